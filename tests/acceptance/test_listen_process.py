"""`token-reset listen` as a real process: start, serve, count, log JSON, stop on SIGTERM."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import asyncpg
import pytest

from tests.support.cli import cli
from tests.support.env import clean_env
from tests.support.metrics import Scrape
from tests.support.processes import running_listener, wait_counts_equal_ledger
from tests.support.users import add_stale_users, reset_by_bulk, reset_by_trigger

pytestmark = [pytest.mark.acceptance, pytest.mark.anyio]

SECRET = "a" * 32
# What the process must do within these, on a 2-core machine shared with other work.
START_SECONDS = 30.0
STOP_SECONDS = 10.0


def promtool_check(text: str) -> None:
    """`promtool check metrics` must accept the exposition (a missing promtool fails)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail(
            "promtool not found on PATH: install the Debian package `prometheus` "
            "(.ci/run does: apt-get install prometheus)"
        )
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"promtool check metrics: {result.stdout}{result.stderr}"


async def test_listen_serves_counts_logs_json_and_stops_on_sigterm(
    database_url: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    """The whole service as a process: readiness, exact counts, valid metrics, clean exit."""
    users = await add_stale_users(conn, 25)
    env = clean_env(
        DATABASE_URL=database_url,
        HTTP_PORT="0",
        CRON_SECRET=SECRET,
        LOG_FORMAT="json",
        PROBE_INTERVAL_SECONDS="0.5",
        LISTENER_NAME="acceptance",
        # The built-in schedule would bulk-reset everyone at start (catching up a
        # missed run); this test wants to choose which path resets whom.
        RESET_SCHEDULE="off",
    )
    # running_listener stops it with SIGTERM and asserts the orderly exit (code 0).
    async with running_listener(env, tmp_path, name="acceptance") as listener:
        await listener.wait_ready(within=START_SECONDS)
        await reset_by_trigger(conn, users[:10])
        await reset_by_bulk(conn)
        truth = await wait_counts_equal_ledger(listener, conn)
        assert truth["trigger"] == 10
        scraped = (await listener.client.get(f"{listener.base_url}/metrics")).text
        assert Scrape.parse(scraped).users_reset() == truth
    promtool_check(scraped)
    for entry in listener.events:
        assert entry["event"] != "_raw", entry  # every line it wrote is a JSON object
        assert {"timestamp", "level", "event"} <= entry.keys(), entry
    logged = [entry["event"] for entry in listener.events]
    for event in ("listener_connected", "listener_caught_up", "resets_recorded"):
        assert event in logged
    assert logged[-1] == "listener_stopped"


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({}, "DATABASE_URL"),
        ({"DATABASE_URL": "postgresql://127.0.0.1:1/x", "HTTP_PORT": "http"}, "HTTP_PORT"),
        ({"DATABASE_URL": "postgresql://127.0.0.1:1/x", "HTTP_PORT": "70000"}, "HTTP_PORT"),
        ({"DATABASE_URL": "postgresql://127.0.0.1:1/x", "LOG_LEVEL": "CHATTY"}, "LOG_LEVEL"),
    ],
)
async def test_bad_configuration_exits_2_with_one_clear_line(
    env: dict[str, str], names: str
) -> None:
    """Before anything starts: exit code 2 and one stderr line naming the problem."""
    result = await cli("listen", env=clean_env(**env), within=STOP_SECONDS)
    stderr = result.stderr.strip()
    assert result.code == 2, stderr
    assert len(stderr.splitlines()) == 1, stderr
    assert names in stderr
    assert stderr.startswith("token-reset: error:")
    assert result.stdout == ""
