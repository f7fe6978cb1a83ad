"""When the built-in schedule is due in UTC (the `HH:MM` form): month boundaries, catch-up."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from listener import slots
from listener.slots import UTC_ZONES

AT = (0, 5)


def daily(at: tuple[int, int]) -> str:
    """The cron expression `HH:MM` stands for."""
    spec = slots.parse_schedule(f"{at[0]:02d}:{at[1]:02d}")
    assert spec is not None
    assert spec.utc
    return spec.expression


def latest_slot(now: datetime, at: tuple[int, int]) -> datetime:
    """The latest daily slot in UTC."""
    return slots.latest_slot(now, daily(at), UTC_ZONES)


def next_due(now: datetime, at: tuple[int, int], served: datetime | None) -> datetime:
    """When the daily UTC schedule is next due."""
    return slots.next_due(now, daily(at), UTC_ZONES, served)


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    """A UTC instant."""
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def test_latest_slot_is_today_after_the_time_and_yesterday_before_it() -> None:
    """00:05 UTC: at 00:04 the latest slot is yesterday's, at 00:05 it is today's."""
    assert latest_slot(datetime(2030, 3, 10, 0, 4, 59, tzinfo=UTC), AT) == utc(2030, 3, 9, 0, 5)
    assert latest_slot(utc(2030, 3, 10, 0, 5), AT) == utc(2030, 3, 10, 0, 5)
    assert latest_slot(utc(2030, 3, 10, 23, 59), AT) == utc(2030, 3, 10, 0, 5)


def test_crossing_a_month_boundary_the_first_slot_is_on_the_first() -> None:
    """31 Jan 23:59 served; the next run is due 1 Feb 00:05, not before."""
    served = utc(2030, 1, 31, 0, 5)
    assert next_due(utc(2030, 1, 31, 23, 59), AT, served) == utc(2030, 2, 1, 0, 5)
    assert next_due(utc(2030, 2, 1, 0, 4), AT, served) == utc(2030, 2, 1, 0, 5)
    assert next_due(utc(2030, 2, 1, 0, 5), AT, served) == utc(2030, 2, 1, 0, 5)


def test_year_and_leap_day_boundaries() -> None:
    """31 Dec -> 1 Jan and 28 Feb -> 29 Feb (leap year) -> 1 Mar."""
    assert next_due(utc(2031, 12, 31, 12), AT, utc(2031, 12, 31, 0, 5)) == utc(2032, 1, 1, 0, 5)
    assert next_due(utc(2032, 2, 28, 12), AT, utc(2032, 2, 28, 0, 5)) == utc(2032, 2, 29, 0, 5)
    assert next_due(utc(2032, 2, 29, 12), AT, utc(2032, 2, 29, 0, 5)) == utc(2032, 3, 1, 0, 5)


def test_served_slot_moves_the_due_time_to_tomorrow() -> None:
    """After today's run, nothing is due until tomorrow's slot."""
    now = utc(2030, 5, 1, 0, 6)
    assert next_due(now, AT, utc(2030, 5, 1, 0, 5)) == utc(2030, 5, 2, 0, 5)


def test_missed_slots_are_caught_up_at_once() -> None:
    """Down for three days: the latest slot is due now (in the past), one run covers it."""
    now = utc(2030, 5, 4, 12)
    due = next_due(now, AT, utc(2030, 5, 1, 0, 5))
    assert due == utc(2030, 5, 4, 0, 5)
    assert due <= now


def test_never_served_is_due_at_the_latest_slot() -> None:
    """A fresh install runs at start (the bulk reset is idempotent, cheap when nothing is stale)."""
    now = utc(2030, 5, 4, 0, 1)
    assert next_due(now, AT, None) == utc(2030, 5, 3, 0, 5)


def test_other_time_zones_are_read_as_the_same_instant() -> None:
    """The schedule is UTC: an aware time in another zone names the same slot."""
    plus_two = timezone(timedelta(hours=2))
    now = datetime(2030, 2, 1, 2, 4, tzinfo=plus_two)  # 00:04 UTC
    assert latest_slot(now, AT) == utc(2030, 1, 31, 0, 5)


@given(
    now=st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
    ),
    hour=st.integers(0, 23),
    minute=st.integers(0, 59),
    served_days_ago=st.one_of(st.none(), st.integers(-1, 40)),
)
def test_due_time_properties(
    now: datetime, hour: int, minute: int, served_days_ago: int | None
) -> None:
    """Latest slot is within the last day; the due time is never more than a day away."""
    at = (hour, minute)
    slot = latest_slot(now, at)
    assert slot <= now < slot + timedelta(days=1)
    assert (slot.hour, slot.minute, slot.second) == (hour, minute, 0)
    served = None if served_days_ago is None else slot - timedelta(days=served_days_ago)
    due = next_due(now, at, served)
    if served is not None and served >= slot:
        assert now < due <= now + timedelta(days=1)
    else:
        assert due == slot


@pytest.mark.parametrize("minute", [0, 5, 59])
def test_slots_are_daily_so_every_first_of_the_month_is_covered(minute: int) -> None:
    """Walking a year day by day, every 1st has a slot at the configured time."""
    at = (0, minute)
    served = utc(2029, 12, 31, 0, minute)
    firsts = 0
    now = utc(2030, 1, 1)
    while now.year == 2030:
        due = next_due(now, at, served)
        if due <= now:
            served = due
            firsts += due.day == 1
        now += timedelta(hours=6)
    assert firsts == 12
