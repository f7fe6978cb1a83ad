"""Benchmark: what the periodic work costs at 100k, 1M and 10M users, on the shipped schema.

For each N: N users carrying last period's usage (loaded with the triggers off, then
`token_reset_recount_usage()`, as README says for a load), one bulk reset
(`reset_monthly_tokens_for_all_users()`, one transaction), then, measured after it:

- the watchdog's check as the service runs it (`listener.watchdog.fetch_snapshot`: fold
  the usage counters, then the snapshot query);
- `token-reset status`'s query (`gather_status`);
- a second bulk run, which finds nobody to reset;
- the bare baseline: one count of the stale users over user_tokens, the scan both used
  to run.

Target (issue "Scale"): the watchdog and status cost about the same at 100k and 10M.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg

from bench.common import (
    per_size,
    print_table,
    publish,
    sized_run_args,
)
from listener.commands.status import gather_status
from listener.migrate import apply_migrations
from listener.watchdog import fetch_snapshot

NAME = "periodic_cost"
STALE_COUNT = (
    "SELECT count(*) FROM user_tokens"
    " WHERE last_monthly_reset < token_reset_period_start() AND monthly_tokens_used > 0"
)


async def median_seconds(action: Callable[[], Awaitable[Any]], runs: int) -> float:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        await action()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


async def measure(conn: asyncpg.Connection, users: int, runs: int) -> dict[str, float]:
    await apply_migrations(conn)
    started = time.perf_counter()
    await conn.execute("SET session_replication_role = replica")
    await conn.execute(
        "INSERT INTO user_tokens (user_id, monthly_tokens_used, last_monthly_reset)"
        " SELECT gen_random_uuid(), 5, token_reset_period_start() - interval '3 days'"
        " FROM generate_series(1, $1)",
        users,
    )
    await conn.execute("RESET session_replication_role")
    await conn.execute("SELECT token_reset_recount_usage()")
    await conn.execute("VACUUM ANALYZE user_tokens")
    load = time.perf_counter() - started
    started = time.perf_counter()
    await conn.fetchval("SELECT reset_monthly_tokens_for_all_users()")
    bulk = time.perf_counter() - started
    return {
        "load_seconds": load,
        "bulk_function_seconds": bulk,
        "nothing_to_do_seconds": await median_seconds(
            lambda: conn.fetchval("SELECT reset_monthly_tokens_for_all_users()"), runs
        ),
        "watchdog_check_seconds": await median_seconds(lambda: fetch_snapshot(conn), runs),
        "status_seconds": await median_seconds(lambda: gather_status(conn), runs),
        "bare_stale_scan_seconds": await median_seconds(lambda: conn.fetchval(STALE_COUNT), runs),
    }


def report(payload: dict[str, Any]) -> None:
    rows = [
        [
            f"{r['users']:,}",
            f"{r['watchdog_check_seconds'] * 1000:.2f}",
            f"{r['status_seconds'] * 1000:.2f}",
            f"{r['bare_stale_scan_seconds'] * 1000:.1f}",
            f"{r['nothing_to_do_seconds'] * 1000:.0f}",
            f"{r['bulk_function_seconds']:.1f}",
        ]
        for r in payload["results"]
    ]
    print_table(
        "periodic cost on the shipped schema",
        ["users", "watchdog ms", "status ms", "bare scan ms", "nothing to do ms", "bulk s"],
        rows,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the periodic-cost benchmark; prints a table and writes the JSON results."""
    args, sizes, runs = sized_run_args(argv, __doc__, NAME)
    payload = asyncio.run(per_size(NAME, sizes, lambda conn, users: measure(conn, users, runs)))
    return publish(payload, report, NAME, args)


if __name__ == "__main__":
    raise SystemExit(main())
