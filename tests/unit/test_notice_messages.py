"""Rollover notices without I/O: the message, destination identity, NOTICE_URLS parsing."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from listener.config import ConfigError, Settings
from listener.destinations import load_destinations, split_urls
from listener.notices import Facts, duration, render, retry_delay, sample_message

START = datetime(2026, 12, 1, 5, 0, tzinfo=UTC)  # midnight in New York (EST)
SECRET = "TokZyxwvUtsrQpOnmlKjih"


def facts(**changes: object) -> Facts:
    """A New York period whose rollover completed 4 min 12 s in."""
    values: dict[str, object] = {
        "period": "2026-12",
        "period_start": START,
        "zone": "America/New_York",
        "observed_at": datetime(2026, 12, 1, 5, 5, tzinfo=UTC),
        "stale_users": 0,
        "resets_by_source": {"bulk": 9000, "trigger": 40, "function": 2},
        "last_reset_at": datetime(2026, 12, 1, 5, 4, 12, tzinfo=UTC),
        "bulk_runs": {"success": 1, "skipped": 1},
        "bulk_batches": 1,
        "seconds_into_period": 300.0,
    }
    values.update(changes)
    return Facts(**values)  # type: ignore[arg-type]


def test_the_complete_notice_states_every_number() -> None:
    """Period and zone, when it completed, users by path, bulk runs and batches, stale."""
    message = render("complete", facts(), grace_seconds=21600)
    assert (message.title, message.notice_type) == ("Token rollover 2026-12 complete", "success")
    assert message.body.splitlines() == [
        "Period 2026-12 (zone America/New_York), started 2026-12-01 05:00:00 UTC.",
        "Complete 4 min 12 s after the period start (last reset 2026-12-01 05:04:12 UTC).",
        "Users reset: 9042 (bulk 9000, trigger 40, function 2).",
        "Bulk runs this period: 2 (1 skipped, 1 success), 1 batch.",
        "Left stale: 0 users carry last period's usage.",
    ]


def test_a_period_with_nothing_to_reset_says_so() -> None:
    """No reset rows: complete at the period start, no bulk runs."""
    body = render(
        "complete",
        facts(resets_by_source={}, last_reset_at=None, bulk_runs={}, bulk_batches=0),
        grace_seconds=60,
    ).body
    assert "Complete at the period start: nobody carried last period's usage." in body
    assert "Users reset: 0 (bulk 0, trigger 0, function 0)." in body
    assert "Bulk runs this period: none." in body


def test_the_overdue_notice_says_how_late_and_what_to_do() -> None:
    """Past the grace with stale users: a warning naming the count and the remedy."""
    message = render(
        "overdue",
        facts(stale_users=17, seconds_into_period=6 * 3600 + 120, bulk_runs={"failure": 2}),
        grace_seconds=21600,
    )
    assert message.notice_type == "warning"
    assert message.title == "Token rollover 2026-12 NOT complete after the grace period"
    assert (
        "NOT complete 6 h 2 min into the period (grace 6 h 0 min): "
        "17 users still carry last period's usage." in message.body
    )
    assert "token-reset reset" in message.body


def test_frozen_facts_round_trip_through_json() -> None:
    """What one replica freezes is what every other replica renders."""
    original = facts()
    assert Facts.from_json(original.to_json()) == original


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(7, "7 s"), (252, "4 min 12 s"), (21600, "6 h 0 min"), (29 * 86400 + 50000, "29 d 13 h")],
)
def test_durations(seconds: float, text: str) -> None:
    """Short and unambiguous in a chat line."""
    assert duration(seconds) == text


def test_retry_delay_doubles_from_the_base_and_is_capped_at_an_hour() -> None:
    """Jittered within 50-100 % of base * 2^(attempt-1), never above 3600 s."""
    import random  # noqa: PLC0415

    rng = random.Random(7)
    for attempt, ceiling in [(1, 30), (2, 60), (5, 480), (30, 3600)]:
        delay = retry_delay(attempt, 30.0, rng)
        assert ceiling / 2 <= delay <= ceiling


def test_a_destination_is_named_by_hash_and_service_never_by_url() -> None:
    """Label, repr and the digest reveal nothing of the token in the URL."""
    (destination,) = load_destinations((f"mmost://chat.example.com/{SECRET}",))
    assert destination.service == "Mattermost"
    assert destination.label == f"#1 Mattermost {destination.digest[:12]}"
    for text in (destination.label, repr(destination), destination.digest):
        assert SECRET[:8] not in text
    assert destination.scrub(f"POST http://chat.example.com/hooks/{SECRET} failed") == (
        "POST http://***/hooks/*** failed"
    )


def test_notice_urls_split_on_blanks_and_commas_before_a_scheme() -> None:
    """A comma inside one URL (several recipients) does not split it."""
    assert split_urls(" json://a/x,\n mailto://u:p@example.com?to=a@b.c,d@e.f  slack://T/B/C ") == (
        "json://a/x",
        "mailto://u:p@example.com?to=a@b.c,d@e.f",
        "slack://T/B/C",
    )


def test_notice_urls_are_checked_at_start_and_the_error_names_no_secret() -> None:
    """An unknown scheme stops the start naming its position and scheme only; a URL is
    never in the Settings' repr."""
    with pytest.raises(ConfigError, match="NOTICE_URLS") as raised:
        Settings.from_env({"NOTICE_URLS": f"json://ok/x nope://{SECRET}@host/{SECRET}"})
    assert "#2 (nope://…)" in str(raised.value)
    assert SECRET[:8] not in str(raised.value)
    settings = Settings.from_env({"NOTICE_URLS": f"json://127.0.0.1:9/{SECRET}"})
    assert settings.notice_urls == (f"json://127.0.0.1:9/{SECRET}",)
    assert SECRET[:8] not in repr(settings)
    with pytest.raises(ConfigError, match="repeats"):
        Settings.from_env({"NOTICE_URLS": "json://a/x json://a/x"})


def test_the_test_message_is_marked_as_a_test() -> None:
    """`notify --test` must never be mistaken for a real rollover."""
    message = sample_message()
    assert message.title.startswith("TEST from token-reset")
    assert "notify --test" in message.body
