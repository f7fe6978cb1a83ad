"""The alert the listener pushes to Alertmanager: fixed labels, readable annotations."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from listener.alertmanager import ALERT_LABELS, alert_body
from listener.assessment import Snapshot, assess
from listener.config import ConfigError, Settings

START = datetime(2026, 11, 1, tzinfo=UTC)


def test_labels_are_the_same_on_every_replica() -> None:
    """No instance label: replicas send identical alerts, Alertmanager keeps one."""
    snapshot = Snapshot(START, "2026-11", 12, 0, None, True)
    now = START + timedelta(hours=7)
    body = alert_body(assess(snapshot, now, 6 * 3600), starts_at=now, ends_at=now)
    assert body["labels"] == {
        "alertname": "TokenResetMissedMonth",
        "severity": "page",
        "service": "token-reset",
    }
    assert body["labels"] is not ALERT_LABELS, "a copy, so nobody mutates the constant"
    assert body["startsAt"] == "2026-11-01T07:00:00+00:00"


def test_description_says_what_is_wrong_and_what_to_do() -> None:
    """The page text names the period, the time into it, the counts and the fix."""
    snapshot = Snapshot(START, "2026-11", 12, 0, None, True)
    now = START + timedelta(hours=7)
    body = alert_body(assess(snapshot, now, 6 * 3600), starts_at=now, ends_at=now)
    description = body["annotations"]["description"]
    assert description.startswith("Period 2026-11, 7.0 h in (grace 6.0 h): 12 users still")
    assert "reset_monthly_tokens_for_all_users()" in description
    late = alert_body(
        assess(snapshot, START + timedelta(days=23, hours=4), 5), starts_at=now, ends_at=now
    )
    assert "23 d 4 h in (grace 5 s)" in late["annotations"]["description"]


def test_alertmanager_url_needs_a_scheme_and_is_not_echoed() -> None:
    """'am:9093' would fail on every push; refuse it at start, without printing secrets."""
    with pytest.raises(ConfigError, match="ALERTMANAGER_URL") as error:
        Settings.from_env({"ALERTMANAGER_URL": "user:s3cret-pass@am:9093"})
    assert "s3cret" not in str(error.value)
    ok = Settings.from_env({"ALERTMANAGER_URL": "https://am.example:9093"})
    assert ok.alertmanager_url == "https://am.example:9093"
