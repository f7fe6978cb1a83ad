"""Real processes for the fault tests: the listener, its log events, its metrics, its memory.

* `running_listener` spawns `python -m listener listen`, reads its stdout JSON lines
  in a thread (a pipe never fills), and always stops it: SIGTERM, then SIGKILL.
* Its /metrics answers are read with tests/support/metrics.py.
* The network fault (a proxy that goes silent) lives in tests/fault/proxy.py.
"""

from __future__ import annotations

import contextlib
import functools
import json
import signal
import subprocess
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, Any

import anyio
import asyncpg
import httpx

from tests.support.cli import LISTENER
from tests.support.metrics import Scrape
from tests.support.users import ledger_counts
from tests.support.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
STOP_SECONDS = 10.0


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB: resident now, and the peak so far."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


class ListenerProcess:
    """One `python -m listener listen` child with its log lines collected as they come."""

    def __init__(self, env: Mapping[str, str], log_path: Path, client: httpx.AsyncClient) -> None:
        self.log_path = log_path
        self.client = client
        self.events: list[dict[str, Any]] = []
        self.port: int | None = None
        self.killed = False
        self._lock = threading.Lock()
        self._log: IO[str] = log_path.open("w", encoding="utf-8")
        self.popen = subprocess.Popen(
            [*LISTENER, "listen"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env),
            cwd=REPO,
        )
        self._reader = threading.Thread(target=self._read, name=f"read-{log_path.stem}")
        self._reader.start()

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.popen.pid

    def _read(self) -> None:
        stdout = self.popen.stdout
        assert stdout is not None
        for raw in stdout:
            line = raw.decode("utf-8", errors="replace")
            self._log.write(line)
            self._log.flush()
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if not isinstance(event, dict):  # a traceback or a stray print
                event = {"event": "_raw", "text": line.rstrip()}
            with self._lock:
                self.events.append(event)

    def mark(self) -> int:
        """A position in the event list: `wait_event(start=mark)` only looks after it."""
        with self._lock:
            return len(self.events)

    def find(self, event: str, *, start: int = 0, **fields: Any) -> list[dict[str, Any]]:
        """Logged events with this name (and these field values) from position `start`."""
        with self._lock:
            candidates = self.events[start:]
        return [
            item
            for item in candidates
            if item.get("event") == event and all(item.get(k) == v for k, v in fields.items())
        ]

    def tail(self, lines: int = 25) -> str:
        """The end of its output, for failure messages."""
        with self._lock:
            recent = self.events[-lines:]
        return "\n".join(json.dumps(item) for item in recent)

    def assert_alive(self) -> None:
        """Fail, with its output, if the process has exited."""
        code = self.popen.poll()
        assert code is None, f"listener exited with {code}:\n{self.tail()}"

    async def wait_event(
        self, event: str, *, start: int = 0, within: float = 15.0, **fields: Any
    ) -> dict[str, Any]:
        """The first matching event from `start`, waiting for it (the process must stay up)."""
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            found.extend(self.find(event, start=start, **fields))
            if not found:
                self.assert_alive()
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
            self.assert_alive()
            return await self.readyz() == 200

        await wait_until(ready, deadline=within, interval=0.02, what="/readyz 200")

    async def wait_metrics(
        self, check: Callable[[Scrape], bool], *, within: float = 20.0, what: str
    ) -> Scrape:
        """Scrape until `check(scrape)` holds; returns that scrape."""
        last: list[Scrape] = []

        async def holds() -> bool:
            self.assert_alive()
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

    async def stop(self, *, within: float = STOP_SECONDS) -> int:
        """SIGTERM and wait (in a thread, not blocking the event loop); SIGKILL after `within`."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                await anyio.to_thread.run_sync(functools.partial(self.popen.wait, timeout=within))
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)  # too slow: the exit code says so
        return self.popen.wait(timeout=STOP_SECONDS)

    def close_output(self) -> None:
        """After the child exited: let the reader thread drain the pipe and finish."""
        self._reader.join(timeout=STOP_SECONDS)
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        self._log.close()


@asynccontextmanager
async def running_listener(
    env: Mapping[str, str], log_dir: Path, name: str = "listener"
) -> AsyncIterator[ListenerProcess]:
    """A listen process on a free port, HTTP up; stopped (SIGTERM, then SIGKILL) on exit."""
    async with httpx.AsyncClient(timeout=10.0) as client:
        process = ListenerProcess(env, log_dir / f"{name}.log", client)
        try:
            started = await process.wait_event("http_listening", within=30.0)
            process.port = int(started["port"])
            yield process
        finally:
            with anyio.CancelScope(shield=True):
                code = await process.stop()
            process.close_output()
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
