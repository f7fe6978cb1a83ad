"""`token-reset reset` as a real subprocess: JSON on stdout, exit codes, progress on a TTY."""

from __future__ import annotations

import json
import os
import pty

import asyncpg
import pytest

from tests.support.bulk import runs, unreachable_url
from tests.support.cli import cli
from tests.support.env import cli_env
from tests.support.users import add_stale_users, carrying_usage

pytestmark = pytest.mark.anyio


async def reset(database_url: str, *extra: str, stderr: int | None = None) -> tuple[int, str, str]:
    """Run `python -m listener reset`; returns (exit code, stdout, stderr)."""
    return await cli("reset", *extra, env=cli_env(database_url), stderr=stderr)


async def test_reset_prints_json_and_a_second_run_resets_nothing(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """Exit 0, stdout is exactly one JSON object; the rerun resets 0."""
    await add_stale_users(conn, 7)
    code, out, err = await reset(database_url)
    assert code == 0, err
    result = json.loads(out)  # the whole stdout: logs went to stderr
    assert result["success"] is True
    assert result["reset_count"] == 7
    assert set(result) >= {"reset_date", "run_id", "duration_ms", "batches", "period"}
    assert await carrying_usage(conn) == 0
    events = [json.loads(line)["event"] for line in err.splitlines()]
    assert events.count("bulk_reset_started") == events.count("bulk_reset_finished") == 1

    code, out, _ = await reset(database_url)
    assert code == 0
    assert json.loads(out)["reset_count"] == 0
    assert [r["source"] for r in await runs(conn)] == ["cli", "cli"]


async def test_unreachable_database_exits_non_zero_with_one_clear_line() -> None:
    """Cron sees exit 1 and a single `token-reset: error:` line saying what went wrong."""
    code, out, err = await reset(unreachable_url())
    assert code == 1
    assert out == ""
    errors = [line for line in err.splitlines() if line.startswith("token-reset: error:")]
    assert len(errors) == 1
    assert "bulk reset failed" in errors[0]
    assert "database unreachable" in errors[0]


async def test_bad_batch_size_is_refused(database_url: str) -> None:
    """A batch size of 0 is bad input: exit 2, nothing run."""
    code, _, err = await reset(database_url, "--batch-size", "0")
    assert code == 2
    assert "--batch-size must be between 1 and" in err


async def test_progress_lines_per_batch_only_on_a_terminal(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """stderr a TTY: one progress line per batch; stdout still only the JSON."""
    await add_stale_users(conn, 5)
    primary, secondary = pty.openpty()
    try:
        code, out, _ = await reset(database_url, "--batch-size", "2", stderr=secondary)
        os.close(secondary)
        secondary = -1
        chunks = []
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(primary)
        if secondary != -1:
            os.close(secondary)
    terminal = b"".join(chunks).decode()
    progress = [line for line in terminal.splitlines() if line.startswith("token-reset: batch")]
    assert code == 0
    assert json.loads(out)["batches"] == 3
    assert len(progress) == 3
    assert "5 users reset so far" in progress[-1]
