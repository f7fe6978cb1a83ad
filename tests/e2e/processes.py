"""Real processes for the end-to-end test: started on free loopback ports, always stopped.

Each process writes its output to a file in the test's tmp directory, so a failure
can show the tail of every log without a pipe that could fill up and block.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import pytest

PROMETHEUS = Path("/usr/bin/prometheus")
ALERTMANAGER = Path("/usr/bin/prometheus-alertmanager")
STOP_SECONDS = 10.0


def require_binaries() -> None:
    """The end-to-end test needs the Debian packages; without them it fails, never skips."""
    missing = [str(path) for path in (PROMETHEUS, ALERTMANAGER) if not os.access(path, os.X_OK)]
    if missing:
        pytest.fail(
            f"missing {', '.join(missing)}: install the Debian packages with "
            "`apt-get install -y prometheus prometheus-alertmanager` (.ci/run does this)"
        )


def free_port() -> int:
    """A loopback port that was free a moment ago (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class Process:
    """One child process with its output in a file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_dir: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log: IO[bytes] = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            list(argv),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
        )

    def output(self) -> str:
        """Everything the process has written so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def tail(self, lines: int = 30) -> str:
        """The end of its output, for failure messages."""
        return "\n".join(self.output().splitlines()[-lines:])

    def json_lines(self) -> list[dict[str, Any]]:
        """Its stdout parsed as JSON lines (non-JSON lines are skipped)."""
        parsed = []
        for line in self.output().splitlines():
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if isinstance(item, dict):
                parsed.append(item)
        return parsed

    def assert_running(self) -> None:
        """Fail with its output if it has exited."""
        code = self.popen.poll()
        assert code is None, f"{self.name} exited with {code}:\n{self.tail()}"

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after a bound; returns the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=STOP_SECONDS)
        self._log.close()
        return self.popen.returncode


def wait_until_ready(process: Process, url: str, deadline_seconds: float) -> None:
    """Poll an HTTP readiness URL until it answers 200 (or the process dies, or time is up)."""
    deadline = time.monotonic() + deadline_seconds
    last_error = "no attempt"
    while time.monotonic() < deadline:
        process.assert_running()
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310  # loopback http
                if response.status == 200:
                    return
                last_error = f"HTTP {response.status}"
        except (urllib.error.URLError, OSError) as exc:
            last_error = str(exc)
        time.sleep(0.1)  # polling a readiness URL: the condition is the HTTP answer
    pytest.fail(
        f"{process.name} not ready at {url} after {deadline_seconds} s ({last_error}):\n"
        f"{process.tail()}"
    )


def wait_for_log_event(process: Process, event: str, deadline_seconds: float) -> dict[str, Any]:
    """The first JSON log line with this event, waiting for it with a deadline."""
    deadline = time.monotonic() + deadline_seconds
    while time.monotonic() < deadline:
        for line in process.json_lines():
            if line.get("event") == event:
                return line
        process.assert_running()
        time.sleep(0.1)  # polling its log file: the condition is the line appearing
    pytest.fail(
        f"{process.name} logged no {event!r} within {deadline_seconds} s:\n{process.tail()}"
    )
