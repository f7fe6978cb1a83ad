"""Real processes in tests: any program as a child, and the real `listen` with its events.

* `Process` runs one program (Prometheus, Alertmanager, the listener, ...) with stdout and
  stderr in a file of the test's tmp directory (no pipe that could fill and block), parses
  its JSON lines as they come, and stops it: SIGTERM, then SIGKILL after a bound.
* `running_listener` runs `python -m listener listen` as a `ListenerProcess`: a Process
  with async waits on its log events, /readyz and /metrics (read with
  tests/support/metrics.py); always stopped, and an orderly exit on SIGTERM is asserted.
* `wait_until_ready` and `wait_for_log_event` are the waits for synchronous tests.
* `run_to_end` and `run_ok` run a program to its end with its output captured.
* The network fault (a proxy that goes silent) lives in tests/fault/proxy.py.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, Any

import anyio
import asyncpg
import httpx
import pytest

from tests.support.cli import LISTENER, REPO
from tests.support.metrics import Scrape
from tests.support.users import ledger_counts
from tests.support.waiting import wait_until

PROMETHEUS = Path("/usr/bin/prometheus")
ALERTMANAGER = Path("/usr/bin/prometheus-alertmanager")
STOP_SECONDS = 10.0


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB: resident now, and the peak so far."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


def run_to_end(
    argv: Sequence[str],
    *,
    timeout: float,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a program to its end, stdout and stderr captured as text.  Never raises on a
    non-zero exit: the test asserts on the code (run_ok when it must be 0)."""
    return subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
        env=dict(env) if env is not None else None,
    )


def run_ok(
    argv: Sequence[str],
    *,
    timeout: float,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """run_to_end, failing the test with the program's output unless it exits 0."""
    done = run_to_end(argv, timeout=timeout, cwd=cwd, env=env)
    assert done.returncode == 0, f"{argv} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done


def require_binaries() -> None:
    """The end-to-end tests need the Debian packages; without them they fail, never skip."""
    missing = [str(path) for path in (PROMETHEUS, ALERTMANAGER) if not os.access(path, os.X_OK)]
    if missing:
        pytest.fail(
            f"missing {', '.join(missing)}: install the Debian packages with "
            "`apt-get install -y prometheus prometheus-alertmanager` (.ci/run does this)"
        )


class Process:
    """One child process with its output in a file, its lines parsed as they come."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_dir: Path,
        env: Mapping[str, str] | None = None,
        *,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log: IO[bytes] = self.log_path.open("wb")
        self._lock = threading.Lock()
        self._entries: list[dict[str, Any]] = []
        self._offset = 0
        self._partial = b""
        self.popen = subprocess.Popen(
            list(argv),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            cwd=cwd,
        )

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.popen.pid

    def output(self) -> str:
        """Everything the process has written so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def tail(self, lines: int = 30) -> str:
        """The end of its output, for failure messages."""
        return "\n".join(self.output().splitlines()[-lines:])

    def entries(self) -> list[dict[str, Any]]:
        """Every complete line so far: a JSON object, or {"event": "_raw", "text": line}."""
        with self._lock:
            with self.log_path.open("rb") as log:
                log.seek(self._offset)
                chunk = log.read()
            self._offset += len(chunk)
            *complete, self._partial = (self._partial + chunk).split(b"\n")
            for raw in complete:
                line = raw.decode("utf-8", errors="replace")
                try:
                    entry = json.loads(line)
                except ValueError:
                    entry = None
                if not isinstance(entry, dict):  # a traceback or a stray print
                    entry = {"event": "_raw", "text": line.rstrip()}
                self._entries.append(entry)
            return list(self._entries)

    def json_lines(self) -> list[dict[str, Any]]:
        """Its output's JSON lines (other lines are skipped)."""
        return [entry for entry in self.entries() if entry.get("event") != "_raw"]

    def assert_running(self) -> None:
        """Fail with its output if it has exited."""
        code = self.popen.poll()
        assert code is None, f"{self.name} exited with {code}:\n{self.tail()}"

    def stop(self, within: float = STOP_SECONDS) -> int | None:
        """SIGTERM, then SIGKILL after `within` seconds; returns the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=within)
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


class ListenerProcess(Process):
    """One `python -m listener listen` child, with async waits on what it logs and serves."""

    def __init__(
        self, env: Mapping[str, str], log_dir: Path, client: httpx.AsyncClient, name: str
    ) -> None:
        super().__init__(name, [*LISTENER, "listen"], log_dir, {**env}, cwd=REPO)
        self.client = client
        self.port: int | None = None
        self.killed = False

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every line it logged so far, parsed (non-JSON lines as "_raw" events)."""
        return self.entries()

    def mark(self) -> int:
        """A position in the event list: `wait_event(start=mark)` only looks after it."""
        return len(self.entries())

    def find(self, event: str, *, start: int = 0, **fields: Any) -> list[dict[str, Any]]:
        """Logged events with this name (and these field values) from position `start`."""
        return [
            item
            for item in self.entries()[start:]
            if item.get("event") == event and all(item.get(k) == v for k, v in fields.items())
        ]

    async def wait_event(
        self, event: str, *, start: int = 0, within: float = 15.0, **fields: Any
    ) -> dict[str, Any]:
        """The first matching event from `start`, waiting for it (the process must stay up)."""
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            found.extend(self.find(event, start=start, **fields))
            if not found:
                self.assert_running()
            return bool(found)

        try:
            await wait_until(seen, deadline=within, interval=0.02, what=f"log event {event!r}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.tail()}") from None
        return found[0]

    @property
    def base_url(self) -> str:
        """Where its HTTP port answers."""
        assert self.port is not None, "the HTTP port is not known yet"
        return f"http://127.0.0.1:{self.port}"

    async def scrape(self) -> Scrape:
        """GET /metrics, parsed."""
        response = await self.client.get(f"{self.base_url}/metrics")
        assert response.status_code == 200, response.text
        return Scrape.parse(response.text)

    async def readyz(self) -> int:
        """GET /readyz's status code."""
        response = await self.client.get(f"{self.base_url}/readyz")
        return response.status_code

    async def wait_ready(self, *, within: float = 20.0) -> None:
        """Wait until /readyz says 200 (connected, listening, caught up)."""

        async def ready() -> bool:
            self.assert_running()
            return await self.readyz() == 200

        await wait_until(ready, deadline=within, interval=0.02, what="/readyz 200")

    async def wait_metrics(
        self, check: Callable[[Scrape], bool], *, within: float = 20.0, what: str
    ) -> Scrape:
        """Scrape until `check(scrape)` holds; returns that scrape."""
        last: list[Scrape] = []

        async def holds() -> bool:
            self.assert_running()
            last[:] = [await self.scrape()]
            return check(last[0])

        await wait_until(holds, deadline=within, interval=0.05, what=what)
        return last[0]

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind runs in the child."""
        if self.popen.poll() is None:
            self.killed = True
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=STOP_SECONDS)

    async def terminate(self, *, within: float = STOP_SECONDS) -> int:
        """SIGTERM and wait (in a thread, not blocking the event loop); SIGKILL after `within`."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                await anyio.to_thread.run_sync(functools.partial(self.popen.wait, timeout=within))
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)  # too slow: the exit code says so
        code = self.popen.wait(timeout=STOP_SECONDS)
        self._log.close()
        return code


@asynccontextmanager
async def running_listener(
    env: Mapping[str, str], log_dir: Path, name: str = "listener"
) -> AsyncIterator[ListenerProcess]:
    """A listen process on a free port, HTTP up; stopped (SIGTERM, then SIGKILL) on exit."""
    async with httpx.AsyncClient(timeout=10.0) as client:
        process = ListenerProcess(env, log_dir, client, name)
        try:
            started = await process.wait_event("http_listening", within=30.0)
            process.port = int(started["port"])
            yield process
        finally:
            with anyio.CancelScope(shield=True):
                code = await process.terminate()
        # Reached only when the block ended normally: an orderly, bounded stop on SIGTERM
        # (exit 0 within STOP_SECONDS) is part of the contract too.
        if not process.killed:
            assert code == 0, f"listen exited with {code} after SIGTERM:\n{process.tail()}"


async def wait_counts_equal_ledger(
    listener: ListenerProcess, conn: asyncpg.Connection, *, within: float = 20.0
) -> dict[str, int]:
    """Scrape until token_reset_users_total equals the ledger's reset rows per source."""
    truth: dict[str, int] = {}

    async def equal(scrape: Scrape) -> bool:
        truth.update(await ledger_counts(conn))
        return scrape.users_reset() == truth

    async def check() -> bool:
        return await equal(await listener.scrape())

    try:
        await wait_until(check, deadline=within, interval=0.05, what="counters == ledger")
    except AssertionError as exc:
        scrape = await listener.scrape()
        raise AssertionError(
            f"{exc}: counters {scrape.users_reset()} vs ledger {truth}\n{listener.tail()}"
        ) from None
    return truth
