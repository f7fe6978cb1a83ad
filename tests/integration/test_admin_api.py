"""The cron endpoint in-process (Starlette + httpx ASGI transport) against a real database."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import asyncpg
import httpx
import pytest
from starlette.applications import Starlette
from structlog.testing import capture_logs

from listener.admin_api import RESET_PATH, admin_routes
from listener.config import Settings
from listener.metrics import Metrics
from tests.support.bulk import (
    blocked_run,
    kill_bulk_sessions,
    running_run_id,
    runs,
    unreachable_url,
)
from tests.support.env import settings_for
from tests.support.users import add_stale_users, carrying_usage

pytestmark = pytest.mark.anyio

SECRET = "cron-secret-for-tests-7f3a9c21"


@asynccontextmanager
async def client_for(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A client talking to a tiny app that mounts only the admin routes."""
    app = Starlette(routes=admin_routes(settings, Metrics.fresh()))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


@asynccontextmanager
async def counting_server() -> AsyncIterator[tuple[str, list[str]]]:
    """A TCP port that records every connection and hangs up: proves whether the DB was tried."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    # anyio's typed-attribute lookup, not Django's QuerySet.extra.
    port = listener.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610
    accepted: list[str] = []

    async def hang_up(stream: anyio.abc.SocketStream) -> None:
        accepted.append("connection")
        await stream.aclose()

    async with listener, anyio.create_task_group() as group:
        group.start_soon(listener.serve, hang_up)
        yield f"postgresql://postgres@127.0.0.1:{port}/nothing", accepted
        group.cancel_scope.cancel()


def bearer(value: str = SECRET) -> dict[str, str]:
    """The header the seed's curl sends."""
    return {"Authorization": f"Bearer {value}"}


async def test_seed_curl_post_with_bearer_resets_everyone(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """`curl -X POST .../api/admin/reset-monthly-tokens -H "Authorization: Bearer $CRON_SECRET"`."""
    await add_stale_users(conn, 12)
    async with client_for(settings_for(database_url, cron_secret=SECRET)) as client:
        response = await client.post(RESET_PATH, headers=bearer())
    assert response.status_code == 200
    body = response.json()
    assert body["success"] is True
    assert body["skipped"] is False
    assert body["reset_count"] == 12
    assert set(body) >= {"reset_date", "run_id", "duration_ms", "batches", "period"}
    assert response.headers["cache-control"] == "no-store"
    assert await carrying_usage(conn) == 0
    (row,) = await runs(conn)
    assert (str(row["run_id"]), row["source"], row["outcome"]) == (
        body["run_id"],
        "endpoint",
        "success",
    )


async def test_get_works_too_for_vercel_cron(conn: asyncpg.Connection, database_url: str) -> None:
    """Vercel Cron calls with GET; same answer as POST, and a rerun resets 0."""
    await add_stale_users(conn, 3)
    async with client_for(settings_for(database_url, cron_secret=SECRET)) as client:
        first = await client.get(RESET_PATH, headers=bearer())
        second = await client.get(RESET_PATH, headers=bearer())
    assert (first.status_code, first.json()["reset_count"]) == (200, 3)
    assert (second.status_code, second.json()["reset_count"]) == (200, 0)


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no-header"),
        pytest.param(bearer("wrong-secret-but-long-enough"), id="wrong-secret"),
        pytest.param(bearer(SECRET[:-1]), id="prefix-of-secret"),
        pytest.param(bearer(SECRET + "x"), id="secret-plus-one"),
        pytest.param({"Authorization": "Bearer "}, id="bearer-empty"),
        pytest.param({"Authorization": "Bearer"}, id="bearer-no-space"),
        pytest.param({"Authorization": SECRET}, id="no-scheme"),
        pytest.param({"Authorization": f"Basic {SECRET}"}, id="basic-scheme"),
        pytest.param({"Authorization": f"Bearer {SECRET} extra"}, id="two-tokens"),
        pytest.param({"Authorization": f"Bearer{SECRET}"}, id="no-separator"),
    ],
)
async def test_unauthorized_calls_get_401_and_touch_no_database(headers: dict[str, str]) -> None:
    """Missing, malformed or wrong credentials: 401 JSON, a Bearer challenge, zero connections."""
    async with counting_server() as (url, accepted):
        async with client_for(settings_for(url, cron_secret=SECRET)) as client:
            with anyio.fail_after(2):
                post = await client.post(RESET_PATH, headers=headers)
                get = await client.get(RESET_PATH, headers=headers)
        for response in (post, get):
            assert response.status_code == 401
            assert response.json() == {"success": False, "error": "unauthorized"}
            assert response.headers["www-authenticate"].startswith("Bearer")
        assert accepted == []


async def test_two_authorization_headers_are_refused() -> None:
    """Ambiguous credentials (one right, one wrong) are malformed, not "first wins"."""
    async with counting_server() as (url, accepted):
        async with client_for(settings_for(url, cron_secret=SECRET)) as client:
            response = await client.post(
                RESET_PATH,
                headers=[("Authorization", f"Bearer {SECRET}"), ("Authorization", "Bearer x")],
            )
        assert response.status_code == 401
        assert accepted == []


async def test_the_probe_does_see_database_attempts() -> None:
    """Control for the test above: with the right secret the runner does connect (then 500)."""
    async with counting_server() as (url, accepted):
        async with client_for(settings_for(url, cron_secret=SECRET)) as client:
            with anyio.fail_after(15):
                response = await client.post(RESET_PATH, headers=bearer())
        assert response.status_code == 500
        assert accepted


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param(f"bearer {SECRET}", id="lowercase-scheme"),
        pytest.param(f"BEARER {SECRET}", id="uppercase-scheme"),
        pytest.param(f"Bearer   {SECRET}", id="several-spaces"),
        pytest.param(f"  Bearer {SECRET}  ", id="surrounding-blanks"),
        pytest.param(f"Bearer\t{SECRET}", id="tab"),
    ],
)
async def test_scheme_is_case_insensitive_and_blanks_are_tolerated(
    database_url: str, authorization: str
) -> None:
    """RFC 7235: the scheme is case-insensitive; blanks around and between parts are accepted."""
    async with client_for(settings_for(database_url, cron_secret=SECRET)) as client:
        response = await client.post(RESET_PATH, headers={"Authorization": authorization})
    assert response.status_code == 200
    assert response.json()["success"] is True


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param(Settings(), id="unset"),
        pytest.param(Settings(cron_secret=""), id="empty"),
        pytest.param(Settings.from_env({"CRON_SECRET": "   "}, stdout_is_tty=False), id="blank"),
    ],
)
async def test_unset_secret_keeps_the_endpoint_closed(settings: Settings) -> None:
    """No CRON_SECRET: 503 with a clear error for everyone, never open (even `Bearer `)."""
    async with counting_server() as (url, accepted):
        closed = settings.with_overrides(database_url=url)
        async with client_for(closed) as client:
            for headers in ({}, {"Authorization": "Bearer "}, bearer()):
                response = await client.post(RESET_PATH, headers=headers)
                assert response.status_code == 503
                assert response.json() == {
                    "success": False,
                    "error": "endpoint disabled: CRON_SECRET not configured",
                }
        assert accepted == []


async def test_too_short_secret_keeps_the_endpoint_closed() -> None:
    """A guessable secret that slipped past start-up validation still opens nothing."""
    async with client_for(Settings(database_url=unreachable_url(), cron_secret="short")) as client:
        response = await client.post(RESET_PATH, headers=bearer("short"))
    assert response.status_code == 503
    assert "16 characters" in response.json()["error"]


async def test_head_never_starts_a_reset(conn: asyncpg.Connection, database_url: str) -> None:
    """Starlette adds HEAD to GET routes; a HEAD probe with the secret must not reset anyone."""
    await add_stale_users(conn, 2)
    async with client_for(settings_for(database_url, cron_secret=SECRET)) as client:
        response = await client.head(RESET_PATH, headers=bearer())
    assert response.status_code == 405
    assert await carrying_usage(conn) == 2
    assert await runs(conn) == []


async def test_two_concurrent_calls_run_one_bulk_reset(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """The second call answers promptly: 200, skipped, naming the running run."""
    stale = await add_stale_users(conn, 40)
    answers: list[httpx.Response] = []
    async with client_for(settings_for(database_url, cron_secret=SECRET)) as client:

        async def first_call() -> None:
            answers.append(await client.post(RESET_PATH, headers=bearer()))

        async with blocked_run(
            conn, database_url, stale[0], first_call, what="first call to block"
        ):
            with anyio.fail_after(5):
                second = await client.get(RESET_PATH, headers=bearer())
            running = await running_run_id(conn)
    (first,) = answers
    assert second.status_code == 200
    assert second.json()["skipped"] is True
    assert second.json()["reason"] == "already_running"
    assert second.json()["running_run_id"] == str(running)
    assert second.json()["reset_count"] == 0
    assert first.status_code == 200
    assert first.json()["run_id"] == str(running)
    assert first.json()["reset_count"] == 40
    assert [r["outcome"] for r in await runs(conn)] == ["success", "skipped"]


async def test_database_down_gives_500_json_without_stack() -> None:
    """Nothing listens at DATABASE_URL: 500, JSON error, no traceback, no secret."""
    async with client_for(settings_for(unreachable_url(), cron_secret=SECRET)) as client:
        with anyio.fail_after(15):
            response = await client.post(RESET_PATH, headers=bearer())
    assert response.status_code == 500
    body = response.json()
    assert body["success"] is False
    assert "database unreachable" in body["error"]
    assert "Traceback" not in response.text
    assert SECRET not in response.text


async def test_database_lost_during_a_call_gives_500_and_keeps_committed_work(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """The server kills the run's session mid-call: 500 JSON, batches kept, a rerun finishes."""
    stale = await add_stale_users(conn, 10)
    answers: list[httpx.Response] = []
    async with client_for(settings_for(database_url, cron_secret=SECRET)) as client:

        async def call() -> None:
            answers.append(await client.post(RESET_PATH, headers=bearer()))

        async with blocked_run(conn, database_url, stale[0], call, what="the call to block"):
            await kill_bulk_sessions(conn)
        (failed,) = answers
        assert failed.status_code == 500
        assert failed.json()["success"] is False
        assert failed.json()["reset_count"] == 9
        assert "Traceback" not in failed.text
        rerun = await client.post(RESET_PATH, headers=bearer())
    assert rerun.json()["reset_count"] == 1
    assert await carrying_usage(conn) == 0


async def test_secret_never_appears_in_logs_or_bodies(
    conn: asyncpg.Connection, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Wrong, right and failing calls: the secret is in no log event, no output, no body."""
    await add_stale_users(conn, 2)
    bodies: list[str] = []
    with capture_logs() as logs:
        async with client_for(settings_for(database_url, cron_secret=SECRET)) as client:
            for headers in (bearer("wrong-secret-but-long-enough"), bearer(SECRET[:-1]), bearer()):
                bodies.append((await client.post(RESET_PATH, headers=headers)).text)
        async with client_for(settings_for(unreachable_url(), cron_secret=SECRET)) as client:
            bodies.append((await client.post(RESET_PATH, headers=bearer())).text)
    events = [entry["event"] for entry in logs]
    # Refusals are logged once per interval: the second wrong call is only counted.
    assert events.count("admin_reset_unauthorized") == 1
    assert events.count("bulk_reset_finished") == 2
    failure = next(e for e in logs if e.get("outcome") == "failure")
    assert failure["exc_info"] is True  # the stack goes to the log, not the client
    captured = capsys.readouterr()
    for text in (json.dumps(logs, default=repr), captured.out, captured.err, *bodies):
        assert SECRET not in text
        assert SECRET[:-1] not in text
