"""``briefs run --demo``: seed the demo users, and print the first brief the moment it is made."""

from __future__ import annotations

import asyncio
import logging
import secrets
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

from pydantic import SecretStr

from briefs.app.host import Watch
from briefs.db import Database
from briefs.demo import seed, todays_brief_made
from briefs.jobs import settings_enqueue_hook
from briefs.logs import register_secret
from briefs.progress import Progress
from briefs.service import load_brief_markdown, queue_brief
from briefs.settings import Settings
from briefs.terminal import printable

log = logging.getLogger(__name__)


def demo_settings(settings: Settings) -> Settings:
    """The demo must work unconfigured: email links are signed, so without BRIEFS_SECRET_KEY
    this process signs with a random key of its own (links from this run stop working after it)."""
    if settings.secret_key is not None:
        return settings
    key = secrets.token_urlsafe(32)
    register_secret(key)
    log.debug("demo: BRIEFS_SECRET_KEY is unset; signing this process's email links with a random key")
    return settings.model_copy(update={"secret_key": SecretStr(key)})


def demo_public_url(settings: Settings, console: str) -> Settings:
    """Without BRIEFS_PUBLIC_URL, the demo's emails link to this run's console (its unsubscribe page)."""
    if settings.public_url:
        return settings
    return settings.model_copy(update={"public_url": console})


async def seed_demo(db: Database, settings: Settings, *, console: str | None = None) -> int:
    """Seed the demo users and make sure a brief for the first one is on its way; return its user id.

    The first run's brief comes from the scheduler (due a minute from now). On a second
    run the same day, today's brief already exists and the scheduler rightly will not
    make it again, so a fresh one is queued now (forced) and the banner says so.
    """
    now = datetime.now(UTC)
    with Progress("seeding demo users", stream=sys.stderr) as bar:
        async with db.raw() as conn:
            users = await seed(conn, now, on_user=lambda i, n, email: bar.update(i, n, email))
    first_id, email, when = users[0]
    brief_date = await todays_brief_made(db, first_id, when)
    if brief_date is None:
        how = (
            f"wants a brief at {when:%H:%M:%S} UTC, a minute from now.\n"
            "      Briefs are generated ahead of the user's time, so it appears here in a few seconds."
        )
    else:
        hook = settings_enqueue_hook(settings)
        await queue_brief(db, settings, first_id, brief_date, force=True, enqueue=hook, now=now)
        how = (
            f"already has today's brief ({brief_date}) from an earlier demo run,\n"
            "      so a fresh one is being made now (regenerated, not re-mailed); it appears here in a few seconds."
        )
    watch = f"the console ({console}/users/{first_id}), " if console else ""
    print(
        f"demo: {len(users)} users ready; {email} (user {first_id}) {how}\n"
        f"      Watch it: {watch}`briefs status`, `briefs jobs`; read it: `briefs show {first_id}`.",
        flush=True,
    )
    return first_id


class DemoService:
    """Prints the demo user's brief as soon as one finishes after the demo started, then returns."""

    name = "demo"
    essential = False  # the process keeps running after the brief is shown

    def __init__(
        self, db: Database, user_id: int, since: datetime, poll: float = 1.0, *, console: str | None = None
    ) -> None:
        self.db, self.user_id, self.since, self.poll, self.console = db, user_id, since, poll, console

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.poll)
            try:
                found = await self._finished_brief()
            except Exception:
                log.debug("demo: brief not readable yet", exc_info=True)
                continue
            if found is not None:
                day, text = found
                uid = self.user_id
                print(f"\n===== brief for user {uid}, {day} =====\n{printable(text)}\n=====", flush=True)
                seen = (f" In the console: {self.console}/users/{uid}/briefs/{day}." if self.console else "")
                print(f"demo: that was `briefs show {uid}`.{seen} `briefs status` shows the queue. Ctrl-C stops.",
                      flush=True)
                return

    async def _finished_brief(self) -> tuple[object, str] | None:
        async with self.db.raw() as conn:
            cur = await conn.execute(
                """SELECT brief_date FROM daily_briefs
                   WHERE user_id = %s AND status IN ('completed', 'partial') AND completed_at >= %s
                   ORDER BY completed_at DESC LIMIT 1""",
                (self.user_id, self.since),
            )
            row = await cur.fetchone()
        if row is None:
            return None
        (day,) = row
        return day, await load_brief_markdown(self.db, self.user_id, day) or ""

    def stop(self) -> None:
        """Nothing to finish: the host cancels it."""

    def abort(self) -> None:
        """Nothing to finish: the host cancels it."""

    def watches(self) -> Sequence[Watch]:
        return []
