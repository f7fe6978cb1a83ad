"""The consumers bench/listener_drain.py races: bare loops, ours, and asyncpg-listen.

Each one LISTENs on its own connection and exposes the same four steps: start (and
have LISTEN registered), hold (BEGIN: the server queues notifications for it), release
and drain (COMMIT, then wait until the burst is processed), close.  Timing is taken
inside each consumer's own path: first notification received, last one processed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import asyncpg

from listener.config import Settings
from listener.connection import DoorbellBuffer, ListenConnection
from listener.ledger import Ledger
from listener.metrics import Metrics
from listener.payload import CHANNEL
from listener.processor import Processor
from listener.service import ServiceState

if TYPE_CHECKING:
    import asyncpg_listen

# asyncpg-listen's keep-alive runs `SELECT 1` every notification_timeout/3 seconds of
# silence; a query inside the held transaction would break the hold, so the timeout is
# an hour.  That only removes work from the peer.
PEER_NOTIFICATION_TIMEOUT = 3600.0
POLL_SECONDS = 0.005


@dataclass
class Drain:
    """One consumer's drain of one burst."""

    count: int
    seconds: float  # first notification received -> last one processed
    release_seconds: float  # COMMIT sent -> last one processed
    # This process's CPU time from COMMIT sent to the last one processed: the other
    # tenants of a shared machine stretch wall time far more than CPU time.
    cpu_seconds: float
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Notifications per second, first to last."""
        return self.count / self.seconds

    @property
    def cpu_rate(self) -> float:
        """Notifications per CPU second of this (client) process."""
        return self.count / self.cpu_seconds


class Consumer(Protocol):
    """What the benchmark drives."""

    def __init__(self, url: str) -> None: ...
    async def start(self) -> None: ...
    async def wait_for(self, count: int, *, deadline_seconds: float) -> None: ...
    async def hold(self) -> None: ...
    async def release_and_drain(self, count: int, *, deadline_seconds: float) -> Drain: ...
    async def close(self) -> None: ...


async def _poll(check: Any, deadline_seconds: float, what: str) -> None:
    """Wait for check() with a deadline (set-up only: never inside a timed window)."""
    deadline = time.monotonic() + deadline_seconds
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {deadline_seconds:g}s")
        await asyncio.sleep(POLL_SECONDS)


class _Counting:
    """Shared bookkeeping: a count, the first and last arrival of the timed burst.

    Per notification a consumer pays `count += 1` and one comparison with `mark`
    (the next count worth a clock reading); the rest runs twice per burst.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.count = 0
        self.mark = sys.maxsize
        self.target = -1
        self.first = 0.0
        self.last = 0.0
        self.cpu_last = 0.0
        self.done = asyncio.Event()
        self.conn: asyncpg.Connection | None = None

    def _edge(self) -> None:
        """The burst's first notification, or its last."""
        now = time.perf_counter()
        if not self.first:
            self.first = now
            self.mark = self.target
        if self.count >= self.target:
            self.last = now
            self.cpu_last = time.process_time()
            self.mark = sys.maxsize
            self.done.set()

    async def wait_for(self, count: int, *, deadline_seconds: float) -> None:
        """Until `count` notifications arrived (the warm-up)."""
        await _poll(lambda: self.count >= count, deadline_seconds, f"{count} notifications")

    async def hold(self) -> None:
        """BEGIN: the server keeps our notifications queued until COMMIT."""
        assert self.conn is not None
        await self.conn.execute("BEGIN")

    async def release_and_drain(self, count: int, *, deadline_seconds: float) -> Drain:
        """COMMIT, then wait until all `count` queued notifications are processed."""
        assert self.conn is not None
        self.first, self.target, self.mark = 0.0, self.count + count, self.count + 1
        released, cpu_released = time.perf_counter(), time.process_time()
        await self.conn.execute("COMMIT")
        await asyncio.wait_for(self.done.wait(), deadline_seconds)
        return Drain(
            count, self.last - self.first, self.last - released, self.cpu_last - cpu_released
        )

    async def close(self) -> None:
        """Drop the connection."""
        if self.conn is not None:
            await self.conn.close(timeout=5)


class BareConsumer(_Counting):
    """The baseline: an asyncpg add_listener callback that only counts."""

    async def start(self) -> None:
        """Connect and LISTEN."""
        self.conn = await asyncpg.connect(self.url)
        await self.conn.add_listener(CHANNEL, self._on_notification)

    def _on_notification(self, conn: Any, pid: int, channel: str, payload: object) -> None:
        self.count += 1
        if self.count >= self.mark:
            self._edge()


class BareJsonConsumer(BareConsumer):
    """A reference: the bare callback plus json.loads of each payload."""

    def _on_notification(self, conn: Any, pid: int, channel: str, payload: object) -> None:
        json.loads(payload)  # type: ignore[arg-type]  # asyncpg hands over a str
        self.count += 1
        if self.count >= self.mark:
            self._edge()


class _ListeningConnection(asyncpg.Connection):
    """Tells us when asyncpg-listen has registered its LISTEN on the connection."""

    listening: asyncio.Event

    async def add_listener(self, channel: str, callback: Any) -> None:
        await super().add_listener(channel, callback)
        self.listening.set()


class PeerConsumer(_Counting):
    """asyncpg-listen's NotificationListener, ListenPolicy.ALL, a handler that counts."""

    async def start(self) -> None:
        """Run the library's listener in a task; wait until it LISTENs."""
        # Imported here: the peer is a benchmark-only package (the `bench` extra), and
        # `python -m bench --list` must work without it.
        import asyncpg_listen  # noqa: PLC0415

        connected = asyncio.Event()

        listening = asyncio.Event()

        async def connect() -> asyncpg.Connection:
            conn = await asyncpg.connect(self.url, connection_class=_ListeningConnection)
            assert isinstance(conn, _ListeningConnection)
            conn.listening = listening
            self.conn = conn
            connected.set()
            return conn

        listener = asyncpg_listen.NotificationListener(connect)
        self.task = asyncio.create_task(
            listener.run(
                {CHANNEL: self._handle},
                policy=asyncpg_listen.ListenPolicy.ALL,
                notification_timeout=PEER_NOTIFICATION_TIMEOUT,
            )
        )
        await asyncio.wait_for(connected.wait(), 30)
        await asyncio.wait_for(listening.wait(), 30)

    async def _handle(self, notification: asyncpg_listen.NotificationOrTimeout) -> None:
        # Timeout objects (none with an hour's timeout) are not notifications.
        if getattr(notification, "payload", None) is not None:
            self.count += 1
            if self.count >= self.mark:
                self._edge()

    async def close(self) -> None:
        """Cancel the library's tasks, then drop the connection."""
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await super().close()


class _DoneBuffer(DoorbellBuffer):
    """The real buffer, telling us when the processing task comes back for more.

    `collect` is where the processor waits between rounds: entering it with every
    doorbell accounted for and no catch-up owed means the burst is fully processed.
    """

    def __init__(self, metrics: Metrics, on_collect: Callable[[bool], None]) -> None:
        super().__init__(metrics)
        self.on_collect = on_collect
        self.collecting = False

    async def collect(self, within: float) -> list[str]:
        """The real collect, announced first."""
        self.on_collect(self._catch_up_requested)
        self.collecting = True
        try:
            return await super().collect(within)
        finally:
            self.collecting = False

    def idle(self) -> bool:
        """The processor is waiting for a doorbell, with nothing queued or owed."""
        return self.collecting and not self._catch_up_requested and not self.pending()

    def pending(self) -> int:
        """Doorbells in the stream, not yet taken by the processor."""
        return self._receive.statistics().current_buffer_used


class OursConsumer:
    """The components of one listener session (listener/service.py `_session`).

    ListenConnection (asyncpg callback, probe-nonce check) -> DoorbellBuffer (bounded
    stream; overflow counted, one catch-up owed) -> Processor (parse_payload, forged-id
    check, Ledger.catch_up under the connection lock, metrics, logs).  Left out: the
    15 s probe (its NOTIFY would wait in the held transaction) and the termination
    watcher; the periodic catch-up is set to an hour so it cannot land in a window.
    """

    def __init__(self, url: str) -> None:
        self.settings = Settings(
            database_url=url,
            catchup_interval_seconds=3600.0,
            listener_name=f"bench-{uuid.uuid4().hex[:8]}",
        )
        self.metrics = Metrics.fresh()
        self.ledger = Ledger(self.metrics, self.settings.listener_name)
        self.buffer = _DoneBuffer(self.metrics, self._on_collect)
        self.listen: ListenConnection | None = None
        self.target = -1
        self.first = 0.0
        self.last = 0.0
        self.cpu_last = 0.0
        self.done = asyncio.Event()
        self.failure: list[tuple[str, str]] = []

    def accounted(self) -> int:
        """Doorbells the processor has dealt with: ok, malformed, or dropped on overflow."""
        total = 0.0
        for outcome in ("ok", "malformed", "overflow"):
            value = self.metrics.registry.get_sample_value(
                "token_reset_notifications_total", {"outcome": outcome}
            )
            total += value or 0.0
        return int(total)

    def _on_collect(self, catch_up_owed: bool) -> None:
        if self.target >= 0 and not catch_up_owed and self.accounted() >= self.target:
            self.last = time.perf_counter()
            self.cpu_last = time.process_time()
            self.target = -1
            self.done.set()

    def _first_arrival(self, payload: str) -> None:
        # Swapped back out after one call so the rest of the burst pays nothing.
        self.first = time.perf_counter()
        assert self.listen is not None
        self.listen._on_payload = self.buffer.offer
        self.buffer.offer(payload)

    async def start(self) -> None:
        """Connect, LISTEN, open the ledger cursor, start the processing task."""
        self.listen = await ListenConnection.open(
            self.settings, self.buffer.offer, connect_seconds=10
        )
        async with self.listen.lock:
            await self.ledger.open(self.listen.conn)
        self.buffer.request_catch_up()  # as the service does right after connecting
        processor = Processor(self.settings, self.ledger, self.buffer, self.metrics, ServiceState())
        self.task = asyncio.create_task(processor.run(self.listen, self._fail))

    def _fail(self, kind: str, reason: str) -> None:
        self.failure.append((kind, reason))
        self.done.set()

    async def wait_for(self, count: int, *, deadline_seconds: float) -> None:
        """Until the warm-up is processed and the initial catch-up has run."""
        await _poll(
            lambda: (
                bool(self.failure)
                or (self.accounted() >= count and self.ledger.reads > 0 and self.buffer.idle())
            ),
            deadline_seconds,
            f"{count} doorbells processed",
        )
        self._check()

    async def hold(self) -> None:
        """BEGIN on the listen connection, under its lock, while the processor idles."""
        assert self.listen is not None
        async with self.listen.lock:
            await self.listen.conn.execute("BEGIN")

    async def release_and_drain(self, count: int, *, deadline_seconds: float) -> Drain:
        """COMMIT, then wait until the processor has dealt with the whole burst."""
        assert self.listen is not None
        reads, windows, dropped = self.ledger.reads, self.ledger.windows, self.buffer.dropped
        ok_before = self._outcome("ok")
        self.target = self.accounted() + count
        self.listen._on_payload = self._first_arrival
        released, cpu_released = time.perf_counter(), time.process_time()
        async with self.listen.lock:
            await self.listen.conn.execute("COMMIT")
        await asyncio.wait_for(self.done.wait(), deadline_seconds)
        self._check()
        return Drain(
            count,
            self.last - self.first,
            self.last - released,
            self.cpu_last - cpu_released,
            extra={
                "ledger_reads": self.ledger.reads - reads,
                "ledger_windows": self.ledger.windows - windows,
                "overflow": self.buffer.dropped - dropped,
                "parsed_ok": self._outcome("ok") - ok_before,
                "malformed": self._outcome("malformed"),
            },
        )

    def _outcome(self, outcome: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "token_reset_notifications_total", {"outcome": outcome}
        )
        return value or 0.0

    def _check(self) -> None:
        if self.failure:
            raise RuntimeError(f"our listener's session failed: {self.failure[0]}")

    async def close(self) -> None:
        """Stop the processing task and close the connection."""
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        if self.listen is not None:
            with anyio.move_on_after(5):
                await self.listen.close(within=2)
        self.buffer.close()


CONSUMERS: dict[str, type[Consumer]] = {
    "bare": BareConsumer,
    "bare_json": BareJsonConsumer,
    "ours": OursConsumer,
    "peer": PeerConsumer,
}
