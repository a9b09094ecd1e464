"""Scheduler: plans brief jobs for every user at each tick."""
