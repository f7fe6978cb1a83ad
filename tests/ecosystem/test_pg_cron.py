"""pg_cron drives the bulk backup, and every run it starts is in the books.

A real PostgreSQL 15 cluster with the Debian package postgresql-15-cron preloaded; both
forms README gives for pg_cron are scheduled.  Each run must leave a
token_reset_bulk_runs row saying pg_cron started it, so `status`, the last-success gauge
(the watchdog reads it from the database), the dashboard and the "no successful bulk run
for hours" alert cover pg_cron deployments too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from listener.commands.status import gather_status
from listener.embedded import EmbeddedPostgres
from listener.migrate import apply_migrations
from listener.sql import query
from tests.support.database import own_cluster
from tests.support.users import add_stale_users
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

PG15_BINDIR = Path("/usr/lib/postgresql/15/bin")
DATABASE = "tokens"


@pytest.fixture(scope="module")
def cron_server() -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL 15 with pg_cron preloaded (tests/setup-and-run installs both)."""
    assert (PG15_BINDIR / "postgres").exists(), "PostgreSQL 15 server binaries missing"
    assert Path("/usr/lib/postgresql/15/lib/pg_cron.so").exists(), (
        "pg_cron missing: apt-get install postgresql-15-cron"
    )
    settings = {
        "shared_preload_libraries": "pg_cron",
        "cron.database_name": DATABASE,
        "fsync": "off",
    }
    with own_cluster("token-reset-cron-", settings, PG15_BINDIR) as server:
        yield server


async def test_pg_cron_runs_are_recorded_like_every_other_bulk_run(
    cron_server: EmbeddedPostgres,
) -> None:
    admin = await asyncpg.connect(cron_server.dsn)
    try:
        await admin.execute(f"CREATE DATABASE {DATABASE}")
    finally:
        await admin.close()
    conn = await asyncpg.connect(cron_server.dsn_for(DATABASE))
    try:
        await apply_migrations(conn)
        await conn.execute("CREATE EXTENSION pg_cron")
        await add_stale_users(conn, 25, used=9)
        await conn.execute(
            "SELECT cron.schedule('token-reset-function', '* * * * *',"
            " 'SELECT reset_monthly_tokens_for_all_users()')"
        )
        await conn.execute(
            "SELECT cron.schedule('token-reset-procedure', '* * * * *',"
            " 'CALL token_reset_bulk_committing(10)')"
        )

        async def both_ran() -> bool:
            done: int = await conn.fetchval(
                "SELECT count(*) FROM token_reset_bulk_runs"
                " WHERE source = 'pg_cron' AND outcome = 'success'"
            )
            return done >= 2

        # pg_cron 1.4 schedules by the minute: the first slot is at most 60 s away.
        await wait_until(both_ran, deadline=100, interval=0.5, what="two pg_cron bulk runs")
        await conn.execute("SELECT cron.unschedule('token-reset-function')")
        await conn.execute("SELECT cron.unschedule('token-reset-procedure')")

        runs = await conn.fetch(
            "SELECT source, outcome, reset_count FROM token_reset_bulk_runs ORDER BY id"
        )
        assert {r["source"] for r in runs} == {"pg_cron"}
        assert sum(r["reset_count"] for r in runs[:2]) == 25
        assert (
            await conn.fetchval("SELECT count(*) FROM token_transactions WHERE operation = 'reset'")
            == 25
        )
        status = await gather_status(conn)
        assert status["last_bulk_run"]["source"] == "pg_cron"
        assert status["last_successful_bulk_run"]["outcome"] == "success"
        snapshot = await conn.fetchrow(query("watchdog_snapshot"))
        assert snapshot is not None
        assert snapshot["last_bulk_success_at"] is not None
        failed = await conn.fetch(
            "SELECT status, return_message FROM cron.job_run_details WHERE status <> 'succeeded'"
        )
        assert failed == [], json.dumps([dict(r) for r in failed])
    finally:
        await conn.close()
