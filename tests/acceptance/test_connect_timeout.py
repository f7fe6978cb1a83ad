"""A server that accepts TCP and never answers: every one-shot command gives up in time.

Before, `migrate` had no connect timeout (asyncpg's 60 s) and `status` printed an empty
reason ("cannot connect to the database: "), because str(TimeoutError()) is empty.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import pytest

from listener.database import DEFAULT_CONNECT_TIMEOUT_SECONDS
from tests.support.cli import cli
from tests.support.env import clean_env
from tests.support.leaks import assert_no_secret, distinctive_secret

pytestmark = [pytest.mark.acceptance, pytest.mark.anyio]

REPO = Path(__file__).resolve().parents[2]
PASSWORD = distinctive_secret(32)
# The timeout itself, plus interpreter start-up on a loaded 2-core machine.
WITHIN = DEFAULT_CONNECT_TIMEOUT_SECONDS + 15


@asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """A port that accepts every connection and then says nothing until the test ends."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port: int = listener.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610  # anyio's typed attribute

    async def hold(stream: anyio.abc.SocketStream) -> None:
        async with stream:  # closed when the test ends and cancels this
            await anyio.sleep_forever()

    async with listener, anyio.create_task_group() as group:
        group.start_soon(listener.serve, hold)
        yield port
        group.cancel_scope.cancel()


async def run(command: str, url: str, into: dict[str, tuple[int, str, str, float]]) -> None:
    """Run one command against `url`; record (exit code, stdout, stderr, seconds)."""
    started = time.monotonic()
    done = await cli(
        command, env=clean_env(DATABASE_URL=url, LOG_FORMAT="json"), within=WITHIN + 30
    )
    into[command] = (*done, time.monotonic() - started)


async def test_one_shot_commands_give_up_within_the_connect_timeout() -> None:
    """migrate, status and reset: exit 1 in time, one line naming host:port and the timeout."""
    results: dict[str, tuple[int, str, str, float]] = {}
    async with silent_server() as port:
        url = f"postgresql://app:{PASSWORD}@127.0.0.1:{port}/app"
        async with anyio.create_task_group() as group:
            for command in ("migrate", "status", "reset"):
                group.start_soon(run, command, url, results)
    for command, (code, out, err, seconds) in sorted(results.items()):
        assert code == 1, (command, err[-500:])
        assert seconds < WITHIN, f"{command} took {seconds:.1f}s"
        assert out == ""
        (reason,) = [line for line in err.splitlines() if line.startswith("token-reset: error:")]
        assert f"127.0.0.1:{port}" in reason, (command, reason)
        assert "timed out" in reason, (command, reason)
        assert_no_secret(out + err, PASSWORD)
