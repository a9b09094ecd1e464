"""Command-line arguments that used to be misread or to escape as an unexpected error."""

from __future__ import annotations

import pytest

from briefs.app.cli import main


@pytest.mark.parametrize(
    "argv",
    [
        # int() reads digits of every script and underscores: '١' was user 1, '９' job 9.
        ["show", "١"],
        ["retry", "９"],
        ["cancel", "1_0"],
        ["jobs", "--limit", "١٠"],
        ["show", " 7"],
        ["show", "+7"],
    ],
)
def test_ids_and_counts_are_ascii_digits(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("briefs: error: argument ") and "not a number" in err and "digits 0-9 only" in err


@pytest.mark.parametrize("now", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"])
def test_an_instant_outside_utc_range_is_a_usage_error(
    now: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: "unexpected OverflowError: date value out of range" (exit 1).
    monkeypatch.setenv("BRIEFS_ENV_FILE", "")
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    assert main(["schedule", "--once", "--now", now]) == 2
    err = capsys.readouterr().err
    assert err == f"briefs: error: the instant {now!r} is out of range in UTC (years 1 to 9999)\n"


def test_worker_slots_are_bounded_like_the_setting(capsys: pytest.CaptureFixture[str]) -> None:
    # --concurrency took up to 2**63 - 1 while BRIEFS_WORKER_CONCURRENCY stops at 100,000.
    with pytest.raises(SystemExit) as exit_:
        main(["worker", "--concurrency", "9223372036854775807"])
    assert exit_.value.code == 2
    assert "at most 100000 slots" in capsys.readouterr().err
