"""A half-open connection: the path to the database goes silent while both sockets stay open."""

from __future__ import annotations

import time
from pathlib import Path

import asyncpg
import pytest

from tests.fault.proxy import tcp_proxy
from tests.support.env import listener_env
from tests.support.processes import running_listener, wait_counts_equal_ledger
from tests.support.users import add_stale_users, reset_by_bulk, reset_by_function, reset_by_trigger

pytestmark = [pytest.mark.anyio, pytest.mark.fault]

PROBE_INTERVAL_SECONDS = 0.5
PROBE_TIMEOUT_SECONDS = 1.0
# Scheduling and pipe latency on a loaded 2-core machine, on top of interval + timeout.
SLACK_SECONDS = 1.5


async def test_a_silent_proxy_is_noticed_by_the_probe_and_nothing_is_lost(
    database_url: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    """Keepalives take minutes; the NOTIFY probe must notice within interval + timeout."""
    users = await add_stale_users(conn, 60)
    with tcp_proxy(database_url) as proxy:
        env = listener_env(
            proxy.url_for(database_url),
            name="fault-half-open",
            PROBE_INTERVAL_SECONDS=PROBE_INTERVAL_SECONDS,
            PROBE_TIMEOUT_SECONDS=PROBE_TIMEOUT_SECONDS,
        )
        async with running_listener(env, tmp_path) as listener:
            await listener.wait_ready()
            assert "token-reset:listen" in proxy.application_names()
            await reset_by_trigger(conn, users[:20])
            await wait_counts_equal_ledger(listener, conn)

            mark = listener.mark()
            paused_at = time.monotonic()
            proxy.pause()
            # Written while the listener is deaf: these doorbells never reach it.
            await reset_by_trigger(conn, users[20:40])
            await reset_by_function(conn, users[40:50])
            lost = await listener.wait_event("listener_disconnected", start=mark, within=10.0)
            noticed_after = time.monotonic() - paused_at
            assert "ProbeFailed" in lost["reason"]
            assert noticed_after < PROBE_INTERVAL_SECONDS + PROBE_TIMEOUT_SECONDS + SLACK_SECONDS
            during = await listener.scrape()
            assert during.connected == 0
            assert proxy.paused  # still deaf: the gauge is not 1 by accident

            resumed_at = time.monotonic()
            proxy.resume()
            await listener.wait_event("listener_connected", start=mark, reconnect=True)
            reconnected_after = time.monotonic() - resumed_at
            assert await reset_by_bulk(conn) == 10
            truth = await wait_counts_equal_ledger(listener, conn)
            after = await listener.scrape()
        assert truth == {"trigger": 40, "function": 10, "bulk": 10}
        assert (after.connected, after.reconnects) == (1, 1)
    print(  # the report's timings (shown with -s or on failure)
        f"half-open noticed after {noticed_after:.2f}s, reconnected {reconnected_after:.2f}s "
        "after resume"
    )
