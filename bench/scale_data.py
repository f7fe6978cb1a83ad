"""The data of bench/scale.py: N stale users and a month of ledger behind them.

Built through the project's migrations (BenchServer.migrated_database runs
listener.migrate.apply_migrations), so the schema is whatever the migrations say today;
the loads only INSERT rows and name public functions (token_reset_period_start,
token_reset_zone, token_reset_period_label, token_reset_reset_metadata), never copies of
their bodies.

Per user n (uuid ``md5('bench-user-' || n)``: key order unrelated to heap order, as with
real uuid v4 ids): last period's reset row at the start of the previous period, then
``ledger_per_user`` deductions spread over the previous period in created_at order (so
BRIN sees the ledger as it grows), and ``monthly_tokens_used`` equal to the sum of those
deductions (the ledger equation holds).  Every user is stale: its last reset is in the
previous period.  Rows are written with INSERT ... SELECT under
``session_replication_role = replica`` (no trigger fires for a data load).
"""

from __future__ import annotations

import time
from typing import Any

import asyncpg

from bench.common import BenchServer
from listener.bulk import run_bulk_reset
from listener.config import Settings
from tests.support.database import unique_name

# The previous period, from the public period functions: the same expression the
# watchdog uses for "last period".
_PREVIOUS = """
WITH p AS (
    SELECT public.token_reset_period_start() AS period_start,
           pg_catalog.timezone(public.token_reset_zone(),
               pg_catalog.timezone(public.token_reset_zone(), public.token_reset_period_start())
               - interval '1 month') AS prev_start
), prev AS (
    SELECT period_start, prev_start,
           public.token_reset_period_label(prev_start) AS prev_label,
           -- deductions go between 3 h after the previous reset and 1 h before now's period
           (period_start - interval '1 hour') - (prev_start + interval '3 hours') AS span
      FROM p
)
"""

# $1 users, $2 deductions per user.  Usage = the user's deduction amounts, summed.
LOAD_USERS = (
    _PREVIOUS
    + """
INSERT INTO public.user_tokens (user_id, monthly_token_limit, monthly_tokens_used,
                                last_monthly_reset, created_at, updated_at)
SELECT md5('bench-user-' || n)::uuid, 1000000000,
       (SELECT coalesce(sum(1 + (n * 7 + k) % 50), 0)::integer
          FROM generate_series(1, $2::integer) AS k),
       prev.prev_start + (n - 1) * interval '1 millisecond',
       prev.prev_start - interval '400 days',
       prev.period_start - interval '1 hour'
  FROM prev, generate_series(1, $1::integer) AS n
"""
)

# Last period's reset of every user (what the previous bulk run wrote).
LOAD_PREVIOUS_RESETS = (
    _PREVIOUS
    + """
INSERT INTO public.token_transactions
       (user_id, operation, feature, amount, created_at, metadata, period)
SELECT md5('bench-user-' || n)::uuid, 'reset', 'monthly_rollover', 1 + n % 499,
       prev.prev_start + (n - 1) * interval '1 millisecond',
       public.token_reset_reset_metadata(prev.prev_label, 1 + n % 499, 'bulk'),
       prev.prev_label
  FROM prev, generate_series(1, $1::integer) AS n
"""
)

# One series in (deduction round, user) order: ids and created_at rise together.
LOAD_DEDUCTIONS = (
    _PREVIOUS
    + """
INSERT INTO public.token_transactions
       (user_id, operation, feature, amount, created_at, metadata, period)
SELECT md5('bench-user-' || (i % $1 + 1))::uuid, 'deduct', 'bench',
       1 + ((i % $1 + 1) * 7 + i / $1 + 1) % 50,
       prev.prev_start + interval '3 hours' + i * (prev.span / ($1::bigint * $2 + 1)),
       pg_catalog.jsonb_build_object('period', prev.prev_label),
       prev.prev_label
  FROM prev, generate_series(0::bigint, $1::bigint * $2 - 1) AS i
"""
)

# The lean minimal contender's ledger: the same row shape, only its key and the
# one-reset-per-period index.  A schema of its own keeps the project's schema as the
# migrations left it.  The table starts empty: its two indexes never hold deductions
# (the key is append-only, the unique index is partial on resets), so last month's
# deductions would change none of its index work.
CREATE_BENCH_SCHEMA = """
CREATE SCHEMA bench;
CREATE TABLE bench.lean_ledger (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id uuid NOT NULL,
    operation text NOT NULL,
    feature text,
    amount integer NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    metadata jsonb
);
CREATE UNIQUE INDEX lean_ledger_one_reset_per_period
    ON bench.lean_ledger ((metadata ->> 'period'), user_id) WHERE operation = 'reset';
"""

# The bare write baseline: a counter per user on a plain table of the same size, with
# user_tokens' fillfactor so both have the same room for HOT updates.
CREATE_COUNTER = """
CREATE TABLE bench.counter (user_id uuid PRIMARY KEY, used integer NOT NULL DEFAULT 0)
    WITH (fillfactor = 80)
"""
LOAD_COUNTER = """
INSERT INTO bench.counter (user_id, used)
SELECT md5('bench-user-' || n)::uuid, 0 FROM generate_series(1, $1::integer) AS n
"""

VACUUM = (
    "VACUUM (FREEZE, ANALYZE) public.user_tokens",
    "VACUUM (FREEZE, ANALYZE) public.token_transactions",
)

# The ledger is partitioned by period (migration 0006): the heap and each index are
# summed over every partition (a partitioned parent's own size is 0).  Partition
# indexes are named after their parent index through pg_inherits.
LEDGER_SIZES = """
WITH parts AS (
    SELECT relid FROM pg_partition_tree('public.token_transactions') WHERE isleaf
), heap AS (
    SELECT 'token_transactions' AS name, 'heap' AS kind, sum(pg_relation_size(relid)) AS bytes
      FROM parts
), indexes AS (
    SELECT coalesce(parent.relname, idx.relname) AS name, 'index' AS kind,
           sum(pg_relation_size(idx.oid)) AS bytes
      FROM parts
      JOIN pg_index i ON i.indrelid = parts.relid
      JOIN pg_class idx ON idx.oid = i.indexrelid
      LEFT JOIN pg_inherits h ON h.inhrelid = idx.oid
      LEFT JOIN pg_class parent ON parent.oid = h.inhparent
     GROUP BY 1
)
SELECT name, kind, bytes::bigint AS bytes FROM heap
UNION ALL
SELECT name, kind, bytes::bigint FROM indexes
 ORDER BY kind, name
"""


async def build_base(
    server: BenchServer, users: int, ledger_per_user: int, patch: str | None
) -> tuple[str, dict[str, float]]:
    """The migrated template of one size: stale users, a month of ledger; frozen and
    analysed.  Returns its name and how long each step took."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    name, url = await server.migrated_database("bench_scale_tpl")
    conn = await asyncpg.connect(url)
    try:
        if patch:
            await conn.execute(patch)
        await conn.execute("SET session_replication_role = replica")
        await conn.execute(LOAD_USERS, users, ledger_per_user)
        await conn.execute(LOAD_PREVIOUS_RESETS, users)
        if ledger_per_user > 0:
            await conn.execute(LOAD_DEDUCTIONS, users, ledger_per_user)
        await conn.execute("RESET session_replication_role")
        await conn.execute(CREATE_BENCH_SCHEMA)
        timings["load_seconds"] = time.perf_counter() - started
        for statement in VACUUM:
            await conn.execute(statement)
        await conn.execute("CHECKPOINT")
        timings["vacuum_seconds"] = time.perf_counter() - started - timings["load_seconds"]
    finally:
        await conn.close()
    return name, timings


async def build_after_reset(server: BenchServer, base: str, users: int) -> str:
    """A copy of the base after the listener runner's bulk reset, vacuumed, plus the bare
    counter table: what the write benchmark clones (users current, ledger a month long)."""
    name = unique_name("bench_scale_wtpl")
    url = await server.create_database(name, base)
    result = await run_bulk_reset(
        Settings(database_url=url, reset_schedule="off"), source="cli", batch_size=10_000
    )
    if result.reset_count != users:
        raise RuntimeError(f"write template: reset {result.reset_count} of {users}")
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(CREATE_COUNTER)
        await conn.execute(LOAD_COUNTER, users)
        for statement in (*VACUUM, "VACUUM (FREEZE, ANALYZE) bench.counter"):
            await conn.execute(statement)
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()
    return name


async def ledger_sizes(server: BenchServer, database: str) -> dict[str, Any]:
    """token_transactions' heap and each index, in bytes and bytes per million rows."""
    conn = await asyncpg.connect(server.url(database))
    try:
        rows = await conn.fetchval("SELECT count(*) FROM public.token_transactions")
        resets = await conn.fetchval(
            "SELECT count(*) FROM public.token_transactions WHERE operation = 'reset'"
        )
        total = await conn.fetchval(
            "SELECT sum(pg_total_relation_size(relid))::bigint"
            " FROM pg_partition_tree('public.token_transactions') WHERE isleaf"
        )
        parts = await conn.fetch(LEDGER_SIZES)
        user_table = await conn.fetchval("SELECT pg_total_relation_size('public.user_tokens')")
        database_bytes = await conn.fetchval("SELECT pg_database_size(current_database())")
    finally:
        await conn.close()
    millions = max(rows, 1) / 1e6
    return {
        "rows": rows,
        "reset_rows": resets,
        "total_bytes": total,
        "total_bytes_per_million_rows": total / millions,
        "relations": {
            r["name"]: {
                "kind": r["kind"],
                "bytes": r["bytes"],
                "bytes_per_million_rows": r["bytes"] / millions,
            }
            for r in parts
        },
        "user_tokens_total_bytes": user_table,
        "database_bytes": database_bytes,
    }
