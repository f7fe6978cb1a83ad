"""A tiny real HTTP server on 127.0.0.1 that records JSON POSTs (Alertmanager, webhooks).

It runs in a thread (http.server), so the code under test talks to it over a real
socket.  Tests wait on what it received with a deadline, never with a bare sleep.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any


@dataclass(frozen=True)
class Received:
    """One POST the server answered."""

    path: str
    body: Any
    status: int
    at: float


class RecordingServer:
    """Records every POST; `status` (settable while running) is what it answers.

    `status_for`, when set, picks the answer per request path (None: `status`), so a
    test can fail one destination while another on the same server succeeds.
    """

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.status_for: Callable[[str], int | None] | None = None
        self.received: list[Received] = []
        self._changed = threading.Condition()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:43121."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> RecordingServer:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def snapshot(self) -> list[Received]:
        """A copy of what was received so far."""
        with self._changed:
            return list(self.received)

    def wait_for(self, predicate: Callable[[list[Received]], bool], timeout: float) -> bool:
        """Block until predicate(received) holds or the timeout passes; returns which."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(list(self.received)), timeout)

    def _record(self, path: str, raw: bytes) -> int:
        chosen = self.status_for(path) if self.status_for is not None else None
        status = self.status if chosen is None else chosen
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body, status = raw.decode(errors="replace"), 400
        with self._changed:
            self.received.append(Received(path, body, status, time.monotonic()))
            self._changed.notify_all()
        return status

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                status = recorder._record(self.path, self.rfile.read(length))
                payload = b"{}"
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: the tests assert on what was received instead."""

        return Handler
