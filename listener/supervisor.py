"""Supervision of the service's long-running tasks: a task that dies is restarted, and says so.

A sibling task that failed used to disappear for the life of the process while /readyz
stayed 200 and its gauges froze at their last values: a dead watchdog looked exactly
like a quiet month.  Now every long-running task (listener, watchdog, schedule,
Alertmanager push, HTTP) runs under `Supervisor.run`:

* a failure (or an unexpected return) is logged with its stack, the task's
  `token_reset_task_up{task}` gauge drops to 0 and /readyz names it;
* the task is started again after a capped exponential backoff with full jitter
  (connection.Backoff, the listener's reconnect policy), so a task that fails on every
  start does not spin, and a fleet of replicas does not restart in step;
* the backoff starts over once a start has lived STABLE_SECONDS;
* cancellation (shutdown) is never caught: it stops the task and the supervision at
  once, wherever they are, so the exit stays within SHUTDOWN_TIMEOUT_SECONDS.

The task objects (the watchdog's alert state, the schedule's served slot, the pusher's
pending alert) are kept by the caller across restarts; only the running loop is new.

`fail(task)` / `recover(task)` are the test hook: while a task is failed, each of its
starts raises InjectedFault inside the task's own task group, so it is torn down
exactly as when its own code raises.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final, Protocol

import anyio
import structlog
from anyio.abc import TaskStatus

from listener.connection import Backoff
from listener.metrics import Metrics, TaskName

log = structlog.get_logger(__name__)

# A start that lived this long was healthy: the next failure backs off from the start.
STABLE_SECONDS: Final = 60.0


class Startable(Protocol):
    """A task body in anyio's start() convention: it calls task_status.started() when up."""

    def __call__(self, *, task_status: TaskStatus[Any]) -> Awaitable[None]:
        """Run until cancelled; report readiness through task_status."""
        ...


class InjectedFault(RuntimeError):
    """Raised inside a supervised task by the test hook `Supervisor.fail`."""


def started_at_once(body: Callable[[], Awaitable[None]]) -> Startable:
    """Adapt a plain long-running coroutine function: it counts as up as soon as it starts."""

    async def startable(*, task_status: TaskStatus[Any]) -> None:
        task_status.started()
        await body()

    return startable


class Supervisor:
    """Runs named tasks, restarts them when they die, exports and reports their state."""

    def __init__(
        self,
        metrics: Metrics,
        down: MutableMapping[str, str],
        *,
        cap: float,
        stable_seconds: float = STABLE_SECONDS,
    ) -> None:
        self.metrics = metrics
        # Shared with ServiceState: name -> why it is not running (what /readyz says).
        self.down = down
        self.cap = cap
        self.stable_seconds = stable_seconds
        self.restarts: dict[str, int] = {}
        self._faults: dict[str, anyio.Event] = {}

    def register(self, name: TaskName) -> None:
        """Export the task's gauge (0) and report it as starting, before its first start."""
        self.metrics.task_up.labels(task=name).set(0)
        self.down[name] = "starting"
        self.restarts.setdefault(name, 0)

    async def run(
        self,
        name: TaskName,
        body: Startable,
        *,
        task_status: TaskStatus[Any] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run `body` until cancelled, restarting it whenever it fails or returns.

        The first start is reported to `task_status` with the body's own start value
        (the HTTP port); a failure before that first start is not restarted but raised,
        so a configuration error (a busy port) stops the service instead of looping.
        """
        self.register(name)
        backoff = Backoff(cap=self.cap)
        first = True
        while True:
            began = anyio.current_time()
            try:
                await self._once(name, body, task_status if first else None)
            except Exception as exc:
                if first and name in self.down:  # never came up: fatal, not restarted
                    raise
                reason = describe_error(_innermost(exc))
                log.exception("task_failed", task=name, error=reason)
            else:
                reason = "returned unexpectedly"
                log.error("task_exited", task=name)
            first = False
            self.metrics.task_up.labels(task=name).set(0)
            self.down[name] = f"restarting after {reason}"
            if anyio.current_time() - began >= self.stable_seconds:
                backoff.reset()
            delay = backoff.next_delay()
            log.warning(
                "task_restarting",
                task=name,
                attempt=backoff.attempt,
                delay_seconds=round(delay, 3),
                reason=reason,
            )
            # Backoff between starts; cancellation (shutdown) ends it at once.
            await anyio.sleep(delay)
            self.restarts[name] += 1

    async def _once(
        self, name: TaskName, body: Startable, task_status: TaskStatus[Any] | None
    ) -> None:
        """One start of the task, in its own task group; returns or raises when it ends."""
        fault = self._faults.setdefault(name, anyio.Event())
        if fault.is_set():
            raise InjectedFault(f"injected failure of task {name}")
        async with anyio.create_task_group() as group:

            async def watched(*, task_status: TaskStatus[Any]) -> None:
                await body(task_status=task_status)
                group.cancel_scope.cancel()  # it returned: end this start, tripwire too

            value = await group.start(watched)
            self.metrics.task_up.labels(task=name).set(1)
            self.down.pop(name, None)
            if self.restarts[name]:
                log.info("task_restarted", task=name, restarts=self.restarts[name])
            if task_status is not None:
                task_status.started(value)
            group.start_soon(_tripwire, name, fault)

    def fail(self, name: TaskName) -> None:
        """Test hook: make the task fail now and on every start until `recover(name)`."""
        self._faults.setdefault(name, anyio.Event()).set()

    def recover(self, name: TaskName) -> None:
        """Test hook: let the task start normally again (at its next restart)."""
        self._faults[name] = anyio.Event()


async def _tripwire(name: str, fault: anyio.Event) -> None:
    """Raise inside the task's group once the test hook fails it."""
    await fault.wait()
    raise InjectedFault(f"injected failure of task {name}")


def describe_error(exc: BaseException) -> str:
    """One line for /readyz and the log: the error's type and its message's first line."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _innermost(exc: BaseException) -> BaseException:
    """The one error inside a (nested) group of one, or the error itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
