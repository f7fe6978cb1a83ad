"""One session's processing task: doorbells and timers become ledger catch-ups.

The service (listener.service) runs one `Processor` per database session, beside the
probe and the lost-connection watch.  It reads the doorbells the connection buffered,
counts probes and malformed payloads, and asks the ledger to catch up: at once when a
doorbell rang, again soon while the horizon holds rows back, and on a timer anyway.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import anyio
import structlog

from listener.config import Settings
from listener.connection import DoorbellBuffer, ListenConnection
from listener.ledger import CatchUp, Ledger
from listener.metrics import Metrics
from listener.payload import Doorbell, Malformed, Probe, parse_payload

# The logger name these events have always carried (the class lived in listener.service).
log = structlog.get_logger("listener.service")

# While the horizon waits for open ledger writers, re-check this soon, backing off.
FOLLOW_UP_MIN_SECONDS = 0.005
FOLLOW_UP_MAX_SECONDS = 1.0
# A flood of bad payloads gets one warning per interval, with a count of the rest.
MALFORMED_LOG_INTERVAL_SECONDS = 1.0

# Ends a session: (error kind, reason).
Fail = Callable[[str, str], None]


class CaughtUpState(Protocol):
    """The part of the service's state a processor writes (listener.service.ServiceState)."""

    caught_up: bool


class Processor:
    """One session's processing task: doorbells and timers become ledger catch-ups."""

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        buffer: DoorbellBuffer,
        metrics: Metrics,
        state: CaughtUpState,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.buffer = buffer
        self.metrics = metrics
        self.state = state
        self._warned_at = float("-inf")
        self._suppressed = 0

    async def run(self, listen: ListenConnection, fail: Fail) -> None:
        """Process until the connection fails (the error ends the session)."""
        interval = self.settings.catchup_interval_seconds
        next_periodic = anyio.current_time() + interval
        follow_up: float | None = None
        target: int | None = None
        while True:
            now = anyio.current_time()
            deadline = next_periodic if follow_up is None else min(next_periodic, now + follow_up)
            doorbells, rang = self._sort(await self.buffer.collect(deadline - now))
            requested = self.buffer.take_catch_up_request()
            if not (rang or requested or anyio.current_time() >= deadline):
                continue
            result: CatchUp | None = None
            try:
                result = await self.ledger.catch_up(
                    listen.conn, lock=listen.lock, more_coming=self.buffer.waiting
                )
            finally:
                self._classify(doorbells, None if result is None else result.allocated)
            next_periodic = anyio.current_time() + interval
            if result.pending:
                follow_up = min(FOLLOW_UP_MAX_SECONDS, 2 * (follow_up or FOLLOW_UP_MIN_SECONDS / 2))
            else:
                follow_up = None
            if target is None:
                target = result.allocated
            if not self.state.caught_up and result.cursor >= target:
                self.state.caught_up = True
                log.info("listener_caught_up", cursor=result.cursor, rows=result.rows)

    def _sort(self, payloads: list[str]) -> tuple[list[Doorbell], bool]:
        """Count probes and malformed payloads; return the doorbells, and whether to read."""
        doorbells: list[Doorbell] = []
        rang = False
        for raw in payloads:
            match parse_payload(raw):
                case Probe():
                    self.metrics.notifications.labels(outcome="probe").inc()
                case Malformed(reason=reason, size=size):
                    # Something rang: a harmless read costs less than guessing it was noise.
                    rang = True
                    self.metrics.notifications.labels(outcome="malformed").inc()
                    self._warn_malformed(reason, size=size)
                case Doorbell() as doorbell:
                    rang = True
                    doorbells.append(doorbell)
        return doorbells, rang

    def _classify(self, doorbells: list[Doorbell], allocated: int | None) -> None:
        """A doorbell naming ids the ledger never handed out is forged; count it so."""
        ok = 0
        for doorbell in doorbells:
            if allocated is not None and doorbell.last_id > allocated:
                self.metrics.notifications.labels(outcome="malformed").inc()
                self._warn_malformed(
                    "announces ids the ledger has not handed out",
                    last_id=doorbell.last_id,
                    allocated=allocated,
                )
            else:
                ok += 1
        if ok:
            self.metrics.notifications.labels(outcome="ok").inc(ok)

    def _warn_malformed(self, reason: str, **fields: object) -> None:
        now = anyio.current_time()
        if now - self._warned_at < MALFORMED_LOG_INTERVAL_SECONDS:
            self._suppressed += 1
            return
        log.warning("notification_malformed", reason=reason, suppressed=self._suppressed, **fields)
        self._warned_at = now
        self._suppressed = 0
