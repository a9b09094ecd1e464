"""The console and HTTP API: one ASGI application (FastAPI), served by ``briefs web`` and ``briefs run``.

* ``/api/v1/…``: the JSON API (:mod:`briefs.web.api`), Bearer token or console session; errors are
  ``application/problem+json`` (:mod:`briefs.web.problems`); the OpenAPI document is
  ``/api/openapi.json`` and its browsable form ``/api/docs``.
* ``/``, ``/jobs``, ``/users``, …: the console's pages (:mod:`briefs.web.console`), behind the login.
* ``/u/<token>``: the unsubscribe page every email links to (:mod:`briefs.web.unsubscribe`), no login.
* ``/healthz``, ``/readyz`` (no login), ``/metrics`` (login unless ``BRIEFS_METRICS_PUBLIC``).
* ``/static/…``: every asset the pages use (no CDN).

Every response carries the security headers of :class:`briefs.web.security.SecurityHeaders`.
"""

from __future__ import annotations

import asyncio
from importlib import resources

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from briefs.db import Database
from briefs.health import HealthServer
from briefs.settings import Settings
from briefs.web import api, console, login, unsubscribe
from briefs.web import problems as problems_mod
from briefs.web.pages import Pages
from briefs.web.security import AdminAuth, SecurityHeaders
from briefs.web.session import LoginRequired, login_url, require_api
from briefs.web.state import WebState

VERSION = "1"


def create_app(db: Database, settings: Settings, auth: AdminAuth) -> FastAPI:
    """The application over ``db``; ``auth`` holds the admin token (configured, or made at start)."""
    app = FastAPI(
        title="briefs",
        version=VERSION,
        summary="Daily AI briefs: the queue, the users, their schedules and briefs.",
        openapi_url="/api/openapi.json",
        docs_url=None,  # the stock docs load their scripts from a CDN: /api/docs is served here instead
        redoc_url=None,
    )
    pages = Pages()
    app.state.web = WebState(db, settings, auth, pages, HealthServer(db, 0))
    app.state.render_error = pages.error
    problems_mod.install(app)
    app.add_exception_handler(LoginRequired, _to_login)
    app.add_middleware(SecurityHeaders)
    app.include_router(_health_routes())
    app.include_router(api.router)
    app.include_router(login.router)
    app.include_router(unsubscribe.router)
    app.include_router(console.router)
    static = resources.files("briefs.web") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    return app


async def close_app(app: FastAPI) -> None:
    """Close what the application holds of its own (the health checks' connection)."""
    await app.state.web.health.stop()


async def _to_login(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LoginRequired)
    return RedirectResponse(login_url(exc.next_path), status_code=303)


def _health_routes() -> APIRouter:
    router = APIRouter(include_in_schema=True, tags=["health"])

    @router.get("/healthz", summary="Liveness: the database answers")
    async def healthz(request: Request) -> JSONResponse:
        ok, body = await request.app.state.web.health.health(ready=False)
        return JSONResponse(body, 200 if ok else 503)

    @router.get("/readyz", summary="Readiness: the database answers and is migrated")
    async def readyz(request: Request) -> JSONResponse:
        ok, body = await request.app.state.web.health.health(ready=True)
        return JSONResponse(body, 200 if ok else 503)

    @router.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics(request: Request) -> Response:
        web: WebState = request.app.state.web
        if not web.settings.metrics_public:
            await require_api(request)
        await web.health.refresh_queue_gauges()
        body = await asyncio.to_thread(generate_latest)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return router
