"""``/api/v1/users``: creating and changing users with the scheduler's rules (one timezone rule), the
preference that reconciles pending jobs at once, and the schedule with what DST does."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import httpx
import pytest

from briefs.contract import MAX_TIMEZONE_CHARS
from briefs.web import state
from scheduler.plan import GAP_SHIFTED, Preference, upcoming
from tests.web.conftest import Data, problem

HOSTILE = "<script>alert(1)</script>"


def _fields(body: dict[str, object]) -> set[object]:
    errors = body["errors"]
    assert isinstance(errors, list)
    return {e["field"] for e in errors}


async def test_create_a_user_and_read_it_back(client: httpx.AsyncClient) -> None:
    created = await client.post("/api/v1/users", json={"name": HOSTILE, "email": "ada@example.com",
                                                        "timezone": "Europe/Paris"})
    assert created.status_code == 201, created.text
    user = created.json()
    assert created.headers["location"] == f"/api/v1/users/{user['id']}"
    assert user["name"] == HOSTILE and user["timezone"] == "Europe/Paris" and user["preference"] is None
    shown = (await client.get(created.headers["location"])).json()
    assert shown["name"] == HOSTILE and shown["engagement"]["tier"] == "standard"
    again = await client.post("/api/v1/users", json={"name": "B", "email": "ada@example.com"})
    assert "already exists" in problem(again, 409)["detail"]


async def test_a_user_shows_their_engagement_and_hostile_stored_values(client: httpx.AsyncClient, data: Data) -> None:
    away = await data.user(last_visit_at=datetime.now(UTC) - timedelta(days=10))
    await data.brief(away, datetime.now(UTC).date() - timedelta(days=1), engagement_stage="re_engagement")
    shown = (await client.get(f"/api/v1/users/{away}")).json()
    assert shown["engagement"]["inactive_days"] == 10 and shown["engagement"]["tier"] == "re_engagement"
    assert shown["engagement"]["latest_brief_stage"] == "re_engagement" and shown["latest_brief"]["status"]
    odd = await data.user(tz="x" * 300)
    await data.one("UPDATE users SET last_visit_at = 'infinity' WHERE id = %s RETURNING id", (odd,))
    body = (await client.get(f"/api/v1/users/{odd}")).json()
    assert body["last_visit_at"] == "infinity" and "too long" in body["engagement"]["reason"]
    assert len(body["timezone"]) < 100
    listed = (await client.get("/api/v1/users", params={"query": str(odd)})).json()["items"]
    assert listed[0]["last_visit_at"] == "infinity"


async def test_invalid_fields_are_named_in_problem_json(client: httpx.AsyncClient) -> None:
    cases = [
        ({"name": "A", "email": "a@example.com", "timezone": "Mars/Olympus"}, "body.timezone", "tz database"),
        ({"name": "A", "email": "a@example.com", "timezone": "x" * 300}, "body.timezone", "too long"),
        ({"name": "A", "email": "not an address", "timezone": "UTC"}, "body.email", "not one valid address"),
        ({"name": "", "email": "a@example.com"}, "body.name", "1 to 200"),
        ({"name": "a\nb", "email": "a@example.com"}, "body.name", "printable"),
        ({"name": "A", "email": "a@example.com", "admin": True}, "body.admin", ""),
    ]
    for payload, field, words in cases:
        body = problem(await client.post("/api/v1/users", json=payload), 422)
        assert body["type"] == "/api/docs#problem-validation" and field in _fields(body), body
        assert words in body["detail"]
        assert "x" * (MAX_TIMEZONE_CHARS + 1) not in str(body)  # the rejected input is not echoed whole
    problem(await client.post("/api/v1/users", content=b"{", headers={"content-type": "application/json"}), 422)


async def test_list_users_by_id_email_or_name_prefix(client: httpx.AsyncClient, data: Data) -> None:
    ada = await data.user("Ada", email="ada@example.com")
    percent = await data.user("9% Bob", email="b_b@example.com")
    await data.user("Bobby", email="bxb@example.com")
    names = {"ada": [ada], "ADA": [ada], str(ada): [ada], "9%": [percent], "9": [percent], "b_b": [percent],
             "%": [], "_": []}
    for query, wanted in names.items():
        body = (await client.get("/api/v1/users", params={"query": query})).json()
        assert [u["id"] for u in body["items"]] == wanted, query
    first = (await client.get("/api/v1/users", params={"limit": 2})).json()
    rest = (await client.get("/api/v1/users", params={"limit": 2, "cursor": first["next_cursor"]})).json()
    assert len(first["items"]) == 2 and len(rest["items"]) == 1 and rest["next_cursor"] is None


async def test_names_and_emails_of_any_length_are_stored_and_found(client: httpx.AsyncClient, data: Data) -> None:
    """The search indexes hold the first 200 characters (a btree entry is at most 2,704 bytes): a longer
    name or email, written by the application that owns users, is stored and found by any prefix."""
    name = "Ä" * 150 + "x" * 5000  # 5,150 characters, over 5 kB in UTF-8
    email = "l" * 3000 + "@example.com"
    long_one = await data.user(name, email=email)
    await data.user("Äaron", email="aaron@example.com")
    for query in (name[:3].lower(), name[:180], name[:320], email[:250].upper()):
        body = (await client.get("/api/v1/users", params={"query": query})).json()
        assert [u["id"] for u in body["items"]] == [long_one], query[:20]
    body = (await client.get("/api/v1/users", params={"query": name[:150] + "y"})).json()
    assert body["items"] == []  # the head matches the index, the rest of the query does not


async def test_patch_a_user(client: httpx.AsyncClient, data: Data) -> None:
    uid = await data.user("Ada")
    changed = await client.patch(f"/api/v1/users/{uid}", json={"name": "Grace", "timezone": "Asia/Kolkata"})
    assert changed.status_code == 200, changed.text
    assert changed.json()["name"] == "Grace" and changed.json()["timezone"] == "Asia/Kolkata"
    assert changed.json()["reconciliation"] is not None
    body = problem(await client.patch(f"/api/v1/users/{uid}", json={"timezone": "Mars/Olympus"}), 422)
    assert "body.timezone" in _fields(body)
    problem(await client.patch(f"/api/v1/users/{uid}", json={}), 422)
    problem(await client.patch(f"/api/v1/users/{uid}", json={"email": None}), 422)
    problem(await client.patch("/api/v1/users/99999", json={"name": "X"}), 404)
    problem(await client.get("/api/v1/users/99999999999999999999999"), 404)


async def test_preference_validation(client: httpx.AsyncClient, data: Data) -> None:
    uid = await data.user()
    cases = [
        ({"frequency": "weekly", "time_of_day": "08:00"}, "body.day_of_week"),
        ({"frequency": "daily", "time_of_day": "08:00", "day_of_week": 2}, "body.day_of_week"),
        ({"frequency": "weekly", "time_of_day": "08:00", "day_of_week": 8}, "body.day_of_week"),
        ({"frequency": "daily", "time_of_day": "24:00"}, "body.time_of_day"),
        ({"frequency": "daily", "time_of_day": "8am"}, "body.time_of_day"),
        ({"frequency": "hourly", "time_of_day": "08:00"}, "body.frequency"),
        ({"frequency": "daily", "time_of_day": "08:00", "is_active": "yes"}, "body.is_active"),
    ]
    for payload, field in cases:
        body = problem(await client.put(f"/api/v1/users/{uid}/preference", json=payload), 422)
        assert field in _fields(body), (payload, body)
    problem(await client.put("/api/v1/users/424242/preference", json={"frequency": "daily", "time_of_day": "08:00"}),
            404)


async def _scheduler_job(data: Data, uid: int, day: date, notify_at: datetime) -> int:
    from briefs.contract import brief_dedup_key

    return await data.job("generate_daily_brief", user_id=uid, run_at=notify_at - timedelta(minutes=10),
                          payload={"user_id": uid, "brief_date": day.isoformat(), "source": "scheduler",
                                   "notify_at": notify_at.isoformat(), "engagement_stage": "standard"},
                          dedup_key=brief_dedup_key(uid, day), notify_at=notify_at, priority=50)


def _midday_zone(now: datetime) -> str:
    """A zone where it is daytime now, so times an hour ahead stay on today's date."""
    for zone in ("UTC", "Asia/Tokyo", "America/New_York", "Asia/Kolkata", "America/Los_Angeles"):
        from zoneinfo import ZoneInfo

        if 2 <= now.astimezone(ZoneInfo(zone)).hour <= 20:
            return zone
    return "Pacific/Auckland"


def _local_hhmm(now: datetime, zone: str, ahead: timedelta) -> str:
    from zoneinfo import ZoneInfo

    return (now + ahead).astimezone(ZoneInfo(zone)).strftime("%H:%M")


async def test_put_preference_moves_then_cancels_the_pending_scheduled_job(
    client: httpx.AsyncClient, data: Data
) -> None:
    now = datetime.now(UTC)
    zone = _midday_zone(now)
    uid = await data.user(tz=zone)
    url = f"/api/v1/users/{uid}/preference"
    soon = _local_hhmm(now, zone, timedelta(minutes=30))
    first = await client.put(url, json={"frequency": "daily", "time_of_day": soon})
    assert first.status_code == 200, first.text
    [enqueued] = first.json()["reconciliation"]["enqueued"]
    job_id = enqueued["job_id"]
    assert first.json()["preference"]["frequency"] == "daily"
    later = _local_hhmm(now, zone, timedelta(minutes=50))
    moved = (await client.put(url, json={"frequency": "daily", "time_of_day": later, "email_enabled": True})).json()
    assert [m["job_id"] for m in moved["reconciliation"]["moved"]] == [job_id]
    job = (await client.get(f"/api/v1/jobs/{job_id}")).json()
    [move] = moved["reconciliation"]["moved"]
    assert job["status"] == "pending" and job["payload"]["notify_at"] == move["notify_at"]
    off = (await client.put(url, json={"frequency": "daily", "time_of_day": later, "is_active": False})).json()
    assert [c["job_id"] for c in off["reconciliation"]["cancelled"]] == [job_id]
    assert (await client.get(f"/api/v1/jobs/{job_id}")).json()["status"] == "cancelled"
    assert off["preference"]["is_active"] is False
    schedule = (await client.get(f"/api/v1/users/{uid}/schedule")).json()
    assert schedule["entries"] == [] and "inactive" in schedule["reason"]


async def test_the_schedule_shows_the_spring_forward_gap(client: httpx.AsyncClient, data: Data) -> None:
    uid = await data.user(tz="America/New_York")
    await data.preference(uid, at=time(2, 30))
    before = datetime.now(UTC)
    response = await client.get(f"/api/v1/users/{uid}/schedule", params={"days": 366})
    after = datetime.now(UTC)
    assert response.status_code == 200, response.text
    body = response.json()
    pref = Preference(uid, "America/New_York", "daily", None, time(2, 30))
    expected = [[u.brief_date.isoformat(), u.dst] for u in upcoming(pref, before, 366)]
    assert [[e["brief_date"], e["dst"]] for e in body["entries"]] in (
        expected, [[u.brief_date.isoformat(), u.dst] for u in upcoming(pref, after, 366)])
    [gap] = [e for e in body["entries"] if e["dst"] == GAP_SHIFTED]
    day = date.fromisoformat(gap["brief_date"])
    assert day.month == 3 and day.isoweekday() == 7 and 8 <= day.day <= 14  # the second Sunday of March
    assert (gap["local_time"], gap["shifted_by_s"], gap["utc_offset"]) == ("03:30:00", 3600, "-04:00")
    assert gap["notify_at"].replace("Z", "+00:00") == f"{day.isoformat()}T07:30:00+00:00"
    ordinary = body["entries"][0]
    assert ordinary["local_time"] == "02:30:00" and ordinary["dst"] in (None, GAP_SHIFTED)


async def test_the_schedule_without_a_usable_preference(client: httpx.AsyncClient, data: Data) -> None:
    none = await data.user()
    body = (await client.get(f"/api/v1/users/{none}/schedule")).json()
    assert body["entries"] == [] and "no brief preference" in body["reason"]
    broken = await data.user(tz="Mars/Olympus")
    await data.preference(broken)
    assert "Mars/Olympus" in problem(await client.get(f"/api/v1/users/{broken}/schedule"), 409)["detail"]
    problem(await client.get(f"/api/v1/users/{none}/schedule", params={"days": 367}), 422)
    problem(await client.get(f"/api/v1/users/{none}/schedule", params={"days": 0}), 422)
    problem(await client.get("/api/v1/users/77777/schedule"), 404)


async def test_a_preference_is_saved_even_when_reconciling_it_fails(
    client: httpx.AsyncClient, data: Data, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The change is committed before the one-user tick runs: a tick that fails is reported, not a 500,
    and the scheduler's next tick reconciles (it reads the saved preference)."""
    async def failing_tick(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the tick failed")

    monkeypatch.setattr(state, "run_tick", failing_tick)
    uid = await data.user()
    done = await client.put(f"/api/v1/users/{uid}/preference", json={"frequency": "daily", "time_of_day": "09:15"})
    assert done.status_code == 200, done.text
    reconciliation = done.json()["reconciliation"]
    assert reconciliation == {"error": "not reconciled now (RuntimeError); the scheduler's next tick will"}
    assert (await client.get(f"/api/v1/users/{uid}")).json()["preference"]["time_of_day"] == "09:15:00"
