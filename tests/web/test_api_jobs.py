"""``/api/v1/jobs``: keyset pages that new rows never disturb, one job whole (whatever its row holds),
and retry and cancel with the queue's rules (409 bodies say why)."""

from __future__ import annotations

import httpx

from tests.web.conftest import Data, problem


async def _all_pages(client: httpx.AsyncClient, url: str) -> list[int]:
    ids: list[int] = []
    cursor = None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        body = (await client.get(url, params=params)).json()
        ids += [job["id"] for job in body["items"]]
        cursor = body["next_cursor"]
        if cursor is None:
            return ids


async def test_pages_continue_where_they_ended_while_new_jobs_arrive(client: httpx.AsyncClient, data: Data) -> None:
    old = [await data.job() for _ in range(5)]
    first = (await client.get("/api/v1/jobs", params={"limit": 2})).json()
    assert [j["id"] for j in first["items"]] == [old[4], old[3]] and first["next_cursor"]
    new = [await data.job() for _ in range(3)]  # newer rows arrive between the pages
    second = (await client.get("/api/v1/jobs", params={"limit": 2, "cursor": first["next_cursor"]})).json()
    assert [j["id"] for j in second["items"]] == [old[2], old[1]]
    third = (await client.get("/api/v1/jobs", params={"limit": 2, "cursor": second["next_cursor"]})).json()
    assert [j["id"] for j in third["items"]] == [old[0]] and third["next_cursor"] is None
    assert await _all_pages(client, "/api/v1/jobs") == sorted(old + new, reverse=True)


async def test_filters_by_status_type_and_user(client: httpx.AsyncClient, data: Data) -> None:
    uid = await data.user()
    failed = await data.job("a", status="failed", user_id=uid)
    await data.job("b", status="failed")
    await data.job("a", status="pending", user_id=uid)
    body = (await client.get("/api/v1/jobs", params={"status": "failed", "type": "a", "user_id": uid})).json()
    assert [j["id"] for j in body["items"]] == [failed]
    problem(await client.get("/api/v1/jobs", params={"status": "dead"}), 422)
    for bad in ("x" * 201, "%%%"):
        body = problem(await client.get("/api/v1/jobs", params={"cursor": bad}), 422)
        assert body["errors"][0]["field"] == "query.cursor"
    problem(await client.get("/api/v1/jobs", params={"limit": 0}), 422)
    problem(await client.get("/api/v1/jobs", params={"limit": 201}), 422)
    problem(await client.get("/api/v1/jobs", params={"type": "a\x00b"}), 422)  # PostgreSQL text has no NUL
    problem(await client.post("/api/v1/jobs/retry", params={"type": "\x00"}), 422)
    problem(await client.get("/api/v1/users", params={"query": "a\x00"}), 422)


async def test_a_job_due_at_infinity_is_listed_and_shown(client: httpx.AsyncClient, data: Data) -> None:
    job = await data.job(run_at="infinity", payload={"deep": [1, {"x": "<b>"}]}, progress='{"step": 2}')
    listed = (await client.get("/api/v1/jobs")).json()["items"]
    assert listed[0]["id"] == job and listed[0]["run_at"] == "infinity"
    shown = (await client.get(f"/api/v1/jobs/{job}")).json()
    assert shown["run_at"] == "infinity" and shown["payload"] == {"deep": [1, {"x": "<b>"}]}
    assert shown["progress"] == {"step": 2} and shown["result"] is None and shown["status"] == "pending"
    past = await data.job(run_at="-infinity")
    assert (await client.get(f"/api/v1/jobs/{past}")).json()["run_at"] == "-infinity"
    assert (await client.get("/api/v1/stats")).status_code == 200


async def test_unknown_and_impossible_ids_are_not_found(client: httpx.AsyncClient) -> None:
    for job_id in ("1", "9223372036854775807", "9223372036854775808", "-9223372036854775809", "1" * 40):
        problem(await client.get(f"/api/v1/jobs/{job_id}"), 404)
        problem(await client.post(f"/api/v1/jobs/{job_id}/retry"), 404)
        problem(await client.post(f"/api/v1/jobs/{job_id}/cancel"), 404)
    problem(await client.get("/api/v1/jobs/abc"), 422)


async def test_retry_and_cancel_follow_the_queue_rules(client: httpx.AsyncClient, data: Data) -> None:
    pending, failed, done = await data.job(), await data.job(status="failed"), await data.job(status="completed")
    body = problem(await client.post(f"/api/v1/jobs/{pending}/retry"), 409)
    assert "is pending; only failed or cancelled jobs can be retried" in body["detail"]
    body = problem(await client.post(f"/api/v1/jobs/{done}/cancel"), 409)
    assert "is completed; only pending or processing jobs can be cancelled" in body["detail"]
    assert (await client.post(f"/api/v1/jobs/{failed}/retry")).json() == {"retried": [failed]}
    assert (await client.get(f"/api/v1/jobs/{failed}")).json()["status"] == "pending"
    assert (await client.post(f"/api/v1/jobs/{pending}/cancel")).json()["status"] == "cancelled"
    problem(await client.post(f"/api/v1/jobs/{pending}/cancel"), 409)
    assert (await client.post(f"/api/v1/jobs/{pending}/retry")).json() == {"retried": [pending]}


async def test_retry_every_failed_job_of_one_type(client: httpx.AsyncClient, data: Data) -> None:
    a1, a2 = await data.job("a", status="failed"), await data.job("a", status="failed")
    b1 = await data.job("b", status="failed")
    a_cancelled = await data.job("a", status="cancelled")
    assert (await client.post("/api/v1/jobs/retry", params={"type": "a"})).json() == {"retried": [a1, a2]}
    assert (await client.get(f"/api/v1/jobs/{b1}")).json()["status"] == "failed"
    assert (await client.get(f"/api/v1/jobs/{a_cancelled}")).json()["status"] == "cancelled"
    problem(await client.post("/api/v1/jobs/retry"), 422)  # the type is required
    assert (await client.post("/api/v1/jobs/retry", params={"type": "a'; DROP TABLE x"})).json() == {"retried": []}
