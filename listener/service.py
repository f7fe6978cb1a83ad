"""`token-reset listen`: one anyio task group owns the whole service.

Tasks: the signal receiver (SIGTERM/SIGINT stop everything), the HTTP server, the
listener (connection, doorbells, ledger catch-up, probe), the watchdog, the
Alertmanager push (with ALERTMANAGER_URL), the built-in schedule and the rollover
notices (with NOTICE_URLS).  Every one but
the signal receiver runs under listener.supervisor: when it dies it is restarted with
backoff, /readyz names it and token_reset_task_up{task} says 0 meanwhile, so a dead
watchdog can no longer look like a quiet month.  Stopping cancels the group; the HTTP
server's graceful shutdown runs shielded under a deadline, so the process exits within
SHUTDOWN_TIMEOUT_SECONDS (default 10 s) with exit code 0.

A database that is down at start is retried forever with backoff (/readyz says
503 meanwhile): in an orchestrator the database often comes up after us.
"""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio
import asyncpg
import structlog
from anyio.abc import TaskStatus
from starlette.applications import Starlette

from listener.clock import Clock, utc_now
from listener.config import Settings
from listener.connection import (
    Backoff,
    DoorbellBuffer,
    ListenConnection,
    ProbeFailed,
    ProbeResult,
)
from listener.database import DEFAULT_CONNECT_TIMEOUT_SECONDS
from listener.http_app import create_app, run_http
from listener.ledger import Ledger
from listener.metrics import Metrics
from listener.notices import Notifier
from listener.processor import Fail, Processor
from listener.schedule import Scheduler, run_schedule
from listener.supervisor import Startable, Supervisor, describe_error, started_at_once
from listener.watchdog import Watchdog

log = structlog.get_logger(__name__)

# While reconnecting, log the 1st attempt, every Nth, and whenever the error changes.
RECONNECT_LOG_EVERY = 10
# Expected ways for a session to end: the database or the network went away.
SESSION_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    # e.g. "another operation is in progress" on a connection the server just killed
    asyncpg.InternalClientError,
    ProbeFailed,
)


@dataclass
class ServiceState:
    """What /readyz reports; other tasks read it, only the service writes it."""

    connected: bool = False
    # A probe's echo came back on this connection: notifications are delivered.
    listening: bool = False
    caught_up: bool = False
    # Why notifications are not delivered although the connection works (one line),
    # until a probe's echo comes back; kept across reconnects so it is logged once.
    undelivered: str | None = None
    stopping: bool = False
    backend_pid: int | None = None
    http_port: int | None = None
    last_error: str | None = None
    # Supervised tasks that are not running, and why (written by the Supervisor).
    tasks_down: dict[str, str] = field(default_factory=dict)

    def not_ready(self) -> list[str]:
        """Reasons the service is not ready; empty when it is."""
        reasons = []
        if self.stopping:
            reasons.append("shutting down")
        if not self.connected:
            reasons.append(f"not connected to the database ({self.last_error or 'starting'})")
        elif not self.listening:
            reasons.append(self.undelivered or "LISTEN not confirmed yet (first probe pending)")
        elif not self.caught_up:
            reasons.append("catching up with the ledger")
        # A dead sibling makes the whole service unready: its gauges would be stale.
        reasons.extend(
            f"task {name} is not running ({why})" for name, why in sorted(self.tasks_down.items())
        )
        return reasons


class Service:
    """The listener service; `run()` returns the process exit code."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics | None = None,
        *,
        clock: Clock = utc_now,
        handle_signals: bool = True,
    ) -> None:
        self.settings = settings
        self.metrics = metrics if metrics is not None else Metrics.fresh()
        self.clock = clock
        self.handle_signals = handle_signals
        self.state = ServiceState()
        self.ledger = Ledger(self.metrics, settings.listener_name)
        self.buffer = DoorbellBuffer(self.metrics)
        self.listen: ListenConnection | None = None
        # Restarts share the listener's reconnect cap (RECONNECT_MAX_SECONDS).
        self.supervisor = Supervisor(
            self.metrics, self.state.tasks_down, cap=settings.reconnect_max_seconds
        )
        # Kept across restarts of their tasks: the alert state, the served slot.
        self.watchdog = Watchdog(settings, self.metrics, clock=clock)
        self.scheduler = (
            Scheduler(settings, self.metrics, clock=clock)
            if settings.schedule is not None
            else None
        )
        # Rollover notices: their own task, so a slow destination never delays counting.
        self.notifier = (
            Notifier(settings, self.metrics, clock=clock) if settings.notice_urls else None
        )
        self._group_scope: anyio.CancelScope | None = None
        self._sessions = 0

    async def run(self, *, task_status: TaskStatus[Service] = anyio.TASK_STATUS_IGNORED) -> int:
        """Run until stopped; reports itself to start() once the HTTP port is bound."""
        app = create_app(self.settings, self.metrics, self.state.not_ready)
        supervise = self.supervisor.run
        try:
            async with anyio.create_task_group() as group:
                self._group_scope = group.cancel_scope
                if self.handle_signals:
                    group.start_soon(self._signals)
                # A failure of the first bind (a busy port) is fatal; later ones restart.
                self.state.http_port = await group.start(supervise, "http", self._http(app))
                group.start_soon(supervise, "listener", started_at_once(self._listen_forever))
                group.start_soon(
                    supervise, "watchdog", started_at_once(self.watchdog.check_forever)
                )
                if self.watchdog.pusher is not None:
                    pusher = started_at_once(self.watchdog.pusher.run)
                    group.start_soon(supervise, "alertmanager", pusher)
                group.start_soon(supervise, "schedule", started_at_once(self._schedule))
                if self.notifier is not None:
                    notices = started_at_once(self.notifier.run)
                    group.start_soon(supervise, "notices", notices)
                task_status.started(self)
        except Exception:
            log.exception("listener_crashed")
            return 1
        finally:
            self.buffer.close()
        log.info("listener_stopped")
        return 0

    def stop(self) -> None:
        """Begin an orderly shutdown, bounded by shutdown_timeout_seconds."""
        if self.state.stopping:
            return
        self.state.stopping = True
        if self._group_scope is not None:
            self._group_scope.cancel()

    async def _signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("shutdown_requested", signal=signal.Signals(signum).name)
                self.stop()
                return

    def _http(self, app: Starlette) -> Startable:
        """One start of the HTTP server, reporting its port; a restart reuses that port."""

        async def serve(*, task_status: TaskStatus[int]) -> None:
            settings = self.settings
            if self.state.http_port is not None:
                # Prometheus and the orchestrator know the first port: come back there.
                settings = dataclasses.replace(settings, http_port=self.state.http_port)
            # A fresh trigger per start: run_http sets it when it is cancelled.
            await run_http(app, settings, anyio.Event(), task_status=task_status)

        return serve

    async def _schedule(self) -> None:
        if self.scheduler is None:
            await run_schedule(self.settings, self.metrics, clock=self.clock)  # off: waits
        else:
            await self.scheduler.run()

    async def _listen_forever(self) -> None:
        backoff = Backoff(cap=self.settings.reconnect_max_seconds)
        reported: str | None = None
        while True:
            connected, kind, detail = await self._session()
            if connected:
                backoff.reset()
                reported = None
            self.state.last_error = detail
            delay = backoff.next_delay()
            attempt = backoff.attempt
            if attempt == 1 or attempt % RECONNECT_LOG_EVERY == 0 or kind != reported:
                log.warning(
                    "listener_reconnecting",
                    attempt=attempt,
                    delay_seconds=round(delay, 3),
                    error=kind,
                    reason=detail,
                )
                reported = kind
            await anyio.sleep(delay)

    async def _session(self) -> tuple[bool, str, str]:
        """One connection's life: returns (was connected, error kind, reason) when it ends."""
        try:
            listen = await ListenConnection.open(
                self.settings, self.buffer.offer, connect_seconds=DEFAULT_CONNECT_TIMEOUT_SECONDS
            )
        except Exception as exc:
            _log_unexpected(exc)
            return False, type(exc).__name__, describe_error(exc)
        failure: list[tuple[str, str]] = []
        connected = False
        try:
            async with listen.lock:
                cursor = await self.ledger.open(listen.conn)
            connected = True
            self._connected(listen, cursor)
            async with anyio.create_task_group() as group:

                def fail(kind: str, reason: str) -> None:
                    if not failure:
                        failure.append((kind, reason))
                    group.cancel_scope.cancel()

                processor = Processor(
                    self.settings, self.ledger, self.buffer, self.metrics, self.state
                )
                group.start_soon(_supervised, self._watch_lost, listen, fail)
                group.start_soon(_supervised, self._probe_loop, listen, fail)
                group.start_soon(_supervised, processor.run, listen, fail)
        except Exception as exc:
            _log_unexpected(exc)
            failure.append((type(exc).__name__, describe_error(exc)))
        finally:
            kind, reason = failure[0] if failure else ("Shutdown", "shutting down")
            await self._disconnected(listen, connected, reason)
        return connected, kind, reason

    def _connected(self, listen: ListenConnection, cursor: int) -> None:
        self.listen = listen
        self.state.connected = True
        # Listening is what the first probe (sent at once) proves, not what LISTEN says.
        self.state.listening = self.state.caught_up = False
        self.state.backend_pid = listen.backend_pid
        self.state.last_error = None
        self.metrics.listener_connected.set(1)
        if self._sessions:
            self.metrics.reconnects.inc()
        self._sessions += 1
        # LISTEN is registered; now read everything the ledger got meanwhile.
        self.buffer.request_catch_up()
        log.info(
            "listener_connected",
            backend_pid=listen.backend_pid,
            consumer=self.ledger.consumer,
            cursor=cursor,
            keepalive=listen.keepalive,
            reconnect=self._sessions > 1,
        )

    async def _disconnected(self, listen: ListenConnection, connected: bool, reason: str) -> None:
        self.listen = None
        self.state.connected = self.state.listening = self.state.caught_up = False
        self.state.backend_pid = None
        self.metrics.listener_connected.set(0)
        if self.state.stopping:
            await listen.close(within=min(2.0, self.settings.shutdown_timeout_seconds / 2))
        else:
            listen.terminate()
        if connected:
            level = log.info if self.state.stopping else log.warning
            level("listener_disconnected", reason=reason)

    async def _watch_lost(self, listen: ListenConnection, fail: Fail) -> None:
        await listen.lost.wait()
        fail("ConnectionLost", "the connection was closed")

    async def _probe_loop(self, listen: ListenConnection, fail: Fail) -> None:
        """Probe at once (readiness waits for it), then every probe interval."""
        while True:
            try:
                result = await listen.probe(self.settings.probe_timeout_seconds)
            except ProbeFailed:
                self.metrics.listener_connected.set(0)
                raise
            if result.delivered and result.round_trip_seconds > self.settings.probe_timeout_seconds:
                # Waited behind other traffic (a NOTIFY flood, a backlog): alive, but slow.
                log.warning(
                    "probe_delayed",
                    round_trip_seconds=round(result.round_trip_seconds, 3),
                    timeout_seconds=self.settings.probe_timeout_seconds,
                    delivered=result.delivered,
                    notifications_received=listen.received,
                )
            if result.delivered:
                self._delivered(result)
            else:
                self._undelivered(listen, result)
            await anyio.sleep(self.settings.probe_interval_seconds)

    def _delivered(self, result: ProbeResult) -> None:
        self.state.listening = True
        self.metrics.listener_connected.set(1)
        self.metrics.listener_pooled.set(0)
        if self.state.undelivered is not None:
            self.state.undelivered = None
            log.info("listener_receiving_notifications")
        log.debug("probe_echoed", round_trip_seconds=round(result.round_trip_seconds, 6))

    def _undelivered(self, listen: ListenConnection, result: ProbeResult) -> None:
        """Loud, not a reconnect loop and not a quiet fall-back to the periodic read.

        A reconnect reaches the same pooler, so the session stays up: the periodic
        catch-up keeps the counts right (late), /readyz says 503 with the reason, the
        listener_connected gauge says 0 (the Disconnected alert fires) and
        token_reset_listener_pooled_connection says why.  Logged once, until cleared.
        """
        self.state.listening = False
        self.metrics.listener_connected.set(0)
        self.metrics.listener_pooled.set(1)
        if self.state.undelivered is None:
            self.state.undelivered = listen.undelivered_reason(result)
            log.error(
                "listener_not_receiving_notifications",
                reason=self.state.undelivered,
                listen_backend_pid=listen.listen_pid,
                query_backend_pid=result.query_backend_pid,
                waited_seconds=round(result.round_trip_seconds, 3),
            )


async def _supervised(
    task: Callable[[ListenConnection, Fail], Awaitable[None]],
    listen: ListenConnection,
    fail: Fail,
) -> None:
    """Run one session task; any error ends the session, which reconnects."""
    try:
        await task(listen, fail)
    except Exception as exc:
        _log_unexpected(exc)
        fail(type(exc).__name__, describe_error(exc))


def _log_unexpected(exc: Exception) -> None:
    """Connection trouble is routine (the reconnect logs it); anything else is a bug."""
    if not isinstance(exc, SESSION_ERRORS):
        log.error("listener_task_failed", exc_info=exc)
