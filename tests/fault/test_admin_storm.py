"""The cron endpoint of a real `listen` process under 200 concurrent wrong-secret requests."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import asyncpg
import httpx
import pytest

from listener.admin_api import RESET_PATH
from tests.fault.proxy import tcp_proxy
from tests.support.bulk import bulk_waiting_on_lock, row_lock, runs
from tests.support.env import listener_env
from tests.support.processes import running_listener
from tests.support.users import add_stale_users
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.fault]

SECRET = "fault-storm-cron-secret-5d1c8e7a"
WRONG_REQUESTS = 200
RIGHT_DURING_STORM = 2
USERS = 2_000
# A run's lock connection: a call that finds the lock taken opens only this one.
BULK_LOCK = "token-reset:bulk-lock"
# A reconnecting listener opens these two (its LISTEN session and its probe's sender).
LISTENER = ("token-reset:listen", "token-reset:probe")
# Missing, malformed and wrong credentials, cycled over the storm.
WRONG_HEADERS: list[list[tuple[str, str]]] = [
    [],
    [("Authorization", "Bearer " + "x" * len(SECRET))],
    [("Authorization", f"Bearer {SECRET[:-1]}")],
    [("Authorization", f"Bearer {SECRET}x")],
    [("Authorization", f"Bearer {SECRET.upper()}")],
    [("Authorization", f"Basic {SECRET}")],
    [("Authorization", SECRET)],
    [("Authorization", "Bearer")],
    [("Authorization", f"Bearer {SECRET} {SECRET}")],
    [("Authorization", f"Bearer {SECRET}"), ("Authorization", "Bearer wrong")],
]
RIGHT = [("Authorization", f"Bearer {SECRET}")]


async def call(
    client: httpx.AsyncClient, url: str, headers: list[tuple[str, str]], method: str
) -> httpx.Response:
    """One request to the endpoint, by the method cron services use."""
    return await client.request(method, url, headers=headers)


async def first_run(client: httpx.AsyncClient, url: str, into: list[httpx.Response]) -> None:
    """The call that gets the bulk lock."""
    into.append(await call(client, url, RIGHT, "POST"))


async def storm(
    client: httpx.AsyncClient, url: str
) -> tuple[list[httpx.Response], list[httpx.Response]]:
    """WRONG_REQUESTS wrong calls with RIGHT_DURING_STORM right ones among them, all at once."""
    wrong: list[httpx.Response] = []
    right: list[httpx.Response] = []

    async def send(number: int, headers: list[tuple[str, str]], into: list[httpx.Response]) -> None:
        into.append(await call(client, url, headers, "GET" if number % 2 else "POST"))

    async with anyio.create_task_group() as group:
        for number in range(WRONG_REQUESTS):
            group.start_soon(send, number, WRONG_HEADERS[number % len(WRONG_HEADERS)], wrong)
            if number % (WRONG_REQUESTS // RIGHT_DURING_STORM) == WRONG_REQUESTS // 4:
                group.start_soon(send, number, RIGHT, right)
    return wrong, right


def overlapping(rows: list[asyncpg.Record]) -> list[tuple[str, str]]:
    """Pairs of successful runs whose [started_at, finished_at] intervals overlap."""
    done = [row for row in rows if row["outcome"] == "success"]
    return [
        (str(a["run_id"]), str(b["run_id"]))
        for i, a in enumerate(done)
        for b in done[i + 1 :]
        if a["started_at"] < b["finished_at"] and b["started_at"] < a["finished_at"]
    ]


async def test_wrong_secrets_do_no_database_work_and_runs_never_overlap(
    database_url: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    """Unauthenticated calls never reach the database; the bulk lock admits one run."""
    users = await add_stale_users(conn, USERS)
    # Every connection the service opens goes through the proxy, which reads the
    # application_name of each: the runner's connections say token-reset:bulk.
    with tcp_proxy(database_url) as proxy:
        # A generous probe timeout: a reconnect under a loaded CI machine is not a finding here.
        env = listener_env(
            proxy.url_for(database_url),
            name="fault-storm",
            CRON_SECRET=SECRET,
            PROBE_TIMEOUT_SECONDS=10,
        )
        async with running_listener(env, tmp_path) as listener:
            await listener.wait_ready()
            url = listener.base_url + RESET_PATH
            limits = httpx.Limits(max_connections=WRONG_REQUESTS + 10)
            async with httpx.AsyncClient(limits=limits, timeout=30.0) as client:
                first: list[httpx.Response] = []
                # A writer holding one stale row keeps the first run in its final pass:
                # the storm then certainly meets a run in progress.  The lock is released
                # (inner context) before the group waits for the first run (outer).
                async with anyio.create_task_group() as group, row_lock(database_url, users[0]):
                    group.start_soon(first_run, client, url, first)
                    await wait_until(
                        lambda: bulk_waiting_on_lock(conn),
                        deadline=30,
                        what="a run in progress",
                    )
                    mark = len(proxy.connections)
                    started = time.monotonic()
                    wrong, right = await storm(client, url)
                    storm_seconds = time.monotonic() - started
                    opened_during_storm = proxy.application_names(mark)
                    assert first == []  # the first run was held the whole time
                # The writer let go: the first run finishes; a later call finds nothing to do.
                again = await call(client, url, RIGHT, "GET")
            scrape = await listener.scrape()
    assert len(wrong) == WRONG_REQUESTS
    assert {(r.status_code, r.json()["error"]) for r in wrong} == {(401, "unauthorized")}
    # No database work for the wrong ones: apart from the listener's own sessions
    # (a reconnect is possible on a loaded machine), the only connections opened during
    # the storm are the right calls' lock connections (each finds the lock taken).
    opened = [name for name in opened_during_storm if name not in LISTENER]
    assert opened == [BULK_LOCK] * RIGHT_DURING_STORM
    (done,) = first
    body = done.json()
    assert (done.status_code, body["skipped"], body["reset_count"]) == (200, False, USERS)
    for response in right:
        skipped = response.json()
        assert (response.status_code, skipped["skipped"], skipped["reason"]) == (
            200,
            True,
            "already_running",
        )
        assert skipped["running_run_id"] == body["run_id"]
    assert (again.status_code, again.json()["skipped"], again.json()["reset_count"]) == (
        200,
        False,
        0,
    )
    history = await runs(conn)
    assert sorted(row["outcome"] for row in history) == ["skipped", "skipped", "success", "success"]
    assert overlapping(history) == []
    assert [
        scrape.value("token_reset_bulk_runs_total", outcome=o)
        for o in ("success", "skipped", "failure")
    ] == [2, 2, 0]
    print(f"storm: {WRONG_REQUESTS + RIGHT_DURING_STORM} requests answered in {storm_seconds:.2f}s")
