"""The built-in bulk backup schedule: daily at RESET_SCHEDULE (HH:MM UTC), so no cron is needed.

Daily covers the 1st of every month and backs up the triggers on every other day.
Each day has one slot (that day at HH:MM UTC).  A slot is served when a scheduled run
recorded success for it; replicas and restarts agree through the runs table, and the
advisory lock in listener.bulk keeps two replicas from running at once (the loser
records "skipped").  At start, a slot missed while the process was down is run at
once (catch-up): `listen` then writes to the database before anyone asked it to, so
its first schedule line says so, as a warning, before the run starts
(`schedule_catch_up_run`: the slot, "now", why, how to turn it off); otherwise the
first line says when the next run is (`schedule_next_run`).  Time comes from the
injected clock, so tests drive `tick(now)` across a month boundary without waiting.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import anyio
import asyncpg
import structlog

from listener.bulk import BulkResetError, BulkResult, run_bulk_reset
from listener.clock import Clock, utc_now
from listener.config import Settings
from listener.database import connect
from listener.metrics import Metrics
from listener.sql import query

# The loop re-reads the clock at least this often (a suspended laptop, a clock step).
POLL_SECONDS = 60.0
# After a failure (database down, another run holding the lock) try again this much later.
RETRY_SECONDS = 60.0
_STATE_TIMEOUT_SECONDS = 10.0

log = structlog.get_logger("listener.schedule")


def latest_slot(now: datetime, at: tuple[int, int]) -> datetime:
    """The most recent slot at or before `now` (today's HH:MM UTC, or yesterday's)."""
    utc = now.astimezone(UTC)
    today = utc.replace(hour=at[0], minute=at[1], second=0, microsecond=0)
    return today if today <= utc else today - timedelta(days=1)


def next_due(now: datetime, at: tuple[int, int], served_through: datetime | None) -> datetime:
    """When a run is next due: the latest slot if it is not served yet, else the next one."""
    slot = latest_slot(now, at)
    if served_through is None or served_through < slot:
        return slot
    return slot + timedelta(days=1)


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
        at = settings.schedule_time
        if at is None:
            raise ValueError("the schedule is turned off (RESET_SCHEDULE=off)")
        self.at = at
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

    def next_due(self, now: datetime) -> datetime:
        """When `tick` next has work: a due slot, or a retry after a failure."""
        due = next_due(now, self.at, self._served_through)
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
        slot = latest_slot(now, self.at)
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
            log.info("schedule_next_run", at=next_due(now, self.at, served).isoformat())
            return
        if served is None:
            reason = "no successful scheduled run is recorded in token_reset_bulk_runs"
        else:
            reason = (
                "no successful scheduled run is recorded for this slot (the last was "
                f"{served.isoformat()}): no replica was running at {self.at[0]:02d}:"
                f"{self.at[1]:02d} UTC"
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
        log.info("schedule_started", at=f"{self.at[0]:02d}:{self.at[1]:02d}", timezone="UTC")
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
                finally:
                    await conn.close()
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
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


async def run_schedule(settings: Settings, metrics: Metrics, *, clock: Clock = utc_now) -> None:
    """Runs until cancelled: the daily/monthly bulk backup, led by one replica."""
    if settings.schedule_time is None:
        log.info("schedule_disabled", reason="RESET_SCHEDULE=off")
        await anyio.sleep_forever()
        return
    await Scheduler(settings, metrics, clock=clock).run()
