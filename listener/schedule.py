"""The built-in bulk backup schedule (RESET_SCHEDULE), so no external cron is needed.

The default, `5 0 * * *` read in the period zone, runs a few minutes after every
period boundary and once a day besides (a safety net behind the triggers).  Slots come
from listener.slots (cron in a zone, DST-exact); the zone is read from the database
(token_reset_settings: the zone in force and a pending change with the instant it
takes effect), so the slot right after a boundary is in the zone of the new period.
The `HH:MM` form keeps meaning daily at HH:MM UTC.

A slot is served when a scheduled run recorded success for it; replicas and restarts
agree through the runs table, and the advisory lock in listener.bulk keeps two
replicas from running at once (the loser records "skipped").  At start, a slot missed
while the process was down is run at once (catch-up; only the latest, once):
`listen` then writes to the database before anyone asked it to, so its first schedule
line says so, as a warning, before the run starts (`schedule_catch_up_run`: the slot,
"now", why, how to turn it off); otherwise the first line says when the next run is
(`schedule_next_run`).  Time comes from the injected clock, so tests drive
`tick(now)` across a month boundary without waiting.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import anyio
import asyncpg
import structlog

from listener import slots
from listener.bulk import BulkResetError, BulkResult, run_bulk_reset
from listener.clock import Clock, utc_now
from listener.config import Settings
from listener.database import connect
from listener.metrics import Metrics
from listener.slots import UTC_ZONES, Zones
from listener.sql import query

# The loop re-reads the clock at least this often (a suspended laptop, a clock step).
POLL_SECONDS = 60.0
# After a failure (database down, another run holding the lock) try again this much later.
RETRY_SECONDS = 60.0
# The period zone is read again this often (a change made with token_reset_configure
# on a database without users takes effect at once; otherwise it is known in advance).
ZONE_REFRESH_SECONDS = 300.0
_STATE_TIMEOUT_SECONDS = 10.0
_DB_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)

log = structlog.get_logger(__name__)


def _zone(name: str) -> ZoneInfo:
    """A zone the database names; UTC (and an error line) if Python's tz data lacks it."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        log.exception("schedule_zone_unknown", zone=name, using="UTC")
        return ZoneInfo("UTC")


def zones_from_row(row: asyncpg.Record) -> Zones:
    """Zones from the `schedule_zones` query (token_reset_settings)."""
    if row["effective_at"] is None:
        return Zones.fixed(_zone(row["timezone"]))
    return Zones(
        previous=_zone(row["previous_timezone"]),
        current=_zone(row["timezone"]),
        effective_at=row["effective_at"],
    )


class Scheduler:
    """One replica's view of the schedule; `tick(now)` does whatever is due at `now`."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        *,
        clock: Clock = utc_now,
        poll_seconds: float = POLL_SECONDS,
        retry_seconds: float = RETRY_SECONDS,
    ) -> None:
        spec = settings.schedule
        if spec is None:
            raise ValueError("the schedule is turned off (RESET_SCHEDULE=off)")
        self.spec = spec
        # UTC for the HH:MM form; the period zone (read from the database) otherwise.
        self.zones: Zones | None = UTC_ZONES if spec.utc else None
        self._zones_read_at: datetime | None = None
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._poll_seconds = poll_seconds
        self._retry = timedelta(seconds=retry_seconds)
        self._loaded = False
        self._served_through: datetime | None = None
        self._retry_at: datetime | None = None
        self.ticks = 0

    @property
    def served_through(self) -> datetime | None:
        """The newest slot known to be served (by this replica or another)."""
        return self._served_through

    def latest_slot(self, now: datetime) -> datetime:
        """The latest slot at or before `now` in the zones known (UTC until loaded)."""
        return slots.latest_slot(now, self.spec.expression, self.zones or UTC_ZONES)

    def next_due(self, now: datetime) -> datetime:
        """When `tick` next has work: a due slot, or a retry after a failure."""
        due = slots.next_due(
            now, self.spec.expression, self.zones or UTC_ZONES, self._served_through
        )
        if self._retry_at is not None and self._retry_at > due:
            return self._retry_at
        return due

    async def tick(self, now: datetime) -> BulkResult | None:
        """Run the latest slot if it is due; the result, or None when nothing ran."""
        self.ticks += 1
        if self._retry_at is not None and now < self._retry_at:
            return None
        first = not self._loaded
        if first and not await self._load(now):
            return None
        if not first and self._zones_stale(now):
            await self._refresh_zones(now)
        slot = self.latest_slot(now)
        if first:
            self._announce(now, slot)
        if self._served_through is not None and slot <= self._served_through:
            return None
        log.info(
            "schedule_due",
            slot=slot.isoformat(),
            late_seconds=round((now - slot).total_seconds(), 3),
            catch_up=first,
        )
        try:
            result = await run_bulk_reset(
                self._settings, source="schedule", metrics=self._metrics, slot=slot
            )
        except BulkResetError as exc:
            self._failed(now, slot, str(exc))
            return None
        self._retry_at = None
        if result.skip_reason == "already_running":
            # Another run holds the lock; it may be an endpoint run that fails, so come
            # back later and let the runs table say whether the slot got served.
            self._retry_at = now + self._retry
        else:
            self._served_through = slot
        if result.skipped:
            log.info(
                "schedule_skipped",
                slot=slot.isoformat(),
                reason=result.skip_reason,
                other_run_id=str(result.other_run_id) if result.other_run_id else None,
            )
        return result

    def _announce(self, now: datetime, slot: datetime) -> None:
        """The one start-up line: a catch-up run now (a write nobody asked for), or when next."""
        served = self._served_through
        if served is not None and slot <= served:
            log.info("schedule_next_run", at=self.next_due(now).isoformat())
            return
        if served is None:
            reason = "no successful scheduled run is recorded in token_reset_bulk_runs"
        else:
            reason = (
                "no successful scheduled run is recorded for this slot (the last was "
                f"{served.isoformat()}): no replica was running at {slot.isoformat()}"
            )
        log.warning(
            "schedule_catch_up_run",
            slot=slot.isoformat(),
            runs="now",
            last_served_slot=None if served is None else served.isoformat(),
            reason=reason,
            writes="resets every user still carrying last period's usage, in batches",
            hint="RESET_SCHEDULE=off (or `listen --no-schedule`) leaves the bulk reset to "
            "an external scheduler",
        )

    def _failed(self, now: datetime, slot: datetime, error: str) -> None:
        """Come back after the retry delay; the runner already logged the stack."""
        self._retry_at = now + self._retry
        log.error(
            "schedule_run_failed",
            slot=slot.isoformat(),
            error=error,
            retry_at=self._retry_at.isoformat(),
        )

    async def run(self) -> None:
        """Tick, sleep until the next due time (at most poll_seconds), re-read the clock."""
        now = self._clock()
        log.info(
            "schedule_started",
            schedule=self.spec.expression,
            timezone="UTC" if self.spec.utc else "period zone (from the database)",
        )
        floor = min(1.0, self._poll_seconds)
        while True:
            try:
                await self.tick(now)
            except Exception:
                # Never let one bad tick take the whole service down; retry later.
                self._retry_at = now + self._retry
                log.exception("schedule_tick_failed", retry_at=self._retry_at.isoformat())
            now = self._clock()
            wait = (self.next_due(now) - now).total_seconds()
            await anyio.sleep(min(max(wait, floor), self._poll_seconds))
            now = self._clock()

    async def _load(self, now: datetime) -> bool:
        """Read the served slot (and the last success, for the gauge) once, at start."""
        try:
            with anyio.fail_after(_STATE_TIMEOUT_SECONDS):
                conn = await connect(self._settings, role="schedule")
                try:
                    row = await conn.fetchrow(query("bulk_schedule_state"))
                    if not self.spec.utc:
                        self._set_zones(now, await conn.fetchrow(query("schedule_zones")))
                finally:
                    await conn.close()
        except _DB_ERRORS as exc:
            self._retry_at = now + self._retry
            log.warning(
                "schedule_state_unavailable",
                error=type(exc).__name__,
                retry_at=self._retry_at.isoformat(),
            )
            return False
        if row is None:
            raise RuntimeError("bulk_schedule_state returned no row")
        self._loaded = True
        self._served_through = row["last_slot"]
        if row["last_success_epoch"] is not None:
            self._metrics.bulk_last_success.set(row["last_success_epoch"])
        return True

    def _zones_stale(self, now: datetime) -> bool:
        if self.spec.utc:
            return False
        if self._zones_read_at is None:
            return True
        return abs((now - self._zones_read_at).total_seconds()) >= ZONE_REFRESH_SECONDS

    async def _refresh_zones(self, now: datetime) -> None:
        """Read the period zone again; on failure keep the zones known (slots go on)."""
        try:
            with anyio.fail_after(_STATE_TIMEOUT_SECONDS):
                conn = await connect(self._settings, role="schedule")
                try:
                    self._set_zones(now, await conn.fetchrow(query("schedule_zones")))
                finally:
                    await conn.close()
        except _DB_ERRORS as exc:
            log.warning("schedule_zone_unavailable", error=type(exc).__name__)

    def _set_zones(self, now: datetime, row: asyncpg.Record | None) -> None:
        if row is None:
            raise RuntimeError("schedule_zones returned no row")
        zones = zones_from_row(row)
        if zones != self.zones:
            log.info("schedule_zone", zone=zones.describe(), schedule=self.spec.expression)
        self.zones, self._zones_read_at = zones, now


async def run_schedule(settings: Settings, metrics: Metrics, *, clock: Clock = utc_now) -> None:
    """Runs until cancelled: the daily/monthly bulk backup, led by one replica."""
    if settings.schedule is None:
        log.info("schedule_disabled", reason="RESET_SCHEDULE=off")
        await anyio.sleep_forever()
        return
    await Scheduler(settings, metrics, clock=clock).run()
