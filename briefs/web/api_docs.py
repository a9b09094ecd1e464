"""``/api/docs``: the OpenAPI document (``/api/openapi.json``) as a server-rendered page, behind the
console login: every path and method with its summary, parameters, request body and responses, and
the problem types every error's ``type`` points at (``/api/docs#problem-<slug>``). No script, no
inline style, nothing from a CDN."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from briefs.web.problems import PROBLEM_TYPES
from briefs.web.session import require_page
from briefs.web.state import web

router = APIRouter(include_in_schema=False)

METHODS = ("get", "post", "put", "patch", "delete")
PROBLEM_NOTES = {
    "bad-request": "The request cannot be understood as sent.",
    "unauthorized": "No admin token (`Authorization: Bearer …`) and no console session.",
    "forbidden": "A console session changing something without its CSRF token (`X-CSRF-Token`).",
    "not-found": "No such job, user or brief (an id beyond 64 bits finds nothing too).",
    "method-not-allowed": "The path exists, not with this method.",
    "conflict": "The state forbids it: the reason is in `detail` (e.g. a job that is not failed cannot be "
                "retried; a brief that exists carries `brief_url`; one already queued carries `job_id`).",
    "validation": "A field is invalid: `errors` lists each (`field`, `message`).",
    "unavailable": "The database or a computation is unavailable; try again.",
    "internal": "An unexpected error; the server log has the details.",
}


def _schema_name(schema: dict[str, Any] | None) -> str:
    if not schema:
        return ""
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    if schema.get("type") == "object" and "title" in schema:  # a model written inline (ProblemDetails)
        return str(schema["title"])
    if "anyOf" in schema:
        return " | ".join(_schema_name(s) for s in schema["anyOf"])
    if schema.get("type") == "array":
        return f"array of {_schema_name(schema.get('items'))}"
    kind = str(schema.get("type", "any"))
    if "enum" in schema:
        kind += " (" + ", ".join(str(v) for v in schema["enum"]) + ")"
    return kind


def _response_type(response: dict[str, Any]) -> str:
    """The body of a response: its media type when not JSON (problem+json, HTML), and its schema."""
    content = response.get("content", {})
    for media, spec in content.items():
        name = _schema_name(spec.get("schema"))
        return name if media == "application/json" else f"{media}: {name}" if name else media
    return ""


def _operation(path: str, method: str, op: dict[str, Any]) -> dict[str, Any]:
    body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
    return {
        "path": path,
        "method": method.upper(),
        "anchor": f"{method}-{path}".replace("/", "-").replace("{", "").replace("}", ""),
        "summary": op.get("summary", ""),
        "description": op.get("description", ""),
        "parameters": [{"name": p.get("name"), "where": p.get("in"), "required": p.get("required", False),
                        "type": _schema_name(p.get("schema")), "description": p.get("description", "")}
                       for p in op.get("parameters", [])],
        "body": _schema_name(body) if body else None,
        "responses": [{"status": code, "description": r.get("description", ""), "type": _response_type(r)}
                      for code, r in op.get("responses", {}).items()],
    }


def operations(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [_operation(path, method, op) for path, item in spec.get("paths", {}).items()
            for method, op in item.items() if method in METHODS]


@router.get("/api/docs", dependencies=[Depends(require_page)])
async def api_docs(request: Request) -> Response:
    spec = request.app.openapi()
    problems = [{"slug": slug, "status": status, "title": title, "note": PROBLEM_NOTES.get(slug, "")}
                for slug, (status, title) in PROBLEM_TYPES.items()]
    schemas = sorted(spec.get("components", {}).get("schemas", {}).items())
    return web(request).pages.render(request, "api_docs.html", info=spec.get("info", {}),
                                     operations=operations(spec), problems=problems, schemas=schemas,
                                     schema_name=_schema_name)
