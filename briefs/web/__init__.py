"""The console and HTTP API (one ASGI application): see :mod:`briefs.web.app`."""
