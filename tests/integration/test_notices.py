"""Rollover notices with real PostgreSQL, real notifier tasks and a real local HTTP receiver.

Two notifiers with different replica names stand for two replicas (they share nothing
but the database); cancelling one and starting a fresh one is a restart.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta

import anyio
import asyncpg
import pytest
from structlog.testing import capture_logs

from listener.bulk import run_bulk_reset
from listener.config import Settings
from listener.metrics import Metrics
from listener.notices import Facts, Notifier
from listener.sql import query
from tests.integration.role_support import login_role
from tests.support.metrics import sample
from tests.support.notices import (
    JSON_PATH,
    MATTERMOST_PATH,
    accepted,
    assert_complete_notice,
    finish_rollover,
    leaked,
    mattermost_fails_first,
    notice_urls,
    rollover,
    start_rollover,
    text_of,
)
from tests.support.recording_server import RecordingServer
from tests.support.users import add_stale_users
from tests.support.waiting import wait_until

pytestmark = pytest.mark.anyio


def settings_for(
    database_url: str, receiver: RecordingServer, name: str, **changes: object
) -> Settings:
    """A replica's settings: both destinations, quick checks, quick retries."""
    return Settings(
        database_url=database_url,
        listener_name=name,
        notice_urls=notice_urls(receiver.url),
        watchdog_interval_seconds=0.1,
        notice_retry_seconds=0.2,
        reset_grace_seconds=21600.0,
    ).with_overrides(**changes)


class PeriodClock:
    """The replicas' clock: a fixed time into the database's current period."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


async def period_start(conn: asyncpg.Connection) -> datetime:
    """The database's current period start."""
    start: datetime = await conn.fetchval("SELECT token_reset_period_start()")
    return start


@asynccontextmanager
async def replica(notifier: Notifier) -> AsyncIterator[Notifier]:
    """Run one notifier until the block ends (cancelled, as a shutdown does)."""
    async with anyio.create_task_group() as group:
        group.start_soon(notifier.run)
        try:
            yield notifier
        finally:
            group.cancel_scope.cancel()


async def deliveries(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """Every delivery row, by kind and label."""
    return await conn.fetch(
        "SELECT period, kind, label, state, attempts, claimed_by, last_error, destination"
        " FROM token_reset_notice_deliveries ORDER BY kind, label"
    )


async def all_sent(conn: asyncpg.Connection, kind: str, count: int) -> bool:
    """True when `count` deliveries of `kind` are recorded as sent."""
    sent: int = await conn.fetchval(
        "SELECT count(*) FROM token_reset_notice_deliveries WHERE kind = $1 AND state = 'sent'",
        kind,
    )
    return sent == count


async def more_checks(*notifiers: Notifier, extra: int = 3) -> None:
    """Let every notifier complete a few more checks (nothing more may be sent)."""
    targets = [n.checks + extra for n in notifiers]
    await wait_until(
        lambda: all(n.checks >= t for n, t in zip(notifiers, targets, strict=True)),
        what="more notifier checks",
    )


async def test_a_real_rollover_sends_one_notice_per_destination_with_its_numbers(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """Two replicas, one restarted midway: each destination (plain JSON, Slack-compatible)
    gets exactly one 'complete' notice, saying the period, users reset by path, when it
    completed, the bulk runs and batches, and that nothing is left stale."""
    clock = PeriodClock(await period_start(conn) + timedelta(minutes=1))
    await start_rollover(conn)
    with RecordingServer() as receiver, capture_logs() as logs:
        a = Notifier(
            settings_for(database_url, receiver, "replica-a"), Metrics.fresh(), clock=clock
        )
        b = Notifier(
            settings_for(database_url, receiver, "replica-b"), Metrics.fresh(), clock=clock
        )
        async with replica(a):
            async with replica(b):
                await more_checks(a, b)
            # b restarts midway: a fresh notifier under the same replica name.
            b = Notifier(
                settings_for(database_url, receiver, "replica-b"), Metrics.fresh(), clock=clock
            )
            async with replica(b):
                assert receiver.snapshot() == []  # stale users remain: nothing due yet
                done = await finish_rollover(conn, settings_for(database_url, receiver, "test"))
                await wait_until(lambda: all_sent(conn, "complete", 2), what="both notices")
                await more_checks(a, b)
        received = receiver.snapshot()
    assert len(received) == 2
    (json_body,) = accepted(received, JSON_PATH)
    (slack_body,) = accepted(received, MATTERMOST_PATH)
    assert json_body["title"] == f"Token rollover {done.period} complete"
    assert json_body["type"] == "success"
    assert set(slack_body) >= {"text"}
    by_source = done.by_source
    assert by_source == {"trigger": 3, "function": 2, "bulk": 25}
    for body in (json_body, slack_body):
        text = text_of(body)
        assert_complete_notice(text, done)
        days = int(done.completed_after_seconds // 86400)
        assert re.search(rf"Complete {days} d \d+ h after the period start", text), text
    rows = await deliveries(conn)
    assert [(r["kind"], r["state"], r["attempts"]) for r in rows] == [("complete", "sent", 1)] * 2
    assert {r["claimed_by"] for r in rows} <= {"replica-a", "replica-b"}
    sent = [e for e in logs if e["event"] == "notice_sent"]
    assert len(sent) == 2
    assert not leaked(repr(logs) + repr([tuple(r) for r in rows]))


async def test_a_failing_destination_is_retried_with_backoff_and_sent_once(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """The Slack-compatible destination answers 500 twice: both failures are counted and
    recorded (without a secret), retried after a backoff, and it gets the notice once;
    the healthy destination is not sent to again meanwhile."""
    clock = PeriodClock(await period_start(conn) + timedelta(minutes=1))
    metrics = Metrics.fresh()
    with RecordingServer() as receiver, capture_logs() as logs:
        receiver.status_for = mattermost_fails_first(2)
        settings = settings_for(database_url, receiver, "replica-a")
        await rollover(conn, settings)
        notifier = Notifier(settings, metrics, clock=clock)
        async with replica(notifier):
            await wait_until(lambda: all_sent(conn, "complete", 2), what="both notices")
            await more_checks(notifier)
        received = receiver.snapshot()
    assert [r.status for r in received if r.path == MATTERMOST_PATH] == [500, 500, 200]
    assert len(accepted(received, JSON_PATH)) == 1
    assert len(received) == 4
    failed = [e for e in logs if e["event"] == "notice_failed"]
    assert [e["attempt"] for e in failed] == [1, 2]
    assert all(e["retry_in_seconds"] > 0 for e in failed)
    assert "error=500" in failed[0]["reason"]
    assert sample(metrics, "token_reset_notices_total", outcome="failure") == 2
    assert sample(metrics, "token_reset_notices_total", outcome="sent") == 2
    rows = {r["label"].split()[1]: r for r in await deliveries(conn)}
    assert (rows["Mattermost"]["state"], rows["Mattermost"]["attempts"]) == ("sent", 3)
    assert (rows["JSON"]["state"], rows["JSON"]["attempts"]) == ("sent", 1)
    assert not leaked(repr(logs) + repr([tuple(r) for r in rows.values()]))


async def test_a_claim_left_by_a_dead_replica_is_taken_over_only_when_its_lease_runs_out(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """A replica that died after claiming both deliveries leaves them 'sending': a live
    lease is respected (nothing sent twice), an expired one is taken over and sent."""
    clock = PeriodClock(await period_start(conn) + timedelta(minutes=1))
    with RecordingServer() as receiver:
        settings = settings_for(database_url, receiver, "replica-b")
        await rollover(conn, settings)
        # What replica-a leaves behind when killed right after claiming: the frozen
        # facts and two claims with a live lease.
        dead = Notifier(
            settings.with_overrides(listener_name="replica-a"),
            Metrics.fresh(),
            clock=clock,
            lease_seconds=3600,
        )
        await claim_without_sending(dead)
        assert [r["state"] for r in await deliveries(conn)] == ["sending", "sending"]

        survivor = Notifier(settings, Metrics.fresh(), clock=clock)
        async with replica(survivor):
            await more_checks(survivor)
            assert receiver.snapshot() == []
            await conn.execute(
                "UPDATE token_reset_notice_deliveries SET lease_until = now() - interval '1 s'"
            )
            await wait_until(lambda: all_sent(conn, "complete", 2), what="the takeover")
            await more_checks(survivor)
        received = receiver.snapshot()
    assert len(accepted(received, JSON_PATH)) == 1
    assert len(accepted(received, MATTERMOST_PATH)) == 1
    assert len(received) == 2
    rows = await deliveries(conn)
    assert [(r["claimed_by"], r["attempts"]) for r in rows] == [("replica-b", 2)] * 2


async def claim_without_sending(notifier: Notifier) -> None:
    """Freeze the facts and claim every delivery as `notifier`, then stop (a crash)."""
    conn = await asyncpg.connect(notifier.settings.database_url)
    try:
        facts = Facts.from_row(await conn.fetchrow(query("notice_facts")), 60.0)
        await conn.execute(query("notice_freeze"), facts.period, "complete", facts.to_json())
        for destination in notifier.destinations or ():
            attempt = await conn.fetchval(
                query("notice_claim"),
                facts.period,
                "complete",
                destination.digest,
                destination.label,
                notifier.claimer,
                notifier.lease_seconds,
            )
            assert attempt == 1
    finally:
        await conn.close()


async def test_an_incomplete_rollover_past_the_grace_says_so_once_then_completes_once(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """Stale users 7 h into the period (grace 6 h): one 'NOT complete' notice per
    destination, never repeated; after the bulk run, one 'complete' notice each."""
    clock = PeriodClock(await period_start(conn) + timedelta(hours=7))
    await add_stale_users(conn, 4, used=9)
    with RecordingServer() as receiver:
        settings = settings_for(database_url, receiver, "replica-a")
        a = Notifier(settings, Metrics.fresh(), clock=clock)
        b = Notifier(
            settings.with_overrides(listener_name="replica-b"), Metrics.fresh(), clock=clock
        )
        async with replica(a), replica(b):
            await wait_until(lambda: all_sent(conn, "overdue", 2), what="the overdue notices")
            await more_checks(a, b)
            overdue = receiver.snapshot()
            await run_bulk_reset(settings, source="cli")
            await wait_until(lambda: all_sent(conn, "complete", 2), what="the complete notices")
            await more_checks(a, b)
        received = receiver.snapshot()
    assert len(overdue) == 2
    (json_overdue,) = accepted(overdue, JSON_PATH)
    assert json_overdue["type"] == "warning"
    assert "NOT complete after the grace period" in json_overdue["title"]
    assert "NOT complete 7 h 0 min into the period (grace 6 h 0 min): 4 users" in text_of(
        json_overdue
    )
    assert "NOT complete 7 h 0 min" in text_of(accepted(overdue, MATTERMOST_PATH)[0])
    later = received[2:]
    assert len(later) == 2
    assert all("complete" in text_of(r.body) and "NOT" not in text_of(r.body) for r in later)


async def test_the_listener_role_can_notify_and_the_app_role_cannot_see_notices(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """A login role granted token_reset_listener (what a deployment runs as) freezes,
    claims and records notices; the application role may not read or forge them."""
    clock = PeriodClock(await period_start(conn) + timedelta(minutes=1))
    with RecordingServer() as receiver:
        await rollover(conn, settings_for(database_url, receiver, "setup"))
        async with login_role(conn, database_url, "token_reset_listener") as url:
            notifier = Notifier(
                settings_for(url, receiver, "replica-a"), Metrics.fresh(), clock=clock
            )
            async with replica(notifier):
                await wait_until(lambda: all_sent(conn, "complete", 2), what="both notices")
        assert len(receiver.snapshot()) == 2
    async with login_role(conn, database_url, "token_reset_app") as url:
        app = await asyncpg.connect(url)
        try:
            for sql in (
                "SELECT * FROM token_reset_notices",
                "SELECT * FROM token_reset_notice_deliveries",
                "UPDATE token_reset_notice_deliveries SET state = 'failed'",
            ):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await app.execute(sql)
        finally:
            await app.close()
