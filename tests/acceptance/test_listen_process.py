"""`token-reset listen` as a real process: start, serve, count, log JSON, stop on SIGTERM."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import asyncpg
import httpx
import pytest
from anyio.abc import Process

from tests.support.cli import LISTENER
from tests.support.env import clean_env
from tests.support.metrics import Scrape
from tests.support.users import add_stale_users, ledger_counts, reset_by_bulk, reset_by_trigger
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.acceptance, pytest.mark.anyio]

REPO = Path(__file__).resolve().parents[2]
LISTEN = [*LISTENER, "listen"]
SECRET = "a" * 32
# What the process must do within these, on a 2-core machine shared with other work.
START_SECONDS = 30.0
STOP_SECONDS = 10.0


@dataclass
class Listener:
    """A running `token-reset listen` and every stdout line it wrote so far."""

    process: Process
    lines: list[str] = field(default_factory=list)

    def events(self) -> list[dict[str, object]]:
        """The stdout lines parsed as JSON (only call after checking they all parse)."""
        return [json.loads(line) for line in self.lines]

    def find(self, event: str) -> dict[str, object] | None:
        """The first logged event of that name, if any (tolerates non-JSON lines)."""
        for line in self.lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("event") == event:
                return entry
        return None


@asynccontextmanager
async def listen_process(env: dict[str, str]) -> AsyncIterator[Listener]:
    """Spawn the service, collect its stdout in the background, kill it if the test fails."""
    process = await anyio.open_process(
        LISTEN, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    listener = Listener(process)

    async def collect() -> None:
        assert process.stdout is not None
        pending = b""
        async for chunk in process.stdout:
            pending += chunk
            *complete, pending = pending.split(b"\n")
            listener.lines.extend(line.decode() for line in complete)
        if pending:
            listener.lines.append(pending.decode())

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(collect)
            yield listener
    finally:
        if process.returncode is None:
            process.kill()
            with anyio.move_on_after(5, shield=True):
                await process.wait()
        await process.aclose()


async def stderr_text(process: Process) -> str:
    """Whatever the process wrote on stderr (after it exited)."""
    if process.stderr is None:
        return ""
    chunks = [chunk async for chunk in process.stderr]
    return b"".join(chunks).decode(errors="replace")


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
    database_url: str, conn: asyncpg.Connection
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
    async with listen_process(env) as listener:
        await wait_until(
            lambda: listener.find("http_listening") is not None,
            deadline=START_SECONDS,
            what="the http_listening event",
        )
        started = listener.find("http_listening")
        assert started is not None
        base = f"http://{started['host']}:{started['port']}"
        async with httpx.AsyncClient(base_url=base) as client:

            async def is_ready() -> bool:
                return (await client.get("/readyz")).status_code == 200

            await wait_until(is_ready, deadline=START_SECONDS, what="/readyz 200")
            await reset_by_trigger(conn, users[:10])
            await reset_by_bulk(conn)
            truth = await ledger_counts(conn)
            assert truth["trigger"] == 10
            scraped: list[str] = []

            async def matches_ledger() -> bool:
                response = await client.get("/metrics")
                scraped[:] = [response.text]
                return Scrape.parse(response.text).users_reset() == truth

            await wait_until(matches_ledger, what="scraped counters to equal the ledger")
        promtool_check(scraped[0])
        listener.process.send_signal(signal.SIGTERM)
        with anyio.fail_after(STOP_SECONDS):
            code = await listener.process.wait()
        assert code == 0, await stderr_text(listener.process)
    for line in listener.lines:
        entry = json.loads(line)
        assert isinstance(entry, dict), line
        assert {"timestamp", "level", "event"} <= entry.keys(), line
    logged = [entry["event"] for entry in listener.events()]
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
    with anyio.fail_after(STOP_SECONDS):
        result = await anyio.run_process(LISTEN, env=clean_env(**env), cwd=REPO, check=False)
    stderr = result.stderr.decode().strip()
    assert result.returncode == 2, stderr
    assert len(stderr.splitlines()) == 1, stderr
    assert names in stderr
    assert stderr.startswith("token-reset: error:")
    assert result.stdout == b""
