"""Handlers for the brief job types (filled in by the brief generator)."""

from __future__ import annotations

from worker.runner import Handler

HANDLERS: dict[str, Handler] = {}
