"""Missed-reset watchdog: "was this month's reset done?", answered from the database.

Every WATCHDOG_INTERVAL_SECONDS one query (sql/queries/watchdog.sql) reads the facts
(stale users, resets recorded this period, the newest reset, whether last period had
usage) and a pure function, `assess` (listener.assessment), judges them.  The period's
boundaries come from the database (its clock and configured zone), while "how far into
the period are we" comes from the listener's injectable clock, so a test can say "7 h
into the month" without faking the database's time.  Because the facts live in the database, a
restart neither raises nor hides the alert, and every replica gives the same answer.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final, Literal

import anyio
import asyncpg
import structlog

from listener.alertmanager import AlertmanagerPusher
from listener.assessment import Assessment, Snapshot, assess
from listener.clock import Clock, iso, utc_now
from listener.config import Settings
from listener.database import KeptConnection
from listener.metrics import Metrics
from listener.periodic import CheckLoop
from listener.sql import query
from listener.throttle import LogThrottle

log = structlog.get_logger(__name__)

Transition = Literal["raised", "cleared"]
# A check that takes longer than this is treated like an unreachable database.
DB_TIMEOUT_SECONDS: Final = 10.0
# The watchdog lease lasts this many check intervals (see shared_or_own_snapshot).
LEASE_INTERVALS: Final = 3
# Ledger ids one fold of the deduction totals reads at most: a backlog (after an outage,
# behind a long-open writer) is caught up over several checks, each well inside
# DB_TIMEOUT_SECONDS.
FOLD_MAX_IDS: Final = 1_000_000
# A fold that keeps failing says so every ten minutes, with the count in between.
_FOLD_FAILURE_LOG = LogThrottle(600.0)


class AlertTracker:
    """Edge detection: logs one event when the alert is raised and one when it clears."""

    def __init__(self) -> None:
        self.active = False
        self.raised_at: datetime | None = None

    def observe(self, assessment: Assessment, now: datetime) -> Transition | None:
        """Feed one assessment; returns the transition it caused, if any."""
        snapshot = assessment.snapshot
        if assessment.missed and not self.active:
            self.active, self.raised_at = True, now
            log.error(
                "missed_reset_alert_raised",
                reasons=list(assessment.reasons),
                stale_users=snapshot.stale_users,
                month_resets=snapshot.month_resets,
                period=snapshot.period_label,
                period_start=snapshot.period_start.isoformat(),
                seconds_into_period=round(assessment.seconds_into_period, 1),
                grace_seconds=assessment.grace_seconds,
                previous_period_had_usage=snapshot.previous_period_had_usage,
                last_reset_at=iso(snapshot.last_reset_at),
            )
            return "raised"
        if not assessment.missed and self.active:
            raised_at = self.raised_at or now
            self.active, self.raised_at = False, None
            log.info(
                "missed_reset_alert_cleared",
                stale_users=snapshot.stale_users,
                month_resets=snapshot.month_resets,
                period=snapshot.period_label,
                active_seconds=round((now - raised_at).total_seconds(), 1),
            )
            return "cleared"
        return None


async def fetch_snapshot(conn: asyncpg.Connection) -> Snapshot:
    """Create the ledger's coming partitions, fold the counters and totals, then check.

    The folds keep the snapshot's cost at the writes since the last check, whatever the
    number of users or the size of the ledger; each commits on its own, so a failed
    snapshot loses nothing.
    """
    await conn.execute(query("watchdog_partitions"), timeout=DB_TIMEOUT_SECONDS)
    await conn.execute(query("watchdog_compact"), timeout=DB_TIMEOUT_SECONDS)
    await fold_deductions(conn)
    row = await conn.fetchrow(query("watchdog_snapshot"), timeout=DB_TIMEOUT_SECONDS)
    if row is None:  # a SELECT without FROM filter always returns a row
        raise RuntimeError("watchdog_snapshot returned no row")
    return Snapshot.from_row(row)


async def fold_deductions(conn: asyncpg.Connection) -> None:
    """Fold the new deductions into the totals; a failure is logged, never raised.

    The totals are analytics; the check after them is the missed-reset alert, which
    nothing about a ledger row, a restore or a busy lock may silence.  The fold needs
    READ COMMITTED (each statement must see what committed before it), whatever the
    role's default isolation.
    """
    try:
        async with conn.transaction(isolation="read_committed"):
            await conn.execute(
                query("watchdog_fold_deductions"), FOLD_MAX_IDS, timeout=DB_TIMEOUT_SECONDS
            )
    except (asyncpg.PostgresError, TimeoutError) as exc:
        suppressed = _FOLD_FAILURE_LOG.admit()
        if suppressed is not None:
            log.warning(
                "deduction_fold_failed",
                error=str(exc),
                error_type=type(exc).__name__,
                suppressed=suppressed,
            )


async def shared_or_own_snapshot(
    conn: asyncpg.Connection, holder: str, interval_seconds: float
) -> tuple[Snapshot, bool]:
    """The lease holder's snapshot, or our own when we hold the lease (or nobody shared).

    Returns (snapshot, led).  One replica checks and shares; the others read what it
    found, so N replicas cost one check a minute, and all of them export the same
    numbers.  The lease lasts three intervals: a dead holder is replaced within that.
    """
    lease_seconds = LEASE_INTERVALS * interval_seconds
    led = await conn.fetchval(query("watchdog_lease"), holder, lease_seconds) is not None
    if not led:
        shared = await conn.fetchrow(query("watchdog_shared"), lease_seconds)
        if shared is not None:
            return Snapshot.from_json(shared["state"]), False
    snapshot = await fetch_snapshot(conn)
    if led:
        await conn.execute(query("watchdog_share"), holder, snapshot.to_json())
    return snapshot, led


class Watchdog:
    """The periodic check: query, judge, export, log edges, push to Alertmanager."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        *,
        clock: Clock = utc_now,
        pusher: AlertmanagerPusher | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self.tracker = AlertTracker()
        self.last: Assessment | None = None
        self.db_available = True
        self.led_checks = 0  # checks this replica ran itself, as the lease holder
        if pusher is None and settings.alertmanager_url:
            pusher = AlertmanagerPusher(settings.alertmanager_url)
        self.pusher = pusher
        self._connection = KeptConnection(settings, "watchdog", timeout_seconds=DB_TIMEOUT_SECONDS)
        self._loop = CheckLoop(settings.watchdog_interval_seconds, self._connection)

    async def run(self) -> None:
        """Runs until cancelled; the Alertmanager pusher (if any) is its own task."""
        async with anyio.create_task_group() as tg:
            if self.pusher is not None:
                tg.start_soon(self.pusher.run)
            await self.check_forever()

    async def check_forever(self) -> None:
        """The periodic checks alone, until cancelled.

        The service runs this and the pusher as two supervised tasks, so either one
        can die and be restarted without the other; the alert state lives on `self`
        and survives a restart (a restart neither re-raises nor forgets the alert).
        """
        log.info(
            "watchdog_started",
            interval_seconds=self.settings.watchdog_interval_seconds,
            grace_seconds=self.settings.reset_grace_seconds,
            alertmanager_push=self.pusher is not None,
        )
        await self._loop.run(self.check_once)

    @property
    def checks(self) -> int:
        """Checks completed by the loop (tests wait on it)."""
        return self._loop.count

    async def check_once(self) -> Assessment | None:
        """One check; None when the database could not be read (last values are kept)."""
        try:
            snapshot = await self._snapshot()
        # Why so broad: whatever goes wrong talking to the database (refused, reset,
        # timed out, not migrated) must not crash the listener's task group.
        except Exception as exc:
            self._connection.drop()
            if self.db_available:
                self.db_available = False
                log.warning(
                    "watchdog_db_unavailable", error=str(exc), error_type=type(exc).__name__
                )
            self._push(self.clock())  # keep a raised alert alive in Alertmanager
            return None
        if not self.db_available:
            self.db_available = True
            log.info("watchdog_db_recovered")
        now = self.clock()
        assessment = assess(snapshot, now, self.settings.reset_grace_seconds)
        self._export(assessment)
        self.last = assessment
        transition = self.tracker.observe(assessment, now)
        log.debug(
            "watchdog_checked",
            missed=assessment.missed,
            stale_users=snapshot.stale_users,
            month_resets=snapshot.month_resets,
        )
        if transition == "cleared" and self.pusher is not None:
            self.pusher.resolve(now)
        self._push(now)
        return assessment

    def _push(self, now: datetime) -> None:
        if self.pusher is not None and self.tracker.active and self.last is not None:
            self.pusher.fire(
                self.last,
                starts_at=self.tracker.raised_at or now,
                now=now,
                interval_seconds=self.settings.watchdog_interval_seconds,
            )

    async def _snapshot(self) -> Snapshot:
        conn = await self._connection.get()
        with anyio.fail_after(DB_TIMEOUT_SECONDS * 2):
            snapshot, led = await shared_or_own_snapshot(
                conn, self.settings.listener_name, self.settings.watchdog_interval_seconds
            )
        self.led_checks += int(led)
        return snapshot

    def _export(self, assessment: Assessment) -> None:
        snapshot = assessment.snapshot
        self.metrics.stale_users.set(snapshot.stale_users)
        self.metrics.month_resets.set(snapshot.month_resets)
        self.metrics.export_usage(snapshot)
        if snapshot.last_reset_at is not None:
            self.metrics.last_reset_timestamp.set(snapshot.last_reset_at.timestamp())
        if snapshot.last_bulk_success_at is not None:
            self.metrics.bulk_last_success.set(snapshot.last_bulk_success_at.timestamp())
        self.metrics.missed_month.set(1 if assessment.missed else 0)

    def close(self) -> None:
        """Drop the database connection (run() does this itself when cancelled)."""
        self._connection.drop()


async def run_watchdog(settings: Settings, metrics: Metrics, *, clock: Clock = utc_now) -> None:
    """Runs until cancelled: every WATCHDOG_INTERVAL_SECONDS, computes the gauges from the DB."""
    await Watchdog(settings, metrics, clock=clock).run()
