"""The watchdog's judgement, driven directly with crafted snapshots (no database, no I/O)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from structlog.testing import capture_logs

from listener.assessment import Snapshot, assess
from listener.watchdog import AlertTracker

PERIOD_START = datetime(2026, 11, 1, tzinfo=UTC)
GRACE = 6 * 3600.0


def snapshot(
    *, stale_users: int = 0, month_resets: int = 10, previous_period_had_usage: bool = True
) -> Snapshot:
    """A November 2026 snapshot; healthy unless told otherwise."""
    return Snapshot(
        period_start=PERIOD_START,
        period_label="2026-11",
        stale_users=stale_users,
        month_resets=month_resets,
        last_reset_at=PERIOD_START + timedelta(minutes=5) if month_resets else None,
        previous_period_had_usage=previous_period_had_usage,
    )


def into_period(hours: float) -> datetime:
    """The listener's clock, `hours` after the period start."""
    return PERIOD_START + timedelta(hours=hours)


def test_inside_grace_stale_users_do_not_alert() -> None:
    """Right after midnight on the 1st every active user is stale: that is not a page."""
    result = assess(snapshot(stale_users=120, month_resets=0), into_period(5.99), GRACE)
    assert result.in_grace
    assert result.reasons == ("stale_users", "no_resets")
    assert not result.missed


def test_after_grace_stale_users_alert() -> None:
    """Past the grace period, users still carrying last month's usage mean a missed reset."""
    result = assess(snapshot(stale_users=3), into_period(6.01), GRACE)
    assert result.missed
    assert result.reasons == ("stale_users",)


def test_exactly_at_grace_is_still_grace() -> None:
    """The alert needs *more than* the grace period; the boundary itself stays quiet."""
    assert not assess(snapshot(stale_users=3), into_period(6), GRACE).missed


def test_zero_resets_although_last_month_had_usage_alerts() -> None:
    """Nobody stale but no reset row either: usage was cleared outside the ledger path."""
    result = assess(snapshot(stale_users=0, month_resets=0), into_period(7), GRACE)
    assert result.reasons == ("no_resets",)
    assert result.missed


def test_zero_resets_after_a_month_without_usage_is_fine() -> None:
    """A first month (or a month nobody used tokens) has nothing to reset."""
    quiet = snapshot(month_resets=0, previous_period_had_usage=False)
    result = assess(quiet, into_period(72), GRACE)
    assert result.reasons == ()
    assert not result.missed


def test_healthy_month_does_not_alert() -> None:
    """Resets recorded and nobody stale: no alert however late in the month."""
    assert not assess(snapshot(), into_period(24 * 27), GRACE).missed


def test_month_boundary_is_judged_in_utc_instants() -> None:
    """06:30 in Berlin on the 1st is 05:30 UTC: still inside a 6 h grace of a UTC month."""
    berlin = datetime(2026, 11, 1, 6, 30, tzinfo=ZoneInfo("Europe/Berlin"))
    result = assess(snapshot(stale_users=5), berlin, GRACE)
    assert result.seconds_into_period == 5.5 * 3600
    assert not result.missed


def test_listener_clock_behind_the_database_month_is_grace() -> None:
    """A listener a second behind the new month (clock skew) sees negative time, no page."""
    result = assess(snapshot(stale_users=5), PERIOD_START - timedelta(seconds=1), GRACE)
    assert result.seconds_into_period == -1
    assert not result.missed


def test_naive_time_is_refused() -> None:
    """A naive datetime has no month; refusing it beats guessing a zone."""
    with pytest.raises(ValueError, match="timezone-aware"):
        assess(snapshot(), datetime(2026, 11, 1, 7), GRACE)


def test_alert_clears_when_stale_users_reach_zero() -> None:
    """The bulk reset clears the stale users (and records resets): the alert clears."""
    tracker = AlertTracker()
    now = into_period(7)
    assert tracker.observe(assess(snapshot(stale_users=4), now, GRACE), now) == "raised"
    later = into_period(7.5)
    cleared = replace(snapshot(), stale_users=0, month_resets=4)
    assert tracker.observe(assess(cleared, later, GRACE), later) == "cleared"
    assert not tracker.active


def test_raise_and_clear_log_one_event_each() -> None:
    """An SRE tails one error line when it breaks and one info line when fixed, not a storm."""
    states = [0, 5, 5, 5, 0, 0, 2, 2]
    with capture_logs() as logs:
        tracker = AlertTracker()
        transitions = []
        for minute, stale in enumerate(states):
            now = into_period(7) + timedelta(minutes=minute)
            result = assess(snapshot(stale_users=stale), now, GRACE)
            transitions.append(tracker.observe(result, now))
    assert transitions == [None, "raised", None, None, "cleared", None, "raised", None]
    events = [(entry["event"], entry["log_level"]) for entry in logs]
    assert events == [
        ("missed_reset_alert_raised", "error"),
        ("missed_reset_alert_cleared", "info"),
        ("missed_reset_alert_raised", "error"),
    ]
    assert logs[0]["stale_users"] == 5
    assert logs[0]["reasons"] == ["stale_users"]
    assert logs[1]["active_seconds"] == 180.0
