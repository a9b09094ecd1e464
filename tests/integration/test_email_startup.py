"""Email settings that cannot work are said once at worker startup, not first discovered job by job."""

from __future__ import annotations

import logging

import pytest

from briefs.app.host import Host
from briefs.app.services import WorkerService
from briefs.db import Database
from briefs.settings import Settings
from tests.conftest import make_settings

KEY = "k" * 40


async def serve(settings: Settings, db: Database) -> None:
    """A burst worker in the process host, as `briefs worker --burst` runs it (no signals: a test)."""

    async def build(db: Database, resources: dict[str, object]) -> list[WorkerService]:
        return [WorkerService(db, settings, resources, burst=True)]

    await Host(settings, db=db, signals=False).run(build)


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ({"smtp_url": "smtp://u:pw-secret-5@mail.example:99999"}, "BRIEFS_SMTP_URL is not a valid URL"),
        ({"smtp_url": "ftp://mail.example"}, "unsupported scheme 'ftp'"),
        ({"smtp_url": "smtp://mail.example", "email_from": "a@b.c\r\nBcc: x@y.z"}, "BRIEFS_EMAIL_FROM"),
        ({"smtp_url": "smtp://mail.example", "secret_key": None}, "BRIEFS_SECRET_KEY"),
    ],
)
async def test_the_worker_says_at_startup_that_email_cannot_work(
    db: Database, database_url: str, overrides: dict[str, object], says: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(database_url, **{"secret_key": KEY, **overrides})
    with caplog.at_level(logging.ERROR, logger="briefs.jobs"):
        await serve(settings, db)  # still starts, and drains
    [record] = [r for r in caplog.records if r.name == "briefs.jobs"]
    assert "email is configured but cannot work" in record.getMessage() and says in record.getMessage()
    assert "pw-secret-5" not in record.getMessage()


async def test_no_word_when_email_is_off_or_fine(
    db: Database, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    for settings in (make_settings(database_url), make_settings(database_url, smtp_url="smtp://127.0.0.1:25",
                                                                secret_key=KEY)):
        with caplog.at_level(logging.ERROR, logger="briefs.jobs"):
            await serve(settings, db)
    assert not [r for r in caplog.records if r.name == "briefs.jobs"]
