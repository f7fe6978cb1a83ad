"""`listen` writes to the database on its first start of the day, and says so first.

With the built-in schedule on (the default), a start after the day's slot that finds
no successful scheduled run for it runs the bulk reset at once: a write nobody asked
for in that moment.  That is kept (a missed 1st must not wait a day), but it must be
impossible to miss in the log: one line, before the run, saying that it runs now,
for which slot, and why.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from tests.support.env import listener_env
from tests.support.processes import running_listener
from tests.support.users import add_stale_users

pytestmark = [pytest.mark.acceptance, pytest.mark.anyio]

CATCH_UP = "schedule_catch_up_run"


def todays_slot() -> tuple[str, datetime]:
    """RESET_SCHEDULE for a slot one minute ago (UTC), and that slot."""
    slot = (datetime.now(UTC) - timedelta(minutes=1)).replace(second=0, microsecond=0)
    return f"{slot.hour:02d}:{slot.minute:02d}", slot


async def test_a_missed_slot_is_announced_before_the_catch_up_run_writes(
    database_url: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    """One warning naming the slot, 'now' and why; then the run; then the users are reset."""
    await add_stale_users(conn, 3)
    schedule, slot = todays_slot()
    env = listener_env(database_url, name="catch-up", RESET_SCHEDULE=schedule)
    async with running_listener(env, tmp_path) as listener:
        finished = await listener.wait_event("bulk_reset_finished", within=30)
        events = [event["event"] for event in listener.events]
        announced = listener.find(CATCH_UP)
    assert finished["outcome"] == "success"
    assert finished["reset_count"] == 3
    (line,) = announced
    assert line["level"] == "warning"
    assert line["slot"] == slot.isoformat()
    assert line["runs"] == "now"
    assert line["last_served_slot"] is None
    assert "no successful scheduled run" in line["reason"]
    assert "RESET_SCHEDULE=off" in line["hint"]
    # Said before anything was written.
    assert events.index(CATCH_UP) < events.index("bulk_reset_started")


async def test_a_served_slot_is_announced_as_the_next_run_and_nothing_runs(
    database_url: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    """Today's slot already served: one line with the next run's time, no catch-up, no run."""
    schedule, slot = todays_slot()
    await conn.execute(
        "INSERT INTO token_reset_bulk_runs (run_id, source, slot, outcome, finished_at) "
        "VALUES (gen_random_uuid(), 'schedule', $1, 'success', now())",
        slot,
    )
    env = listener_env(database_url, name="no-catch-up", RESET_SCHEDULE=schedule)
    async with running_listener(env, tmp_path) as listener:
        line = await listener.wait_event("schedule_next_run", within=30)
        await listener.wait_ready()
        catch_up = listener.find(CATCH_UP)
        started = listener.find("bulk_reset_started")
    assert line["at"] == (slot + timedelta(days=1)).isoformat()
    assert (catch_up, started) == ([], [])
