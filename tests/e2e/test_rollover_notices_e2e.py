"""Rollover notices end to end: two real `token-reset listen` replicas, one restarted
midway, a real month rollover, and a local HTTP receiver standing in for the plain JSON
and Slack-compatible (Mattermost) destinations.

Both replicas log at DEBUG, the level at which apprise and urllib3 would print webhook
URLs; every line they wrote is searched for the secrets in NOTICE_URLS.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import anyio
import asyncpg
import pytest

from tests.support.cli import LISTENER
from tests.support.env import clean_env, settings_for
from tests.support.notices import (
    JSON_PATH,
    MATTERMOST_PATH,
    accepted,
    assert_complete_notice,
    finish_rollover,
    leaked,
    mattermost_fails_first,
    notice_urls,
    start_rollover,
    text_of,
)
from tests.support.processes import Process
from tests.support.recording_server import RecordingServer
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.acceptance, pytest.mark.anyio]

REPO = Path(__file__).resolve().parents[2]
# The README quotes a notice from a real run; set SAVE_NOTICE_EXAMPLE=1 to refresh it.
NOTICE_EXAMPLE = REPO / "bench" / "results" / "rollover_notice_example.json"
LISTEN = [*LISTENER, "listen"]
DEADLINE_SECONDS = 60.0


def replica_env(database_url: str, name: str, urls: tuple[str, ...]) -> dict[str, str]:
    """A replica: its own name, both destinations, quick checks, DEBUG logs."""
    return clean_env(
        DATABASE_URL=database_url,
        HTTP_HOST="127.0.0.1",
        HTTP_PORT="0",
        LOG_FORMAT="json",
        LOG_LEVEL="DEBUG",
        LISTENER_NAME=name,
        RESET_SCHEDULE="off",
        WATCHDOG_INTERVAL_SECONDS="0.2",
        NOTICE_RETRY_SECONDS="2",
        NOTICE_URLS="\n".join(urls),
        # The test database's period began weeks ago: no "overdue" notice in this test.
        RESET_GRACE_SECONDS=str(60 * 86400),
    )


def checks(process: Process) -> int:
    """How many notifier checks the process has logged."""
    return sum(1 for line in process.json_lines() if line.get("event") == "notices_checked")


async def more_checks(*processes: Process, extra: int = 3) -> None:
    """Wait until every process has done `extra` more checks (and is still running)."""
    targets = [checks(p) + extra for p in processes]

    def done() -> bool:
        for process in processes:
            process.assert_running()
        return all(checks(p) >= t for p, t in zip(processes, targets, strict=True))

    await wait_until(done, deadline=DEADLINE_SECONDS, interval=0.05, what="notifier checks")


async def states(conn: asyncpg.Connection) -> dict[str, str]:
    """Delivery state by service name."""
    rows = await conn.fetch("SELECT label, state FROM token_reset_notice_deliveries")
    return {r["label"].split()[1]: r["state"] for r in rows}


async def test_two_replicas_one_restarted_send_one_notice_per_destination_and_no_secret(
    conn: asyncpg.Connection, database_url: str, tmp_path: Path
) -> None:
    """The Slack-compatible destination fails once (500); replica b is restarted while
    its retry waits.  Each destination accepts exactly one notice with the rollover's
    numbers, and no replica ever logged any 8-character piece of a secret."""
    await start_rollover(conn)
    processes: list[Process] = []
    with RecordingServer() as receiver:
        receiver.status_for = mattermost_fails_first(1)
        urls = notice_urls(receiver.url)

        def start(name: str, log_name: str) -> Process:
            process = Process(log_name, LISTEN, tmp_path, env=replica_env(database_url, name, urls))
            processes.append(process)
            return process

        try:
            a = start("replica-a", "a")
            b = start("replica-b", "b-first")
            await more_checks(a, b)
            assert receiver.snapshot() == []  # 25 users still stale: nothing due

            done = await finish_rollover(conn, settings_for(database_url))
            await wait_until(
                lambda: _failed_once(conn), deadline=DEADLINE_SECONDS, what="the first failure"
            )
            assert await anyio.to_thread.run_sync(b.stop) == 0
            b = start("replica-b", "b-restarted")
            await wait_until(
                lambda: _all_sent(conn), deadline=DEADLINE_SECONDS, what="both notices sent"
            )
            await more_checks(a, b)
        finally:
            for process in processes:
                await anyio.to_thread.run_sync(process.stop)
        received = receiver.snapshot()

    assert [r.status for r in received if r.path == MATTERMOST_PATH] == [500, 200]
    (json_body,) = accepted(received, JSON_PATH)
    (slack_body,) = accepted(received, MATTERMOST_PATH)
    assert len(received) == 3
    for body in (json_body, slack_body):
        text = text_of(body)
        assert_complete_notice(text, done)
    assert json_body["type"] == "success"
    rows = await conn.fetch(
        "SELECT label, state, attempts, last_error FROM token_reset_notice_deliveries"
    )
    assert sorted((r["label"].split()[1], r["state"], r["attempts"]) for r in rows) == [
        ("JSON", "sent", 1),
        ("Mattermost", "sent", 2),
    ]
    for process in processes:
        output = process.output()
        assert not leaked(output), f"{process.name} logged a secret"
        assert '"event": "notices_started"' in output
    debug_lines = sum(1 for p in processes for line in p.json_lines() if line["level"] == "debug")
    assert debug_lines > 0  # DEBUG really was on
    if os.environ.get("SAVE_NOTICE_EXAMPLE") == "1":
        example = {"json": json_body, "mattermost (Slack-compatible)": slack_body}
        NOTICE_EXAMPLE.write_text(json.dumps(example, indent=2) + "\n", encoding="utf-8")


async def _failed_once(conn: asyncpg.Connection) -> bool:
    return (await states(conn)).get("Mattermost") in ("failed", "sent")


async def _all_sent(conn: asyncpg.Connection) -> bool:
    return await states(conn) == {"JSON": "sent", "Mattermost": "sent"}
