"""The built-in schedule with an injected clock: month boundary, catch-up, replicas, failures."""

from __future__ import annotations

import json
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import anyio
import asyncpg
import pytest
from structlog.testing import capture_logs

from listener.bulk import BulkResult
from listener.metrics import Metrics
from listener.schedule import Scheduler, run_schedule
from tests.support.bulk import (
    blocked_run,
    kill_bulk_sessions,
    runs,
    unreachable_url,
)
from tests.support.env import settings_for
from tests.support.metrics import sample
from tests.support.users import add_stale_users, carrying_usage
from tests.support.waiting import wait_until

pytestmark = pytest.mark.anyio

JAN_SLOT = datetime(2030, 1, 31, 0, 5, tzinfo=UTC)
FEB_SLOT = datetime(2030, 2, 1, 0, 5, tzinfo=UTC)


class ManualClock:
    """The listener's clock, moved by the test (the database keeps its own time)."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


async def served(conn: asyncpg.Connection, slot: datetime) -> None:
    """Record that a scheduled run already served `slot` (yesterday's run happened)."""
    await conn.execute(
        "INSERT INTO token_reset_bulk_runs (run_id, source, slot, outcome, finished_at) "
        "VALUES (gen_random_uuid(), 'schedule', $1, 'success', now())",
        slot,
    )


async def successes_for(conn: asyncpg.Connection, slot: datetime) -> int:
    """Successful scheduled runs recorded for one slot."""
    count: int = await conn.fetchval(
        "SELECT count(*) FROM token_reset_bulk_runs "
        "WHERE source = 'schedule' AND outcome = 'success' AND slot = $1",
        slot,
    )
    return count


async def test_tick_crossing_into_a_new_month_resets_stale_users(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """31 Jan 23:59 nothing is due; 1 Feb 00:05 the scheduler resets everyone, once."""
    await served(conn, JAN_SLOT)
    await add_stale_users(conn, 15)
    scheduler = Scheduler(settings_for(database_url), Metrics.fresh())

    assert await scheduler.tick(datetime(2030, 1, 31, 23, 59, tzinfo=UTC)) is None
    assert await carrying_usage(conn) == 15
    assert scheduler.next_due(datetime(2030, 1, 31, 23, 59, tzinfo=UTC)) == FEB_SLOT

    result = await scheduler.tick(FEB_SLOT + timedelta(seconds=30))
    assert result is not None
    assert (result.outcome, result.reset_count, result.source) == ("success", 15, "schedule")
    assert await carrying_usage(conn) == 0
    assert await successes_for(conn, FEB_SLOT) == 1
    assert await scheduler.tick(FEB_SLOT + timedelta(minutes=1)) is None
    assert scheduler.next_due(FEB_SLOT + timedelta(minutes=1)) == FEB_SLOT + timedelta(days=1)


async def test_the_loop_runs_the_slot_when_the_injected_clock_reaches_it(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """run(): sleeps at most poll_seconds, re-reads the clock, and runs when it crosses 00:05."""
    await served(conn, JAN_SLOT)
    await add_stale_users(conn, 6)
    clock = ManualClock(datetime(2030, 1, 31, 23, 59, 59, tzinfo=UTC))
    scheduler = Scheduler(
        settings_for(database_url), Metrics.fresh(), clock=clock, poll_seconds=0.02
    )

    async def idle_ticks() -> bool:
        return scheduler.ticks >= 3

    async def february_ran() -> bool:
        return await successes_for(conn, FEB_SLOT) > 0

    async with anyio.create_task_group() as group:
        group.start_soon(scheduler.run)
        await wait_until(idle_ticks, what="a few idle ticks")
        assert await carrying_usage(conn) == 6
        clock.now = FEB_SLOT
        await wait_until(february_ran, what="the February run")
        group.cancel_scope.cancel()
    assert await carrying_usage(conn) == 0


async def test_a_slot_missed_while_down_is_caught_up_at_start(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """Last served 29 Jan, started 1 Feb at noon: runs at once for 1 Feb's slot."""
    await served(conn, JAN_SLOT - timedelta(days=2))
    await add_stale_users(conn, 4)
    scheduler = Scheduler(settings_for(database_url), Metrics.fresh())
    with capture_logs() as logs:
        result = await scheduler.tick(datetime(2030, 2, 1, 12, tzinfo=UTC))
    assert result is not None
    assert result.reset_count == 4
    assert await successes_for(conn, FEB_SLOT) == 1
    due = next(e for e in logs if e["event"] == "schedule_due")
    assert due["catch_up"] is True
    assert due["slot"] == FEB_SLOT.isoformat()


async def test_a_restart_does_not_rerun_a_served_slot(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """Started after today's slot was served: nothing runs, nothing recorded, gauge restored."""
    await served(conn, FEB_SLOT)
    metrics = Metrics.fresh()
    scheduler = Scheduler(settings_for(database_url), metrics)
    assert await scheduler.tick(FEB_SLOT + timedelta(hours=3)) is None
    assert len(await runs(conn)) == 1
    assert scheduler.served_through == FEB_SLOT
    assert sample(metrics, "token_reset_bulk_last_success_timestamp_seconds") > 0


async def test_two_replicas_racing_for_one_slot_run_it_once(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """Same slot, same moment: one success; the other is skipped and later sees the slot done."""
    await served(conn, JAN_SLOT)
    stale = await add_stale_users(conn, 10)
    replica_a = Scheduler(settings_for(database_url), Metrics.fresh(), retry_seconds=60)
    replica_b = Scheduler(settings_for(database_url), Metrics.fresh(), retry_seconds=60)
    now = FEB_SLOT + timedelta(seconds=1)
    results: list[BulkResult | None] = []

    async def tick_a() -> None:
        results.append(await replica_a.tick(now))

    async with blocked_run(conn, database_url, stale[0], tick_a, what="replica A to be running"):
        with anyio.fail_after(5):
            skipped = await replica_b.tick(now)
    (ran,) = results
    assert ran is not None
    assert ran.outcome == "success"
    assert skipped is not None
    assert (skipped.outcome, skipped.skip_reason) == ("skipped", "already_running")
    assert skipped.other_run_id == ran.run_id
    # B comes back after its retry delay and finds the slot served: no second run.
    assert replica_b.next_due(now) == now + timedelta(seconds=60)
    again = await replica_b.tick(now + timedelta(seconds=60))
    assert again is not None
    assert (again.outcome, again.skip_reason, again.other_run_id) == (
        "skipped",
        "slot_done",
        ran.run_id,
    )
    assert replica_b.served_through == FEB_SLOT
    assert await successes_for(conn, FEB_SLOT) == 1
    assert await carrying_usage(conn) == 0


async def test_two_replicas_one_after_the_other_run_the_slot_once(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """B loaded its state before A ran; at the slot it still steps aside (checked under lock)."""
    await served(conn, JAN_SLOT)
    await add_stale_users(conn, 3)
    replica_a = Scheduler(settings_for(database_url), Metrics.fresh())
    replica_b = Scheduler(settings_for(database_url), Metrics.fresh())
    assert await replica_b.tick(FEB_SLOT - timedelta(minutes=1)) is None
    ran = await replica_a.tick(FEB_SLOT)
    skipped = await replica_b.tick(FEB_SLOT)
    assert ran is not None
    assert skipped is not None
    assert (ran.outcome, skipped.outcome, skipped.skip_reason) == (
        "success",
        "skipped",
        "slot_done",
    )
    assert await successes_for(conn, FEB_SLOT) == 1
    recorded = [(r["outcome"], r["slot"]) for r in await runs(conn)]
    assert recorded[1:] == [("success", FEB_SLOT), ("skipped", FEB_SLOT)]


async def test_database_down_is_retried_later_not_fatal() -> None:
    """No database: the tick logs and schedules a retry; the loop keeps going."""
    scheduler = Scheduler(settings_for(unreachable_url()), Metrics.fresh(), retry_seconds=90)
    with capture_logs() as logs, anyio.fail_after(15):
        assert await scheduler.tick(FEB_SLOT) is None
    assert any(e["event"] == "schedule_state_unavailable" for e in logs)
    assert scheduler.next_due(FEB_SLOT) == FEB_SLOT + timedelta(seconds=90)
    assert await scheduler.tick(FEB_SLOT + timedelta(seconds=30)) is None


async def test_a_failed_run_is_retried_and_the_slot_stays_due(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """A run that fails does not mark its slot served; the retry serves it."""
    await served(conn, JAN_SLOT)
    stale = await add_stale_users(conn, 5)
    scheduler = Scheduler(settings_for(database_url), Metrics.fresh(), retry_seconds=60)
    assert await scheduler.tick(FEB_SLOT - timedelta(minutes=1)) is None  # loads state
    results: list[BulkResult | None] = []

    async def tick() -> None:
        results.append(await scheduler.tick(FEB_SLOT))

    async with blocked_run(conn, database_url, stale[0], tick):
        await kill_bulk_sessions(conn)
    assert results == [None]
    assert scheduler.served_through == JAN_SLOT
    retry = await scheduler.tick(FEB_SLOT + timedelta(seconds=60))
    assert retry is not None
    assert (retry.outcome, retry.reset_count) == ("success", 1)
    assert scheduler.served_through == FEB_SLOT


async def test_schedule_off_does_nothing(database_url: str) -> None:
    """RESET_SCHEDULE=off: run_schedule logs once and waits to be cancelled, touching nothing."""
    settings = settings_for(database_url, reset_schedule="off")
    with capture_logs() as logs:
        with anyio.move_on_after(0.2) as scope:
            await run_schedule(settings, Metrics.fresh())
    assert scope.cancelled_caught
    assert [e["event"] for e in logs] == ["schedule_disabled"]
    with pytest.raises(ValueError, match="turned off"):
        Scheduler(settings, Metrics.fresh())


# 00:05 in New York on 31 Jan and 1 Feb 2030 (EST, UTC-5).
NY_JAN_SLOT = datetime(2030, 1, 31, 5, 5, tzinfo=UTC)
NY_FEB_SLOT = datetime(2030, 2, 1, 5, 5, tzinfo=UTC)


async def test_the_default_schedule_runs_in_the_period_zone_read_from_the_database(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """`5 0 * * *` after the owner sets America/New_York (the scheduler had read UTC):
    nothing at 00:05 UTC on 1 Feb, the run at 00:05 New York (05:05 UTC), once."""
    await served(conn, NY_JAN_SLOT)
    scheduler = Scheduler(settings_for(database_url), Metrics.fresh())
    assert await scheduler.tick(datetime(2030, 1, 31, 6, tzinfo=UTC)) is None  # read UTC
    # No users yet, so the new zone takes effect at once (README, I4).
    await conn.execute("SELECT token_reset_configure('America/New_York')")
    await add_stale_users(conn, 5)

    assert await scheduler.tick(FEB_SLOT) is None
    assert await scheduler.tick(NY_FEB_SLOT - timedelta(minutes=1)) is None
    assert await carrying_usage(conn) == 5
    assert scheduler.next_due(NY_FEB_SLOT - timedelta(minutes=1)) == NY_FEB_SLOT
    result = await scheduler.tick(NY_FEB_SLOT)
    assert result is not None
    assert (result.outcome, result.reset_count) == ("success", 5)
    assert await successes_for(conn, NY_FEB_SLOT) == 1
    assert await scheduler.tick(NY_FEB_SLOT + timedelta(hours=3)) is None
    assert scheduler.next_due(NY_FEB_SLOT + timedelta(hours=3)) == NY_FEB_SLOT + timedelta(days=1)


async def test_a_pending_zone_change_puts_the_first_slot_of_the_next_period_in_the_new_zone(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """With users, a new zone takes effect at the next boundary.  The scheduler knows it
    in advance: until then slots are 00:05 UTC, and the first one after it is 00:05 in
    the new zone, five minutes after the new period starts (not 00:05 UTC a day later)."""
    await add_stale_users(conn, 1)
    answer = json.loads(await conn.fetchval("SELECT token_reset_configure('America/New_York')"))
    change = datetime.fromisoformat(answer["effective_at"])
    assert change.astimezone(ZoneInfo("America/New_York")).time() == time(0, 0)
    last_utc_slot = change.replace(hour=0, minute=5)
    assert last_utc_slot < change
    await served(conn, last_utc_slot)
    scheduler = Scheduler(settings_for(database_url), Metrics.fresh())

    assert await scheduler.tick(change + timedelta(minutes=4)) is None
    assert scheduler.next_due(change + timedelta(minutes=4)) == change + timedelta(minutes=5)
    result = await scheduler.tick(change + timedelta(minutes=5))
    assert result is not None
    assert result.outcome == "success"
    assert await successes_for(conn, change + timedelta(minutes=5)) == 1


async def test_hh_mm_keeps_meaning_utc_whatever_the_period_zone(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """RESET_SCHEDULE=00:05 with the period zone in New York: the run is at 00:05 UTC."""
    await conn.execute("SELECT token_reset_configure('America/New_York')")
    await served(conn, JAN_SLOT)
    await add_stale_users(conn, 2)
    scheduler = Scheduler(settings_for(database_url, reset_schedule="00:05"), Metrics.fresh())
    result = await scheduler.tick(FEB_SLOT)
    assert result is not None
    assert (result.outcome, result.reset_count) == ("success", 2)
    assert await successes_for(conn, FEB_SLOT) == 1
