"""Benchmark: what the usage analytics cost, at 100k, 1M and 10M users with a month of ledger.

For each N: N users in this period (loaded with the triggers off, then the owner's
recounts, as README says for a load) and a month of ledger behind them: two deductions
per user, over 14 features, in this period's partition.  Then, measured:

- the fold of the deductions written since the last check (`token_reset_fold_deductions`,
  after BATCH new deductions), and the watchdog's whole check (`fetch_snapshot`: folds
  and the snapshot with every analytics number);
- the bare baseline the fold replaces: the per-feature sum over this period's ledger
  (what a dashboard would otherwise run), timed in the same run;
- the hot path: deduct_tokens in a server-side loop on random users, as shipped (it
  counts its own crossings of the 80 %/100 % lines) and as the previous release had it
  (its deduct_tokens and count trigger swapped in), beside a bare
  `UPDATE ... SET used = used + 1` of the same users: the price of the near-limit
  counting.

Target (issue "usage analytics"): the fold and the check cost about the same at 100k and
10M users, while the bare ledger sum grows with the ledger.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import asyncpg

from bench.common import (
    per_size,
    print_table,
    publish,
    rotated,
    sized_run_args,
    timed,
)
from bench.periodic_cost import median_seconds
from listener.migrate import apply_migrations
from listener.sql import migrations
from listener.watchdog import fetch_snapshot

NAME = "analytics_cost"
FEATURES = 14
LEDGER_ROWS_PER_USER = 2
# New deductions between two checks: about a minute of a busy application.
BATCH = 10_000
ROUNDS = 6
LEDGER_SUM = (
    "SELECT coalesce(feature, '(none)'), sum(amount) FROM token_transactions"
    " WHERE operation = 'deduct' AND period = token_reset_period_label(now()) GROUP BY 1"
)
# The release before 0010: its count trigger (0005) and its deduct_tokens (0004, read
# from that migration), swapped in inside a transaction that is rolled back after.
PREVIOUS_COUNT_TRIGGER = """
DROP TRIGGER user_tokens_count_update ON user_tokens;
CREATE TRIGGER user_tokens_count_update AFTER UPDATE ON user_tokens FOR EACH ROW
    WHEN (((OLD.monthly_tokens_used > 0) <> (NEW.monthly_tokens_used > 0)
           OR OLD.last_monthly_reset <> NEW.last_monthly_reset)
          AND pg_catalog.current_setting('token_reset.counting', true) IS DISTINCT FROM 'self')
    EXECUTE FUNCTION token_reset_count_usage()
"""


def previous_deduct_tokens() -> str:
    """deduct_tokens as migration 0004 created it (the release before 0011 changed it)."""
    (text,) = (migration.sql for migration in migrations() if migration.version == 4)
    start = text.index("CREATE FUNCTION public.deduct_tokens(")
    end = text.index("\n$$;", start) + len("\n$$;")
    return text[start:end].replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)


# One call per picked user (bench_picks, drawn untimed by `pick`), in one server-side
# loop: no round trip per call.
LOOP = """
DO $$
DECLARE
    v_ids uuid[] := (SELECT array_agg(user_id) FROM bench_picks);
    v_id uuid;
BEGIN
    FOREACH v_id IN ARRAY v_ids LOOP
        {statement};
    END LOOP;
END
$$
"""
DEDUCT = "PERFORM deduct_tokens(v_id, 1, 'bench')"
BARE = "UPDATE user_tokens SET monthly_tokens_used = monthly_tokens_used + 1 WHERE user_id = v_id"


async def pick(conn: asyncpg.Connection, calls: int, users: int) -> None:
    """Draw `calls` random users into bench_picks (the same ones for every contender)."""
    share = min(100.0, 200.0 * calls / users)
    await conn.execute(
        "DROP TABLE IF EXISTS bench_picks;"
        f" CREATE TEMP TABLE bench_picks AS SELECT user_id FROM user_tokens"
        f" TABLESAMPLE BERNOULLI ({share}) LIMIT {calls}"
    )


async def seconds(conn: asyncpg.Connection, sql: str) -> float:
    """Wall time of one statement."""
    elapsed, _ = await timed(lambda: conn.execute(sql))
    return elapsed


async def load(conn: asyncpg.Connection, users: int) -> float:
    started = time.perf_counter()
    await conn.execute("SET session_replication_role = replica")
    await conn.execute(
        "INSERT INTO user_tokens (user_id, monthly_tokens_used, monthly_token_limit)"
        " SELECT gen_random_uuid(), 40, 100 + (i % 7) * 50 FROM generate_series(1, $1) i",
        users,
    )
    await conn.execute(
        "INSERT INTO token_transactions (user_id, operation, feature, amount, metadata)"
        " SELECT u.user_id, 'deduct', 'feature-' || (n % $1), 20,"
        "        jsonb_build_object('period', token_reset_period_label(now()))"
        "   FROM user_tokens u, generate_series(1, $2) n",
        FEATURES,
        LEDGER_ROWS_PER_USER,
    )
    await conn.execute("RESET session_replication_role")
    await conn.execute("SELECT token_reset_recount_usage()")
    await conn.execute("SELECT token_reset_recount_deductions()")
    await conn.execute("VACUUM ANALYZE")
    return time.perf_counter() - started


async def hot_path(conn: asyncpg.Connection, calls: int, users: int) -> dict[str, float]:
    """Seconds per call: deduct_tokens now, with the previous trigger, and a bare UPDATE."""
    await pick(conn, calls, users)
    loop = LOOP
    figures: dict[str, float] = {}

    def keep(key: str, seconds: float) -> None:
        figures[key] = min(figures.get(key, seconds), seconds)

    async def previous_trigger() -> float:
        # The previous release's trigger, inside a transaction rolled back after.
        swap = conn.transaction()
        await swap.start()
        try:
            await conn.execute(PREVIOUS_COUNT_TRIGGER)
            await conn.execute(previous_deduct_tokens())
            return await seconds(conn, loop.replace("{statement}", DEDUCT))
        finally:
            await swap.rollback()

    contenders = {
        "deduct_seconds": lambda: seconds(conn, loop.replace("{statement}", DEDUCT)),
        "deduct_previous_release_seconds": previous_trigger,
        "bare_update_seconds": lambda: seconds(conn, loop.replace("{statement}", BARE)),
    }
    # Best of ROUNDS, the order rotated each round: the one run first would otherwise
    # also pay for warming up.
    for round_ in range(ROUNDS):
        for key in rotated(list(contenders), round_):
            keep(key, await contenders[key]())
    return {key: value / calls for key, value in figures.items()}


async def measure(conn: asyncpg.Connection, users: int, runs: int, calls: int) -> dict[str, Any]:
    await apply_migrations(conn)
    load_seconds = await load(conn, users)
    await fetch_snapshot(conn)  # the first check after the load
    fold_samples = []
    for _ in range(runs):
        await pick(conn, BATCH, users)
        await conn.execute(
            LOOP.replace("{statement}", "PERFORM deduct_tokens(v_id, 1, 'feature-3')")
        )
        fold_samples.append(await seconds(conn, "SELECT token_reset_fold_deductions()"))
    fold_samples.sort()
    return {
        "users": users,
        "ledger_rows": users * LEDGER_ROWS_PER_USER,
        "load_seconds": load_seconds,
        "fold_after_batch_seconds": fold_samples[len(fold_samples) // 2],
        "watchdog_check_seconds": await median_seconds(lambda: fetch_snapshot(conn), runs),
        "bare_ledger_sum_seconds": await median_seconds(lambda: conn.fetch(LEDGER_SUM), runs),
        **await hot_path(conn, calls, users),
    }


def report(payload: dict[str, Any]) -> None:
    rows = [
        [
            f"{r['users']:,}",
            f"{r['ledger_rows']:,}",
            f"{r['fold_after_batch_seconds'] * 1000:.1f}",
            f"{r['watchdog_check_seconds'] * 1000:.1f}",
            f"{r['bare_ledger_sum_seconds'] * 1000:.0f}",
            f"{r['deduct_seconds'] * 1e6:.0f}",
            f"{r['deduct_previous_release_seconds'] * 1e6:.0f}",
            f"{r['bare_update_seconds'] * 1e6:.0f}",
        ]
        for r in payload["results"]
    ]
    print_table(
        f"usage analytics cost (fold after {BATCH:,} deductions)",
        [
            "users",
            "ledger rows",
            "fold ms",
            "watchdog ms",
            "bare ledger sum ms",
            "deduct us",
            "deduct, previous release us",
            "bare UPDATE us",
        ],
        rows,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the analytics-cost benchmark; prints a table and writes the JSON results."""
    args, sizes, runs = sized_run_args(argv, __doc__, NAME)
    calls = 1_000 if args.smoke else 50_000
    payload = asyncio.run(
        per_size(NAME, sizes, lambda conn, users: measure(conn, users, runs, calls))
    )
    return publish(payload, report, NAME, args)


if __name__ == "__main__":
    raise SystemExit(main())
