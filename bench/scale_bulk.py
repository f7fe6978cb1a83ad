"""The bulk-reset part of bench/scale.py, and what is measured right after it.

Every measurement runs on a fresh file copy of the size's template, after a CHECKPOINT:

- the contender's run (seconds, the server's CPU seconds, WAL bytes), checked (every
  user reset, one ledger row each), then the HOT-update ratio and the table's growth;
- a second run of the same entry point, which finds nobody stale ("nothing to do");
- on the listener runner's copy also: watchdog_snapshot and status_summary latency
  beside a bare ``count(*)`` of user_tokens, and the catch-up of a listener that was
  down during the run (its cursor was opened before it) beside one bare read of the
  same reset rows.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import asyncpg

from bench.bulk_reset import BARE, MINIMAL, disable_triggers
from bench.common import (
    BenchServer,
    fresh_copy,
    listener_settings,
    local_backend_pid,
    postmaster_pid,
    server_cpu_seconds,
)
from bench.write_path import settle
from listener.bulk import run_bulk_reset
from listener.config import Settings
from listener.logs import configure_logging
from listener.metrics import Metrics
from listener.service import Service
from listener.sql import query

CONSUMER = "bench-scale"
LISTENER_TIMEOUT_SECONDS = 600.0

# bench/bulk_reset.py's minimal statement, pointed at the lean ledger (only its key and
# the one-reset-per-period index); the statement itself is defined once, there.
_TARGET = "INSERT INTO token_transactions"
assert _TARGET in MINIMAL, "bench/bulk_reset.py's MINIMAL changed its INSERT target"
MINIMAL_LEAN = MINIMAL.replace(_TARGET, "INSERT INTO bench.lean_ledger")

BARE_COUNT_USERS = "SELECT count(*) FROM public.user_tokens"
BARE_READ_RESETS = (
    "SELECT count(*) FROM public.token_transactions WHERE operation = 'reset' AND id > $1"
)
LATENCY_QUERIES = {
    "watchdog_snapshot": query("watchdog_snapshot"),
    "status_summary": query("status_summary"),
    "bare_count_users": BARE_COUNT_USERS,
}


@dataclass(frozen=True)
class Contender:
    """The timed action on a copy, whether it runs with triggers off, and where its
    ledger rows go (None: it writes none)."""

    description: str
    triggers_off: bool
    ledger: str | None
    action: Callable[[str, asyncpg.Connection, int], Awaitable[int]]


async def _function(url: str, conn: asyncpg.Connection, batch_size: int) -> int:
    del url, batch_size  # the public function uses its own batch size
    answer = json.loads(await conn.fetchval("SELECT reset_monthly_tokens_for_all_users()"))
    return int(answer["reset_count"])


async def _committing(url: str, conn: asyncpg.Connection, batch_size: int) -> int:
    # The listener's runner itself (lock, run row, pending check, batches, final pass),
    # on its own connection, as `token-reset reset` and the schedule call it.
    del conn
    settings = Settings(database_url=url, reset_schedule="off")
    result = await run_bulk_reset(settings, source="cli", batch_size=batch_size)
    return result.reset_count


async def _statement(conn: asyncpg.Connection, sql: str) -> int:
    status = await conn.execute(sql)
    return int(status.split()[-1])


async def _minimal(url: str, conn: asyncpg.Connection, batch_size: int) -> int:
    del url, batch_size
    return await _statement(conn, MINIMAL_LEAN)


async def _minimal_full(url: str, conn: asyncpg.Connection, batch_size: int) -> int:
    del url, batch_size
    return await _statement(conn, MINIMAL)


async def _bare(url: str, conn: asyncpg.Connection, batch_size: int) -> int:
    del url, batch_size
    return await _statement(conn, BARE)


CONTENDERS: dict[str, Contender] = {
    "function": Contender(
        "SELECT reset_monthly_tokens_for_all_users() (one transaction)",
        False,
        "public.token_transactions",
        _function,
    ),
    "committing": Contender(
        "listener.bulk.run_bulk_reset (a transaction per batch)",
        False,
        "public.token_transactions",
        _committing,
    ),
    "minimal": Contender(
        "UPDATE feeding one INSERT into a ledger with only its key and the "
        "one-reset-per-period index, triggers off",
        True,
        "bench.lean_ledger",
        _minimal,
    ),
    "minimal_full": Contender(
        "the same statement into the project's ledger (all its indexes), triggers off",
        True,
        "public.token_transactions",
        _minimal_full,
    ),
    "bare": Contender("UPDATE only, triggers off", True, None, _bare),
}

TABLE_STATE = """
SELECT n_tup_upd, n_tup_hot_upd, n_dead_tup,
       pg_relation_size('public.user_tokens') AS heap_bytes,
       pg_total_relation_size('public.user_tokens') AS total_bytes
  FROM pg_stat_user_tables WHERE relid = 'public.user_tokens'::regclass
"""


async def _table_state(conn: asyncpg.Connection) -> asyncpg.Record:
    # Pending statistics reach the shared view only when the backend goes idle.
    if conn.get_server_version().major >= 15:
        await conn.execute("SELECT pg_stat_force_next_flush()")
    row = await conn.fetchrow(TABLE_STATE)
    assert row is not None
    return row


class ServerClock:
    """CPU seconds of every process of a local server (None for a remote one); read
    after the timed action's own connections have closed and been reaped."""

    def __init__(self, conn: asyncpg.Connection, database: str) -> None:
        pid = local_backend_pid(conn, database)
        self.postmaster = postmaster_pid(pid) if pid else None
        self.conn = conn

    async def read(self) -> float | None:
        if self.postmaster is None:
            return None
        try:
            await settle(self.conn, self.postmaster)
        except RuntimeError:
            return None  # a connection that would not go away: no CPU figure, not a crash
        return server_cpu_seconds(self.postmaster)


async def _timed_run(
    conn: asyncpg.Connection, database: str, url: str, contender: Contender, batch_size: int
) -> dict[str, Any]:
    await conn.execute("CHECKPOINT")
    clock = ServerClock(conn, database)
    wal_before = await conn.fetchval("SELECT pg_current_wal_insert_lsn()")
    cpu_before = await clock.read()
    started = time.perf_counter()
    reset = await contender.action(url, conn, batch_size)
    seconds = time.perf_counter() - started
    cpu_after = await clock.read()
    wal_bytes = await conn.fetchval(
        "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), $1)", wal_before
    )
    cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    return {"seconds": seconds, "server_cpu_seconds": cpu, "reset": reset, "wal_bytes": wal_bytes}


async def _check(conn: asyncpg.Connection, contender: Contender, users: int, reset: int) -> None:
    left = await conn.fetchval(
        "SELECT count(*) FROM public.user_tokens"
        " WHERE last_monthly_reset < public.token_reset_period_start()"
        " AND monthly_tokens_used > 0"
    )
    ledger = 0
    if contender.ledger is not None:
        ledger = await conn.fetchval(
            f"SELECT count(*) FROM {contender.ledger}"
            " WHERE operation = 'reset'"
            " AND metadata ->> 'period' = public.token_reset_period_label(now())"
        )
    expected = users if contender.ledger is not None else 0
    if reset != users or left != 0 or ledger != expected:
        raise RuntimeError(
            f"{contender.description}: reset {reset} of {users}, {left} left stale, "
            f"{ledger} ledger rows this period (expected {expected})"
        )


async def measure_once(
    server: BenchServer,
    template: str,
    name: str,
    users: int,
    batch_size: int,
    *,
    latency_runs: int,
    extras: bool,
) -> dict[str, Any]:
    """One contender on a fresh copy; with `extras`, latency and listener catch-up too."""
    contender = CONTENDERS[name]
    async with fresh_copy(server, template, "bench_scale") as copy:
        conn, database, url = copy.conn, copy.name, copy.url
        await disable_triggers(conn, contender.triggers_off)
        cursor = None
        if extras:  # the listener's cursor exists: it was running before, then down
            opened = await conn.fetchrow(query("listener_cursor_open"), CONSUMER)
            assert opened is not None
            cursor = int(opened["last_id"])
        before = await _table_state(conn)
        run = await _timed_run(conn, database, url, contender, batch_size)
        await _check(conn, contender, users, run["reset"])
        after = await _table_state(conn)
        again = await _timed_run(conn, database, url, contender, batch_size)
        if again["reset"] != 0:
            raise RuntimeError(f"{name}: the second run reset {again['reset']}")
        result = {
            **run,
            "hot_update_ratio": _hot_ratio(before, after),
            "heap_growth": after["heap_bytes"] / before["heap_bytes"] - 1,
            "total_growth": after["total_bytes"] / before["total_bytes"] - 1,
            "dead_tuples": after["n_dead_tup"],
            "nothing_to_do_seconds": again["seconds"],
        }
        if extras:
            assert cursor is not None
            result["latency"] = await latencies(conn, latency_runs)
            result["listener"] = await listener_catch_up(conn, url, cursor, users)
    return result


def _hot_ratio(before: asyncpg.Record, after: asyncpg.Record) -> float:
    updates = after["n_tup_upd"] - before["n_tup_upd"]
    hot = after["n_tup_hot_upd"] - before["n_tup_hot_upd"]
    return hot / updates if updates else 0.0


async def latencies(conn: asyncpg.Connection, runs: int) -> dict[str, dict[str, Any]]:
    """Each query's first call (it may set hint bits on rows the reset wrote) and then
    `runs` more, interleaved so drift on a shared machine hits all of them alike."""
    found: dict[str, dict[str, Any]] = {name: {"samples": []} for name in LATENCY_QUERIES}
    for repetition in range(runs + 1):
        for name, sql in LATENCY_QUERIES.items():
            started = time.perf_counter()
            await conn.fetchrow(sql)
            seconds = time.perf_counter() - started
            if repetition == 0:
                found[name]["first_seconds"] = seconds
            else:
                found[name]["samples"].append(seconds)
    return found


async def listener_catch_up(
    conn: asyncpg.Connection, url: str, cursor: int, users: int
) -> dict[str, Any]:
    """A listener that was down during the bulk run starts: seconds until it is ready
    and until it has counted every reset, beside one bare read of the same rows."""
    started = time.perf_counter()
    bare_rows = await conn.fetchval(BARE_READ_RESETS, cursor)
    bare_seconds = time.perf_counter() - started
    if bare_rows != users:
        raise RuntimeError(f"listener catch-up: {bare_rows} reset rows after the cursor")
    last_id = await conn.fetchval("SELECT max(id) FROM public.token_transactions")
    settings = listener_settings(url, CONSUMER)
    service = Service(settings, Metrics.fresh(), handle_signals=False)
    counted = 0
    windows = 0

    def on_window(after: int, upper: int, rows: int) -> None:
        nonlocal counted, windows
        del after, upper
        counted += rows
        windows += 1

    service.ledger.on_window = on_window
    ready_seconds = counted_seconds = None
    started = time.perf_counter()
    async with anyio.create_task_group() as group:
        await group.start(service.run)
        with anyio.fail_after(LISTENER_TIMEOUT_SECONDS):
            # Readiness and the count are plain fields: poll them.
            while ready_seconds is None or counted_seconds is None:
                now = time.perf_counter() - started
                if ready_seconds is None and not service.state.not_ready():
                    ready_seconds = now
                if counted_seconds is None and counted >= users:
                    counted_seconds = now
                await anyio.sleep(0.002)
        service.stop()
    if counted != users or (service.ledger.cursor or 0) < last_id:
        raise RuntimeError(f"listener counted {counted} of {users} resets")
    return {
        "ready_seconds": ready_seconds,
        "counted_seconds": counted_seconds,
        "resets": counted,
        "windows": windows,
        "bare_read_seconds": bare_seconds,
    }


def devnull_logs() -> None:
    """The runner and the listener render their logs as in production, into /dev/null."""
    configure_logging("json", "INFO", stream=open(os.devnull, "w", encoding="utf-8"))  # noqa: SIM115
