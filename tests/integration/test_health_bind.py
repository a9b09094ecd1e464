"""A health server that cannot listen (port taken, host unknown or malformed) is one clear refusal."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from briefs.db import ConfigError, Database
from briefs.health import HealthServer


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize("host", ["127.0.0.1", "no such\nhost", "in valid", "a" * 300])
async def test_a_health_server_that_cannot_listen_says_where_and_why(db: Database, taken_port: int, host: str) -> None:
    # Before: OSError, socket.gaierror or UnicodeError escaped as "unexpected …" from every service.
    server = HealthServer(db, taken_port, host=host)
    with pytest.raises(ConfigError) as err:
        await server.start()
    message = str(err.value)
    assert message.startswith("cannot serve health checks on ")
    assert "(BRIEFS_HEALTH_HOST, BRIEFS_HEALTH_PORT): " in message
    assert "\n" not in message and len(message) < 500
    await server.stop()


def test_the_worker_refuses_a_taken_health_port_in_one_line(
    clean_db: str, taken_port: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from briefs.app.cli import main

    monkeypatch.setenv("BRIEFS_ENV_FILE", "")
    monkeypatch.setenv("DATABASE_URL", clean_db)
    monkeypatch.setenv("BRIEFS_HEALTH_HOST", "127.0.0.1")
    monkeypatch.setenv("BRIEFS_HEALTH_PORT", str(taken_port))
    assert main(["worker", "--burst"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"briefs: error: cannot serve health checks on 127.0.0.1:{taken_port} ")
    assert "unexpected" not in err[-1]
