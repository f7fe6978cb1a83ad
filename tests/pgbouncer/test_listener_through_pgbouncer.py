"""The listener behind a real PgBouncer: session mode works, transaction mode is reported.

Transaction pooling hands the LISTEN session's server connection back to the pool
after every statement; a NOTIFY arriving while no client holds it is dropped by
PgBouncer (it logs "got packet 'A' from server when not linked").  The listener's own
NOTIFY still echoes (it arrives inside the statement that sent it), so a self-probe
passes and the listener looks healthy while hearing nothing.  These tests pin down
that the listener notices within one probe interval and says so: /readyz, one log
line, a gauge.
"""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import asyncpg
import httpx
import pytest
from structlog.testing import capture_logs

from listener.service import Service
from tests.pgbouncer.support import DROPPED_NOTIFICATION, running_pgbouncer
from tests.support.env import listener_settings
from tests.support.metrics import notifications, sample
from tests.support.service import ready, running, wait_counts_match_ledger
from tests.support.users import add_stale_users, reset_by_trigger
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.pgbouncer]

DOORBELLS = 10
POOLED_EVENT = "listener_not_receiving_notifications"


def gauge(service: Service, name: str) -> float | None:
    """One unlabelled sample of the service's registry."""
    return sample(service.metrics, name)


async def test_session_mode_delivers_every_doorbell(
    database_url: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    """Stock PgBouncer, pool_mode=session: connects, is ready, hears 10 of 10 doorbells."""
    users = await add_stale_users(conn, DOORBELLS)
    async with running_pgbouncer(database_url, tmp_path, pool_mode="session") as bouncer:
        # The periodic catch-up is an hour away: only doorbells can make the counts move.
        settings = listener_settings(bouncer.url_for(database_url), catchup_interval_seconds=3600.0)
        async with running(settings) as service:
            await ready(service)
            for user in users:  # one transaction, one doorbell each
                await reset_by_trigger(conn, [user])
            truth = await wait_counts_match_ledger(service, conn, within=10.0)
            assert truth["trigger"] == DOORBELLS
            # The counts can match before the last doorbells are processed (one read
            # covers rows several doorbells announce): wait for all ten, with a deadline.
            await wait_until(
                lambda: notifications(service.metrics, "ok") == DOORBELLS,
                deadline=10,
                what="every doorbell heard",
            )
            assert gauge(service, "token_reset_listener_pooled_connection") == 0
            assert gauge(service, "token_reset_listener_connected") == 1
            # The pid the service reports is the real server process behind PgBouncer
            # (asyncpg's get_server_pid() is PgBouncer's made-up cancel key there).
            name = await conn.fetchval(
                "SELECT application_name FROM pg_stat_activity WHERE pid = $1",
                service.state.backend_pid,
            )
            assert name == "token-reset:listen"


async def test_transaction_mode_is_detected_within_one_probe_interval(
    database_url: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    """pool_mode=transaction: /readyz 503 with one line, one log event, the gauge; no flapping."""
    users = await add_stale_users(conn, DOORBELLS)
    interval, timeout = 2.0, 0.5
    async with running_pgbouncer(database_url, tmp_path, pool_mode="transaction") as bouncer:
        settings = listener_settings(
            bouncer.url_for(database_url),
            probe_interval_seconds=interval,
            probe_timeout_seconds=timeout,
            catchup_interval_seconds=3600.0,
        )
        with capture_logs() as logs:
            async with running(settings) as service:
                base = f"http://127.0.0.1:{service.state.http_port}"
                async with httpx.AsyncClient(base_url=base) as client:
                    await wait_until(lambda: service.state.connected, what="a connection")
                    connected_at = time.monotonic()
                    reasons: list[str] = []

                    async def reported() -> bool:
                        answer = await client.get("/readyz")
                        reasons[:] = answer.json().get("reasons", [])
                        return answer.status_code == 503 and any(
                            "transaction" in reason for reason in reasons
                        )

                    await wait_until(reported, deadline=10, what="/readyz naming the pooler")
                    detected_after = time.monotonic() - connected_at
                    # Doorbells written now are lost on the way; PgBouncer says why.
                    for user in users:
                        await reset_by_trigger(conn, [user])
                    listen = service.listen
                    assert listen is not None
                    probes = listen.probes
                    await wait_until(
                        lambda: listen.probes >= probes + 2, deadline=15, what="two more probes"
                    )
                    answer = await client.get("/readyz")
                assert answer.status_code == 503
                assert answer.json()["reasons"] == reasons
                assert gauge(service, "token_reset_listener_pooled_connection") == 1
                assert gauge(service, "token_reset_listener_connected") == 0
                assert gauge(service, "token_reset_reconnects_total") == 0
                assert notifications(service.metrics, "ok") == 0
        log = bouncer.log()
    assert detected_after < interval, detected_after
    (reason,) = reasons
    assert "\n" not in reason
    assert "pool_mode=transaction" in reason
    events = [event for event in logs if event["event"] == POOLED_EVENT]
    assert len(events) == 1, events
    assert events[0]["log_level"] == "error"
    assert DROPPED_NOTIFICATION in log
    print(f"transaction pooling reported {detected_after:.2f}s after connecting")


async def test_session_mode_survives_a_killed_server_connection(
    database_url: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    """Session mode, LISTEN backend killed: reconnects, hears doorbells again, never 'pooled'."""
    users = await add_stale_users(conn, 2)
    async with running_pgbouncer(database_url, tmp_path, pool_mode="session") as bouncer:
        settings = listener_settings(bouncer.url_for(database_url), catchup_interval_seconds=3600.0)
        async with running(settings) as service:
            await ready(service)
            await reset_by_trigger(conn, users[:1])
            await wait_counts_match_ledger(service, conn, within=10.0)
            with anyio.fail_after(10):
                await conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = 'token-reset:listen' AND datname = current_database()"
                )
            await wait_until(
                lambda: gauge(service, "token_reset_reconnects_total") == 1, what="a reconnect"
            )
            await ready(service)
            await reset_by_trigger(conn, users[1:])
            assert (await wait_counts_match_ledger(service, conn, within=10.0))["trigger"] == 2
            assert gauge(service, "token_reset_listener_pooled_connection") == 0
