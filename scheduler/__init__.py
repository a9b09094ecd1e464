"""Scheduler: plans brief jobs for every user at each tick."""

import briefs  # noqa: F401  (importing briefs pins timezone rules to the tzdata package)
