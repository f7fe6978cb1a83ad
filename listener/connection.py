"""The dedicated LISTEN connection, and the health checks that keep it honest.

The failure that bites listeners most is a connection that looks open but is dead
(a NAT or load balancer dropped it, a failover left it talking to nobody): LISTEN
then hears nothing, forever, and "no notifications" looks like "no resets".  So:

* TCP keepalives on the socket, so the kernel notices a silent peer;
* a termination listener, so a connection asyncpg sees closing ends the session now;
* a round-trip probe: NOTIFY our own channel with a nonce and expect it back within
  a timeout, which proves the whole path (socket, server, LISTEN registration);
* on any failure the caller `terminate()`s (a `close()` on a dead socket can hang)
  and reconnects with capped exponential backoff and full jitter.
"""

from __future__ import annotations

import contextlib
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import anyio
import asyncpg
import structlog

from listener.config import Settings
from listener.database import connect
from listener.metrics import Metrics
from listener.payload import CHANNEL, new_nonce, probe_payload
from listener.sql import query

log = structlog.get_logger("listener.connection")

# Kernel keepalive: first probe after 30 s idle, then every 10 s, dead after 3 misses;
# unacknowledged writes fail after 60 s.  The NOTIFY probe usually notices first.
KEEPALIVE_IDLE_SECONDS: Final = 30
KEEPALIVE_INTERVAL_SECONDS: Final = 10
KEEPALIVE_COUNT: Final = 3
USER_TIMEOUT_MILLISECONDS: Final = 60_000
# Doorbells waiting for the processing task; a burst beyond this is dropped and
# replaced by one catch-up read.
DOORBELL_BUFFER_SIZE: Final = 1024


class ProbeFailed(Exception):
    """The probe's NOTIFY did not come back in time: the connection is not listening."""


@dataclass
class Backoff:
    """Capped exponential backoff with full jitter (sleep uniformly in [0, min(cap, b*2^n)])."""

    base: float = 0.1
    cap: float = 30.0
    attempt: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next_delay(self) -> float:
        """The next sleep; full jitter keeps a fleet of listeners from reconnecting in step."""
        self.attempt += 1
        ceiling = min(self.cap, self.base * 2 ** min(self.attempt - 1, 30))
        return self.rng.uniform(0.0, ceiling)

    def reset(self) -> None:
        """Back to the first attempt after a success."""
        self.attempt = 0


def enable_keepalive(conn: asyncpg.Connection) -> bool:
    """TCP keepalive on the connection's socket; False on a Unix socket (nothing to do)."""
    # asyncpg exposes no public accessor for its transport; the socket is the
    # documented asyncio transport extra "socket".
    transport = getattr(conn, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE_SECONDS),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_SECONDS),
        ("TCP_KEEPCNT", KEEPALIVE_COUNT),
        ("TCP_USER_TIMEOUT", USER_TIMEOUT_MILLISECONDS),
    ):
        option = getattr(socket, name, None)  # Linux names; absent elsewhere
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
    return True


class ListenConnection:
    """One asyncpg connection LISTENing on token_resets; every query goes through `lock`."""

    def __init__(self, conn: asyncpg.Connection, on_payload: Callable[[str], None]) -> None:
        self.conn = conn
        self.lock = anyio.Lock()
        self.lost = anyio.Event()
        self.keepalive = False
        self._on_payload = on_payload
        self._probe_nonce: str | None = None
        self._probe_echo = anyio.Event()

    @classmethod
    async def open(
        cls, settings: Settings, on_payload: Callable[[str], None], *, connect_seconds: float
    ) -> ListenConnection:
        """Connect, arm keepalive and the termination listener, then LISTEN."""
        # Cursor writes need not wait for a WAL flush: a crash of this process loses
        # nothing committed, and after a database crash the process keeps its own
        # cursor (see Ledger.open).  Flushing per window tripled the lag under load.
        conn = await connect(
            settings,
            role="listen",
            timeout=connect_seconds,
            server_settings={"synchronous_commit": "off"},
        )
        listen = cls(conn, on_payload)
        try:
            listen.keepalive = enable_keepalive(conn)
            conn.add_termination_listener(listen._on_terminated)
            with anyio.fail_after(connect_seconds):
                # asyncpg forgets listeners with the connection: register on every new one.
                await conn.add_listener(CHANNEL, listen._on_notification)
        except BaseException:
            conn.terminate()
            raise
        return listen

    @property
    def backend_pid(self) -> int:
        """The server process of this connection (what pg_terminate_backend takes)."""
        return int(self.conn.get_server_pid())

    def _on_notification(self, conn: object, pid: int, channel: str, payload: object) -> None:
        # Runs as a plain loop callback: must never block or raise.  The echo is
        # recognised here, not after the buffer, so a full buffer cannot fail a probe.
        text = str(payload)
        nonce = self._probe_nonce
        if nonce is not None and nonce in text:
            self._probe_echo.set()
        self._on_payload(text)

    def _on_terminated(self, conn: object) -> None:
        self.lost.set()

    async def probe(self, within: float) -> float:
        """NOTIFY ourselves and wait for the echo; returns the round trip in seconds."""
        nonce = new_nonce()
        self._probe_echo = anyio.Event()
        self._probe_nonce = nonce
        started = anyio.current_time()
        try:
            with anyio.fail_after(within):
                async with self.lock:
                    await self.conn.execute(query("listener_probe"), probe_payload(nonce))
                await self._probe_echo.wait()
        except TimeoutError:
            raise ProbeFailed(f"probe not echoed within {within:g}s") from None
        finally:
            self._probe_nonce = None
        return anyio.current_time() - started

    def terminate(self) -> None:
        """Drop the connection at once, without a goodbye that a dead peer never answers."""
        self.conn.terminate()

    async def close(self, within: float) -> None:
        """Close politely within `within` seconds, else terminate; for orderly shutdown."""
        try:
            with (
                anyio.move_on_after(within, shield=True),
                contextlib.suppress(
                    OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError
                ),
            ):
                await self.conn.close(timeout=within)
        finally:
            if not self.conn.is_closed():
                self.conn.terminate()


class DoorbellBuffer:
    """The bounded buffer between asyncpg's callback and the processing task.

    The callback only appends (never blocks, never raises).  When the buffer is full
    the newest doorbell is dropped, counted as outcome="overflow", and one catch-up
    read is requested: the ledger holds everything the dropped doorbells announced.
    """

    def __init__(self, metrics: Metrics, size: int = DOORBELL_BUFFER_SIZE) -> None:
        self._metrics = metrics
        # Resolved once: labels() costs more than the rest of the callback together.
        self._overflow = metrics.notifications.labels(outcome="overflow")
        self._send, self._receive = anyio.create_memory_object_stream[str](size)
        self._catch_up_requested = False
        self.dropped = 0
        # Drops not yet added to the overflow counter: the processing task adds them
        # in one inc() per round instead of one per dropped doorbell.
        self._unflushed = 0
        # The stream filled up: drop without trying it again until collect() empties it.
        self._full = False

    def offer(self, payload: str) -> None:
        """Called from the asyncpg callback: enqueue, or drop and ask for a catch-up."""
        if not self._full:
            try:
                self._send.send_nowait(payload)
            except anyio.WouldBlock:
                self._full = True
            else:
                return
        # In a burst this is the callback's whole cost: three attribute writes.
        self.dropped += 1
        self._unflushed += 1
        self._catch_up_requested = True

    def request_catch_up(self) -> None:
        """Ask the processing task for one ledger read even without a doorbell."""
        self._catch_up_requested = True

    def take_catch_up_request(self) -> bool:
        """True (once) if a catch-up was requested since the last call."""
        requested, self._catch_up_requested = self._catch_up_requested, False
        if self._unflushed:
            self._overflow.inc(self._unflushed)
            self._unflushed = 0
        return requested

    def waiting(self) -> bool:
        """Doorbells are queued (or a catch-up is owed): the processor will be back soon."""
        return self._catch_up_requested or self._receive.statistics().current_buffer_used > 0

    async def collect(self, within: float) -> list[str]:
        """Wait up to `within` seconds for a payload, then take every one already waiting.

        Taking them all at once is what coalesces a burst into one ledger read.
        """
        payloads: list[str] = []
        if not self._catch_up_requested:
            with anyio.move_on_after(max(within, 0.0)):
                payloads.append(await self._receive.receive())
        while True:
            try:
                payloads.append(self._receive.receive_nowait())
            except anyio.WouldBlock:
                self._full = False
                return payloads

    def close(self) -> None:
        """Release both ends of the stream."""
        self._send.close()
        self._receive.close()
