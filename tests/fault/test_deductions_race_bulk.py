"""Concurrent deductions racing bulk runs across the month boundary, as a property."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from uuid import UUID

import anyio
import asyncpg
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from listener.bulk import run_bulk_reset
from listener.config import Settings
from tests.support.database import TestServer, unique_name

pytestmark = pytest.mark.fault

# Last period's usage is also in the ledger (as old deductions): they must not count now.
OLD_DEDUCTS_SQL = """
INSERT INTO token_transactions (user_id, operation, feature, amount, created_at, metadata)
SELECT $1, 'deduct', 'history', $2, last_period,
       jsonb_build_object('period', token_reset_period_label(last_period))
  FROM (SELECT token_reset_period_start() - interval '3 days' AS last_period) moment
"""
# Per user: usage, this period's deductions, and resets by period.
STATE_SQL = """
SELECT u.user_id, u.monthly_tokens_used AS used, u.monthly_token_limit AS lim,
       u.last_monthly_reset >= token_reset_period_start() AS current,
       coalesce(sum(t.amount) FILTER (WHERE t.operation = 'deduct'
                 AND t.metadata ->> 'period' = token_reset_period_label(now())), 0) AS deducted,
       coalesce(sum(t.amount) FILTER (WHERE t.operation = 'deduct'
                 AND t.feature = 'race'), 0) AS raced,
       count(t.id) FILTER (WHERE t.operation = 'reset'
                 AND t.metadata ->> 'period' = token_reset_period_label(now())) AS resets,
       coalesce(sum(t.amount) FILTER (WHERE t.operation = 'reset'), 0) AS cleared,
       (SELECT max(n) FROM (SELECT count(*) AS n FROM token_transactions r
          WHERE r.user_id = u.user_id AND r.operation = 'reset'
          GROUP BY r.metadata ->> 'period') per_period) AS most_resets_in_a_period
  FROM user_tokens u
  LEFT JOIN token_transactions t ON t.user_id = u.user_id
 GROUP BY u.user_id
"""


@dataclass(frozen=True)
class User:
    """A user at the start: last period's usage (stale) or this period's."""

    stale: bool
    limit: int
    used: int


@dataclass(frozen=True)
class Scenario:
    """Users, the deductions to race, and the bulk runs racing them."""

    users: tuple[User, ...]
    deductions: tuple[tuple[int, int], ...]
    # (runner or the SQL function, how many deductions finish before it starts)
    bulk_runs: tuple[tuple[str, int], ...]
    workers: int


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    """Small worlds: a few users near their limits, deductions that sometimes overdraw."""
    users = draw(
        st.lists(
            st.builds(
                lambda stale, limit, share: User(stale, limit, limit * share // 4),
                st.booleans(),
                st.sampled_from([10, 25, 50]),
                st.integers(0, 4),
            ),
            min_size=2,
            max_size=8,
        )
    )
    amounts = st.one_of(st.integers(1, 8), st.integers(9, 60))
    deductions = draw(
        st.lists(st.tuples(st.integers(0, len(users) - 1), amounts), min_size=1, max_size=40)
    )
    bulk_runs = draw(
        st.lists(
            st.tuples(st.sampled_from(["runner", "function"]), st.integers(0, len(deductions))),
            min_size=1,
            max_size=3,
        )
    )
    return Scenario(tuple(users), tuple(deductions), tuple(bulk_runs), draw(st.integers(2, 4)))


async def setup_users(conn: asyncpg.Connection, scenario: Scenario) -> list[UUID]:
    """Stale users carry usage from last period; current users got theirs by deduct_tokens."""
    ids: list[UUID] = []
    for user in scenario.users:
        if user.stale:
            user_id = await conn.fetchval(
                "INSERT INTO user_tokens (user_id, monthly_token_limit, monthly_tokens_used,"
                " last_monthly_reset) VALUES (gen_random_uuid(), $1, $2,"
                " token_reset_period_start() - interval '3 days') RETURNING user_id",
                user.limit,
                user.used,
            )
            if user.used:
                await conn.execute(OLD_DEDUCTS_SQL, user_id, user.used)
        else:
            user_id = await conn.fetchval(
                "INSERT INTO user_tokens (user_id, monthly_token_limit) VALUES"
                " (gen_random_uuid(), $1) RETURNING user_id",
                user.limit,
            )
            if user.used:
                await conn.execute("SELECT deduct_tokens($1, $2, 'setup')", user_id, user.used)
        ids.append(user_id)
    return ids


async def race(url: str, scenario: Scenario, ids: list[UUID]) -> tuple[Counter[UUID], int]:
    """Deduction workers and bulk runs at once; returns accepted amounts and refusals."""
    accepted: Counter[UUID] = Counter()
    refused = 0
    queue = list(reversed(scenario.deductions))
    finished = 0
    # A bulk run starts once its number of deductions has finished: a condition, not a
    # timer, so the interleavings hypothesis draws are the ones that happen.
    gates = {after: anyio.Event() for _, after in scenario.bulk_runs}

    def progressed() -> None:
        for after, gate in gates.items():
            if finished >= after:
                gate.set()

    async def worker(conn: asyncpg.Connection) -> None:
        nonlocal finished, refused
        while queue:
            index, amount = queue.pop()
            try:
                await conn.execute("SELECT deduct_tokens($1, $2, 'race')", ids[index], amount)
            except asyncpg.CheckViolationError as exc:
                if "allowance exceeded" not in str(exc):
                    raise
                refused += 1
            else:
                accepted[ids[index]] += amount
            finished += 1
            progressed()

    async def bulk(kind: str, after: int) -> None:
        await gates[after].wait()
        if kind == "runner":
            # Tiny batches: many commits for the deductions to interleave with.
            await run_bulk_reset(Settings(database_url=url), source="cli", batch_size=2)
            return
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("SELECT reset_monthly_tokens_for_all_users()")
        finally:
            await conn.close()

    conns = [await asyncpg.connect(url) for _ in range(scenario.workers)]
    try:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as group:
                for kind, after in scenario.bulk_runs:
                    group.start_soon(bulk, kind, after)
                for conn in conns:
                    group.start_soon(worker, conn)
                progressed()
    finally:
        for conn in conns:
            await conn.close()
    return accepted, refused


async def check_scenario(server: TestServer, template: str, scenario: Scenario) -> None:
    """Run one scenario in a fresh database and check every user against the ledger."""
    name = unique_name("tr_race")
    url = await server.create_database(name, template)
    try:
        conn = await asyncpg.connect(url)
        try:
            ids = await setup_users(conn, scenario)
            accepted, refused = await race(url, scenario, ids)
            rows = {row["user_id"]: row for row in await conn.fetch(STATE_SQL)}
            sources = await conn.fetch(
                "SELECT DISTINCT metadata ->> 'source' FROM token_transactions"
                " WHERE operation = 'reset'"
            )
        finally:
            await conn.close()
    finally:
        await server.drop_database(name)
    for user_id, user in zip(ids, scenario.users, strict=True):
        row = rows[user_id]
        # Usage is exactly this period's deductions, whatever interleaving happened.
        assert row["used"] == row["deducted"], (user, dict(row))
        assert row["used"] <= row["lim"]
        # Accepted deductions are in the ledger; refused ones wrote nothing.
        assert row["raced"] == accepted[user_id], (user, dict(row))
        # At most one reset per period; exactly one for a stale user with usage.
        assert (row["most_resets_in_a_period"] or 0) <= 1
        expected_resets = 1 if user.stale and user.used > 0 else 0
        assert (row["resets"], row["cleared"]) == (expected_resets, user.used * expected_resets)
        assert row["current"] or row["used"] == 0, "usage left behind in a past period"
    # Coverage of the interleavings (shown with --hypothesis-show-statistics).
    event(f"refused: {min(refused, 3)}{'+' if refused >= 3 else ''}")
    for (source,) in sources:
        event(f"a reset by {source}")


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(scenario=scenarios())
def test_usage_always_equals_this_periods_deductions_and_resets_happen_once(
    pg_server: TestServer, migrated_template: str, scenario: Scenario
) -> None:
    """Whatever the interleaving of deductions and bulk runs, usage matches the ledger."""
    anyio.run(check_scenario, pg_server, migrated_template, scenario, backend="asyncio")
