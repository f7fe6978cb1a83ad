"""Benchmark 1: the bulk reset of N stale users against two bare baselines.

Contenders, each on a fresh file copy of the same template database (same rows, same
physical layout), after a CHECKPOINT, interleaved and rotated across repetitions:

- function: ``SELECT reset_monthly_tokens_for_all_users()`` (keyset batches, one
  transaction);
- committing: the same batches each in its own transaction, the way the listener's
  runner calls ``token_reset_bulk_batch`` then ``token_reset_bulk_final_pass``;
- minimal: one statement in which the UPDATE feeds one INSERT of a ledger row per reset
  user (triggers off): the least work the contract asks for;
- bare: the UPDATE alone, triggers off.

Target: function <= 1.5x minimal.  ``python -m bench.bulk_reset --help``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from bench.common import (
    BenchServer,
    add_patch_option,
    backend_cpu_seconds,
    base_parser,
    bench_server,
    build_template,
    fresh_copy,
    local_backend_pid,
    machine,
    machine_since,
    print_table,
    publish,
    ratio,
    read_patch,
    rotated,
    stale_users_sql,
    summary,
    timed,
)
from listener.sql import query

NAME = "bulk_reset"
TARGET_FUNCTION_OVER_MINIMAL = 1.5

LOAD_USERS = stale_users_sql("bench-user-")

BARE = """
UPDATE user_tokens SET monthly_tokens_used = 0, last_monthly_reset = now()
 WHERE last_monthly_reset < token_reset_period_start() AND monthly_tokens_used > 0
"""

# PostgreSQL before 18 cannot RETURNING the old value, and the ledger row needs the
# usage it cleared, so the UPDATE reads it from a self-join on the row's ctid
# (a TID join: no index, no second lookup by key).
MINIMAL = """
WITH u AS (
    UPDATE user_tokens t
       SET monthly_tokens_used = 0, last_monthly_reset = now()
      FROM user_tokens o
     WHERE o.ctid = t.ctid
       AND o.last_monthly_reset < token_reset_period_start()
       AND o.monthly_tokens_used > 0
    RETURNING t.user_id, o.monthly_tokens_used AS previous_used
)
INSERT INTO token_transactions (user_id, operation, feature, amount, metadata)
SELECT user_id, 'reset', 'monthly_rollover', previous_used,
       jsonb_build_object('period', token_reset_period_label(now()),
                          'previous_used', previous_used, 'source', 'bulk')
  FROM u
"""

DISABLE_TRIGGERS = (
    "ALTER TABLE user_tokens DISABLE TRIGGER USER",
    "ALTER TABLE token_transactions DISABLE TRIGGER USER",
)


async def disable_triggers(conn: asyncpg.Connection, off: bool) -> None:
    """For a contender that runs without the project's triggers (off), disable them on
    its copy (also bench/scale_bulk.py); otherwise leave the copy as it is."""
    if off:
        for statement in DISABLE_TRIGGERS:
            await conn.execute(statement)


@dataclass(frozen=True)
class Contender:
    """How to prepare a fresh copy, the timed action, and whether it writes the ledger."""

    description: str
    triggers_off: bool
    writes_ledger: bool
    action: Callable[[asyncpg.Connection, int], Awaitable[int]]


async def _function(conn: asyncpg.Connection, batch_size: int) -> int:
    del batch_size  # the public function uses its own default (10k)
    answer = json.loads(await conn.fetchval("SELECT reset_monthly_tokens_for_all_users()"))
    return int(answer["reset_count"])


async def _committing(conn: asyncpg.Connection, batch_size: int) -> int:
    # The listener runner's own named queries (listener/bulk.py), one transaction per
    # batch as it does; only its bookkeeping row in token_reset_bulk_runs is left out.
    after: Any = None
    total = 0
    while True:  # bounded: the keyset walk ends after users / batch_size batches
        async with conn.transaction():
            row = await conn.fetchrow(query("bulk_batch"), after, batch_size)
        assert row is not None
        total += int(row["reset_count"])
        if row["last_key"] is None:
            break
        after = row["last_key"]
    async with conn.transaction():
        final: int = await conn.fetchval(query("bulk_final_pass"))
    return total + final


async def _statement(conn: asyncpg.Connection, sql: str) -> int:
    status = await conn.execute(sql)
    return int(status.split()[-1])


async def _minimal(conn: asyncpg.Connection, batch_size: int) -> int:
    del batch_size
    return await _statement(conn, MINIMAL)


async def _bare(conn: asyncpg.Connection, batch_size: int) -> int:
    del batch_size
    return await _statement(conn, BARE)


CONTENDERS: dict[str, Contender] = {
    "function": Contender("SELECT reset_monthly_tokens_for_all_users()", False, True, _function),
    "committing": Contender(
        "token_reset_bulk_batch per transaction + final pass", False, True, _committing
    ),
    "minimal": Contender("UPDATE feeding one ledger INSERT, triggers off", True, True, _minimal),
    "bare": Contender("bare UPDATE, triggers off", True, False, _bare),
}


async def _table_stats(conn: asyncpg.Connection) -> tuple[int, int]:
    # Pending statistics reach the shared view only when the backend goes idle.
    if conn.get_server_version().major >= 15:
        await conn.execute("SELECT pg_stat_force_next_flush()")
    row = await conn.fetchrow(
        "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'user_tokens'"
    )
    assert row is not None
    return int(row["n_tup_upd"]), int(row["n_tup_hot_upd"])


async def measure_once(
    server: BenchServer, template: str, name: str, users: int, batch_size: int
) -> dict[str, Any]:
    """One measurement of one contender on a fresh copy; checks it did the whole job."""
    contender = CONTENDERS[name]
    async with fresh_copy(server, template, "bench_bulk") as copy:
        conn = copy.conn
        await disable_triggers(conn, contender.triggers_off)
        await conn.execute("CHECKPOINT")
        pid = local_backend_pid(conn, copy.name)
        wal_before = await conn.fetchval("SELECT pg_current_wal_insert_lsn()")
        cpu_before = backend_cpu_seconds(pid) if pid else None
        seconds, reset = await timed(lambda: contender.action(conn, batch_size))
        cpu_after = backend_cpu_seconds(pid) if pid else None
        wal_bytes = await conn.fetchval(
            "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), $1)", wal_before
        )
        await _check(conn, contender, users, reset)
        updates, hot = await _table_stats(conn)
    cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "reset": reset,
        "wal_bytes": int(wal_bytes),
        "hot_update_ratio": hot / updates if updates else 0.0,
    }


async def _check(conn: asyncpg.Connection, contender: Contender, users: int, reset: int) -> None:
    left = await conn.fetchval("SELECT count(*) FROM user_tokens WHERE monthly_tokens_used > 0")
    ledger = await conn.fetchval("SELECT count(*) FROM token_transactions")
    expected_ledger = users if contender.writes_ledger else 0
    if reset != users or left != 0 or ledger != expected_ledger:
        raise RuntimeError(
            f"{contender.description}: reset {reset} of {users}, {left} left stale, "
            f"{ledger} ledger rows (expected {expected_ledger})"
        )


async def run(
    users: int,
    repetitions: int,
    batch_size: int,
    names: Sequence[str],
    patch: Path | None = None,
) -> dict[str, Any]:
    """Build the data once, measure every contender `repetitions` times, summarise."""
    load_before = machine()["loadavg"]
    with bench_server() as server:
        settings = await server.describe()
        template = await build_template(
            server, "bench_bulk_tpl", LOAD_USERS, users, read_patch(patch)
        )
        try:
            raw: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
            for repetition in range(repetitions):
                for name in rotated(names, repetition):
                    result = await measure_once(server, template, name, users, batch_size)
                    print(
                        f"  rep {repetition + 1}/{repetitions} {name:<10} {result['seconds']:.2f} s"
                    )
                    raw[name].append(result)
        finally:
            await server.drop_database(template)
    contenders = {
        name: {
            "description": CONTENDERS[name].description,
            "seconds": summary([r["seconds"] for r in results]),
            "cpu_seconds": _optional_summary([r["cpu_seconds"] for r in results]),
            "wal_bytes": summary([float(r["wal_bytes"]) for r in results]),
            "hot_update_ratio": summary([r["hot_update_ratio"] for r in results]),
        }
        for name, results in raw.items()
    }
    return {
        "benchmark": NAME,
        "users": users,
        "batch_size": batch_size,
        "repetitions": repetitions,
        "patch": str(patch) if patch else None,
        "contenders": contenders,
        "ratios": _ratios(contenders),
        "target": {"function_over_minimal_max": TARGET_FUNCTION_OVER_MINIMAL},
        "server": settings,
        "machine": machine_since(load_before),
    }


def _optional_summary(samples: Sequence[float | None]) -> dict[str, Any] | None:
    """summary() when every sample exists (CPU time needs a local server), else None."""
    present = [s for s in samples if s is not None]
    return summary(present) if present and len(present) == len(samples) else None


def _ratios(contenders: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Every contender over each baseline present, by min and median wall time, and by
    median backend CPU time when it was measured."""
    ratios: dict[str, dict[str, float]] = {}
    for name, ours in contenders.items():
        for baseline in ("minimal", "bare"):
            # "bare" is the lower baseline: bare/minimal would only restate minimal/bare.
            if baseline == name or baseline not in contenders or name == "bare":
                continue
            theirs = contenders[baseline]
            entry = {
                stat: ratio(ours["seconds"][stat], theirs["seconds"][stat])
                for stat in ("min", "median")
            }
            if ours["cpu_seconds"] and theirs["cpu_seconds"]:
                entry["cpu_median"] = ratio(
                    ours["cpu_seconds"]["median"], theirs["cpu_seconds"]["median"]
                )
            ratios[f"{name}/{baseline}"] = entry
    return ratios


def report(payload: dict[str, Any]) -> None:
    """The human table: seconds, WAL, HOT ratio per contender, then the ratios."""
    rows = [
        [
            name,
            data["seconds"]["min"],
            data["seconds"]["median"],
            data["cpu_seconds"]["median"] if data["cpu_seconds"] else "-",
            data["wal_bytes"]["median"] / 2**20,
            data["hot_update_ratio"]["median"],
        ]
        for name, data in payload["contenders"].items()
    ]
    print_table(
        f"bulk reset of {payload['users']:,} stale users ({payload['repetitions']} reps, "
        f"PG {payload['server'].get('server_version')})",
        ["contender", "min s", "median s", "CPU s (med)", "WAL MiB", "HOT ratio"],
        rows,
    )
    ratio_rows = [
        [key, value["min"], value["median"], value.get("cpu_median", "-")]
        for key, value in payload["ratios"].items()
    ]
    print_table(
        "ratios (target function/minimal <= 1.5)",
        ["ratio", "of mins", "of medians", "of CPU medians"],
        ratio_rows,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the bulk reset benchmark; prints a table and writes the JSON results."""
    parser = base_parser(__doc__, NAME)
    parser.add_argument("--users", type=int, default=None, help="stale users (default 1,000,000)")
    parser.add_argument("--batch-size", type=int, default=10_000, help="committing variant batch")
    parser.add_argument(
        "--contenders",
        default=",".join(CONTENDERS),
        help=f"comma-separated subset of {','.join(CONTENDERS)}",
    )
    add_patch_option(parser)
    args = parser.parse_args(argv)
    users = args.users or (20_000 if args.smoke else 1_000_000)
    repetitions = args.repetitions or (1 if args.smoke else 3)
    batch_size = 2_000 if args.smoke and args.batch_size == 10_000 else args.batch_size
    names = [name.strip() for name in args.contenders.split(",") if name.strip()]
    unknown = [name for name in names if name not in CONTENDERS]
    if unknown or not names:
        parser.error(f"unknown contenders {unknown}; choose from {','.join(CONTENDERS)}")
    payload = asyncio.run(run(users, repetitions, batch_size, names, args.patch))
    return publish(payload, report, NAME, args, patched=args.patch is not None)


if __name__ == "__main__":
    raise SystemExit(main())
