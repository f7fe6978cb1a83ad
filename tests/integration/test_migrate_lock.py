"""`token-reset migrate` serialises on something only the owner can hold, and says so.

Before, it took pg_advisory_lock(hashtext('token_reset.migrate')), which any role that
can connect may take too: `migrate` then waited forever, without a word.  Now the lock
is LOCK TABLE token_reset_migrations IN EXCLUSIVE MODE (the table is REVOKEd from
PUBLIC; SELECT's ACCESS SHARE does not conflict), bounded by
MIGRATE_LOCK_TIMEOUT_SECONDS, and a wait is logged once, naming the holder.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import anyio
import asyncpg
import pytest

from listener.migrate import apply_migrations
from listener.sql import migrations, query
from tests.support.cli import cli
from tests.support.database import open_transaction, sessions_waiting_on_lock, unique_name
from tests.support.env import cli_env
from tests.support.waiting import wait_until

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[2]
NEWEST = len(migrations())
MIGRATE_APP = "token-reset:migrate"


@pytest.fixture
async def one_behind(empty_database_url: str) -> str:
    """A database migrated to all but the newest migration: `migrate` has work to do."""
    conn = await asyncpg.connect(empty_database_url)
    try:
        await apply_migrations(conn, target=NEWEST - 1)
    finally:
        await conn.close()
    return empty_database_url


@asynccontextmanager
async def role(database_url: str, *, grant_select: bool = False) -> AsyncIterator[str]:
    """A login role with no privileges (or SELECT on the history); dropped afterwards."""
    name = unique_name("tr_squatter")
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f"CREATE ROLE {name} LOGIN")
        if grant_select:
            await admin.execute(f"GRANT SELECT ON public.token_reset_migrations TO {name}")
        yield name
    finally:
        await admin.execute(f"DROP OWNED BY {name}")
        await admin.execute(f"DROP ROLE {name}")
        await admin.close()


def as_role(database_url: str, name: str) -> str:
    """The same database URL, logging in as another role."""
    scheme, _, rest = database_url.partition("://")
    return f"{scheme}://{name}@{rest.rpartition('@')[2]}"


def holding_the_history(database_url: str) -> AbstractAsyncContextManager[asyncpg.Connection]:
    """The owner's session in a transaction holding the table lock a migration takes."""
    return open_transaction(
        database_url,
        "LOCK TABLE public.token_reset_migrations IN EXCLUSIVE MODE",
        application_name="other-migrator",
    )


async def migrators_waiting(conn: asyncpg.Connection, expected: int) -> bool:
    """True when `expected` migrate sessions of this database are blocked on a lock."""
    return await sessions_waiting_on_lock(conn, MIGRATE_APP) == expected


async def migrate_cli(
    database_url: str, into: list[tuple[int, str, str, float]], **env_values: str
) -> None:
    """`python -m listener migrate`; appends (exit code, stdout, stderr, seconds)."""
    started = time.monotonic()
    done = await cli("migrate", env=cli_env(database_url, **env_values))
    into.append((*done, time.monotonic() - started))


def events(stderr: str, name: str) -> list[dict[str, object]]:
    """The JSON log events of that name among stderr's lines."""
    found = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == name:
                found.append(entry)
    return found


async def test_a_role_without_grants_cannot_block_migrate(one_behind: str) -> None:
    """The old advisory lock, held by a nobody, and SELECT's lock: migrate goes through."""
    async with (
        role(one_behind) as nobody,
        role(one_behind, grant_select=True) as reader_role,
    ):
        squatter = await asyncpg.connect(as_role(one_behind, nobody))
        reader = await asyncpg.connect(as_role(one_behind, reader_role))
        try:
            await squatter.execute("SELECT pg_advisory_lock(hashtext('token_reset.migrate'))")
            # Nor can it take the table lock itself: no privilege on the table.
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                async with squatter.transaction():
                    await squatter.execute(
                        "LOCK TABLE public.token_reset_migrations IN EXCLUSIVE MODE"
                    )
            # A reader in an open transaction holds ACCESS SHARE: no conflict.
            await reader.execute("BEGIN")
            await reader.fetch("SELECT * FROM public.token_reset_migrations")
            conn = await asyncpg.connect(one_behind)
            try:
                with anyio.fail_after(30):
                    report = await apply_migrations(conn)
            finally:
                await conn.close()
            assert report.applied == (NEWEST,)
        finally:
            await reader.close()
            await squatter.close()


async def test_history_table_is_not_granted_to_public(one_behind: str) -> None:
    """After a migrate, PUBLIC has no privilege on the history (an old GRANT is revoked)."""
    conn = await asyncpg.connect(one_behind)
    try:
        await conn.execute("GRANT ALL ON public.token_reset_migrations TO PUBLIC")
        await apply_migrations(conn)
        public = await conn.fetchval(
            "SELECT count(*) FROM pg_class c, "
            "aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) a "
            "WHERE c.oid = 'public.token_reset_migrations'::regclass AND a.grantee = 0"
        )
    finally:
        await conn.close()
    assert public == 0


async def test_a_second_migrate_waits_for_the_first_and_says_for_whom(
    one_behind: str, conn: asyncpg.Connection
) -> None:
    """One log line naming the holder (pid, application_name, user); done once released."""
    results: list[tuple[int, str, str, float]] = []
    async with holding_the_history(one_behind) as holder:
        watcher = await asyncpg.connect(one_behind)
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(migrate_cli, one_behind, results)
                await wait_until(
                    lambda: migrators_waiting(watcher, 1),
                    deadline=30,
                    what="migrate waiting for the lock",
                )
                holder_pid = holder.get_server_pid()
                await holder.execute("COMMIT")
                await holder.execute("BEGIN")  # so the context's rollback has a transaction
        finally:
            await watcher.close()
    ((code, out, err, _),) = results
    assert code == 0, err[-2000:]
    assert json.loads(out)["applied"] == [NEWEST]
    (waiting,) = events(err, "migration_lock_waiting")
    holders = waiting["holders"]
    assert isinstance(holders, list)
    assert [(h["pid"], h["application_name"]) for h in holders] == [(holder_pid, "other-migrator")]
    assert holders[0]["usename"]


async def test_an_over_long_hold_fails_within_the_configured_timeout(one_behind: str) -> None:
    """MIGRATE_LOCK_TIMEOUT_SECONDS=2: exit 1 soon after, one line naming the holder."""
    results: list[tuple[int, str, str, float]] = []
    async with holding_the_history(one_behind) as holder:
        await migrate_cli(one_behind, results, MIGRATE_LOCK_TIMEOUT_SECONDS="2")
        holder_pid = holder.get_server_pid()
    ((code, out, err, seconds),) = results
    assert code == 1, err[-2000:]
    assert out == ""
    assert seconds < 2 + 15  # the timeout plus interpreter start-up on a loaded machine
    (line,) = [line for line in err.splitlines() if line.startswith("token-reset: error:")]
    assert "MIGRATE_LOCK_TIMEOUT_SECONDS" in line
    assert f"pid {holder_pid}" in line


async def test_two_migrates_racing_to_create_the_history_table(empty_database_url: str) -> None:
    """Both first creators hit the catalog's unique index; both retry and succeed, once each.

    A third session creating the table in an open transaction makes the race certain:
    both `migrate` runs block on its catalog rows and fail with a unique violation when
    it commits, exactly as two runs starting at the same instant can.
    """
    results: list[tuple[int, str, str, float]] = []
    creator = await asyncpg.connect(empty_database_url)
    # Its own session: pg_stat_activity is a snapshot per transaction.
    watcher = await asyncpg.connect(empty_database_url)
    try:
        await creator.execute("BEGIN")
        await creator.execute(query("migration_history_create"))
        async with anyio.create_task_group() as group:
            group.start_soon(migrate_cli, empty_database_url, results)
            group.start_soon(migrate_cli, empty_database_url, results)
            await wait_until(
                lambda: migrators_waiting(watcher, 2),
                deadline=30,
                what="both migrate runs blocked on the creator",
            )
            await creator.execute("COMMIT")
        history = [row["version"] for row in await watcher.fetch(query("migration_history"))]
    finally:
        await watcher.close()
        await creator.close()
    assert [code for code, *_ in results] == [0, 0], [err[-1000:] for _, _, err, _ in results]
    applied = sorted(v for _, out, _, _ in results for v in json.loads(out)["applied"])
    assert applied == list(range(1, NEWEST + 1))
    assert history == list(range(1, NEWEST + 1))
