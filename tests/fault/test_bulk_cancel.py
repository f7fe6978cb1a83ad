"""A bulk reset cancelled midway (pg_cancel_backend or statement_timeout), then run again."""

from __future__ import annotations

import json
from uuid import UUID

import anyio
import asyncpg
import pytest

from tests.support.bulk import bulk_waiting_on_lock, runs
from tests.support.cli import LISTENER, REPO
from tests.support.env import cli_env
from tests.support.users import carrying_usage
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.fault]

USERS = 30_000
BATCH = 1_000
# The batch holding the blocked user: the walk commits BLOCKED_BATCH - 1 batches first.
BLOCKED_BATCH = 10
STATEMENT_TIMEOUT_MS = 2_000

# Per user: still stale iff no reset row this period; reset rows carry the usage cleared.
WHOLE_BATCHES_SQL = """
SELECT count(r.id) AS reset_rows,
       count(*) FILTER (WHERE (u.last_monthly_reset >= token_reset_period_start())
                              <> (r.id IS NOT NULL)) AS state_without_row,
       count(*) FILTER (WHERE r.id IS NOT NULL
                          AND (r.amount <> o.used OR u.monthly_tokens_used <> 0)) AS wrong_reset,
       count(*) FILTER (WHERE r.id IS NULL AND u.monthly_tokens_used <> o.used) AS touched
  FROM fault_original o
  JOIN user_tokens u USING (user_id)
  LEFT JOIN token_transactions r
    ON r.user_id = o.user_id AND r.operation = 'reset'
   AND r.metadata ->> 'period' = token_reset_period_label(now())
"""
# Reset users in primary-key order: committed batches are a prefix of the keyset walk.
RESET_RANKS_SQL = """
SELECT min(rank) AS first, max(rank) AS last, count(*) AS n FROM (
    SELECT row_number() OVER (ORDER BY user_id) AS rank,
           last_monthly_reset >= token_reset_period_start() AS reset
      FROM user_tokens) ranked
 WHERE reset
"""


async def one_row(conn: asyncpg.Connection, sql: str) -> asyncpg.Record:
    """The single row an aggregate query returns."""
    row = await conn.fetchrow(sql)
    assert row is not None
    return row


async def seed(conn: asyncpg.Connection) -> UUID:
    """USERS stale users with random usage (kept aside); returns the user to block on."""
    await conn.execute(
        "INSERT INTO user_tokens (user_id, monthly_tokens_used, last_monthly_reset)"
        " SELECT gen_random_uuid(), 1 + floor(random() * 400)::int,"
        " token_reset_period_start() - interval '3 days' FROM generate_series(1, $1)",
        USERS,
    )
    await conn.execute(
        "CREATE TABLE fault_original AS SELECT user_id, monthly_tokens_used AS used"
        " FROM user_tokens"
    )
    blocked: UUID = await conn.fetchval(
        "SELECT user_id FROM user_tokens ORDER BY user_id OFFSET $1 LIMIT 1",
        BLOCKED_BATCH * BATCH - 1,
    )
    return blocked


async def hold_reset_row(conn: asyncpg.Connection, user_id: UUID) -> None:
    """An open transaction owning this period's reset-row slot of one user.

    Its user_tokens row stays unlocked, so the batch picks the user, and its ledger
    INSERT then waits on the unique index: the run is stopped mid-walk, exactly there.
    """
    await conn.execute("BEGIN")
    await conn.execute(
        "INSERT INTO token_transactions (user_id, operation, feature, amount, metadata)"
        " VALUES ($1, 'reset', 'monthly_rollover', 0, jsonb_build_object("
        " 'period', token_reset_period_label(now()), 'previous_used', 0, 'source', 'bulk'))",
        user_id,
    )


async def reset_command(database_url: str) -> tuple[int, str, str]:
    """`python -m listener reset`: exit code, stdout, stderr."""
    done = await anyio.run_process(
        [*LISTENER, "reset", "--batch-size", str(BATCH)],
        env=cli_env(database_url),
        cwd=REPO,
        check=False,
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def cancel_blocked_batch(conn: asyncpg.Connection) -> None:
    """pg_cancel_backend on the runner once it is blocked (so the cancel hits a statement)."""
    await wait_until(lambda: bulk_waiting_on_lock(conn), deadline=30, what="the blocked batch")
    cancelled = await conn.fetchval(
        "SELECT bool_and(pg_cancel_backend(pid)) FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name = 'token-reset:bulk'"
    )
    assert cancelled


@pytest.mark.parametrize("how", ["pg_cancel_backend", "statement_timeout"])
async def test_cancelled_bulk_run_keeps_whole_batches_and_a_rerun_finishes(
    database_url: str, conn: asyncpg.Connection, how: str
) -> None:
    """Each batch commits with its ledger rows and progress, or not at all; a rerun finishes."""
    blocked = await seed(conn)
    url = database_url
    if how == "statement_timeout":
        # asyncpg passes unknown URL parameters on as server settings.
        url = f"{database_url}?statement_timeout={STATEMENT_TIMEOUT_MS}"
    blocker = await asyncpg.connect(database_url)
    try:
        await hold_reset_row(blocker, blocked)
        result: list[tuple[int, str, str]] = []

        async def first_run() -> None:
            result.append(await reset_command(url))

        with anyio.fail_after(60):
            async with anyio.create_task_group() as group:
                group.start_soon(first_run)
                if how == "pg_cancel_backend":
                    await cancel_blocked_batch(conn)
        await blocker.execute("ROLLBACK")
    finally:
        await blocker.close()
    code, _, stderr = result[0]
    assert code == 1, stderr
    cause = "user request" if how == "pg_cancel_backend" else "statement timeout"
    assert f"57014: canceling statement due to {cause}" in stderr

    # Committed batches are whole: run row, ledger and user rows agree.
    (failed,) = await runs(conn)
    committed = (BLOCKED_BATCH - 1) * BATCH
    assert (failed["outcome"], failed["batches"], failed["reset_count"]) == (
        "failure",
        BLOCKED_BATCH - 1,
        committed,
    )
    whole = await one_row(conn, WHOLE_BATCHES_SQL)
    assert dict(whole) == {
        "reset_rows": committed,
        "state_without_row": 0,
        "wrong_reset": 0,
        "touched": 0,
    }
    ranks = await one_row(conn, RESET_RANKS_SQL)
    assert (ranks["first"], ranks["last"], ranks["n"]) == (1, committed, committed)

    # The rerun finishes the job; nobody is reset twice.
    code, stdout, stderr = await reset_command(database_url)
    assert code == 0, stderr
    answer = json.loads(stdout)
    assert (answer["skipped"], answer["reset_count"]) == (False, USERS - committed)
    totals = await one_row(
        conn,
        "SELECT count(*) AS rows, count(DISTINCT user_id) AS users, sum(amount) AS cleared,"
        " (SELECT sum(used) FROM fault_original) AS original"
        " FROM token_transactions WHERE operation = 'reset'",
    )
    assert (totals["rows"], totals["users"]) == (USERS, USERS)
    assert totals["cleared"] == totals["original"]
    assert await carrying_usage(conn) == 0
    assert [row["outcome"] for row in await runs(conn)] == ["failure", "success"]
