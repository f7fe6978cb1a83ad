"""100,000 malformed or forged notifications on token_resets from a hostile database role."""

from __future__ import annotations

import time
from pathlib import Path

import asyncpg
import pytest

from tests.support.env import listener_env
from tests.support.metrics import Scrape
from tests.support.processes import (
    ListenerProcess,
    memory_kib,
    running_listener,
    wait_counts_equal_ledger,
)
from tests.support.users import add_stale_users, reset_by_bulk, reset_by_function, reset_by_trigger

pytestmark = [pytest.mark.anyio, pytest.mark.fault]

TRANSACTIONS = 4
PER_TRANSACTION = 25_000
FLOOD = TRANSACTIONS * PER_TRANSACTION
WARM_UP = 1_000
MEMORY_BOUND_KIB = 50 * 1024

# One payload per $1 (a number unique across the whole run: PostgreSQL delivers
# identical payloads of one transaction only once, and every one must arrive).
# Per 100 numbers: 40 not JSON or not an object, 20 wrong versions, 4 huge (just under
# PostgreSQL's 8000-byte limit), 30 forged ranges beyond the ledger, 4 impossible
# numbers, 1 forged probe, 1 forgery the listener cannot tell from a real doorbell
# (ids it has handed out): all must be harmless.
FLOOD_SQL = """
SELECT count(pg_notify('token_resets', CASE
    WHEN n % 100 < 8 THEN 'not json ' || n
    WHEN n % 100 < 16 THEN '{"v":1,"first_id":' || n
    WHEN n % 100 < 24 THEN '[' || n || ']'
    WHEN n % 100 < 32 THEN '"' || n || '" ' || repeat('é', (n % 50)::integer)
    WHEN n % 100 < 40 THEN '{"v":1,"first_id":"1","last_id":"' || n || '","count":1}'
    WHEN n % 100 < 44 THEN '{"v":2,"first_id":1,"last_id":1,"count":1,"n":' || n || '}'
    WHEN n % 100 < 48 THEN '{"v":true,"first_id":1,"last_id":1,"count":1,"n":' || n || '}'
    WHEN n % 100 < 52 THEN '{"v":"1","first_id":1,"last_id":1,"count":1,"n":' || n || '}'
    WHEN n % 100 < 56 THEN '{"v":1.0,"first_id":1,"last_id":1,"count":1,"n":' || n || '}'
    WHEN n % 100 < 60 THEN '{"first_id":1,"last_id":1,"count":1,"n":' || n || '}'
    WHEN n % 100 < 64 THEN '{"v":1,"first_id":1,"last_id":1,"count":1,"n":' || n
                           || ',"pad":"' || repeat('x', 7900) || '"}'
    WHEN n % 100 < 84 THEN '{"v":1,"first_id":1,"last_id":9999999,"count":9999999,"n":'
                           || n || '}'
    WHEN n % 100 < 94 THEN '{"v":1,"first_id":9223372036854775807,'
                           || '"last_id":9223372036854775807,"count":1,"n":' || n || '}'
    WHEN n % 100 = 94 THEN '{"v":1,"first_id":5,"last_id":1,"count":1,"n":' || n || '}'
    WHEN n % 100 = 95 THEN '{"v":1,"first_id":0,"last_id":1,"count":1,"n":' || n || '}'
    WHEN n % 100 = 96 THEN '{"v":1,"first_id":1,"last_id":2,"count":3,"n":' || n || '}'
    WHEN n % 100 = 97 THEN '{"v":1,"first_id":1,"last_id":99999999999999999999,"count":1,'
                           || '"n":' || n || '}'
    WHEN n % 100 = 98 THEN '{"probe":"forged-' || n || '"}'
    ELSE '{"v":1,"first_id":1,"last_id":1,"count":1,"n":' || n || '}'
END)) FROM generate_series($1::bigint, $2::bigint) AS n
"""
FORGED_PROBES_PER_100 = 1
UNDETECTABLE_PER_100 = 1
# Real resets (one transaction, one doorbell each) sent between the flood's transactions.
REAL_DURING = 3


def received(scrape: Scrape) -> int:
    """Every payload the listener took off the connection: each ends in exactly one outcome."""
    return sum(scrape.notifications().values())


async def wait_received(listener: ListenerProcess, total: int, *, within: float) -> Scrape:
    """Scrape until `total` payloads are accounted for."""
    return await listener.wait_metrics(
        lambda scrape: received(scrape) >= total,
        within=within,
        what=f"{total} notifications accounted for",
    )


async def notify(conn: asyncpg.Connection, first: int, last: int) -> None:
    """NOTIFY payloads first..last in one transaction (delivered together at commit)."""
    sent = await conn.fetchval(FLOOD_SQL, first, last)
    assert sent == last - first + 1


async def test_a_flood_of_forged_notifications_is_counted_and_harmless(
    database_url: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    """Any role can NOTIFY: 100k bad payloads keep it alive, bounded, and counting right."""
    users = await add_stale_users(conn, 15)
    # No probes of its own during the flood, so every payload counted is one we sent.
    env = listener_env(database_url, name="fault-flood", PROBE_INTERVAL_SECONDS=3600)
    async with running_listener(env, tmp_path) as listener:
        await listener.wait_ready()
        await reset_by_trigger(conn, users[:5])
        await reset_by_function(conn, users[5:8])
        await wait_counts_equal_ledger(listener, conn)
        await notify(conn, 10_000_000, 10_000_000 + WARM_UP - 1)
        baseline = await wait_received(listener, WARM_UP, within=30)
        rss_before, _ = memory_kib(listener.pid)

        started = time.monotonic()
        for number in range(TRANSACTIONS):
            first = number * PER_TRANSACTION
            await notify(conn, first, first + PER_TRANSACTION - 1)
            if number < REAL_DURING:
                # A real reset amid the flood: its one doorbell may well be dropped.
                await reset_by_trigger(conn, [users[8 + number]])
        sent_seconds = time.monotonic() - started
        after = await wait_received(listener, received(baseline) + FLOOD + REAL_DURING, within=90)
        drained_seconds = time.monotonic() - started
        rss_after, rss_peak = memory_kib(listener.pid)

        # Still alive, ready, and still counting real resets exactly.
        listener.assert_running()
        assert await listener.readyz() == 200
        assert await reset_by_bulk(conn) == 4
        truth = await wait_counts_equal_ledger(listener, conn)
        warnings = listener.find("notification_malformed")
    assert truth == {"trigger": 5 + REAL_DURING, "function": 3, "bulk": 4}
    delta = {k: after.notifications()[k] - v for k, v in baseline.notifications().items()}
    # Exactly one outcome per payload: nothing double-counted, nothing unaccounted for.
    assert sum(delta.values()) == FLOOD + REAL_DURING, delta
    # Only the forgeries shaped like probes or like in-range doorbells may pass as such;
    # everything else is malformed, or dropped by the bounded buffer (overflow).
    assert delta["probe"] <= FLOOD * FORGED_PROBES_PER_100 // 100, delta
    assert delta["ok"] <= FLOOD * UNDETECTABLE_PER_100 // 100 + REAL_DURING, delta
    assert delta["malformed"] + delta["overflow"] >= FLOOD * 98 // 100, delta
    assert delta["malformed"] > 0, delta
    # Memory bounded: the peak during the flood, not just what is left after it.
    assert rss_peak - rss_before < MEMORY_BOUND_KIB, (rss_before, rss_peak)
    # A flood is summarised in the log, not echoed line by line.
    assert 0 < len(warnings) < 200
    print(
        f"flood: sent in {sent_seconds:.1f}s, drained in {drained_seconds:.1f}s; outcomes "
        f"{delta}; RSS {rss_before // 1024} MiB -> {rss_after // 1024} MiB "
        f"(peak {rss_peak // 1024} MiB); {len(warnings)} warning lines"
    )
