"""The listener through failures: killed connections, deaf connections, restarts, no database."""

from __future__ import annotations

import socket

import anyio
import asyncpg
import httpx
import pytest

from listener.embedded import free_port
from listener.metrics import Metrics
from listener.service import Service
from tests.support.env import CONSUMER, listener_settings
from tests.support.metrics import counted, sample
from tests.support.service import ready, ready_listener, running, wait_counts_match_ledger
from tests.support.users import add_stale_users, ledger_counts, reset_by_bulk, reset_by_trigger
from tests.support.waiting import wait_until

pytestmark = pytest.mark.anyio


def reconnects(service: Service) -> int:
    """token_reset_reconnects_total."""
    return int(sample(service.metrics, "token_reset_reconnects_total") or 0)


async def test_terminated_connection_reconnects_and_counts_equal_the_ledger(
    database_url: str, conn: asyncpg.Connection
) -> None:
    """pg_terminate_backend while resets happen: after reconnecting, nothing is lost."""
    users = await add_stale_users(conn, 2000)
    produced: list[int] = []
    at_kill: list[int] = []
    enough = anyio.Event()
    async with ready_listener(database_url) as service:
        killer = await asyncpg.connect(database_url)
        try:
            async with anyio.create_task_group() as group:

                async def produce() -> None:
                    for user in users:  # one reset per transaction, until told to stop
                        if enough.is_set():
                            return
                        await reset_by_trigger(conn, [user])
                        produced.append(1)

                group.start_soon(produce)
                for kill in range(2):
                    await wait_until(lambda kill=kill: len(produced) > 20 * (kill + 1))
                    await wait_until(lambda: service.state.backend_pid is not None)
                    at_kill.append(len(produced))
                    await killer.execute(
                        "SELECT pg_terminate_backend($1)", service.state.backend_pid
                    )
                    await wait_until(
                        lambda kill=kill: reconnects(service) > kill, what="a reconnect"
                    )
                await wait_until(lambda: len(produced) > at_kill[-1] + 20)
                enough.set()
        finally:
            await killer.close()
        truth = await wait_counts_match_ledger(service, conn)
        assert truth["trigger"] == len(produced) > at_kill[-1] > at_kill[0] > 0
        assert reconnects(service) == 2


async def test_a_deaf_connection_fails_its_probe_and_is_replaced(
    database_url: str, conn: asyncpg.Connection
) -> None:
    """A connection that stopped listening looks open; the NOTIFY probe catches it."""
    users = await add_stale_users(conn, 2)
    settings = listener_settings(
        database_url, probe_interval_seconds=0.2, probe_timeout_seconds=0.5
    )
    async with running(settings) as service:
        await ready(service)
        listen = service.listen
        assert listen is not None
        async with listen.lock:
            await listen.conn.execute("UNLISTEN token_resets")
        await wait_until(lambda: reconnects(service) >= 1, what="the probe to force a reconnect")
        await ready(service)
        await reset_by_trigger(conn, users)
        assert (await wait_counts_match_ledger(service, conn))["trigger"] == 2


async def test_a_restart_neither_recounts_nor_skips(
    database_url: str, conn: asyncpg.Connection
) -> None:
    """Resets written while the listener was down are counted by the next one, once."""
    users = await add_stale_users(conn, 17)
    settings = listener_settings(database_url)
    async with running(settings) as first:
        await ready(first)
        await reset_by_trigger(conn, users[:10])
        await wait_counts_match_ledger(first, conn)
    await reset_by_trigger(conn, users[10:])  # nobody listening
    async with running(settings, Metrics.fresh()) as second:
        await ready(second)
        await wait_until(lambda: counted(second.metrics)["trigger"] == 7, what="7 new resets")
        assert (await ledger_counts(conn))["trigger"] == 17
    async with running(settings, Metrics.fresh()) as third:
        await ready(third)
        assert counted(third.metrics) == {"trigger": 0, "function": 0, "bulk": 0}
    cursor = await conn.fetchval(
        "SELECT last_id FROM token_reset_listener_cursors WHERE consumer = $1", CONSUMER
    )
    assert cursor >= await conn.fetchval("SELECT max(id) FROM token_transactions")


async def test_a_new_consumer_starts_after_the_history(
    database_url: str, conn: asyncpg.Connection
) -> None:
    """The first start of a consumer name begins at the newest ledger id: history is not new."""
    await add_stale_users(conn, 5)
    assert await reset_by_bulk(conn) == 5
    async with running(listener_settings(database_url, listener_name="newcomer")) as service:
        await ready(service)
        more = await add_stale_users(conn, 2)
        await reset_by_trigger(conn, more)
        await wait_until(lambda: counted(service.metrics)["trigger"] == 2, what="2 new resets")
        assert counted(service.metrics)["bulk"] == 0


async def test_no_database_at_start_keeps_retrying_and_is_not_ready(
    database_url: str,
) -> None:
    """A database that is down at start: /readyz says 503, the service waits, stops cleanly."""
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    service = Service(listener_settings(nowhere), Metrics.fresh(), handle_signals=False)
    exit_codes: list[int] = []

    async def run() -> None:
        exit_codes.append(await service.run())

    async with anyio.create_task_group() as group:
        group.start_soon(run)
        await wait_until(lambda: service.state.last_error is not None, what="a failed attempt")
        await wait_until(lambda: service.state.http_port is not None)
        base = f"http://127.0.0.1:{service.state.http_port}"
        async with httpx.AsyncClient(base_url=base) as client:
            assert (await client.get("/healthz")).status_code == 200
            readyz = await client.get("/readyz")
        assert readyz.status_code == 503
        assert "not connected to the database" in readyz.json()["reasons"][0]
        service.stop()
    assert exit_codes == [0]


async def test_a_ledger_behind_the_cursor_does_not_silence_the_listener(
    database_url: str, conn: asyncpg.Connection
) -> None:
    """After a restore or a lossy failover the cursor is ahead of the ids: follow the ledger."""
    users = await add_stale_users(conn, 3)
    await conn.execute(
        "INSERT INTO token_reset_listener_cursors (consumer, last_id) VALUES ($1, 1000000)",
        CONSUMER,
    )
    async with ready_listener(database_url) as service:
        assert service.ledger.cursor is not None
        assert service.ledger.cursor < 1_000_000
        await reset_by_trigger(conn, users)
        assert (await wait_counts_match_ledger(service, conn))["trigger"] == 3


async def test_a_busy_http_port_stops_the_service_with_exit_code_1(database_url: str) -> None:
    """Another process on HTTP_PORT is fatal at start, with a clear log, not a hang."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        service = Service(
            listener_settings(database_url, http_port=port), Metrics.fresh(), handle_signals=False
        )
        with anyio.fail_after(15):
            assert await service.run() == 1
