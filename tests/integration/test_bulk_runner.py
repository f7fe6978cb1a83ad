"""The bulk runner against a real database: batches, records, one run at a time, failures."""

from __future__ import annotations

from uuid import UUID

import anyio
import asyncpg
import pytest
from structlog.testing import capture_logs

from listener.bulk import BatchProgress, BulkResetError, BulkResult, run_bulk_reset
from listener.metrics import Metrics
from tests.support.bulk import (
    blocked_run,
    kill_bulk_sessions,
    running_run_id,
    runs,
    unreachable_url,
)
from tests.support.env import settings_for
from tests.support.metrics import sample
from tests.support.users import add_current_users, add_stale_users, carrying_usage

pytestmark = pytest.mark.anyio


async def test_resets_every_stale_user_in_batches_and_records_the_run(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """25 stale users in batches of 10: three batches, all reset, one success row, bulk ledger."""
    await add_stale_users(conn, 25)
    await add_current_users(conn, 5)
    metrics = Metrics.fresh()
    seen: list[BatchProgress] = []

    result = await run_bulk_reset(
        settings_for(database_url),
        source="cli",
        metrics=metrics,
        batch_size=10,
        on_batch=seen.append,
    )

    assert (result.outcome, result.reset_count, result.batches) == ("success", 25, 4)
    assert await carrying_usage(conn) == 0
    assert [p.batches for p in seen] == [1, 2, 3, 4]
    assert seen[-1].reset_count == 25
    assert all(p.run_id == result.run_id for p in seen)
    (row,) = await runs(conn)
    assert (row["run_id"], row["source"], row["outcome"]) == (result.run_id, "cli", "success")
    assert (row["reset_count"], row["batches"], row["error"]) == (25, 4, None)
    assert row["finished_at"] >= row["started_at"]
    sources = await conn.fetch(
        "SELECT metadata->>'source' AS source, count(*) FROM token_transactions "
        "WHERE operation = 'reset' GROUP BY 1"
    )
    assert [(r["source"], r["count"]) for r in sources] == [("bulk", 25)]
    assert sample(metrics, "token_reset_bulk_runs_total", outcome="success") == 1
    assert sample(metrics, "token_reset_bulk_last_success_timestamp_seconds") == pytest.approx(
        row["finished_at"].timestamp(), abs=0.01
    )


async def test_result_dates_come_from_the_database_and_json_has_the_contract_keys(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """reset_date and period are the database's, in the configured zone."""
    await add_stale_users(conn, 3)
    result = await run_bulk_reset(settings_for(database_url), source="endpoint")
    expected = await conn.fetchrow(
        "SELECT token_reset_period_label(now()) AS period, "
        "to_char(timezone(token_reset_zone(), now()), 'YYYY-MM-DD') AS reset_date"
    )
    assert expected is not None
    body = result.to_json()
    assert body["success"] is True
    assert body["skipped"] is False
    assert (body["period"], body["reset_date"]) == (expected["period"], expected["reset_date"])
    assert body["run_id"] == str(result.run_id)
    assert isinstance(body["duration_ms"], int)
    assert (body["reset_count"], body["batches"]) == (3, 1)


async def test_second_run_resets_nothing(conn: asyncpg.Connection, database_url: str) -> None:
    """Repeatable: the rerun finds no stale user and records its own success with 0."""
    await add_stale_users(conn, 12)
    first = await run_bulk_reset(settings_for(database_url), source="cli", batch_size=5)
    second = await run_bulk_reset(settings_for(database_url), source="cli", batch_size=5)
    assert (first.reset_count, second.reset_count) == (12, 0)
    assert [r["outcome"] for r in await runs(conn)] == ["success", "success"]


async def test_logs_one_start_and_one_end_event_per_run(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """An SRE greps bulk_reset_started / bulk_reset_finished with the run's numbers."""
    await add_stale_users(conn, 4)
    with capture_logs() as logs:
        result = await run_bulk_reset(settings_for(database_url), source="schedule")
    started = [e for e in logs if e["event"] == "bulk_reset_started"]
    finished = [e for e in logs if e["event"] == "bulk_reset_finished"]
    assert len(started) == len(finished) == 1
    assert started[0]["run_id"] == finished[0]["run_id"] == str(result.run_id)
    assert finished[0]["source"] == "schedule"
    assert finished[0]["outcome"] == "success"
    assert (finished[0]["reset_count"], finished[0]["batches"]) == (4, 1)
    assert finished[0]["duration_ms"] == result.duration_ms


async def test_a_concurrent_caller_is_skipped_promptly_and_names_the_running_run(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """One bulk run at a time: the second caller steps aside with the running run's id."""
    stale = await add_stale_users(conn, 30)
    settings = settings_for(database_url)
    metrics = Metrics.fresh()
    first: list[BulkResult] = []

    async def run_first() -> None:
        first.append(await run_bulk_reset(settings, source="schedule", metrics=metrics))

    async with blocked_run(conn, database_url, stale[0], run_first, what="the first run to block"):
        with anyio.fail_after(5):
            second = await run_bulk_reset(settings, source="endpoint", metrics=metrics)
        running = await running_run_id(conn)
        # The row lock is released: the first run finishes while the group waits for it.
    assert second.outcome == "skipped"
    assert second.skip_reason == "already_running"
    assert second.other_run_id == running
    assert second.to_json()["running_run_id"] == str(running)

    assert first[0].outcome == "success"
    assert first[0].run_id == running
    assert first[0].reset_count == 30
    outcomes = {r["source"]: r["outcome"] for r in await runs(conn)}
    assert outcomes == {"schedule": "success", "endpoint": "skipped"}
    assert sample(metrics, "token_reset_bulk_runs_total", outcome="skipped") == 1
    assert sample(metrics, "token_reset_bulk_runs_total", outcome="success") == 1


async def test_connection_lost_mid_run_keeps_committed_batches_and_a_rerun_finishes(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """Killed in the final pass: batches stay, the run is recorded failed, the rerun completes."""
    stale = await add_stale_users(conn, 20)
    settings = settings_for(database_url)
    metrics = Metrics.fresh()
    errors: list[BulkResetError] = []

    async def run_doomed() -> None:
        try:
            await run_bulk_reset(settings, source="cli", metrics=metrics, batch_size=5)
        except BulkResetError as exc:
            errors.append(exc)

    async with blocked_run(conn, database_url, stale[0], run_doomed):
        await kill_bulk_sessions(conn)

    (error,) = errors
    assert error.reset_count == 19  # every batch committed; only the locked user is left
    assert "19 users reset, kept" in str(error)
    assert await carrying_usage(conn) == 1
    (failed,) = await runs(conn)
    assert (failed["outcome"], failed["reset_count"]) == ("failure", 19)
    # FATAL 57P01 "terminating connection", or the socket closing first.
    assert "57P01" in failed["error"] or "connection lost" in failed["error"]
    assert sample(metrics, "token_reset_bulk_runs_total", outcome="failure") == 1

    rerun = await run_bulk_reset(settings, source="cli", metrics=metrics)
    assert (rerun.outcome, rerun.reset_count) == ("success", 1)
    assert await carrying_usage(conn) == 0
    assert await conn.fetchval("SELECT count(*) FROM token_transactions") == 20


async def test_unreachable_database_raises_a_clear_error(database_url: str) -> None:
    """No database: BulkResetError naming the cause, counted as a failure."""
    metrics = Metrics.fresh()
    with anyio.fail_after(15), pytest.raises(BulkResetError, match="database unreachable"):
        await run_bulk_reset(settings_for(unreachable_url()), source="cli", metrics=metrics)
    assert sample(metrics, "token_reset_bulk_runs_total", outcome="failure") == 1


async def test_a_run_left_running_by_a_dead_process_is_marked_abandoned(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """A crash leaves 'running' behind; the next run (holding the lock) closes it as failure."""
    dead = UUID(int=7)
    await conn.execute(
        "INSERT INTO token_reset_bulk_runs (run_id, source) VALUES ($1, 'schedule')", dead
    )
    await run_bulk_reset(settings_for(database_url), source="cli")
    row = await conn.fetchrow("SELECT * FROM token_reset_bulk_runs WHERE run_id = $1", dead)
    assert row is not None
    assert row["outcome"] == "failure"
    assert row["error"].startswith("abandoned")


async def test_cancelled_run_is_recorded_as_failure(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """Shutdown mid-run: the row says cancelled, nothing stays 'running'."""
    stale = await add_stale_users(conn, 3)

    async def run() -> None:
        await run_bulk_reset(settings_for(database_url), source="cli")

    async with blocked_run(conn, database_url, stale[0], run) as blocked:
        blocked.cancel_scope.cancel()
    (row,) = await runs(conn)
    assert (row["outcome"], row["error"]) == ("failure", "cancelled")


async def test_invalid_batch_size_is_refused_before_any_work(database_url: str) -> None:
    """A zero batch would loop forever in SQL terms; refused up front."""
    with pytest.raises(ValueError, match="batch size must be positive"):
        await run_bulk_reset(settings_for(database_url), source="cli", batch_size=0)
