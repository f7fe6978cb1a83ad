"""The listener SIGKILLed in the middle of a burst and started again under the same name."""

from __future__ import annotations

from pathlib import Path
from uuid import UUID

import anyio
import asyncpg
import pytest

from listener.metrics import RESET_SOURCES
from tests.support.env import listener_env
from tests.support.metrics import Scrape
from tests.support.processes import running_listener
from tests.support.users import add_stale_users, reset_by_trigger
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.fault]

CONSUMER = "fault-sigkill"
USERS = 20_000
BATCH = 500
BATCHES = USERS // BATCH


async def persisted_cursor(conn: asyncpg.Connection) -> int:
    """What the listener has saved: every reset row up to here is counted by someone."""
    value = await conn.fetchval(
        "SELECT last_id FROM token_reset_listener_cursors WHERE consumer = $1", CONSUMER
    )
    return int(value or 0)


async def listen_backend_gone(conn: asyncpg.Connection) -> bool:
    """The killed listener's server process has exited: its last transaction is decided."""
    remaining: int = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name = 'token-reset:listen'"
    )
    return remaining == 0


async def resets_after(conn: asyncpg.Connection, cursor: int) -> dict[str, int]:
    """Ledger reset rows with id > cursor, per source."""
    rows = await conn.fetch(
        "SELECT metadata ->> 'source' AS source, count(*) AS n FROM token_transactions"
        " WHERE operation = 'reset' AND id > $1 GROUP BY 1",
        cursor,
    )
    counts = dict.fromkeys(RESET_SOURCES, 0)
    counts.update({row["source"]: int(row["n"]) for row in rows})
    return counts


async def burst(database_url: str, killed: anyio.Event, committed: list[int]) -> None:
    """The bulk walk in committed batches of BATCH; the second half waits for the kill."""
    conn = await asyncpg.connect(database_url)
    try:
        after: UUID | None = None
        for number in range(BATCHES):
            if number == BATCHES // 2:
                await killed.wait()
            row = await conn.fetchrow(
                "SELECT last_key, reset_count FROM token_reset_bulk_batch($1, $2)", after, BATCH
            )
            assert row is not None
            committed.append(int(row["reset_count"]))
            after = row["last_key"]
    finally:
        await conn.close()


async def test_sigkill_mid_burst_then_restart_counts_every_reset_exactly_once(
    database_url: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    """The cursor is saved before counting: the next process counts exactly the rest."""
    await add_stale_users(conn, USERS)
    env = listener_env(database_url, name=CONSUMER)
    killed = anyio.Event()
    committed: list[int] = []
    async with running_listener(env, tmp_path, "first") as first:
        await first.wait_ready()
        async with anyio.create_task_group() as group:
            group.start_soon(burst, database_url, killed, committed)

            async def counting() -> bool:
                return await persisted_cursor(conn) >= 5 * BATCH

            await wait_until(counting, deadline=30, what="the first listener to save a cursor")
            last_scrape: Scrape = await first.scrape()
            first.kill()
            batches_at_kill = len(committed)
            killed.set()
    await wait_until(
        lambda: listen_backend_gone(conn), what="the killed listener's backend", deadline=10.0
    )
    cursor_at_kill = await persisted_cursor(conn)
    newest_id = int(await conn.fetchval("SELECT max(id) FROM token_transactions"))
    assert 0 < cursor_at_kill < newest_id, "the kill was not mid-burst"
    assert batches_at_kill < BATCHES
    # While nobody listens: trigger resets too, so two sources must come out right.
    await reset_by_trigger(conn, await add_stale_users(conn, 100))

    counted_before = await resets_after(conn, 0)
    counted_later = await resets_after(conn, cursor_at_kill)
    first_counted = last_scrape.users_reset()
    async with running_listener(env, tmp_path, "second") as second:
        connected = await second.wait_event("listener_connected")
        assert connected["cursor"] == cursor_at_kill
        await second.wait_ready()
        newest_id = int(await conn.fetchval("SELECT max(id) FROM token_transactions"))

        async def caught_up() -> bool:
            return await persisted_cursor(conn) == newest_id

        await wait_until(caught_up, deadline=30, what="the second listener's cursor at the end")
        scrape = await second.scrape()
    ledger_total = await resets_after(conn, 0)
    assert ledger_total == counted_before  # nothing was written meanwhile
    assert ledger_total == {"trigger": 100, "bulk": USERS, "function": 0}
    # Exactly the rows the first process had not saved: none lost, none counted twice.
    assert scrape.users_reset() == counted_later
    # The first process counted only rows at or below its saved cursor.
    saved = {source: ledger_total[source] - counted_later[source] for source in RESET_SOURCES}
    assert all(first_counted[s] <= saved[s] for s in RESET_SOURCES), (first_counted, saved)
    print(
        f"sigkill: cursor {cursor_at_kill} of {newest_id} at kill after {batches_at_kill} "
        f"batches; first counted {first_counted} (last scrape), second counted "
        f"{scrape.users_reset()}"
    )
