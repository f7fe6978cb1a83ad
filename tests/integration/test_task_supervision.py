"""Every long-running task of the service is supervised: a dead task is visible and comes back.

The failure mode these guard against is "deaf looks healthy": a watchdog (or schedule,
or Alertmanager push) task that died once used to stay dead for the life of the
process while /readyz said 200 and token_reset_missed_month froze at its last value.

The crash itself is injected (`Supervisor.fail(task)`: every start of that task fails
until `recover(task)`, as a bug on every iteration would); everything else is real: the
service runs with its real HTTP port, database and Alertmanager receiver, and the test
reads /readyz and /metrics over HTTP as an orchestrator and Prometheus would.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import asyncpg
import httpx
import pytest

from listener.metrics import Metrics
from listener.service import Service
from tests.support.env import listener_settings
from tests.support.metrics import Scrape, sample
from tests.support.recording_server import RecordingServer
from tests.support.service import ready, ready_listener, running, wait_counts_match_ledger
from tests.support.users import add_stale_users, reset_by_trigger
from tests.support.waiting import wait_until

pytestmark = pytest.mark.anyio

TASKS = ("listener", "watchdog", "schedule", "alertmanager", "http")
# Seen dead, then back: generous for a 2-core machine shared with other test runs.
DEADLINE_SECONDS = 20.0


def task_up(text: str) -> dict[str, float]:
    """token_reset_task_up per task, from a /metrics scrape."""
    return Scrape.parse(text).by_label("token_reset_task_up", "task")


def gauge(metrics: Metrics, task: str) -> float | None:
    """token_reset_task_up{task} from the in-process registry."""
    return sample(metrics, "token_reset_task_up", task=task)


@pytest.fixture
def alertmanager() -> AsyncIterator[RecordingServer]:
    """A real HTTP receiver, so the service runs its Alertmanager push task."""
    with RecordingServer() as server:
        yield server


async def healthy(client: httpx.AsyncClient, task: str) -> bool:
    """/readyz 200 and the task's gauge 1, both over HTTP (refused: not yet, while restarting)."""
    try:
        readyz = await client.get("/readyz")
        scraped = task_up((await client.get("/metrics")).text)
    except httpx.TransportError:
        return False
    return readyz.status_code == 200 and scraped.get(task) == 1


async def reported_dead(client: httpx.AsyncClient, task: str) -> bool:
    """/readyz 503 naming the task, and the task's gauge 0, both over HTTP."""
    readyz = await client.get("/readyz")
    if readyz.status_code != 503:
        return False
    named = any(f"task {task} " in reason for reason in readyz.json()["reasons"])
    return named and task_up((await client.get("/metrics")).text).get(task) == 0


@pytest.mark.parametrize("task", TASKS)
async def test_a_failing_task_is_reported_and_restarted(
    task: str, database_url: str, alertmanager: RecordingServer
) -> None:
    """The task fails: /readyz names it, its gauge drops to 0; it comes back to 1 and 200."""
    settings = listener_settings(
        database_url,
        watchdog_interval_seconds=0.1,
        alertmanager_url=alertmanager.url,
        reset_schedule="00:05",
    )
    async with running(settings) as service:
        await ready(service)
        base = f"http://127.0.0.1:{service.state.http_port}"
        async with httpx.AsyncClient(base_url=base) as client:
            await wait_until(
                lambda: healthy(client, task), deadline=DEADLINE_SECONDS, what="ready, task up"
            )
            service.supervisor.fail(task)
            if task == "http":
                # Nothing answers HTTP while the server is down: ask the process itself.
                def down() -> bool:
                    named = any("task http " in r for r in service.state.not_ready())
                    return named and gauge(service.metrics, "http") == 0

                await wait_until(down, deadline=DEADLINE_SECONDS, what="http reported down")
            else:
                await wait_until(
                    lambda: reported_dead(client, task),
                    deadline=DEADLINE_SECONDS,
                    what=f"/readyz and the gauge to report {task} dead",
                )
            service.supervisor.recover(task)
            await wait_until(
                lambda: healthy(client, task),
                deadline=DEADLINE_SECONDS,
                what=f"{task} back: gauge 1 and /readyz 200",
            )


async def test_a_restarted_watchdog_keeps_moving_its_gauges(
    database_url: str, conn: asyncpg.Connection
) -> None:
    """After a crash the watchdog reads the database again: its gauges do not freeze."""
    metrics = Metrics.fresh()
    async with running(
        listener_settings(database_url, watchdog_interval_seconds=0.1), metrics
    ) as svc:
        await ready(svc)
        svc.supervisor.fail("watchdog")
        await wait_until(lambda: gauge(metrics, "watchdog") == 0, what="watchdog down")
        await add_stale_users(conn, 4)
        svc.supervisor.recover("watchdog")
        await wait_until(
            lambda: sample(metrics, "token_reset_stale_users") == 4,
            deadline=DEADLINE_SECONDS,
            what="the restarted watchdog to export the 4 new stale users",
        )


async def test_a_restarted_listener_counts_what_happened_while_it_was_down(
    database_url: str, conn: asyncpg.Connection
) -> None:
    """The listener task dies and restarts: resets written meanwhile are counted, once."""
    users = await add_stale_users(conn, 6)
    async with ready_listener(database_url) as service:
        service.supervisor.fail("listener")
        await wait_until(lambda: gauge(service.metrics, "listener") == 0, what="listener down")
        await reset_by_trigger(conn, users)
        service.supervisor.recover("listener")
        assert (await wait_counts_match_ledger(service, conn))["trigger"] == 6


async def test_shutdown_is_prompt_while_every_task_is_failing(
    database_url: str, alertmanager: RecordingServer
) -> None:
    """Tasks in restart backoff do not delay the exit beyond shutdown_timeout_seconds."""
    settings = listener_settings(
        database_url, alertmanager_url=alertmanager.url, shutdown_timeout_seconds=5.0
    )
    service = Service(settings, Metrics.fresh(), handle_signals=False)
    codes: list[int] = []

    async def run() -> None:
        codes.append(await service.run())

    async with anyio.create_task_group() as group:
        group.start_soon(run)
        await wait_until(lambda: not service.state.not_ready(), what="readiness")
        for task in TASKS:
            service.supervisor.fail(task)
        await wait_until(
            lambda: all(gauge(service.metrics, t) == 0 for t in TASKS), what="all tasks down"
        )
        with anyio.fail_after(settings.shutdown_timeout_seconds):
            service.stop()
            await wait_until(lambda: bool(codes), what="run() to return")
    assert codes == [0]
