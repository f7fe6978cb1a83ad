"""deploy/postgres/roles.sql on a real server: the stack runs without a superuser.

compose's init script runs roles.sql once as the image's superuser; after that the
listener and `token-reset migrate` log in as a role that is a member of
token_reset_app and nothing more (no SUPERUSER, CREATEROLE, CREATEDB).  Here the same
file runs through psql against the test server (role and database names made unique,
since roles are cluster-wide), and then the real commands run as that role.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import asyncpg
import pytest

from listener.embedded import find_bindir
from tests.support.cli import REPO
from tests.support.cli import cli as run
from tests.support.database import TestServer, run_sync, with_database
from tests.support.env import cli_env, listener_env
from tests.support.processes import running_listener, wait_counts_equal_ledger
from tests.support.users import add_stale_users, reset_by_trigger

pytestmark = pytest.mark.anyio

ROLES_SQL = REPO / "deploy" / "postgres" / "roles.sql"


def as_login(url: str, role: str, password: str, database: str) -> str:
    """`url`'s server, logged in as `role` to `database`."""
    rest = url.split("://", 1)[1].rpartition("@")[2]
    return with_database(f"postgresql://{role}:{password}@{rest}", database)


async def drop(server: TestServer, role: str, database: str) -> None:
    """Remove what roles.sql created (roles outlive databases: drop it last)."""
    await server.drop_database(database)
    admin = await server.admin()
    try:
        await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
    finally:
        await admin.close()


@pytest.fixture
def login_url(pg_server: TestServer) -> Iterator[str]:
    """roles.sql run by psql as the server's superuser; the new login role's URL."""
    suffix = uuid.uuid4().hex[:10]
    role, database, password = f"tr_login_{suffix}", f"tr_compose_{suffix}", f"pw-{suffix}"
    psql = find_bindir() / "psql"
    done = run_sync(
        functools.partial(anyio.run_process, check=False),
        [
            str(psql),
            pg_server.admin_url,
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-v",
            f"login_role={role}",
            "-v",
            f"login_password={password}",
            "-v",
            f"database={database}",
            "-f",
            str(ROLES_SQL),
        ],
    )
    assert done.returncode == 0, done.stderr.decode()
    try:
        yield as_login(pg_server.admin_url, role, password, database)
    finally:
        run_sync(drop, pg_server, role, database)


async def cli(url: str, *args: str) -> tuple[int, str, str]:
    """`python -m listener <args>` with only this database configured."""
    return await run(*args, env=cli_env(url))


async def test_the_login_role_is_a_member_of_token_reset_app_and_nothing_more(
    login_url: str,
) -> None:
    """Not a superuser, cannot create roles or databases, inherits token_reset_app."""
    conn = await asyncpg.connect(login_url)
    try:
        row = await conn.fetchrow(
            "SELECT r.rolsuper, r.rolcreaterole, r.rolcreatedb, r.rolreplication, "
            "pg_has_role(current_user, 'token_reset_app', 'USAGE') AS member, "
            "d.datdba = r.oid AS owns_database "
            "FROM pg_roles r, pg_database d "
            "WHERE r.rolname = current_user AND d.datname = current_database()"
        )
    finally:
        await conn.close()
    assert row is not None
    assert dict(row) == {
        "rolsuper": False,
        "rolcreaterole": False,
        "rolcreatedb": False,
        "rolreplication": False,
        "member": True,
        "owns_database": True,
    }


async def test_migrate_listen_reset_and_status_run_as_that_role(
    login_url: str, tmp_path: Path
) -> None:
    """The compose stack's commands, as the non-superuser: all of them work."""
    code, out, err = await cli(login_url, "migrate")
    assert code == 0, err
    assert json.loads(out)["success"] is True
    conn = await asyncpg.connect(login_url)
    try:
        users = await add_stale_users(conn, 6)
        env = listener_env(login_url, name="compose-role")
        async with running_listener(env, tmp_path) as listener:
            await listener.wait_ready()
            await reset_by_trigger(conn, users[:2])
            code, out, err = await cli(login_url, "reset")
            assert code == 0, err
            truth = await wait_counts_equal_ledger(listener, conn)
        code, status, err = await cli(login_url, "status", "--json")
        assert code == 0, err
    finally:
        await conn.close()
    assert json.loads(out)["reset_count"] == 4
    assert truth == {"trigger": 2, "function": 0, "bulk": 4}
    assert json.loads(status)["stale_users"] == 0
