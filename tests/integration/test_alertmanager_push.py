"""Direct push to Alertmanager's API, received by a real HTTP server on 127.0.0.1.

Raised: the alert is posted and re-posted every interval (Alertmanager resolves what
is not re-sent).  Cleared: one post with endsAt.  Alertmanager down or failing: the
failures are retried with backoff and counted, and the watchdog keeps working.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import anyio
import asyncpg
import pytest
from structlog.testing import capture_logs

from listener.alertmanager import ALERT_LABELS, AlertmanagerPusher
from listener.clock import utc_now
from listener.config import Settings
from listener.metrics import Metrics
from listener.watchdog import Watchdog
from tests.support.metrics import sample
from tests.support.recording_server import Received, RecordingServer
from tests.support.users import add_stale_users

pytestmark = pytest.mark.anyio

DEADLINE_SECONDS = 15.0
INTERVAL = 0.05


async def stale_users_seven_hours_in(conn: asyncpg.Connection) -> Callable[[], datetime]:
    """Three users carrying last period's usage; a clock 7 h into the period."""
    await add_stale_users(conn, 3, used=40)
    start: datetime = await conn.fetchval("SELECT token_reset_period_start()")
    offset = start + timedelta(hours=7) - utc_now()
    return lambda: utc_now() + offset


def alert_posts(received: list[Received]) -> list[dict[str, Any]]:
    """The alerts of every successful POST to /api/v2/alerts, in order."""
    return [
        alert
        for item in received
        if item.path == "/api/v2/alerts" and item.status == 200
        for alert in item.body
    ]


def fired(alert: dict[str, Any], now: datetime) -> bool:
    """Alertmanager's view: active while endsAt lies in the future."""
    return datetime.fromisoformat(alert["endsAt"]) > now


async def wait_received(
    server: RecordingServer, predicate: Callable[[list[Received]], bool]
) -> None:
    """Block (off the event loop) until the server has received what predicate wants."""
    arrived = await anyio.to_thread.run_sync(server.wait_for, predicate, DEADLINE_SECONDS)
    assert arrived, f"not received within {DEADLINE_SECONDS} s: {server.snapshot()!r}"


async def wait_for_checks(watchdog: Watchdog, count: int) -> None:
    """Wait until the watchdog has completed `count` more checks."""
    target = watchdog.checks + count
    with anyio.fail_after(DEADLINE_SECONDS):
        # The loop exposes a counter, not an event; re-reading it is the condition.
        while watchdog.checks < target:  # noqa: ASYNC110
            await anyio.sleep(INTERVAL / 2)


async def test_raise_posts_and_reposts_then_clear_sends_ends_at(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """While missed, the alert goes out every interval; after the reset, endsAt = now."""
    clock = await stale_users_seven_hours_in(conn)
    with RecordingServer() as server:
        settings = Settings(
            database_url=database_url,
            watchdog_interval_seconds=INTERVAL,
            alertmanager_url=server.url + "/",
        )
        watchdog = Watchdog(settings, Metrics.fresh(), clock=clock)
        async with anyio.create_task_group() as tg:
            tg.start_soon(watchdog.run)
            await wait_received(server, lambda got: len(alert_posts(got)) >= 3)
            firing = alert_posts(server.snapshot())
            assert {a["labels"]["alertname"] for a in firing} == {"TokenResetMissedMonth"}
            assert firing[0]["labels"] == ALERT_LABELS
            assert firing[0]["annotations"]["summary"] == "Monthly token reset was missed"
            assert "3 users still carry" in firing[0]["annotations"]["description"]
            # Same alert each time (one startsAt), kept alive by a moving endsAt.
            assert len({a["startsAt"] for a in firing}) == 1
            assert all(fired(a, clock()) for a in firing)

            await conn.execute("SELECT reset_monthly_tokens_for_all_users()")
            await wait_received(server, lambda got: not fired(alert_posts(got)[-1], clock()))
            await wait_for_checks(watchdog, 3)
            tg.cancel_scope.cancel()
    posts = alert_posts(server.snapshot())
    resolved = posts[-1]
    # The resolution is the last post: nothing is re-sent once it has cleared.
    assert [fired(a, clock()) for a in posts].count(False) == 1
    assert resolved["labels"] == ALERT_LABELS
    assert resolved["startsAt"] == firing[0]["startsAt"]
    assert datetime.fromisoformat(resolved["endsAt"]) >= datetime.fromisoformat(
        resolved["startsAt"]
    )


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_alertmanager_down_is_retried_counted_and_harmless(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """A dead Alertmanager costs retries and one warning, never the watchdog's work."""
    clock = await stale_users_seven_hours_in(conn)
    url = f"http://user:hunter2-secret@127.0.0.1:{closed_port()}"
    settings = Settings(database_url=database_url, watchdog_interval_seconds=INTERVAL)
    pusher = AlertmanagerPusher(url, timeout=1.0, initial_backoff=0.02, max_backoff=0.1)
    metrics = Metrics.fresh()
    with capture_logs() as logs:
        watchdog = Watchdog(settings, metrics, clock=clock, pusher=pusher)
        async with anyio.create_task_group() as tg:
            tg.start_soon(watchdog.run)
            with anyio.fail_after(DEADLINE_SECONDS):
                while pusher.failures < 4:  # noqa: ASYNC110  # a counter, no event to await
                    await anyio.sleep(0.02)
            # The watchdog carried on: it still sees the database change.
            await conn.execute("SELECT reset_monthly_tokens_for_all_users()")
            with anyio.fail_after(DEADLINE_SECONDS):
                while sample(metrics, "token_reset_missed_month") != 0:  # noqa: ASYNC110
                    await anyio.sleep(0.02)
            tg.cancel_scope.cancel()
    assert pusher.sent == 0
    warnings = [
        e for e in logs if e["event"] == "alertmanager_push_failed" and e["log_level"] == "warning"
    ]
    assert len(warnings) == 1, "one warning per failure streak, not one per retry"
    assert "hunter2" not in repr(logs), "credentials in ALERTMANAGER_URL must never be logged"


async def test_failing_alertmanager_recovers_and_delivers(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """HTTP 500s are failures too; once Alertmanager answers, the alert gets through."""
    clock = await stale_users_seven_hours_in(conn)
    with RecordingServer(status=500) as server, capture_logs() as logs:
        settings = Settings(database_url=database_url, watchdog_interval_seconds=INTERVAL)
        pusher = AlertmanagerPusher(server.url, initial_backoff=0.02, max_backoff=0.1)
        watchdog = Watchdog(settings, Metrics.fresh(), clock=clock, pusher=pusher)
        async with anyio.create_task_group() as tg:
            tg.start_soon(watchdog.run)
            await wait_received(server, lambda got: len(got) >= 3)
            server.status = 200
            await wait_received(server, lambda got: len(alert_posts(got)) >= 1)
            with anyio.fail_after(DEADLINE_SECONDS):
                # The server has the POST; wait for the pusher to have read the answer.
                while pusher.sent < 1:  # noqa: ASYNC110  # a counter, no event to await
                    await anyio.sleep(0.02)
            tg.cancel_scope.cancel()
    assert pusher.failures >= 3
    events = [e["event"] for e in logs if e["event"].startswith("alertmanager_push_")]
    assert "alertmanager_push_recovered" in events
    recovered = next(e for e in logs if e["event"] == "alertmanager_push_recovered")
    assert recovered["failed_attempts"] >= 3
