"""2 million notifications from another role while the liveness probe runs every second.

Any role that may connect may NOTIFY token_resets.  The probe's echo queues behind
everything sent before it and the listener drains some 200k notifications a second,
so the echo arrives seconds after the probe's timeout.  Notifications arriving the
whole time prove the connection is alive: the listener must not call it dead (no
disconnect, no reconnect, same server process), and every reset written during the
flood must still be counted.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from tests.support.env import listener_env
from tests.support.metrics import Scrape
from tests.support.processes import ListenerProcess, running_listener, wait_counts_equal_ledger
from tests.support.users import add_stale_users, reset_by_bulk, reset_by_trigger

pytestmark = [pytest.mark.anyio, pytest.mark.fault]

FLOOD = 2_000_000
STATEMENTS = 4  # one transaction each: each commit delivers its share in one go
PER_STATEMENT = FLOOD // STATEMENTS
# Payloads must differ: PostgreSQL folds identical ones within a transaction.
FLOOD_SQL = (
    "SELECT count(pg_notify('token_resets', 'x' || n)) FROM generate_series($1::int, $2::int) n"
)
# Real resets, one transaction (one doorbell) each, between the flood's statements.
RESETS_PER_GAP = 5
PROBE_INTERVAL_SECONDS = 1.0
PROBE_TIMEOUT_SECONDS = 2.0


def as_user(url: str, user: str) -> str:
    """The same server and database as another user."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, f"{user}@{host}", parts.path, parts.query, parts.fragment))


@asynccontextmanager
async def other_role(conn: asyncpg.Connection, database_url: str) -> AsyncIterator[str]:
    """A plain login role (no grants beyond connecting); yields its URL, dropped on exit."""
    role = f"tr_flood_{uuid.uuid4().hex[:10]}"
    database = await conn.fetchval("SELECT current_database()")
    await conn.execute(f"CREATE ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE")
    await conn.execute(f'GRANT CONNECT ON DATABASE "{database}" TO {role}')
    try:
        yield as_user(database_url, role)
    finally:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
        )
        await conn.execute(f'REVOKE CONNECT ON DATABASE "{database}" FROM {role}')
        await conn.execute(f"DROP ROLE {role}")


def received(scrape: Scrape) -> int:
    """Every payload the listener took off the connection (each has exactly one outcome)."""
    return sum(scrape.notifications().values())


async def listen_pid(conn: asyncpg.Connection) -> list[int]:
    """The server processes of the listener's LISTEN sessions on this database."""
    rows = await conn.fetch(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'token-reset:listen'"
        " AND datname = current_database()"
    )
    return [row["pid"] for row in rows]


async def test_a_two_million_notification_flood_is_no_disconnect_and_loses_nothing(
    database_url: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    """Probe every 1 s with a 2 s timeout through a 2M flood: same session, every reset counted."""
    users = await add_stale_users(conn, STATEMENTS * RESETS_PER_GAP + 7)
    env = listener_env(
        database_url,
        name="fault-probe-flood",
        PROBE_INTERVAL_SECONDS=PROBE_INTERVAL_SECONDS,
        PROBE_TIMEOUT_SECONDS=PROBE_TIMEOUT_SECONDS,
    )
    async with other_role(conn, database_url) as flood_url, running_listener(env, tmp_path) as lp:
        listener: ListenerProcess = lp
        await listener.wait_ready()
        before = await listener.scrape()
        pids_before = await listen_pid(conn)
        mark = listener.mark()
        flooder = await asyncpg.connect(flood_url)
        try:
            started = time.monotonic()
            written = 0
            for number in range(STATEMENTS):
                first = number * PER_STATEMENT
                sent = await flooder.fetchval(FLOOD_SQL, first, first + PER_STATEMENT - 1)
                assert sent == PER_STATEMENT
                for user in users[written : written + RESETS_PER_GAP]:
                    await reset_by_trigger(conn, [user])
                written += RESETS_PER_GAP
            sent_seconds = time.monotonic() - started
        finally:
            await flooder.close()
        # Stop early on a disconnect: the flood's undelivered rest dies with the session.
        after = await listener.wait_metrics(
            lambda scrape: (
                received(scrape) >= received(before) + FLOOD
                or bool(listener.find("listener_disconnected", start=mark))
            ),
            within=100,
            what=f"{FLOOD} flood notifications taken off the connection",
        )
        assert listener.find("listener_disconnected", start=mark) == []
        drained_seconds = time.monotonic() - started
        assert await reset_by_bulk(conn) == 7
        truth = await wait_counts_equal_ledger(listener, conn, within=30)
        end = await listener.scrape()
        ready = await listener.readyz()
        pids_after = await listen_pid(conn)
        disconnects = listener.find("listener_disconnected", start=mark)
        connects = listener.find("listener_connected")
        delayed = listener.find("probe_delayed", start=mark)
    assert disconnects == [], disconnects
    assert len(connects) == 1, connects
    assert (before.reconnects, after.reconnects, end.reconnects) == (0, 0, 0)
    assert (after.connected, end.connected) == (1, 1)
    assert pids_before == pids_after == [connects[0]["backend_pid"]]
    assert ready == 200
    assert truth == {"trigger": STATEMENTS * RESETS_PER_GAP, "function": 0, "bulk": 7}
    # The probes that met the flood waited for their echo past the 2 s timeout.
    assert delayed, "no probe waited behind the flood: the test did not test anything"
    longest = max(event["round_trip_seconds"] for event in delayed)
    assert longest > PROBE_TIMEOUT_SECONDS, delayed
    print(
        f"flood of {FLOOD} sent in {sent_seconds:.1f}s, drained {drained_seconds:.1f}s after "
        f"it started; {len(delayed)} probes waited past the timeout (longest "
        f"{longest:.1f}s); no reconnect"
    )
