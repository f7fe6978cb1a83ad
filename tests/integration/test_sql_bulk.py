"""The bulk backup reset: batches, idempotence, doorbells, and races with deductions."""

from __future__ import annotations

import json
import random
import re
import uuid

import anyio
import asyncpg
import pytest

from tests.support.users import add_stale_users, add_user, make_stale
from tests.support.waiting import wait_until

pytestmark = pytest.mark.anyio


async def test_bulk_reset_contract_and_second_run_is_zero(conn: asyncpg.Connection) -> None:
    """N stale users with usage: reset_count N, then 0; users without usage cost nothing."""
    await add_stale_users(conn, 2_500, used=10)
    await add_stale_users(conn, 300, used=0)
    await add_user(conn, used=40)

    first = json.loads(await conn.fetchval("SELECT reset_monthly_tokens_for_all_users()"))
    second = json.loads(await conn.fetchval("SELECT auto_reset_monthly_tokens()"))

    assert first["success"] is True
    assert first["reset_count"] == 2_500
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", first["reset_date"])
    assert second["success"] is True
    assert second["reset_count"] == 0
    ledger = await conn.fetch(
        "SELECT metadata->>'source' AS source, count(*) AS n, sum(amount) AS total"
        " FROM token_transactions WHERE operation = 'reset' GROUP BY 1"
    )
    assert [(r["source"], r["n"], r["total"]) for r in ledger] == [("bulk", 2_500, 25_000)]
    still_stale = await conn.fetchval(
        "SELECT count(*) FROM user_tokens"
        " WHERE last_monthly_reset < token_reset_period_start() AND monthly_tokens_used > 0"
    )
    assert still_stale == 0
    assert (
        await conn.fetchval(
            "SELECT monthly_tokens_used FROM user_tokens WHERE monthly_tokens_used > 0"
        )
        == 40
    )


async def test_bulk_rings_once_per_batch_with_the_id_range(database_url: str) -> None:
    """2,500 resets in batches of 1,000 ring three doorbells whose ranges cover the ledger."""
    conn = await asyncpg.connect(database_url)
    listener = await asyncpg.connect(database_url)
    received: list[dict[str, int]] = []
    try:
        await listener.add_listener(
            "token_resets", lambda *args: received.append(json.loads(args[3]))
        )
        await add_stale_users(conn, 2_500, used=10)
        result = json.loads(await conn.fetchval("SELECT token_reset_bulk_all(1000)"))
        assert result["reset_count"] == 2_500
        await wait_until(
            lambda: sum(n["count"] for n in received) >= 2_500, what="doorbells", deadline=10.0
        )
        assert len(received) == 3
        assert all(n["v"] == 1 for n in received)
        ids = await conn.fetch("SELECT id FROM token_transactions WHERE operation = 'reset'")
        announced = {i for n in received for i in range(n["first_id"], n["last_id"] + 1)}
        assert {r["id"] for r in ids} == announced
    finally:
        await listener.close()
        await conn.close()


async def test_row_trigger_resets_ring_once_per_transaction(database_url: str) -> None:
    """One UPDATE crossing 50 stale rows rings one doorbell, not fifty."""
    conn = await asyncpg.connect(database_url)
    listener = await asyncpg.connect(database_url)
    received: list[str] = []
    try:
        await listener.add_listener("token_resets", lambda *args: received.append(args[3]))
        await add_stale_users(conn, 50, used=3)
        await conn.execute("UPDATE user_tokens SET monthly_tokens_used = monthly_tokens_used + 1")
        # A marker doorbell after the UPDATE's commit: once it arrives, all earlier ones have.
        await conn.execute("SELECT pg_notify('token_resets', 'marker')")
        await wait_until(
            lambda: bool(received) and received[-1] == "marker", what="marker", deadline=10.0
        )
        first_id = await conn.fetchval("SELECT min(id) FROM token_transactions")
        assert len(received) == 2
        assert json.loads(received[0]) == {
            "v": 1,
            "first_id": first_id,
            "last_id": first_id,
            "count": 1,
            "coalesced": True,
        }
        assert await conn.fetchval("SELECT count(*) FROM token_transactions") == 50
    finally:
        await listener.close()
        await conn.close()


async def test_committing_procedure_resets_everyone(database_url: str) -> None:
    """CALL token_reset_bulk_committing() (for pg_cron) commits per batch and finishes."""
    conn = await asyncpg.connect(database_url)
    try:
        await add_stale_users(conn, 1_200, used=4)
        await conn.execute("CALL token_reset_bulk_committing(500)")
        assert (
            await conn.fetchval("SELECT count(*) FROM token_transactions WHERE operation = 'reset'")
            == 1_200
        )
    finally:
        await conn.close()


async def test_per_write_notifications_can_be_turned_off(database_url: str) -> None:
    """With notify_per_write off, trigger resets stay silent and bulk batches still ring."""
    conn = await asyncpg.connect(database_url)
    listener = await asyncpg.connect(database_url)
    received: list[str] = []
    try:
        await listener.add_listener("token_resets", lambda *args: received.append(args[3]))
        await conn.execute("SELECT token_reset_configure(p_notify_per_write => false)")
        user = await add_user(conn, used=5, stale=True)
        await conn.execute(
            "UPDATE user_tokens SET monthly_tokens_used = monthly_tokens_used + 1"
            " WHERE user_id = $1",
            user,
        )
        await add_stale_users(conn, 10, used=10)
        await conn.execute("SELECT reset_monthly_tokens_for_all_users()")
        await conn.execute("SELECT pg_notify('token_resets', 'marker')")
        await wait_until(lambda: "marker" in received, what="marker", deadline=10.0)
        assert len(received) == 2
        assert json.loads(received[0])["count"] == 10
    finally:
        await listener.close()
        await conn.close()


async def test_concurrent_bulk_runs_and_deductions(database_url: str) -> None:
    """Three bulk runs racing 16 deducting connections: one reset per user, no lost deduction."""
    users = 400
    setup = await asyncpg.connect(database_url)
    await add_stale_users(setup, users, used=20)
    user_ids = [r["user_id"] for r in await setup.fetch("SELECT user_id FROM user_tokens")]
    random.Random(7).shuffle(user_ids)
    succeeded: list[tuple[uuid.UUID, int]] = []

    async def deducting(worker: int) -> None:
        conn = await asyncpg.connect(database_url)
        rng = random.Random(worker)
        try:
            for _ in range(60):
                user, amount = rng.choice(user_ids), rng.randint(1, 5)
                await conn.fetchval("SELECT deduct_tokens($1, $2, 'race')", user, amount)
                succeeded.append((user, amount))
        finally:
            await conn.close()

    async def bulk() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await conn.fetchval("SELECT token_reset_bulk_all(50)")
        finally:
            await conn.close()

    try:
        async with anyio.create_task_group() as tg:
            for worker in range(16):
                tg.start_soon(deducting, worker)
            for _ in range(3):
                tg.start_soon(bulk)

        per_user = await setup.fetch(
            "SELECT user_id, count(*) FILTER (WHERE operation = 'reset') AS resets,"
            "       coalesce(sum(amount) FILTER (WHERE operation = 'deduct'), 0) AS deducted"
            "  FROM token_transactions GROUP BY user_id"
        )
        assert all(r["resets"] == 1 for r in per_user)
        assert len(per_user) == users
        stored = dict(await setup.fetch("SELECT user_id, monthly_tokens_used FROM user_tokens"))
        ledger = {r["user_id"]: r["deducted"] for r in per_user}
        expected: dict[uuid.UUID, int] = dict.fromkeys(user_ids, 0)
        for user, amount in succeeded:
            expected[user] += amount
        assert stored == expected == ledger
        assert len(succeeded) == 16 * 60
    finally:
        await setup.close()


async def test_rerun_after_data_moves_back_a_period(conn: asyncpg.Connection) -> None:
    """Moving users already reset this period back a period does not re-open their reset:
    a bulk run makes them current with their usage kept and writes no second row, so the
    run's count, the ledger and the usage agree (one clear, one row)."""
    await add_stale_users(conn, 100, used=3)
    await conn.fetchval("SELECT reset_monthly_tokens_for_all_users()")
    assert await make_stale(conn, used=9) == 100
    again = json.loads(await conn.fetchval("SELECT reset_monthly_tokens_for_all_users()"))
    assert again["reset_count"] == 0
    assert (
        await conn.fetchval("SELECT count(*) FROM token_transactions WHERE operation = 'reset'")
        == 100
    )
    assert await conn.fetchval("SELECT sum(monthly_tokens_used) FROM user_tokens") == 900
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM user_tokens WHERE last_monthly_reset < token_reset_period_start()"
        )
        == 0
    )
