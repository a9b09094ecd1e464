"""The brief-job contract: one payload schema, one key format, one timezone rule, no import side effects."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, date, datetime

import pytest

from briefs import contract
from briefs.contract import (
    BRIEF_JOB,
    EMAIL_JOB,
    BriefPayload,
    BriefRequest,
    EmailRequest,
    InvalidTimezone,
    brief_date_of_key,
    brief_dedup_key,
    email_dedup_key,
    load_timezone,
)
from briefs.errors import PermanentError

NOTIFY = datetime(2026, 3, 10, 8, 15, tzinfo=UTC)


def test_a_request_survives_its_payload_unchanged() -> None:
    request = BriefRequest(7, date(2026, 3, 10), NOTIFY, contract.REENGAGE, email=True, catch_up=True)
    payload = request.to_payload(source="scheduler")
    assert payload == {"user_id": 7, "brief_date": "2026-03-10", "notify_at": "2026-03-10T08:15:00Z",
                       "engagement_stage": "re_engagement", "email": True, "catch_up": True, "force": False,
                       "resend_email": False, "source": "scheduler"}
    assert BriefRequest.from_payload(payload) == request
    assert BriefPayload.model_validate(payload).source == "scheduler"
    assert request.dedup_key == "brief:7:2026-03-10"
    email = EmailRequest(7, date(2026, 3, 10), 99)
    assert EmailRequest.from_payload(email.to_payload()) == email and email.dedup_key == "email:7:2026-03-10"


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ([1, 2], "generate_daily_brief: payload must be a JSON object, got array"),
        ({"brief_date": "2026-03-10"}, "generate_daily_brief: user_id is missing"),
        ({"user_id": True, "brief_date": "2026-03-10"}, "user_id must be a positive integer, got True"),
        ({"user_id": "7", "brief_date": "2026-03-10"}, "user_id must be a positive integer, got '7'"),
        ({"user_id": 7, "brief_date": "20260310"}, "brief_date must be YYYY-MM-DD, got '20260310'"),
        ({"user_id": 7, "brief_date": "2026-02-30"}, "brief_date must be YYYY-MM-DD"),
        ({"user_id": 7, "brief_date": "2026-03-1\u0661"}, "brief_date must be YYYY-MM-DD"),
        ({"user_id": 7, "brief_date": "2026-03-10", "notify_at": "08:15"}, "notify_at is not ISO 8601"),
        ({"user_id": 7, "brief_date": "2026-03-10", "notify_at": "2026-03-10T08:15"}, "notify_at has no UTC offset"),
        ({"user_id": 7, "brief_date": "2026-03-10", "email": "yes"}, "email must be true or false, got 'yes'"),
        ({"user_id": 7, "brief_date": "9999-12-31"}, "brief_date 9999-12-31 is outside the dates a brief can cover"),
    ],
)
def test_a_bad_payload_is_permanent_and_names_the_field(payload: object, message: str) -> None:
    with pytest.raises(PermanentError) as caught:
        BriefRequest.from_payload(payload)
    assert message in str(caught.value)
    assert len(str(caught.value)) < 300


def test_the_job_row_fills_gaps_and_must_agree() -> None:
    request = BriefRequest.from_payload({"brief_date": "2026-03-10"}, user_id=7, notify_at=NOTIFY)
    assert (request.user_id, request.notify_at) == (7, NOTIFY)
    with pytest.raises(PermanentError, match=r"the payload's user_id 8 is not the job's \(7\)"):
        BriefRequest.from_payload({"user_id": 8, "brief_date": "2026-03-10"}, user_id=7)
    with pytest.raises(PermanentError, match="send_brief_email: brief_id must be a positive integer"):
        EmailRequest.from_payload({"user_id": 7, "brief_date": "2026-03-10", "brief_id": 0})


def test_an_unknown_stage_reads_as_standard() -> None:
    request = BriefRequest.from_payload({"user_id": 7, "brief_date": "2026-03-10", "engagement_stage": "x" * 10_000})
    assert request.engagement_stage == contract.STANDARD


def test_keys_are_written_and_read_back_in_one_form_only() -> None:
    assert brief_dedup_key(7, date(2026, 3, 10)) == "brief:7:2026-03-10"
    assert email_dedup_key(7, date(2026, 3, 10)) == "email:7:2026-03-10"
    assert brief_date_of_key("brief:7:2026-03-10", 7) == date(2026, 3, 10)
    for key in ("brief:7:2026-03-10", "brief:7:20260310", "brief:07:2026-03-10", "brief:7:2026-03-10:x", ""):
        assert brief_date_of_key(key, 8 if key == "brief:7:2026-03-10" else 7) is None, key
    assert BRIEF_JOB == "generate_daily_brief" and EMAIL_JOB == "send_brief_email"  # the table contract


def test_zones_come_from_the_tzdata_package_one_object_per_name() -> None:
    paris = load_timezone("Europe/Paris")
    assert paris is load_timezone("Europe/Paris") and paris.key == "Europe/Paris"
    assert datetime(2026, 7, 1, 12, tzinfo=paris).utcoffset().total_seconds() == 7200
    for bad in ("Factory", "europe/paris", "../etc/passwd", "/etc/localtime", "", "x" * 100, None, 5):
        with pytest.raises(InvalidTimezone):
            load_timezone(bad)


def test_importing_the_packages_leaves_the_process_zoneinfo_search_path_alone() -> None:
    code = (
        "import zoneinfo; before = zoneinfo.TZPATH\n"
        "import briefs, briefs.contract, scheduler.plan, scheduler.tick, worker.runner\n"
        "assert zoneinfo.TZPATH == before, (before, zoneinfo.TZPATH)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
