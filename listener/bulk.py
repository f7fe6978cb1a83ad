"""The bulk backup reset, shared by the endpoint, the CLI and the built-in schedule.

One run at a time across every process and replica.  The lock is a transaction-level
advisory lock held by an open transaction on a connection of its own (the "lock
connection", application_name token-reset:bulk-lock), while a second connection
(token-reset:bulk) does the work.  Why not a session-level lock on one connection:
behind a transaction-mode pooler (PgBouncer pool_mode=transaction) "the session" is
whichever server connection the pool lends for one transaction, so a session lock
stays behind on a pooled server after the run (every later run: "skipped") and the
unlock lands elsewhere.  An open transaction keeps its server connection in every
pool mode, and ends, with its lock, when the run ends or the process dies.  The lock
transaction runs only simple-protocol statements after taking the lock, so it holds
no snapshot and no transaction id: vacuum keeps cleaning up behind a long run.

A caller that finds the lock taken returns at once with outcome "skipped" and the
running run's id.  Each batch is its own transaction (bounded row locks, one NOTIFY
per batch) and records its progress in the run's row in that same transaction, so a
failure loses nothing: committed batches stay whole and a rerun finishes the job.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal
from uuid import UUID, uuid4

import anyio
import asyncpg
import structlog
from asyncpg.transaction import Transaction

from listener.clock import iso
from listener.config import Settings
from listener.connection import Backoff, enable_keepalive
from listener.database import ConnectTimeout, connect
from listener.metrics import Metrics
from listener.sql import query

RunSource = Literal["endpoint", "cli", "schedule"]
SkipReason = Literal["already_running", "slot_done"]
# Recording a failure (a few ms normally) must not stretch a bounded shutdown much.
CLEANUP_TIMEOUT_SECONDS = 2.0
_MAX_ERROR_CHARS = 300
# A batch rolled back by a serialization failure (40001) or deadlock (40P01) is tried
# again this many times, with jittered backoff from the base up to the cap.
MAX_RETRIES = 5
RETRY_BASE_SECONDS = 0.05
RETRY_CAP_SECONDS = 2.0
# How long a lock holder may take between taking the lock and recording its run.
HOLDER_GRACE_SECONDS = 2.0
HOLDER_POLL_SECONDS = 0.05

log = structlog.get_logger(__name__)


class BulkResetError(RuntimeError):
    """A bulk run failed; batches committed before the failure stay, a rerun finishes."""

    def __init__(self, message: str, *, run_id: UUID, reset_count: int, batches: int) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.reset_count = reset_count
        self.batches = batches


@dataclass(frozen=True)
class BatchProgress:
    """Handed to the progress callback after every committed batch."""

    run_id: UUID
    batches: int
    reset_count: int
    elapsed_ms: int


ProgressCallback = Callable[[BatchProgress], None]


@dataclass(frozen=True)
class BulkResult:
    """What one run did (or, when skipped, what it found)."""

    run_id: UUID
    source: RunSource
    outcome: Literal["success", "skipped"]
    reset_count: int
    batches: int
    duration_ms: int
    reset_date: str
    period: str
    skip_reason: SkipReason | None = None
    # The run holding the lock (already_running) or the one that served the slot.
    other_run_id: UUID | None = None
    # Database time the run finished (success only): feeds the last-success gauge.
    finished_epoch: float | None = None

    @property
    def skipped(self) -> bool:
        """True when another run made this one unnecessary."""
        return self.outcome == "skipped"

    def to_json(self) -> dict[str, object]:
        """The endpoint's and the CLI's answer."""
        body: dict[str, object] = {
            "success": True,
            "skipped": self.skipped,
            "reset_count": self.reset_count,
            "reset_date": self.reset_date,
            "period": self.period,
            "run_id": str(self.run_id),
            "duration_ms": self.duration_ms,
            "batches": self.batches,
        }
        if self.skip_reason is not None:
            body["reason"] = self.skip_reason
            key = "running_run_id" if self.skip_reason == "already_running" else "served_by_run_id"
            body[key] = None if self.other_run_id is None else str(self.other_run_id)
        return body


class BulkLockSquatted(RuntimeError):
    """The bulk lock is held by a backend that is not a recorded, running bulk run."""


async def _recorded_holder(conn: asyncpg.Connection) -> UUID | None:
    """The run holding the bulk lock; raises when its holder is not a recorded run.

    Any role that can connect can take an advisory lock.  A holder that is not a
    running bulk run (a squatter, or a session that leaked the lock) would otherwise
    make every caller answer "skipped" while nothing runs.  The holder takes the lock
    and then records its run: that instant is allowed for, briefly.
    """
    pid: int | None = None
    with anyio.move_on_after(HOLDER_GRACE_SECONDS):
        while True:
            holder = await conn.fetchrow(query("bulk_lock_holder"))
            if holder is None:
                return None  # released in the meantime: this call simply lost the race
            if holder["run_id"] is not None:
                run_id: UUID = holder["run_id"]
                return run_id
            pid = holder["pid"]
            await anyio.sleep(HOLDER_POLL_SECONDS)
    raise BulkLockSquatted(
        f"the bulk lock is held by backend pid {pid}, which is not a recorded "
        "bulk run: nothing ran (see pg_stat_activity for that pid)"
    )


def _one(row: asyncpg.Record | None, what: str) -> asyncpg.Record:
    """The single row a statement always returns; its absence is a schema mismatch."""
    if row is None:
        raise RuntimeError(f"{what} returned no row")
    return row


@dataclass
class _Run:
    """One run's identity and progress, shared by the happy path and the failure path."""

    settings: Settings
    source: RunSource
    size: int
    slot: datetime | None
    on_batch: ProgressCallback | None
    run_id: UUID = field(default_factory=uuid4)
    batches: int = 0
    reset_count: int = 0
    recorded: bool = False
    retries: int = 0
    started: float = field(default_factory=time.monotonic)

    def elapsed_ms(self) -> int:
        return round((time.monotonic() - self.started) * 1000)

    def fields(self) -> dict[str, int]:
        return {
            "reset_count": self.reset_count,
            "batches": self.batches,
            "retries": self.retries,
            "duration_ms": self.elapsed_ms(),
        }

    async def execute(self, locking: _Connections) -> BulkResult:
        """Lock, record, walk the batches, final pass; or step aside."""
        lock = await locking.open_lock()
        if not await lock.fetchval(query("bulk_lock_try")):
            try:
                other = await _recorded_holder(lock)
            except BulkLockSquatted as exc:
                # Recorded as a failed run (committed with the lock connection's open
                # transaction): status, the gauges and the alerts see it.
                await lock.execute(
                    query("bulk_run_refused"), self.run_id, self.source, self.slot, str(exc)
                )
                await locking.release()
                raise
            return await self.skip(lock, "already_running", other)
        # The run row names the lock's backend: a caller that finds the lock taken
        # checks that its holder is a recorded run (see _recorded_holder).
        lock_pid = await lock.fetchval(query("bulk_lock_pid"))
        # A simple-protocol statement after the lock: it also drops the extended
        # protocol's unnamed portal, whose snapshot would otherwise pin an xmin for
        # as long as the run holds the lock.
        await lock.execute(query("bulk_lock_hold"))
        conn = await locking.open_work()
        abandoned = await conn.fetch(query("bulk_abandon_running"))
        if abandoned:
            log.warning("bulk_run_abandoned", run_ids=[str(r["run_id"]) for r in abandoned])
        if self.slot is not None:
            served_by = await conn.fetchval(query("bulk_slot_done"), self.slot)
            if served_by is not None:
                await locking.release()
                return await self.skip(conn, "slot_done", served_by)
        await conn.execute(query("bulk_run_start"), self.run_id, self.source, self.slot, lock_pid)
        self.recorded = True
        after: UUID | None = None
        # Nothing to do (the usual daily run after the 1st) costs one scan, no batches.
        pending = bool(await conn.fetchval(query("bulk_pending")))
        while pending:
            batch = await self.retrying(conn, self._batch, after)
            self.batches += 1
            self.reset_count += batch["reset_count"]
            self.report()
            if batch["last_key"] is None:
                break
            after = batch["last_key"]
        # The final pass (rows the batches skipped because a writer held them) and the
        # success record commit together: "success" always means the job was finished.
        done = await self.retrying(conn, self._finish, None)
        self.reset_count = done["reset_count"]
        await locking.release()
        return BulkResult(
            run_id=self.run_id,
            source=self.source,
            outcome="success",
            reset_count=done["reset_count"],
            batches=done["batches"],
            duration_ms=self.elapsed_ms(),
            reset_date=done["reset_date"],
            period=done["period"],
            finished_epoch=done["finished_epoch"],
        )

    async def _batch(self, conn: asyncpg.Connection, after: UUID | None) -> asyncpg.Record:
        async with conn.transaction():
            await conn.execute(query("bulk_work_settings"))
            batch = _one(await conn.fetchrow(query("bulk_batch"), after, self.size), "batch")
            await conn.execute(query("bulk_run_progress"), self.run_id, batch["reset_count"])
        return batch

    async def _finish(self, conn: asyncpg.Connection, _: UUID | None) -> asyncpg.Record:
        async with conn.transaction():
            await conn.execute(query("bulk_work_settings"))
            final = await conn.fetchval(query("bulk_final_pass"))
            return _one(await conn.fetchrow(query("bulk_run_success"), self.run_id, final), "run")

    async def retrying(
        self,
        conn: asyncpg.Connection,
        step: Callable[[asyncpg.Connection, UUID | None], Awaitable[asyncpg.Record]],
        after: UUID | None,
    ) -> asyncpg.Record:
        """One transaction, tried again after a serialization failure or a deadlock.

        Under `serializable` (or a deadlock with a writer) PostgreSQL rolls the batch
        back whole, progress row included, so trying it again loses and doubles
        nothing.  Bounded, with jittered backoff; the count lands in the run's row.
        """
        backoff = Backoff(base=RETRY_BASE_SECONDS, cap=RETRY_CAP_SECONDS)
        while True:
            try:
                return await step(conn, after)
            except (asyncpg.SerializationError, asyncpg.DeadlockDetectedError) as exc:
                if backoff.attempt >= MAX_RETRIES:
                    raise
                self.retries += 1
                delay = backoff.next_delay()
                log.warning(
                    "bulk_batch_retry",
                    run_id=str(self.run_id),
                    sqlstate=exc.sqlstate,
                    attempt=backoff.attempt,
                    delay_ms=round(delay * 1000),
                )
                await anyio.sleep(delay)
                await conn.execute(query("bulk_run_retried"), self.run_id)

    async def skip(
        self, conn: asyncpg.Connection, reason: SkipReason, other: UUID | None
    ) -> BulkResult:
        """Record that this call stepped aside, and what it found."""
        detail = f"{reason}: run {other}" if other is not None else reason
        await conn.execute(query("bulk_run_skipped"), self.run_id, self.source, self.slot, detail)
        dates = _one(await conn.fetchrow(query("bulk_period")), "period")
        return BulkResult(
            run_id=self.run_id,
            source=self.source,
            outcome="skipped",
            reset_count=0,
            batches=0,
            duration_ms=self.elapsed_ms(),
            reset_date=dates["reset_date"],
            period=dates["period"],
            skip_reason=reason,
            other_run_id=other,
        )

    def report(self) -> None:
        """Tell the caller's progress callback about the batch just committed."""
        if self.on_batch is None:
            return
        progress = BatchProgress(self.run_id, self.batches, self.reset_count, self.elapsed_ms())
        try:
            self.on_batch(progress)
        except Exception:
            # A progress printer that fails (closed terminal) must not abort a reset.
            log.warning("bulk_progress_callback_failed", run_id=str(self.run_id), exc_info=True)

    async def after_failure(self, locking: _Connections, message: str) -> None:
        """Drop the run's connections (the lock goes with them); record the failure afresh."""
        locking.terminate()
        if not self.recorded:
            return
        recorded = False
        with anyio.move_on_after(CLEANUP_TIMEOUT_SECONDS):
            recorded = await self._record_failure(message)
        if not recorded:
            # The row stays 'running'; the next run that takes the lock marks it abandoned.
            log.warning("bulk_run_not_recorded", run_id=str(self.run_id))

    async def _record_failure(self, message: str) -> bool:
        try:
            fresh = await connect(self.settings, role="bulk", timeout=CLEANUP_TIMEOUT_SECONDS)
        except (OSError, asyncpg.PostgresError):
            return False
        try:
            await fresh.execute(query("bulk_run_failure"), self.run_id, message)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            return False
        finally:
            fresh.terminate()
        return True


async def run_bulk_reset(
    settings: Settings,
    *,
    source: RunSource,
    metrics: Metrics | None = None,
    batch_size: int | None = None,
    on_batch: ProgressCallback | None = None,
    slot: datetime | None = None,
) -> BulkResult:
    """One bulk run, or a prompt skip; raises BulkResetError after recording a failure."""
    size = settings.bulk_batch_size if batch_size is None else batch_size
    if size < 1:
        raise ValueError(f"batch size must be positive, got {size}")
    run = _Run(settings, source, size, slot, on_batch)
    bound = log.bind(run_id=str(run.run_id), source=source)
    bound.info("bulk_reset_started", batch_size=size, slot=iso(slot))
    locking = _Connections(settings)
    try:
        # The kernel notices a dead peer (keepalive on both connections); the deadline
        # bounds a live but stalled one.
        with anyio.fail_after(settings.bulk_run_timeout_seconds):
            result = await run.execute(locking)
    except anyio.get_cancelled_exc_class():
        with anyio.CancelScope(shield=True):
            await run.after_failure(locking, "cancelled")
        _count(metrics, "failure")
        bound.warning("bulk_reset_finished", **run.fields(), outcome="failure", error="cancelled")
        raise
    except Exception as exc:
        message = _failure_cause(exc)
        with anyio.CancelScope(shield=True):
            await run.after_failure(locking, message)
        _count(metrics, "failure")
        bound.error(
            "bulk_reset_finished", **run.fields(), outcome="failure", error=message, exc_info=True
        )
        raise BulkResetError(
            f"bulk reset failed after {run.batches} committed batches "
            f"({run.reset_count} users reset, kept): {message}",
            run_id=run.run_id,
            reset_count=run.reset_count,
            batches=run.batches,
        ) from exc
    await locking.close()
    _count(metrics, result.outcome)
    if metrics is not None and result.finished_epoch is not None:
        metrics.bulk_last_success.set(result.finished_epoch)
    bound.info(
        "bulk_reset_finished",
        reset_count=result.reset_count,
        batches=result.batches,
        duration_ms=result.duration_ms,
        outcome=result.outcome,
        reason=result.skip_reason,
        other_run_id=None if result.other_run_id is None else str(result.other_run_id),
        period=result.period,
    )
    return result


class _Connections:
    """A run's two connections: the lock's (one open transaction) and the work's."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.lock: asyncpg.Connection | None = None
        self.work: asyncpg.Connection | None = None
        self._held: Transaction | None = None

    async def open_lock(self) -> asyncpg.Connection:
        """Connect and BEGIN the transaction that will hold the run's lock."""
        self.lock = await connect(self._settings, role="bulk-lock")
        enable_keepalive(self.lock)
        self._held = self.lock.transaction()
        await self._held.start()
        return self.lock

    async def open_work(self) -> asyncpg.Connection:
        """The connection that runs the batches (opened only once the lock is held)."""
        self.work = await connect(self._settings, role="bulk")
        enable_keepalive(self.work)
        return self.work

    async def release(self) -> None:
        """End the lock's transaction: the next run may start."""
        if self._held is not None:
            held, self._held = self._held, None
            await held.commit()

    async def close(self) -> None:
        """After a run that ended normally: release the lock, close both politely.

        Shielded and bounded, and whatever did not close politely (a cancellation
        arriving meanwhile, a dead socket) is terminated: never a connection left open.
        """
        try:
            with anyio.move_on_after(CLEANUP_TIMEOUT_SECONDS, shield=True):
                with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                    await self.release()
                for conn in (self.work, self.lock):
                    if conn is not None:
                        with contextlib.suppress(
                            OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError
                        ):
                            await conn.close(timeout=CLEANUP_TIMEOUT_SECONDS)
        finally:
            self.terminate()

    def terminate(self) -> None:
        """After a failure: drop both at once; the server ends the lock's transaction."""
        self._held = None
        for conn in (self.work, self.lock):
            if conn is not None and not conn.is_closed():
                conn.terminate()


def _failure_cause(exc: BaseException) -> str:
    """A one-line cause for logs, the run row, the CLI and the HTTP body (no stack, no DSN)."""
    if isinstance(exc, ConnectTimeout):
        text = str(exc)  # host:port and the timeout
    elif isinstance(exc, asyncpg.PostgresError):
        first_line = (str(exc).splitlines() or [""])[0]
        text = f"database error {exc.sqlstate}: {first_line}"
    elif isinstance(exc, BulkLockSquatted):
        text = str(exc)
    elif isinstance(exc, TimeoutError):
        text = "the run did not finish within BULK_RUN_TIMEOUT_SECONDS: stopped, its lock released"
    elif isinstance(exc, OSError | asyncpg.InterfaceError):
        text = f"database unreachable or connection lost ({type(exc).__name__})"
    else:
        text = f"unexpected {type(exc).__name__}"
    return text[:_MAX_ERROR_CHARS]


def _count(metrics: Metrics | None, outcome: str) -> None:
    if metrics is not None:
        metrics.bulk_runs.labels(outcome=outcome).inc()
