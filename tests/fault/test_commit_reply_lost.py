"""A window's cursor save commits on the server but its answer is lost with the connection."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

from tests.fault.proxy import tcp_proxy
from tests.support.env import listener_env
from tests.support.processes import running_listener, wait_counts_equal_ledger
from tests.support.users import add_stale_users, reset_by_trigger
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.fault]

CONSUMER = "fault-commit-lost"


async def test_a_window_committed_without_an_answer_is_still_counted(
    database_url: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    """The cursor moved in the database but the process never heard: it must still count."""
    users = await add_stale_users(conn, 10)
    with tcp_proxy(database_url) as proxy:
        env = listener_env(
            proxy.url_for(database_url),
            name=CONSUMER,
            PROBE_INTERVAL_SECONDS=0.5,
            PROBE_TIMEOUT_SECONDS=1,
        )
        async with running_listener(env, tmp_path) as listener:
            await listener.wait_ready()
            mark = listener.mark()
            # The listener's next window saves its cursor (the statement names the
            # consumer): it reaches the server and commits, the answer is held back.
            proxy.pause_after("token-reset:listen", CONSUMER.encode())
            await reset_by_trigger(conn, users)
            await wait_until(lambda: proxy.paused, deadline=15, what="the cursor's save")
            await listener.wait_event("listener_disconnected", start=mark)
            saved = await conn.fetchval(
                "SELECT last_id FROM token_reset_listener_cursors WHERE consumer = $1", CONSUMER
            )
            newest = await conn.fetchval("SELECT max(id) FROM token_transactions")
            assert saved == newest, "premise: the window's cursor save committed on the server"
            assert (await listener.scrape()).users_reset()["trigger"] == 0  # never answered
            proxy.resume()
            await listener.wait_event("listener_connected", start=mark, reconnect=True)
            try:
                await wait_counts_equal_ledger(listener, conn, within=10)
            except AssertionError as exc:
                raise AssertionError(
                    "a window whose cursor save committed on the server but whose answer was "
                    "lost with the connection was not counted. On a reconnect Ledger.open "
                    "(listener/ledger.py) must keep the live process's in-memory cursor, so "
                    "the next window re-reads and counts those rows (greatest() keeps the "
                    f"save idempotent); adopting the saved cursor skips them.\n{exc}"
                ) from None
