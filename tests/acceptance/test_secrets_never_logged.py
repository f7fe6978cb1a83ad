"""No failure path prints a secret: the DSN's password, CRON_SECRET, Alertmanager's password.

Each test drives a real failure of a real process and greps *all* its output (stdout,
stderr, HTTP bodies) for every secret and every 8-character piece of one.  Before,
tracebacks carried frame locals: a failed endpoint run logged 39 characters of a
64-character CRON_SECRET, `token-reset reset` against an unreachable database logged
the DSN's password several times, a malformed DSN in `listen` on every reconnect.
(Malformed DSNs: tests/acceptance/test_bad_configuration.py; a silent server:
tests/acceptance/test_connect_timeout.py.  Both grep their output the same way.)
"""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import asyncpg
import httpx
import pytest

from listener.admin_api import RESET_PATH
from listener.embedded import free_port
from tests.support.bulk import bulk_waiting_on_lock, row_lock
from tests.support.cli import run_cli
from tests.support.database import unique_name
from tests.support.env import clean_env, listener_env
from tests.support.leaks import assert_no_secret, distinctive_secret
from tests.support.processes import running_listener
from tests.support.users import add_stale_users
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.acceptance, pytest.mark.anyio]

REPO = Path(__file__).resolve().parents[2]
PASSWORD = distinctive_secret()
CRON_SECRET = distinctive_secret()
ALERTMANAGER_PASSWORD = distinctive_secret()
SECRETS = (PASSWORD, CRON_SECRET, ALERTMANAGER_PASSWORD)
ONE_SHOT = ("reset", "migrate", "status")


def closed_port_url() -> str:
    """A DSN with our password, at a port nobody listens on."""
    return f"postgresql://app:{PASSWORD}@127.0.0.1:{free_port()}/app"


def alertmanager_url() -> str:
    """An Alertmanager with basic-auth credentials in its URL, not answering."""
    return f"http://alerts:{ALERTMANAGER_PASSWORD}@127.0.0.1:{free_port()}/"


def with_our_password(database_url: str) -> tuple[str, str]:
    """The test database's URL carrying PASSWORD (the test server trusts local logins).

    If the URL has a password of its own it is kept (and returned, to be checked too).
    """
    parts = urlsplit(database_url)
    if parts.password:
        return database_url, parts.password
    netloc = f"{parts.username or 'postgres'}:{PASSWORD}@{parts.hostname}:{parts.port or 5432}"
    return parts._replace(netloc=netloc).geturl(), PASSWORD


def one_shot(argv: list[str], database_url: str, **values: str) -> subprocess.CompletedProcess[str]:
    """A one-shot command with every secret configured; its whole output."""
    env = clean_env(
        DATABASE_URL=database_url,
        CRON_SECRET=CRON_SECRET,
        ALERTMANAGER_URL=alertmanager_url(),
        LOG_LEVEL="DEBUG",
        **values,
    )
    return run_cli(*argv, env=env, timeout=90)


@pytest.mark.parametrize("log_format", ["json", "console"])
@pytest.mark.parametrize("command", ONE_SHOT)
def test_unreachable_database(command: str, log_format: str) -> None:
    """A closed port: exit 1 with one error line, and no secret anywhere in the output."""
    done = one_shot([command], closed_port_url(), LOG_FORMAT=log_format)
    assert done.returncode == 1, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("token-reset: error:")]
    assert len(errors) == 1
    assert_no_secret(done.stdout + done.stderr, *SECRETS)


@asynccontextmanager
async def refused_login(database_url: str) -> AsyncIterator[str]:
    """A login role with PASSWORD that the server refuses (CONNECTION LIMIT 0); its URL.

    The test server trusts local connections, so a wrong password would be accepted:
    the connection limit makes the server refuse the login instead.
    """
    name = unique_name("tr_refused")
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f"CREATE ROLE {name} LOGIN CONNECTION LIMIT 0 PASSWORD '{PASSWORD}'")
        parts = urlsplit(database_url)
        netloc = f"{name}:{PASSWORD}@{parts.hostname}:{parts.port or 5432}"
        yield parts._replace(netloc=netloc).geturl()
    finally:
        await admin.execute(f"DROP ROLE IF EXISTS {name}")
        await admin.close()


@pytest.mark.parametrize("command", ONE_SHOT)
async def test_database_refusing_the_login(command: str, database_url: str) -> None:
    """The server says no (a PostgresError at connect): exit 1, no secret in the output."""
    async with refused_login(database_url) as url:
        done = await anyio.to_thread.run_sync(lambda: one_shot([command], url, LOG_FORMAT="json"))
    assert done.returncode == 1, done.stderr[-2000:]
    assert "too many connections" in done.stderr
    assert_no_secret(done.stdout + done.stderr, *SECRETS)


def test_listen_with_a_bad_http_host() -> None:
    """HTTP_HOST that cannot be bound: the service stops (exit 1) and prints no secret."""
    done = one_shot(
        ["listen"],
        closed_port_url(),
        LOG_FORMAT="json",
        HTTP_HOST="no-such-host.invalid",
        HTTP_PORT="0",
        RESET_SCHEDULE="off",
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "listener_crashed" in done.stdout
    assert_no_secret(done.stdout + done.stderr, *SECRETS)


def bearer() -> dict[str, str]:
    """The cron caller's header."""
    return {"Authorization": f"Bearer {CRON_SECRET}"}


async def test_listen_reconnecting_and_a_failed_endpoint_run(tmp_path: Path) -> None:
    """Ten reconnects to an unreachable database and a failed cron call: no secret logged."""
    env = listener_env(
        closed_port_url(),
        name="secrets-unreachable",
        CRON_SECRET=CRON_SECRET,
        ALERTMANAGER_URL=alertmanager_url(),
        RECONNECT_MAX_SECONDS="0.05",
    )
    async with running_listener(env, tmp_path) as listener:
        await listener.wait_event("listener_reconnecting", attempt=10, within=30)
        response = await listener.client.post(listener.base_url + RESET_PATH, headers=bearer())
    assert response.status_code == 500
    assert "database unreachable" in response.json()["error"]
    output = listener.log_path.read_text()
    assert "bulk_reset_finished" in output
    assert_no_secret(output + response.text, *SECRETS)


async def test_listen_with_a_failing_alertmanager_and_a_run_cut_short(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection
) -> None:
    """A reachable database: the alert push fails, a run loses its connection mid-way."""
    users = await add_stale_users(conn, 3)
    url, password = with_our_password(database_url)
    env = listener_env(
        url,
        name="secrets-reachable",
        CRON_SECRET=CRON_SECRET,
        ALERTMANAGER_URL=alertmanager_url(),
        RESET_GRACE_SECONDS="0",
        WATCHDOG_INTERVAL_SECONDS="0.2",
    )
    responses: list[httpx.Response] = []
    async with running_listener(env, tmp_path) as listener:
        await listener.wait_event("alertmanager_push_failed", within=30)

        async def call() -> None:
            url = listener.base_url + RESET_PATH
            responses.append(await listener.client.post(url, headers=bearer()))

        # A writer holds one row: the run waits in its final pass, and is cut off there.
        async with anyio.create_task_group() as group, row_lock(database_url, users[0]):
            group.start_soon(call)
            await wait_until(lambda: bulk_waiting_on_lock(conn), deadline=30, what="run waiting")
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'token-reset:bulk' AND datname = current_database()"
            )
    (response,) = responses
    assert response.status_code == 500
    output = listener.log_path.read_text()
    assert "alertmanager_push_failed" in output
    assert '"outcome": "failure"' in output
    assert_no_secret(output + response.text, *SECRETS, password)
