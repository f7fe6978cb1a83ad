"""The dedicated LISTEN connection, and the health checks that keep it honest.

The failure that bites listeners most is a connection that looks open but is dead
(a NAT or load balancer dropped it, a failover left it talking to nobody): LISTEN
then hears nothing, forever, and "no notifications" looks like "no resets".  So:

* TCP keepalives on the socket, so the kernel notices a silent peer;
* a termination listener, so a connection asyncpg sees closing ends the session now;
* a round-trip probe: NOTIFY our channel with a nonce from a second connection (the
  probe's own) and expect it back on the LISTEN connection within a timeout.  That is
  the path every doorbell takes: another session's NOTIFY reaching our idle LISTEN
  session.  A NOTIFY sent on the LISTEN connection itself would prove much less: it
  comes back inside its own statement, even through a transaction-mode pooler that
  drops every notification arriving between our statements;
* an unanswered probe is diagnosed with one query on the LISTEN connection: no answer
  or a server process that no longer listens means dead or deaf (the caller
  `terminate()`s, since a `close()` on a dead socket can hang, and reconnects with
  capped exponential backoff and full jitter); an answer from a listening server
  process means notifications are lost on the way although the connection works,
  i.e. a transaction-mode pooler, which a reconnect cannot fix: it is reported
  instead (`ProbeResult.delivered` is False).
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

log = structlog.get_logger(__name__)

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
    """The probe's NOTIFY did not come back and the connection is dead or deaf: reconnect."""


@dataclass(frozen=True)
class ProbeResult:
    """One probe on a connection that answers queries."""

    round_trip_seconds: float
    # The echo arrived: other sessions' notifications reach the LISTEN session.
    delivered: bool
    # Not delivered: the server process that answered the diagnosis query (it
    # listens; it may not be the one that ran LISTEN).
    query_backend_pid: int | None = None


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
    """One asyncpg connection LISTENing on token_resets; every query goes through `lock`.

    A second connection, `sender`, only sends the probe's NOTIFY (see the module
    docstring); it is opened with the LISTEN connection and dropped with it.
    """

    def __init__(self, conn: asyncpg.Connection, on_payload: Callable[[str], None]) -> None:
        self.conn = conn
        self.lock = anyio.Lock()
        self.lost = anyio.Event()
        self.keepalive = False
        # The server process that ran LISTEN (pg_backend_pid() in that transaction).
        self.listen_pid: int | None = None
        self.sender: asyncpg.Connection | None = None
        # Probes completed (echoed or diagnosed): tests and benchmarks wait on it.
        self.probes = 0
        # Notifications taken off the connection: the probe's proof of life in a flood.
        self.received = 0
        self._on_payload = on_payload
        self._probe_nonce: str | None = None
        self._probe_echo = anyio.Event()

    @classmethod
    async def open(
        cls, settings: Settings, on_payload: Callable[[str], None], *, connect_seconds: float
    ) -> ListenConnection:
        """Connect, arm keepalive and the termination listener, LISTEN, open the sender."""
        conn = await connect(settings, role="listen", timeout=connect_seconds)
        listen = cls(conn, on_payload)
        try:
            listen.keepalive = enable_keepalive(conn)
            conn.add_termination_listener(listen._on_terminated)
            with anyio.fail_after(connect_seconds):
                # asyncpg forgets listeners with the connection: register on every new
                # one.  One transaction with pg_backend_pid(), because behind PgBouncer
                # asyncpg's get_server_pid() is the pooler's made-up cancel key, and
                # in transaction mode only a transaction pins one server process.
                async with conn.transaction():
                    await conn.add_listener(CHANNEL, listen._on_notification)
                    listen.listen_pid = int(await conn.fetchval(query("listener_backend_pid")))
                listen.sender = await connect(settings, role="probe", timeout=connect_seconds)
        except BaseException:
            listen.terminate()
            raise
        return listen

    @property
    def backend_pid(self) -> int:
        """The server process holding the LISTEN (what pg_terminate_backend takes)."""
        if self.listen_pid is not None:
            return self.listen_pid
        return int(self.conn.get_server_pid())

    def _on_notification(self, conn: object, pid: int, channel: str, payload: object) -> None:
        # Runs as a plain loop callback: must never block or raise.  The echo is
        # recognised here, not after the buffer, so a full buffer cannot fail a probe.
        self.received += 1
        text = str(payload)
        nonce = self._probe_nonce
        if nonce is not None and nonce in text:
            self._probe_echo.set()
        self._on_payload(text)

    def _on_terminated(self, conn: object) -> None:
        self.lost.set()

    async def probe(self, within: float) -> ProbeResult:
        """NOTIFY from the sender, wait for the echo; diagnose a missing one.

        Raises ProbeFailed when the connection is dead or deaf (reconnecting helps);
        returns `delivered=False` when it answers queries but hears nothing (a
        transaction-mode pooler: reconnecting does not help).

        The connection's lock is held throughout, so no statement of ours runs while
        the echo travels: the LISTEN session is idle, as it is when a doorbell rings.
        (A transaction-mode pooler does pass on a notification that happens to arrive
        during one of our statements; a probe racing the ledger reader would pass by
        luck.)

        `within` is how long the probe waits *without any notification arriving*.  An
        echo queued behind a flood (any role may NOTIFY our channel: 2 million in a
        few seconds take the listener ten to drain) arrives late, in order; the
        notifications arriving meanwhile prove the socket, the server and the LISTEN
        alive, so each one seen pushes the deadline on (`_extend_while_traffic`).
        """
        nonce = new_nonce()
        self._probe_echo = anyio.Event()
        started = anyio.current_time()
        phase = "lock"
        error: Exception | None = None
        with anyio.CancelScope(deadline=started + within) as scope:
            async with anyio.create_task_group() as group:
                group.start_soon(self._extend_while_traffic, scope, within)
                try:
                    await self.lock.acquire()
                    phase = "send"
                    self._probe_nonce = nonce
                    await self._send(probe_payload(nonce))
                    phase = "echo"
                    await self._probe_echo.wait()
                except Exception as exc:  # re-raised below, not wrapped in an ExceptionGroup
                    error = exc
                group.cancel_scope.cancel()
        self._probe_nonce = None
        self.probes += 1
        waited = anyio.current_time() - started
        try:
            if error is not None:
                raise error
            if self._probe_echo.is_set():
                return ProbeResult(round_trip_seconds=waited, delivered=True)
            if phase == "lock":
                raise ProbeFailed(f"the connection stayed busy for {waited:.3g}s")
            if phase == "send":
                raise ProbeFailed(f"the probe's NOTIFY was not sent within {waited:.3g}s")
            return await self._diagnose(within, waited)
        finally:
            if phase != "lock":
                self.lock.release()

    async def _extend_while_traffic(self, scope: anyio.CancelScope, within: float) -> None:
        """Keep the probe's deadline `within` seconds after the latest notification seen."""
        seen = self.received
        while True:
            await anyio.sleep(within / 4)
            if self.received != seen:
                seen = self.received
                scope.deadline = max(scope.deadline, anyio.current_time() + within)

    async def _send(self, payload: str) -> None:
        """The probe's NOTIFY, on the sender connection; a failure ends the session."""
        sender = self.sender
        if sender is None or sender.is_closed():
            raise ProbeFailed("the probe's connection is closed")
        try:
            await sender.execute(query("listener_probe"), payload)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise ProbeFailed(f"the probe's NOTIFY failed: {type(exc).__name__}: {exc}") from exc

    async def _diagnose(self, within: float, waited: float) -> ProbeResult:
        """No echo: does the LISTEN connection still answer, and from a listening process?"""
        with anyio.move_on_after(within):
            row = await self.conn.fetchrow(query("listener_diagnose"))  # under probe()'s lock
            if row is None:  # the query always returns one row
                raise RuntimeError("listener_diagnose returned no row")
            pid, listening = int(row["backend_pid"]), bool(row["listening"])
            if pid == self.listen_pid and not listening:
                raise ProbeFailed(f"probe not echoed: server process {pid} no longer listens")
            return ProbeResult(round_trip_seconds=waited, delivered=False, query_backend_pid=pid)
        raise ProbeFailed(
            f"probe not echoed within {waited:.3g}s and the connection does not answer"
        )

    def undelivered_reason(self, result: ProbeResult) -> str:
        """One line for /readyz and the log: what was seen, and what to change."""
        if result.query_backend_pid != self.listen_pid:
            seen = (
                f"LISTEN ran on server process {self.listen_pid}, "
                f"statements now run on {result.query_backend_pid}"
            )
        else:
            seen = f"server process {self.listen_pid} listens, but nothing reaches us"
        return (
            "other sessions' notifications do not reach the LISTEN connection although it "
            f"answers queries ({seen}): DATABASE_URL goes through a transaction-mode pooler "
            "(PgBouncer pool_mode=transaction); LISTEN needs a direct connection or "
            "pool_mode=session"
        )

    def terminate(self) -> None:
        """Drop both connections at once, without a goodbye that a dead peer never answers."""
        self.conn.terminate()
        if self.sender is not None:
            self.sender.terminate()

    async def close(self, within: float) -> None:
        """Close both politely within `within` seconds, else terminate; for orderly shutdown."""
        connections = [conn for conn in (self.sender, self.conn) if conn is not None]
        try:
            with anyio.move_on_after(within, shield=True):
                for conn in connections:
                    with contextlib.suppress(
                        OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError
                    ):
                        await conn.close(timeout=within)
        finally:
            for conn in connections:
                if not conn.is_closed():
                    conn.terminate()


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
