"""RESET_SCHEDULE as a cron expression in the period zone: slots around boundaries and DST.

The reference below is a cron daemon simulated minute by minute on the UTC axis: at each
instant it runs once if any wall-clock minute it has not yet passed (since the last
instant) matches the expression.  A wall time skipped by a spring-forward gap therefore
runs at the first instant after the gap, and a wall time repeated by a fall-back runs
only the first time.  The scheduler's slot arithmetic must produce exactly that sequence.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import cache
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from listener.slots import (
    DEFAULT_SCHEDULE,
    ScheduleSpec,
    Zones,
    latest_slot,
    next_due,
    next_slot,
    parse_schedule,
)

DST_ZONES = ("America/New_York", "America/Havana", "Europe/London", "Australia/Lord_Howe")
ZONES = (*DST_ZONES, "UTC", "Asia/Kolkata")
MINUTE = timedelta(minutes=1)


def utc(year: int, month: int, day: int, hour: int, minute: int) -> datetime:
    """A UTC instant."""
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def zones(name: str) -> Zones:
    """One zone in force at every instant."""
    return Zones.fixed(ZoneInfo(name))


@cache
def transitions(name: str) -> tuple[datetime, ...]:
    """Every instant in 2000-2040 at which the zone's UTC offset changes (to the minute)."""
    zone = ZoneInfo(name)
    found: list[datetime] = []
    day = datetime(2000, 1, 1, 12, tzinfo=UTC)
    previous = day.astimezone(zone).utcoffset()
    while day.year < 2041:
        following = day + timedelta(days=1)
        offset = following.astimezone(zone).utcoffset()
        if offset != previous:
            low, high = day, following  # offset(low) = previous, offset(high) = offset
            while high - low > MINUTE:
                middle = low + (high - low) / 2
                middle = middle.replace(second=0, microsecond=0)
                if middle.astimezone(zone).utcoffset() == previous:
                    low = middle
                else:
                    high = middle
            found.append(high)
        previous, day = offset, following
    return tuple(found)


Fields = tuple[set[int], set[int], set[int] | None, set[int] | None]


def matcher(expression: str) -> Fields:
    """(minutes, hours, days of month or None for '*', weekdays or None) from croniter."""
    fields = croniter(expression).expanded
    minutes = set(range(60)) if fields[0] == ["*"] else {int(v) for v in fields[0]}
    hours = set(range(24)) if fields[1] == ["*"] else {int(v) for v in fields[1]}
    days = None if fields[2] == ["*"] else {int(v) for v in fields[2]}
    weekdays = None if fields[4] == ["*"] else {int(v) % 7 for v in fields[4]}
    return minutes, hours, days, weekdays


def matches(spec: Fields, wall: datetime) -> bool:
    """Vixie cron: day of month OR day of week when both are restricted."""
    minutes, hours, days, weekdays = spec
    if wall.minute not in minutes or wall.hour not in hours:
        return False
    weekday = (wall.weekday() + 1) % 7  # cron: 0 = Sunday
    if days is not None and weekdays is not None:
        return wall.day in days or weekday in weekdays
    if days is not None:
        return wall.day in days
    return weekdays is None or weekday in weekdays


def reference_slots(expression: str, name: str, start: datetime, end: datetime) -> list[datetime]:
    """The simulated daemon's runs in [start, end); it starts a day early to be in step."""
    spec = matcher(expression)
    zone = ZoneInfo(name)
    instant = start - timedelta(days=1)
    passed = instant.astimezone(zone).replace(tzinfo=None)
    runs: list[datetime] = []
    while instant < end:
        instant += MINUTE
        wall = instant.astimezone(zone).replace(tzinfo=None)
        due = False
        candidate = passed + MINUTE
        while candidate <= wall:
            due = due or matches(spec, candidate)
            candidate += MINUTE
        passed = max(passed, wall)
        if due and instant >= start:
            runs.append(instant)
    return [run for run in runs if run < end]


def chain(expression: str, zone_set: Zones, start: datetime, end: datetime) -> list[datetime]:
    """The scheduler's slots in [start, end), each found from the one before."""
    slots: list[datetime] = []
    slot = next_slot(start - timedelta(microseconds=1), expression, zone_set)
    while slot < end:
        slots.append(slot)
        following = next_slot(slot, expression, zone_set)
        assert following > slot, "slots must be strictly increasing"
        slot = following
    return slots


def period_start(name: str, year: int, month: int) -> datetime:
    """The first instant whose local date is the 1st (README, I4), found by the minute."""
    zone = ZoneInfo(name)
    guess = datetime(year, month, 1, tzinfo=zone).astimezone(UTC) - timedelta(hours=4)
    while guess.astimezone(zone).day != 1:
        guess += MINUTE
    return guess


MINUTE_FIELDS = st.sampled_from(["0", "5", "30", "*/15", "*/7", "0,30", "59", "45"])
HOUR_FIELDS = st.sampled_from(["*", "0", "1", "2", "0-3", "*/2", "23", "1,2,3"])
DAY_FIELDS = st.sampled_from(["*", "*", "*", "1", "1,15", "31"])
WEEKDAY_FIELDS = st.sampled_from(["*", "*", "*", "0", "1-5", "6"])
EXPRESSIONS = st.builds(
    lambda m, h, d, w: f"{m} {h} {d} * {w}", MINUTE_FIELDS, HOUR_FIELDS, DAY_FIELDS, WEEKDAY_FIELDS
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    expression=EXPRESSIONS,
    name=st.sampled_from(DST_ZONES),
    pick=st.integers(min_value=0, max_value=10_000),
    shift_hours=st.integers(min_value=-20, max_value=4),
)
def test_across_a_dst_change_no_slot_is_skipped_or_run_twice(
    expression: str, name: str, pick: int, shift_hours: int
) -> None:
    """Around a real DST change, the slots are exactly the simulated daemon's runs:
    a wall time in a spring-forward gap runs once right after it, a repeated one once."""
    changes = transitions(name)
    start = changes[pick % len(changes)] + timedelta(hours=shift_hours)
    end = start + timedelta(hours=30)
    assert chain(expression, zones(name), start, end) == reference_slots(
        expression, name, start, end
    )


@settings(max_examples=200, deadline=None)
@given(
    expression=EXPRESSIONS,
    name=st.sampled_from(ZONES),
    now=st.datetimes(
        min_value=datetime(2000, 1, 2), max_value=datetime(2040, 12, 30), timezones=st.just(UTC)
    ),
)
def test_the_latest_slot_is_in_the_past_and_the_next_one_is_in_the_future(
    expression: str, name: str, now: datetime
) -> None:
    """Every due slot is at or before now, and nothing between it and now is a slot."""
    zone_set = zones(name)
    latest = latest_slot(now, expression, zone_set)
    assert latest <= now
    assert next_slot(latest, expression, zone_set) > now


@settings(max_examples=150, deadline=None)
@given(
    name=st.sampled_from(ZONES),
    year=st.integers(min_value=2000, max_value=2040),
    month=st.integers(min_value=1, max_value=12),
)
def test_the_default_runs_within_minutes_after_every_period_boundary(
    name: str, year: int, month: int
) -> None:
    """`5 0 * * *` in the period zone: the first slot of every period is at most five
    minutes after its start, DST changes at midnight on the 1st included."""
    start = period_start(name, year, month)
    first = next_slot(start - timedelta(microseconds=1), DEFAULT_SCHEDULE, zones(name))
    assert start <= first <= start + timedelta(minutes=5)


def test_havana_repeats_midnight_on_the_first_and_runs_once_after_the_first_midnight() -> None:
    """America/Havana, 1 Nov 2026: 01:00 falls back to 00:00, so 00:05 happens twice;
    the period starts at the first midnight and the slot is the first 00:05, once."""
    havana = zones("America/Havana")
    start = period_start("America/Havana", 2026, 11)
    assert start == datetime(2026, 11, 1, 4, 0, tzinfo=UTC)
    slots = chain(DEFAULT_SCHEDULE, havana, start - timedelta(hours=2), start + timedelta(hours=4))
    assert slots == [datetime(2026, 11, 1, 4, 5, tzinfo=UTC)]


def test_new_york_spring_forward_runs_the_skipped_time_once_at_three() -> None:
    """America/New_York, 8 Mar 2026: 02:30 does not exist; `30 2 * * *` runs at 03:00
    EDT (07:00 UTC), the first instant after the gap, and the next day at 02:30 EDT."""
    new_york = zones("America/New_York")
    slots = chain(
        "30 2 * * *",
        new_york,
        datetime(2026, 3, 7, 12, tzinfo=UTC),
        datetime(2026, 3, 9, 12, tzinfo=UTC),
    )
    assert slots == [utc(2026, 3, 8, 7, 0), utc(2026, 3, 9, 6, 30)]


def test_london_fall_back_runs_a_repeated_time_once() -> None:
    """Europe/London, 25 Oct 2026: 01:30 happens at 00:30 and 01:30 UTC; it runs at the first."""
    slots = chain(
        "30 1 * * *",
        zones("Europe/London"),
        datetime(2026, 10, 24, 12, tzinfo=UTC),
        datetime(2026, 10, 26, 12, tzinfo=UTC),
    )
    assert slots == [utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30)]


def test_a_zone_change_uses_the_old_zone_before_it_and_the_new_one_from_it() -> None:
    """UTC until New York's 1 Dec 2026 midnight (05:00 UTC), then New York: the slot after
    the boundary is 00:05 New York, not the next 00:05 UTC a day later."""
    change = datetime(2026, 12, 1, 5, 0, tzinfo=UTC)
    zone_set = Zones(ZoneInfo("UTC"), ZoneInfo("America/New_York"), effective_at=change)
    slots = chain(
        DEFAULT_SCHEDULE,
        zone_set,
        datetime(2026, 11, 30, 0, 0, tzinfo=UTC),
        datetime(2026, 12, 3, 0, 0, tzinfo=UTC),
    )
    assert slots == [
        datetime(2026, 11, 30, 0, 5, tzinfo=UTC),
        datetime(2026, 12, 1, 0, 5, tzinfo=UTC),
        datetime(2026, 12, 1, 5, 5, tzinfo=UTC),
        datetime(2026, 12, 2, 5, 5, tzinfo=UTC),
    ]
    assert latest_slot(change + timedelta(minutes=4), DEFAULT_SCHEDULE, zone_set) == datetime(
        2026, 12, 1, 0, 5, tzinfo=UTC
    )
    after = change + timedelta(minutes=5)
    assert latest_slot(after, DEFAULT_SCHEDULE, zone_set) == after


@settings(max_examples=80, deadline=None)
@given(
    expression=EXPRESSIONS,
    old=st.sampled_from(ZONES),
    new=st.sampled_from(ZONES),
    offset_hours=st.integers(min_value=-30, max_value=30),
)
def test_slots_around_a_zone_change_are_strictly_increasing_and_never_in_the_future(
    expression: str, old: str, new: str, offset_hours: int
) -> None:
    """Whatever the two zones, the chain crosses the change without a repeat, and the
    latest slot at every hour around it is in the past and agrees with the chain."""
    change = period_start(new, 2027, 4)
    zone_set = Zones(previous=ZoneInfo(old), current=ZoneInfo(new), effective_at=change)
    start, end = change - timedelta(hours=40), change + timedelta(hours=40)
    slots = chain(expression, zone_set, start, end)
    assert slots == sorted(set(slots))
    assert slots == chain(expression, zones(old), start, change) + chain(
        expression, zones(new), change, end
    )
    now = change + timedelta(hours=offset_hours, minutes=7)
    earlier = [s for s in slots if s <= now]
    if earlier:
        assert latest_slot(now, expression, zone_set) == earlier[-1]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("5 0 * * *", ScheduleSpec("5 0 * * *", utc=False)),
        ("  */10   1  *  *  1-5 ", ScheduleSpec("*/10 1 * * 1-5", utc=False)),
        ("00:05", ScheduleSpec("5 0 * * *", utc=True)),
        ("8:30", ScheduleSpec("30 8 * * *", utc=True)),
        ("off", None),
        ("OFF", None),
    ],
)
def test_parse_schedule(raw: str, expected: ScheduleSpec | None) -> None:
    """Five fields run in the period zone; HH:MM keeps meaning daily in UTC; off is off."""
    assert parse_schedule(raw) == expected


@pytest.mark.parametrize(
    "raw",
    ["5 0 * * * *", "61 * * * *", "5 0 * *", "0 0 31 2 *", "@daily", "midnight", "25:00"],
)
def test_parse_schedule_refuses(raw: str) -> None:
    """Six fields, out-of-range values, a date that never comes, aliases and junk."""
    with pytest.raises(ValueError, match="RESET_SCHEDULE"):
        parse_schedule(raw)


def test_next_due_catches_up_the_latest_missed_slot_once() -> None:
    """Down over three New York midnights: one run for the latest slot, then tomorrow's."""
    new_york = zones("America/New_York")
    now = datetime(2030, 5, 4, 12, tzinfo=UTC)
    served = datetime(2030, 5, 1, 4, 5, tzinfo=UTC)
    due = next_due(now, DEFAULT_SCHEDULE, new_york, served)
    assert due == datetime(2030, 5, 4, 4, 5, tzinfo=UTC)
    assert next_due(now, DEFAULT_SCHEDULE, new_york, due) == datetime(2030, 5, 5, 4, 5, tzinfo=UTC)
