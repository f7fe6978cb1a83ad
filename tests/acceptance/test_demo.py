"""`token-reset demo` as a user runs it: its own embedded server, the whole story, clean exit."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from listener.embedded import private_data_root
from tests.support.cli import LISTENER
from tests.support.env import clean_env

pytestmark = pytest.mark.acceptance

# The whole demo takes ~5 s here (initdb included); the bound allows a loaded machine.
DEMO_SECONDS = 90
STOP_SECONDS = 15.0
# Set on purpose: the demo must ignore it and use the server it owns.
UNREACHABLE_DATABASE = "postgresql://nobody@127.0.0.1:1/nothing"


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """The embedded server's data directory, outside pytest's basetemp.

    As root the server runs as another user who must be able to enter every directory
    above it, and pytest's basetemp is 0700 (the demo changes no permissions).
    """
    with private_data_root("token-reset-demo-test-") as root:
        yield root / "pgdata"


def demo_env() -> dict[str, str]:
    """The inherited environment, JSON logs, and a DATABASE_URL the demo must ignore."""
    return clean_env(LOG_FORMAT="json", DATABASE_URL=UNREACHABLE_DATABASE)


def demo_argv(data_dir: Path) -> list[str]:
    """`python -m listener demo` on a data directory of the test's own."""
    return [*LISTENER, "demo", "--users", "50", "--data-dir", str(data_dir)]


def log_lines(stdout: str) -> list[dict[str, Any]]:
    """Every JSON line of the output, parsed (a line that starts with '{' must parse)."""
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_demo_once_tells_the_rollover_and_exits_zero(tmp_path: Path, data_dir: Path) -> None:
    """--once: missed reset shown, every stale user reset and counted, summary, exit 0."""
    summary_path = tmp_path / "demo.json"
    argv = [*demo_argv(data_dir), "--once", "--json-summary", str(summary_path)]
    done = subprocess.run(
        argv,
        cwd=tmp_path,
        env=demo_env(),
        capture_output=True,
        text=True,
        timeout=DEMO_SECONDS,
        check=False,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    out = done.stdout
    logs = log_lines(out)
    events = [entry["event"] for entry in logs]
    for expected in (
        "http_listening",
        "missed_reset_alert_raised",
        "resets_recorded",
        "bulk_reset_finished",
        "missed_reset_alert_cleared",
        "listener_stopped",
    ):
        assert expected in events, f"no {expected} log line:\n{out}"
    assert "ignoring DATABASE_URL" in out

    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    users = summary["users"]
    assert users["total"] == 50
    stale = users["stale_with_usage"]
    before, after = summary["before"], summary["after"]
    assert (before["missed_month"], before["stale_users"]) == (1, stale)
    assert (after["missed_month"], after["stale_users"], after["month_resets"]) == (0, 0, stale)
    resets = after["resets"]
    assert resets["function"] == users["reset_by_function"] > 0
    assert resets["trigger"] == users["reset_by_trigger"] > 0
    assert resets["bulk"] == summary["bulk"]["reset_count"]
    assert sum(resets.values()) == stale
    logged = sum(e["count"] for e in logs if e["event"] == "resets_recorded")
    assert logged == stale, "every reset appears in the JSON log, once"

    port = next(e["port"] for e in logs if e["event"] == "http_listening")
    by_source = ", ".join(f"{s} {resets[s]:g}" for s in ("function", "trigger", "bulk"))
    assert f"resets by source   {by_source} (total {stale} of {stale}" in out
    assert f"http://127.0.0.1:{port}/metrics" in out
    assert f"http://127.0.0.1:{port}/api/admin/reset-monthly-tokens" in out
    assert not (data_dir / "postmaster.pid").exists(), "the embedded server was left running"


def test_demo_serves_until_sigint_then_stops_everything(tmp_path: Path, data_dir: Path) -> None:
    """Without --once the demo keeps serving /metrics; SIGINT stops it with exit 0."""
    log_path = tmp_path / "demo.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            demo_argv(data_dir), cwd=tmp_path, env=demo_env(), stdout=log, stderr=log
        )
    try:
        deadline = time.monotonic() + DEMO_SECONDS
        while "press Ctrl-C to stop" not in log_path.read_text(errors="replace"):
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, f"never served:\n{log_path.read_text()}"
            time.sleep(0.1)  # polling its output file: the condition is the line appearing
        port = next(
            e["port"] for e in log_lines(log_path.read_text()) if e["event"] == "http_listening"
        )
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:  # loopback http
            assert b"token_reset_missed_month 0.0" in response.read()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=STOP_SECONDS) == 0, log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=STOP_SECONDS)
    assert not (data_dir / "postmaster.pid").exists(), "the embedded server was left running"


def run_on_a_terminal(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str]:
    """Run argv with stdout and stderr on a pseudo-terminal; (exit code, what it showed)."""
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal
        )
    finally:
        os.close(terminal)
    shown = bytearray()
    deadline = time.monotonic() + DEMO_SECONDS
    try:
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"still running after {DEMO_SECONDS} s:\n{shown.decode()}"
            readable, _, _ = select.select([controller], [], [], remaining)
            if not readable:
                continue
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not chunk:
                break
            shown += chunk
        return process.wait(timeout=STOP_SECONDS), shown.decode(errors="replace")
    finally:
        os.close(controller)
        if process.poll() is None:
            process.kill()
            process.wait(timeout=STOP_SECONDS)


def test_demo_on_a_terminal_shows_the_story_not_json(tmp_path: Path, data_dir: Path) -> None:
    """On a terminal (and no LOG_FORMAT asked for) a person reads the story, not JSON."""
    env = {k: v for k, v in demo_env().items() if k not in {"LOG_FORMAT", "LOG_LEVEL"}}
    code, shown = run_on_a_terminal([*demo_argv(data_dir), "--once"], env, tmp_path)
    assert code == 0, shown
    lines = [line for line in shown.splitlines() if line.strip()]
    as_json = [line for line in lines if line.lstrip().startswith("{")]
    assert not as_json, f"JSON lines on a terminal:\n{shown}"
    story = [line for line in lines if line.startswith("demo: ")]
    assert any("the missed reset, as Prometheus sees it" in line for line in story), shown
    posted = "demo: POST /api/admin/reset-monthly-tokens -> 200"
    assert any(line.startswith(posted) for line in story), shown
    assert "== token-reset demo: summary ==" in shown
    # The story is what a person reads: most lines on the screen are the demo's own.
    summary = shown.split("== token-reset demo: summary ==", 1)[0]
    before = [line for line in summary.splitlines() if line.strip()]
    assert len(story) >= len(before) // 2, f"the story is buried in log lines:\n{shown}"
