"""Who may use the API: the admin token, or the console's session (its CSRF token to change anything);
the OpenAPI document and its browsable form."""

from __future__ import annotations

import httpx

from tests.web.conftest import TOKEN, Console, Data, problem


async def test_no_token_wrong_token_and_the_right_one(anon: httpx.AsyncClient, client: httpx.AsyncClient) -> None:
    body = problem(await anon.get("/api/v1/jobs"), 401)
    assert body["type"] == "/api/docs#problem-unauthorized"
    assert (await anon.get("/api/v1/jobs")).headers["www-authenticate"].startswith("Bearer")
    for header in (f"Bearer {TOKEN}x", f"Basic {TOKEN}", TOKEN, "Bearer "):
        problem(await anon.get("/api/v1/jobs", headers={"Authorization": header}), 401)
    problem(await anon.post("/api/v1/jobs/1/cancel"), 401)
    assert (await client.get("/api/v1/jobs")).status_code == 200


async def test_a_console_session_reads_and_changes_with_its_csrf_token(console: Console, data: Data) -> None:
    job = await data.job()
    assert (await console.client.get(f"/api/v1/jobs/{job}")).status_code == 200
    body = problem(await console.client.post(f"/api/v1/jobs/{job}/cancel"), 403)
    assert "X-CSRF-Token" in body["detail"]
    problem(await console.client.post(f"/api/v1/jobs/{job}/cancel", headers={"X-CSRF-Token": "nope"}), 403)
    ok = await console.client.post(f"/api/v1/jobs/{job}/cancel", headers={"X-CSRF-Token": console.csrf})
    assert ok.status_code == 200 and ok.json() == {"id": job, "status": "cancelled"}


async def test_the_openapi_document_lists_every_path(anon: httpx.AsyncClient) -> None:
    response = await anon.get("/api/openapi.json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    expected = {
        "/api/v1/stats": {"get"}, "/api/v1/jobs": {"get"}, "/api/v1/jobs/{job_id}": {"get"},
        "/api/v1/jobs/retry": {"post"}, "/api/v1/jobs/{job_id}/retry": {"post"},
        "/api/v1/jobs/{job_id}/cancel": {"post"}, "/api/v1/users": {"get", "post"},
        "/api/v1/users/{user_id}": {"get", "patch"}, "/api/v1/users/{user_id}/preference": {"put"},
        "/api/v1/users/{user_id}/schedule": {"get"}, "/api/v1/users/{user_id}/briefs": {"get", "post"},
        "/api/v1/users/{user_id}/briefs/{brief_date}": {"get"},
        "/api/v1/users/{user_id}/briefs/{brief_date}/email.html": {"get"},
        "/api/v1/users/{user_id}/briefs/{brief_date}/email.txt": {"get"},
    }
    for path, methods in expected.items():
        assert set(paths[path]) == methods, path
        assert all(paths[path][m].get("summary") for m in methods), path
    # Problems are documented with the media type they are sent with, and only that one.
    missing = paths["/api/v1/jobs/{job_id}"]["get"]["responses"]["404"]["content"]
    assert list(missing) == ["application/problem+json"]
    assert set(missing["application/problem+json"]["schema"]["properties"]) >= {"type", "title", "status", "detail"}


async def test_the_docs_page_is_behind_the_login_and_lists_paths_and_problem_types(
    anon: httpx.AsyncClient, console: Console
) -> None:
    redirect = await anon.get("/api/docs")
    assert redirect.status_code == 303 and redirect.headers["location"].startswith("/login")
    page = await console.client.get("/api/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert "/api/v1/users/{user_id}/schedule" in html and 'id="problem-validation"' in html
    assert 'id="problem-conflict"' in html and "<script>" not in html and "style=" not in html
    assert "application/problem+json: ProblemDetails" in html
