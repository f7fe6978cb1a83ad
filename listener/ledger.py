"""The ledger reader: the truth behind every reset metric and log line.

NOTIFY is only a doorbell.  This module reads `token_transactions` reset rows with
ids above a cursor and turns each one into metrics exactly once:

* **Cursor.**  Stored in ``token_reset_listener_cursors`` under the consumer name
  (LISTENER_NAME, default the host name) and written in the same transaction as
  the window it covers, before the metrics move, so a restart neither recounts nor
  skips.  A consumer's first start begins at the newest ledger id: resets written
  before this listener existed are history (the watchdog's gauges, read from the
  database, cover them), and counting a year of ledger into a fresh process's
  counters would be a spike that never happened.  A row still uncommitted at that
  first instant, with an id below the newest, counts as history too.
* **Horizon.**  Ids are drawn at INSERT but become visible at COMMIT, so a smaller
  id can appear after a larger one.  The cursor therefore only passes ids that are
  settled (see ``token_reset_listener_horizon`` in migration 0002): every id up to
  the sequence's high-water mark, once the transactions that were writing the
  ledger at that moment have ended.  Under steady writes that costs one extra read
  cycle of lag; a transaction that writes the ledger and stays open holds counting
  back until it ends.  How long is the gauge `token_reset_ledger_held_back_seconds`
  (alert TokenResetCountingHeldBack); past ``warn_after_seconds`` the log line
  ``ledger_horizon_waiting`` names the holders' sessions (pid, user,
  application_name), so an operator can find the forgotten transaction.
* **Windows.**  Reads go by id in windows of at most ``WINDOW_IDS`` ids, aggregated
  in SQL per (source, period), so a backlog of millions is bounded work per query.
* **Lag.**  `token_reset_event_lag_seconds` gets one observation per (source,
  period) group of a window: the age of the group's oldest row when read, on the
  database's clock.  Rows of one transaction share its start time (a bulk run's
  whole batch does), so per-row observations would repeat one number thousands of
  times; the oldest row is the honest "how far behind are the metrics".
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import anyio
import asyncpg
import structlog

from listener.metrics import RESET_SOURCES, Metrics
from listener.sql import query

log = structlog.get_logger(__name__)

WINDOW_IDS: Final = 50_000
# A horizon held back this long by one open transaction is worth an operator's look.
HORIZON_WAIT_WARNING_SECONDS: Final = 30.0
# Holders named in the log line (a pile-up of hundreds is summarised by the count).
HOLDERS_LOGGED: Final = 10


@dataclass(frozen=True)
class ResetBatch:
    """Reset rows of one window that share a source and a period."""

    source: str
    period: str
    count: int
    first_id: int
    last_id: int
    newest_at: float
    lag_seconds: float


@dataclass(frozen=True)
class CatchUp:
    """What one catch-up found: where the cursor is and what the ledger has handed out."""

    cursor: int
    allocated: int
    settled: int
    rows: int
    pending: bool


@dataclass
class _Pending:
    allocated: int
    writers: list[str]
    since: float = field(default_factory=time.monotonic)
    warned: bool = False


class Ledger:
    """A cursor over the ledger's reset rows; `catch_up` counts new ones exactly once."""

    def __init__(self, metrics: Metrics, consumer: str, *, window_ids: int = WINDOW_IDS) -> None:
        self.metrics = metrics
        self.consumer = consumer
        self.window_ids = window_ids
        self.cursor: int | None = None
        # Observability for tests and benchmarks: catch-ups completed, windows read.
        self.reads = 0
        self.windows = 0
        # Called after each window is counted with (after, upper, rows): benchmarks
        # timestamp processing with it.  Must not block.
        self.on_window: Callable[[int, int, int], None] | None = None
        self._pending: _Pending | None = None
        # How long a held-back horizon waits before the log names its holders.
        self.warn_after_seconds = HORIZON_WAIT_WARNING_SECONDS
        self._last_reset_at = 0.0
        self._lock: anyio.Lock | None = None

    def _exclusive(self) -> contextlib.AbstractAsyncContextManager[object]:
        """The connection's lock for one query, when the caller shares the connection."""
        return self._lock if self._lock is not None else contextlib.nullcontext()

    async def open(self, conn: asyncpg.Connection) -> int:
        """Load (or create) this consumer's cursor and the gauges that come from the DB."""
        row = None
        # A concurrent first start under the same name makes both branches miss once.
        for _ in range(3):
            row = await conn.fetchrow(query("listener_cursor_open"), self.consumer)
            if row is not None:
                break
        if row is None:
            raise RuntimeError(f"could not create the cursor of consumer {self.consumer!r}")
        stored = int(row["last_id"])
        # On a reconnect the in-memory cursor wins, in both directions.  Ahead of the
        # stored one: cursor writes commit asynchronously (see ListenConnection) and a
        # database crash may lose the last few.  Behind it: a window's statement can
        # commit (saving the cursor) while its reply is lost with the connection, so
        # those rows were saved but never counted; re-reading them counts them once
        # (the save uses greatest(), so repeating it is harmless).
        self.cursor = stored if self.cursor is None else self.cursor
        self._pending = None
        self.metrics.ledger_held_back.set(0)
        if row["created"]:
            log.info("ledger_cursor_created", consumer=self.consumer, cursor=self.cursor)
        cache = await conn.fetchval(query("ledger_sequence_cache"))
        if cache is not None and cache > 1:
            log.error(
                "ledger_sequence_cached",
                cache=cache,
                hint="ALTER SEQUENCE ... CACHE 1: cached ids defeat the listener's horizon",
            )
        newest = await conn.fetchval(query("ledger_last_reset"))
        if newest is not None:
            self._set_last_reset(float(newest))
        return self.cursor

    async def catch_up(
        self,
        conn: asyncpg.Connection,
        *,
        lock: anyio.Lock | None = None,
        more_coming: Callable[[], bool] | None = None,
    ) -> CatchUp:
        """Read and count every settled reset row above the cursor.

        `lock` (the connection's) is taken per query, not for the whole catch-up, so a
        long backlog does not starve the liveness probe into a false alarm.
        `more_coming` says another catch-up is already due (doorbells are waiting).
        """
        if self.cursor is None:
            raise RuntimeError("Ledger.open() must run before catch_up()")
        self._lock = lock
        allocated, settled = await self._horizon(conn, self.cursor)
        rows = await self._read_to(conn, settled)
        if self._pending is not None and not (more_coming is not None and more_coming()):
            # One more look: the writers that held the horizon back are usually short
            # transactions that have ended while we read, and no doorbell is waiting
            # to bring us back soon.
            _, settled = await self._horizon(conn, self.cursor)
            rows += await self._read_to(conn, settled)
        self.reads += 1
        return CatchUp(
            cursor=self.cursor,
            allocated=allocated,
            settled=settled,
            rows=rows,
            pending=self._pending is not None,
        )

    async def _read_to(self, conn: asyncpg.Connection, settled: int) -> int:
        """Windows from the cursor up to `settled`; returns the reset rows counted."""
        rows = 0
        while self.cursor is not None and self.cursor < settled:
            upper = min(settled, self.cursor + self.window_ids)
            rows += await self._window(conn, self.cursor, upper)
        return rows

    async def _horizon(self, conn: asyncpg.Connection, cursor: int) -> tuple[int, int]:
        """(allocated now, highest settled id), keeping one pending horizon between calls."""
        pending = self._pending
        async with self._exclusive():
            row = await conn.fetchrow(
                query("ledger_horizon"), pending.writers if pending is not None else []
            )
        if row is None:  # the function always returns one row
            raise RuntimeError("token_reset_listener_horizon() returned no row")
        allocated = int(row["allocated"])
        writers: list[str] = list(row["writers"])
        if allocated < cursor:
            cursor = await self._rewind(conn, cursor, allocated)
            pending = None
        settled = cursor
        if pending is not None and not row["waiting"]:
            settled = max(settled, pending.allocated)
            pending = None
        if not writers:
            settled = max(settled, allocated)
            pending = None
        elif pending is None and allocated > settled:
            pending = _Pending(allocated, writers)
        elif pending is not None:
            await self._warn_if_stuck(conn, pending)
        self._pending = pending
        held = 0.0 if pending is None else time.monotonic() - pending.since
        self.metrics.ledger_held_back.set(held)
        return allocated, settled

    async def _rewind(self, conn: asyncpg.Connection, cursor: int, allocated: int) -> int:
        """The ledger is behind the cursor: a restore or a lossy failover.  Follow it.

        Otherwise the listener would stay silent until new ids passed the old cursor.
        """
        log.error(
            "ledger_rewound",
            cursor=cursor,
            allocated=allocated,
            hint="the ledger's ids went backwards (restore or failover); reading on from there",
        )
        async with self._exclusive():
            await conn.execute(query("listener_cursor_rewind"), self.consumer, allocated)
        self.cursor = allocated
        return allocated

    async def _warn_if_stuck(self, conn: asyncpg.Connection, pending: _Pending) -> None:
        """Once per hold, past warn_after_seconds: log who holds counting back."""
        waited = time.monotonic() - pending.since
        if pending.warned or waited <= self.warn_after_seconds:
            return
        pending.warned = True
        async with self._exclusive():
            rows = await conn.fetch(query("ledger_horizon_holders"), pending.writers)
        holders = [
            {
                "pid": row["pid"],
                "user": row["usename"],
                "application_name": row["application_name"],
                "state": row["state"],
                "transaction_seconds": None
                if row["transaction_seconds"] is None
                else round(row["transaction_seconds"], 1),
                "virtual_transaction": row["virtualtransaction"],
            }
            for row in rows
        ]
        log.warning(
            "ledger_horizon_waiting",
            waited_seconds=round(waited, 1),
            cursor=self.cursor,
            holders=holders[:HOLDERS_LOGGED],
            holder_count=len(holders),
            hint="open transactions that wrote token_transactions hold counting back: "
            "end them (COMMIT/ROLLBACK, or pg_terminate_backend(pid))",
        )

    async def _window(self, conn: asyncpg.Connection, after: int, upper: int) -> int:
        """Read (after, upper] and save the cursor in one statement, then count."""
        self.windows += 1
        async with self._exclusive():
            records = await conn.fetch(query("ledger_window"), self.consumer, after, upper)
        # Counted only after the cursor is durable: a crash in between loses the counts
        # of a process that is gone anyway, and the next one does not count them twice.
        self.cursor = upper
        batches = [_batch(record) for record in records]
        for batch in batches:
            self._record(batch)
        rows = sum(batch.count for batch in batches)
        if self.on_window is not None:
            self.on_window(after, upper, rows)
        return rows

    def _record(self, batch: ResetBatch) -> None:
        source = batch.source if batch.source in RESET_SOURCES else "unknown"
        self.metrics.users_reset.labels(source=source).inc(batch.count)
        self.metrics.event_lag.observe(max(batch.lag_seconds, 0.0))
        self._set_last_reset(batch.newest_at)
        log.info(
            "resets_recorded",
            count=batch.count,
            source=source,
            period=batch.period,
            first_id=batch.first_id,
            last_id=batch.last_id,
            lag_seconds=round(batch.lag_seconds, 6),
        )

    def _set_last_reset(self, at: float) -> None:
        # Windows arrive in id order, but a later id can carry an earlier time.
        if at > self._last_reset_at:
            self._last_reset_at = at
            self.metrics.last_reset_timestamp.set(at)


def _batch(record: asyncpg.Record) -> ResetBatch:
    return ResetBatch(
        source=str(record["source"]),
        period=str(record["period"]),
        count=int(record["resets"]),
        first_id=int(record["first_id"]),
        last_id=int(record["last_id"]),
        newest_at=float(record["newest_at"]),
        lag_seconds=float(record["lag_seconds"]),
    )
