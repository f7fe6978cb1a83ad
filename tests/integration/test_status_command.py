"""`token-reset status` as a real subprocess: counts, last runs, JSON and the human table."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import pytest

from listener.bulk import run_bulk_reset
from listener.metrics import Metrics
from listener.watchdog import Watchdog
from tests.support.bulk import unreachable_url
from tests.support.cli import cli
from tests.support.env import cli_env, settings_for
from tests.support.metrics import sample
from tests.support.users import add_current_users, add_stale_users

pytestmark = pytest.mark.anyio


async def status(database_url: str, *extra: str) -> tuple[int, str, str]:
    """Run `python -m listener status`; returns (exit code, stdout, stderr)."""
    return await cli("status", *extra, env=cli_env(database_url))


async def status_json(database_url: str) -> dict[str, Any]:
    """The machine-readable status."""
    code, out, err = await status(database_url, "--json")
    assert code == 0, err
    parsed: dict[str, Any] = json.loads(out)
    return parsed


async def test_status_counts_before_and_after_a_bulk_run(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """Who still carries last period's usage, then the run that cleared them."""
    await add_stale_users(conn, 5, used=9)
    await add_stale_users(conn, 2, used=0)  # stale but nothing to clear
    await add_current_users(conn, 3)
    period = await conn.fetchval("SELECT token_reset_period_label(now())")

    before = await status_json(database_url)
    assert before["period"] == period
    assert (before["users_total"], before["stale_users"]) == (10, 5)
    assert before["users_untouched_this_period"] == 7
    assert (before["period_resets"], before["last_reset_at"]) == (0, None)
    assert before["last_bulk_run"] is None
    assert before["last_successful_bulk_run"] is None

    result = await run_bulk_reset(settings_for(database_url), source="cli")
    after = await status_json(database_url)
    assert after["stale_users"] == 0
    assert after["users_untouched_this_period"] == 2  # zero usage: never rewritten, never wrong
    assert after["period_resets"] == 5
    newest = await conn.fetchval(
        "SELECT max(created_at) FROM token_transactions WHERE operation = 'reset'"
    )
    assert after["last_reset_at"] == newest.isoformat()
    assert after["last_bulk_run"]["run_id"] == str(result.run_id)
    assert after["last_bulk_run"]["outcome"] == "success"
    assert after["last_bulk_run"]["source"] == "cli"
    assert after["last_bulk_run"]["reset_count"] == 5
    assert after["last_successful_bulk_run"]["run_id"] == str(result.run_id)


async def test_last_run_shows_a_failure_and_last_success_the_one_before(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """A failed run is the last run; the last success is still reported; skips are left out."""
    await run_bulk_reset(settings_for(database_url), source="schedule")
    await conn.execute(
        "INSERT INTO token_reset_bulk_runs (run_id, source, outcome, finished_at, error) "
        "VALUES (gen_random_uuid(), 'endpoint', 'failure', now(), 'database error 57P01: x')"
    )
    await conn.execute(
        "INSERT INTO token_reset_bulk_runs (run_id, source, outcome, finished_at) "
        "VALUES (gen_random_uuid(), 'cli', 'skipped', now())"
    )
    report = await status_json(database_url)
    assert report["last_bulk_run"]["outcome"] == "failure"
    assert report["last_bulk_run"]["error"] == "database error 57P01: x"
    assert report["last_successful_bulk_run"]["source"] == "schedule"


async def test_human_table_by_default(conn: asyncpg.Connection, database_url: str) -> None:
    """Without --json: aligned label/value lines an operator reads at a glance."""
    await add_stale_users(conn, 2)
    code, out, _ = await status(database_url)
    assert code == 0
    lines = dict(line.split("  ", 1) for line in out.splitlines())
    assert lines["stale users"].strip() == "2 still carrying last period's usage"
    assert lines["not yet touched this period"].strip().startswith("2 ")
    assert lines["last bulk run"].strip() == "never"


async def test_unreachable_database_exits_1_with_one_line() -> None:
    """No database: exit 1 and one clear line, nothing on stdout."""
    code, out, err = await status(unreachable_url(), "--json")
    assert code == 1
    assert out == ""
    assert err.strip().startswith("token-reset: error: cannot connect to the database")
    assert len(err.strip().splitlines()) == 1


async def test_status_stale_users_is_the_gauge_for_the_same_database(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """`status --json` and token_reset_stale_users give one number under one name.

    Users last reset in a previous period at 0 used need no reset: they are "not yet
    touched this period", never "stale users", in the status as in the metrics.
    """
    await add_stale_users(conn, 5, used=9)
    await add_stale_users(conn, 2, used=0)
    await add_current_users(conn, 3)
    metrics = Metrics.fresh()
    watchdog = Watchdog(settings_for(database_url), metrics)
    try:
        assert await watchdog.check_once() is not None
    finally:
        watchdog.close()
    gauge = sample(metrics, "token_reset_stale_users")

    report = await status_json(database_url)
    assert report["stale_users"] == gauge == 5
    assert report["users_untouched_this_period"] == 7
