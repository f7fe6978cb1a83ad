"""Managed PostgreSQL (RDS, Cloud SQL, Supabase): the migrating role owns its database but
may not create roles.  A cluster of its own, so the group roles really do not exist."""

from __future__ import annotations

import json
from collections.abc import Iterator

import asyncpg
import pytest

from listener.embedded import EmbeddedPostgres
from listener.migrate import apply_migrations
from tests.support.cli import run_cli
from tests.support.database import own_cluster
from tests.support.env import clean_env

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

OWNER = "app_owner"


@pytest.fixture(scope="module")
def bare_cluster() -> Iterator[EmbeddedPostgres]:
    """A cluster of its own: on the shared test server the group roles exist."""
    with own_cluster("token-reset-managed-", {"fsync": "off"}) as server:
        yield server


async def test_migrate_without_createrole_works_and_names_the_missing_roles(
    bare_cluster: EmbeddedPostgres,
) -> None:
    admin = await asyncpg.connect(bare_cluster.dsn)
    try:
        await admin.execute(f"CREATE ROLE {OWNER} LOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB")
        await admin.execute(f"CREATE DATABASE tokens OWNER {OWNER}")
    finally:
        await admin.close()
    owner_url = bare_cluster.dsn_for("tokens").replace("://postgres@", f"://{OWNER}@")

    # A one-shot CLI run, blocking: nothing else waits meanwhile.
    done = run_cli("migrate", env=clean_env(DATABASE_URL=owner_url, LOG_FORMAT="json"), timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert sorted(report["missing_roles"]) == ["token_reset_app", "token_reset_listener"]
    warnings = [line for line in done.stderr.splitlines() if '"roles_missing"' in line]
    assert len(warnings) == 1

    conn = await asyncpg.connect(owner_url)
    try:
        user = await conn.fetchval("SELECT gen_random_uuid()")
        await conn.execute("INSERT INTO user_tokens (user_id) VALUES ($1)", user)
        answer = json.loads(await conn.fetchval("SELECT deduct_tokens($1, 3, 'chat')", user))
        assert answer["used"] == 3

        admin = await asyncpg.connect(bare_cluster.dsn)
        try:  # what the DBA runs, from README
            await admin.execute("CREATE ROLE token_reset_app NOLOGIN")
            await admin.execute("CREATE ROLE token_reset_listener NOLOGIN")
        finally:
            await admin.close()
        again = await apply_migrations(conn)
        assert again.missing_roles == ()
        assert await conn.fetchval(
            "SELECT has_function_privilege('token_reset_app',"
            " 'deduct_tokens(uuid, bigint, text)', 'EXECUTE')"
            " AND has_table_privilege('token_reset_listener', 'token_reset_listener_cursors',"
            " 'INSERT')"
            " AND NOT has_table_privilege('token_reset_app', 'user_tokens', 'UPDATE')"
        )
    finally:
        await conn.close()
