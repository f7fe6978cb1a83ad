"""A TCP proxy in front of the database that can go silent: the half-open connection.

`tcp_proxy` forwards 127.0.0.1:<port> to the database.  `pause()` stops moving bytes
in both directions while every socket stays open, which is what a connection that a
NAT or load balancer silently forgot looks like to both ends; `resume()` delivers
what was held back.  `pause_after()` springs that pause right after one client
message, so the server acts on it while its answer never arrives.  Each connection's
libpq `application_name` is read from its startup message, so a test can tell which
part of the service opened it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import anyio
import anyio.abc
from anyio.from_thread import BlockingPortal, start_blocking_portal

# libpq's startup message carries "application_name\0<value>\0" in clear text.
_APPLICATION_NAME = re.compile(rb"application_name\x00([^\x00]*)\x00")
_SNIFF_BYTES = 4096


def with_address(url: str, host: str, port: int) -> str:
    """The same database URL (user, database, options) at another host and port."""
    parts = urlsplit(url)
    user = parts.netloc.rpartition("@")[0]
    netloc = f"{user}@{host}:{port}" if user else f"{host}:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@dataclass
class ProxiedConnection:
    """One client connection through the proxy and the start of what the client sent."""

    head: bytearray = field(default_factory=bytearray)

    def sniff(self, data: bytes) -> None:
        """Keep the first bytes: they hold the startup message."""
        if len(self.head) < _SNIFF_BYTES:
            self.head += data[: _SNIFF_BYTES - len(self.head)]

    @property
    def application_name(self) -> str | None:
        """The libpq application_name the client announced, once its startup was seen."""
        match = _APPLICATION_NAME.search(bytes(self.head))
        return None if match is None else match[1].decode("utf-8", errors="replace")


class TcpProxy:
    """Forwards 127.0.0.1:port to a target; `pause()` holds every byte, sockets stay open.

    It runs on an event loop of its own, in its own thread: a test busy with hundreds
    of requests must not slow the proxy down and fail the listener's probe by accident.
    """

    def __init__(self, target_host: str, target_port: int, portal: BlockingPortal) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.connections: list[ProxiedConnection] = []
        self._portal = portal
        self._flowing = portal.call(anyio.Event)
        portal.call(self._flowing.set)
        # One-shot trap: (application_name, marker) -> pause right after forwarding it.
        self._trap: tuple[str, bytes] | None = None

    def url_for(self, database_url: str) -> str:
        """`database_url` rerouted through this proxy."""
        return with_address(database_url, "127.0.0.1", self.port)

    @property
    def paused(self) -> bool:
        """True while no byte moves in either direction."""
        return not self._flowing.is_set()

    def pause(self) -> None:
        """Stop forwarding on every connection, old and new; nothing is closed."""
        self._portal.call(self._pause)

    def resume(self) -> None:
        """Forward again, including whatever was held back."""
        self._portal.call(self._flowing.set)

    def pause_after(self, application_name: str, marker: bytes) -> None:
        """Once that client sends bytes containing `marker`: forward them, then pause.

        The server then acts on the message (say a COMMIT) while its answer is held
        back: the client cannot know whether it happened.
        """
        self._trap = (application_name, marker)

    def _sprung(self, record: ProxiedConnection, data: bytes) -> bool:
        """True (once) when this client data is what pause_after() waits for."""
        trap = self._trap
        if trap is None or record.application_name != trap[0] or trap[1] not in data:
            return False
        self._trap = None
        return True

    def _pause(self) -> None:
        if self._flowing.is_set():
            self._flowing = anyio.Event()

    def application_names(self, start: int = 0) -> list[str | None]:
        """application_name of each connection accepted from position `start` on."""
        return [connection.application_name for connection in self.connections[start:]]

    async def _gate(self) -> None:
        # Re-read the attribute every time: pause() swaps in a fresh, unset event.
        while not self._flowing.is_set():
            await self._flowing.wait()

    async def _pump(
        self,
        source: anyio.abc.ByteStream,
        sink: anyio.abc.ByteStream,
        record: ProxiedConnection | None,
        scope: anyio.CancelScope,
    ) -> None:
        # Either side ending (EOF, reset, closed) ends this direction; then close both,
        # as a real proxy would.
        with contextlib.suppress(
            anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError
        ):
            while True:
                await self._gate()
                data = await source.receive()
                if record is not None:
                    record.sniff(data)
                await self._gate()  # bytes read just before a pause are held too
                await sink.send(data)
                if record is not None and self._sprung(record, data):
                    self._pause()
        scope.cancel()

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        record = ProxiedConnection()
        self.connections.append(record)
        async with client:
            try:
                upstream = await anyio.connect_tcp(*self.target)
            except OSError:
                return
            async with upstream, anyio.create_task_group() as group:
                group.start_soon(self._pump, client, upstream, record, group.cancel_scope)
                group.start_soon(self._pump, upstream, client, None, group.cancel_scope)

    async def serve(self, *, task_status: anyio.abc.TaskStatus[int]) -> None:
        """Accept and forward until cancelled; reports the bound port."""
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        # anyio's typed-attribute lookup, not Django's QuerySet.extra.
        self.port = int(listener.extra(anyio.abc.SocketAttribute.local_port))  # noqa: S610
        async with listener:
            task_status.started(self.port)
            await listener.serve(self._handle)


@contextmanager
def tcp_proxy(database_url: str) -> Iterator[TcpProxy]:
    """A proxy in front of the server of `database_url`, closed (all sockets) on exit."""
    parts = urlsplit(database_url)
    with start_blocking_portal("asyncio") as portal:
        proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432, portal)
        serving, _ = portal.start_task(proxy.serve)
        try:
            yield proxy
        finally:
            serving.cancel()  # the portal then stops with nothing left to wait for
