"""Slot arithmetic of the built-in schedule: a cron expression read on a zone's wall clock.

RESET_SCHEDULE is a five-field cron expression evaluated in the period zone (the zone
that defines "the month", read from the database), so the default `5 0 * * *` runs a
few minutes after every period boundary and once a day besides.  The older `HH:MM`
form still means "daily at HH:MM UTC".

croniter parses the expression and walks *naive* wall-clock times; this module maps
each wall time to an instant itself, because that is where DST bites:

* a wall time that does not exist (skipped by a spring-forward gap) runs at the first
  instant after the gap, so it is never skipped;
* a wall time that happens twice (repeated by a fall-back) runs the first time only,
  so it never runs twice;
* several wall times mapping to one instant make one slot, so slots strictly increase.

That is what a cron daemon stepping minute by minute does (tests/unit/
test_schedule_cron.py simulates one).  The zone may change at a known instant (a new
period zone takes effect at the next period boundary): slots before it are read in
the previous zone, slots from it in the new one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final
from zoneinfo import ZoneInfo

from croniter import CroniterBadCronError, CroniterBadDateError, croniter

# A few minutes after each period boundary (00:05 local on the 1st) and daily besides.
DEFAULT_SCHEDULE: Final = "5 0 * * *"
# No zone moves its clock by more than this at once (the largest real shift is 2 h):
# wall times further than this from an instant's own wall time cannot map next to it.
_MAX_SHIFT: Final = timedelta(hours=3)
_TINY: Final = timedelta(microseconds=1)
_FIELDS: Final = 5


@dataclass(frozen=True)
class ScheduleSpec:
    """A parsed RESET_SCHEDULE: the cron expression, and whether it is read in UTC."""

    expression: str
    # True for the HH:MM form (daily, UTC as it always was); else the period zone.
    utc: bool = False

    def describe(self) -> str:
        """For the log line at start: what runs, in which zone."""
        return f"{self.expression} ({'UTC' if self.utc else 'period zone'})"


@dataclass(frozen=True)
class Zones:
    """The zone at every instant: `previous` before `effective_at`, `current` from it.

    Mirrors token_reset_settings (previous_timezone, timezone, timezone_effective_at):
    a pending zone change is known in advance, so the slot right after the boundary
    is already read in the new zone.
    """

    previous: ZoneInfo
    current: ZoneInfo
    effective_at: datetime | None = None

    @classmethod
    def fixed(cls, zone: ZoneInfo) -> Zones:
        """One zone, always in force."""
        return cls(previous=zone, current=zone, effective_at=None)

    @property
    def changing(self) -> bool:
        """True when a different zone takes over at `effective_at`."""
        return self.effective_at is not None and self.previous.key != self.current.key

    def describe(self) -> str:
        """The zone names for logs."""
        if not self.changing or self.effective_at is None:
            return self.current.key
        return f"{self.previous.key} until {self.effective_at.isoformat()}, then {self.current.key}"


UTC_ZONES: Final = Zones.fixed(ZoneInfo("UTC"))


def _fires(expression: str) -> bool:
    """True when croniter reads the expression and it fires at least once.

    Probed from a fixed date: an expression that never fires (31 February) must stop the
    start, not hang or fail at midnight.
    """
    try:
        croniter(expression, datetime(2000, 1, 1)).get_next(datetime)
    except (CroniterBadCronError, CroniterBadDateError, ValueError, KeyError):
        return False
    return True


def parse_schedule(raw: str) -> ScheduleSpec | None:
    """`off`, `HH:MM` (daily, UTC) or five cron fields (period zone); raises ValueError."""
    value = " ".join(raw.split()).lower()
    if value == "off":  # the only way to turn it off (empty means the default)
        return None
    parts = value.split(":")
    if len(parts) == 2 and all(p.isdigit() for p in parts):
        hour, minute = int(parts[0]), int(parts[1])
        if 0 <= hour < 24 and 0 <= minute < 60:
            return ScheduleSpec(f"{minute} {hour} * * *", utc=True)
    if len(value.split(" ")) == _FIELDS and not value.startswith("@") and _fires(value):
        return ScheduleSpec(value, utc=False)
    raise ValueError(
        "RESET_SCHEDULE must be a five-field cron expression (read in the period zone, "
        f"e.g. '5 0 * * *'), 'HH:MM' (daily, UTC) or 'off', got {raw!r}"
    )


def wall_to_instant(wall: datetime, zone: ZoneInfo) -> datetime:
    """The instant a naive wall time in `zone` runs at: its first occurrence, or, when
    a gap skips it, the first instant after the gap."""
    instant = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    if instant.astimezone(zone).replace(tzinfo=None) == wall:
        return instant
    # In a gap: fold=1 lands before it, fold=0 after it.  The transition is the first
    # instant whose wall time is past `wall`: bisect to the second (transitions are
    # on whole seconds).
    low = wall.replace(tzinfo=zone, fold=1).astimezone(UTC)
    high = instant
    while high - low > timedelta(seconds=1):
        middle = low + (high - low) / 2
        middle = middle.replace(microsecond=0)
        if middle <= low:
            break
        if middle.astimezone(zone).replace(tzinfo=None) > wall:
            high = middle
        else:
            low = middle
    return high


def _wall(instant: datetime, zone: ZoneInfo) -> datetime:
    return instant.astimezone(zone).replace(tzinfo=None)


def _latest_in(now: datetime, expression: str, zone: ZoneInfo) -> datetime:
    """The latest slot at or before `now` in one zone."""
    walls = croniter(expression, _wall(now, zone) + _MAX_SHIFT)
    while True:
        try:
            slot = wall_to_instant(walls.get_prev(datetime), zone)
        except CroniterBadDateError:
            raise LookupError(f"no slot of {expression!r} before {now.isoformat()}") from None
        if slot <= now:
            return slot


def _next_in(after: datetime, expression: str, zone: ZoneInfo) -> datetime:
    """The first slot strictly after `after` in one zone."""
    walls = croniter(expression, _wall(after, zone) - _MAX_SHIFT)
    while True:
        slot = wall_to_instant(walls.get_next(datetime), zone)
        if slot > after:
            return slot


def latest_slot(now: datetime, expression: str, zones: Zones) -> datetime:
    """The most recent slot at or before `now` (timezone-aware)."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if not zones.changing or zones.effective_at is None:
        return _latest_in(now, expression, zones.current)
    change = zones.effective_at
    if now >= change:
        slot = _latest_in(now, expression, zones.current)
        if slot >= change:
            return slot
    return _latest_in(min(now, change - _TINY), expression, zones.previous)


def next_slot(after: datetime, expression: str, zones: Zones) -> datetime:
    """The first slot strictly after `after` (timezone-aware)."""
    if after.tzinfo is None:
        raise ValueError("after must be timezone-aware")
    if not zones.changing or zones.effective_at is None:
        return _next_in(after, expression, zones.current)
    change = zones.effective_at
    if after < change:
        slot = _next_in(after, expression, zones.previous)
        if slot < change:
            return slot
    return _next_in(max(after, change - _TINY), expression, zones.current)


def next_due(
    now: datetime, expression: str, zones: Zones, served_through: datetime | None
) -> datetime:
    """When a run is next due: the latest slot if it is not served yet, else the next one.

    Slots missed while down are not replayed one by one: the latest one is due at once
    (one bulk run catches everything up).
    """
    slot = latest_slot(now, expression, zones)
    if served_through is None or served_through < slot:
        return slot
    return next_slot(slot, expression, zones)
