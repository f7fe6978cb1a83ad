"""Applies sql/migrations in order, once each, serialised on the history table's lock.

Two `token-reset migrate` runs at once (two replicas starting, a deploy racing a
manual run) serialise: each migration's transaction first takes LOCK TABLE
token_reset_migrations IN EXCLUSIVE MODE and re-reads the history under it, so the
second run finds nothing left to do.  Only the table's owner can hold that lock (PUBLIC
is revoked, and SELECT's ACCESS SHARE does not conflict): unlike an advisory lock, no
other role can stall a deploy.  The wait is bounded (MIGRATE_LOCK_TIMEOUT_SECONDS) and
announced once with who holds the lock.  Every applied migration is recorded with its
checksum, so an edited, already-applied file is refused instead of silently diverging.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg
import structlog

from listener.config import DEFAULT_MIGRATE_LOCK_TIMEOUT_SECONDS
from listener.sql import Migration, migrations, query

log = structlog.get_logger(__name__)

# The first migration whose settings and privileges are derived by functions of its own,
# and the first with a partitioned ledger.
DERIVED_OBJECTS_SINCE = 4
PARTITIONED_SINCE = 6

# Two first runs creating the history table at once: the loser's CREATE TABLE IF NOT
# EXISTS fails on the catalog's unique index; the next attempt sees the table.
_CREATE_ATTEMPTS = 3


class MigrationError(RuntimeError):
    """The database's migration history does not match the migrations shipped here."""


class MigrationLockTimeout(MigrationError):
    """Another session held the migration lock longer than the configured timeout."""


@dataclass(frozen=True)
class MigrationReport:
    """What one run did: the versions it applied and the version it left the database at."""

    applied: tuple[int, ...]
    current_version: int
    # Roles the declared privileges name but the database lacks (managed PostgreSQL
    # without CREATEROLE): their grants are applied by the first migrate after a DBA
    # creates them.
    missing_roles: tuple[str, ...] = ()


async def apply_migrations(
    conn: asyncpg.Connection,
    *,
    target: int | None = None,
    lock_timeout_seconds: float = DEFAULT_MIGRATE_LOCK_TIMEOUT_SECONDS,
) -> MigrationReport:
    """Bring the database to `target` (default: the newest migration)."""
    available = migrations()
    target = available[-1].version if target is None else target
    await _create_history(conn)
    await _refuse_a_planted_history(conn)
    lock = _HistoryLock(conn, lock_timeout_seconds)
    applied: list[int] = []
    while True:
        async with conn.transaction():
            await lock.take()
            history = {row["version"]: row for row in await conn.fetch(query("migration_history"))}
            _check_history(history, available)
            pending = [m for m in available if m.version not in history and m.version <= target]
            if not pending:
                current = max(history, default=0)
                missing: tuple[str, ...] = ()
                if current >= DERIVED_OBJECTS_SINCE:
                    missing = await _apply_derived(conn)
                if current >= PARTITIONED_SINCE:
                    await conn.execute(query("migration_ensure_partitions"))
                return MigrationReport(
                    tuple(applied), current_version=current, missing_roles=missing
                )
            migration = pending[0]
            await conn.execute(migration.sql)
            await conn.execute(
                query("migration_record"), migration.version, migration.name, migration.checksum
            )
        applied.append(migration.version)
        log.info("migration_applied", version=migration.version, name=migration.name)


async def _refuse_a_planted_history(conn: asyncpg.Connection) -> None:
    """Never write history rows into a table another role made (and could trigger on)."""
    row = await conn.fetchrow(query("migration_history_trusted"))
    if row is None or not row["trusted"]:
        owner = "nobody" if row is None else row["owner"]
        raise MigrationError(
            f"public.token_reset_migrations is owned by {owner} or has a trigger: not "
            "written, since a role that may CREATE in schema public can plant it; drop it "
            "(as its owner or a superuser) and REVOKE CREATE ON SCHEMA public FROM PUBLIC"
        )


async def _create_history(conn: asyncpg.Connection) -> None:
    for attempt in range(1, _CREATE_ATTEMPTS + 1):
        try:
            await conn.execute(query("migration_history_create"))
        except (
            asyncpg.UniqueViolationError,
            asyncpg.DuplicateTableError,
            asyncpg.DuplicateObjectError,  # its row type, created a moment before ours
        ):
            if attempt == _CREATE_ATTEMPTS:
                raise
        else:
            return


class _HistoryLock:
    """Takes the history table's lock in the current transaction, bounded and announced."""

    def __init__(self, conn: asyncpg.Connection, timeout_seconds: float) -> None:
        self.conn = conn
        self.timeout_ms = max(1, round(timeout_seconds * 1000))
        self.timeout_seconds = timeout_seconds
        self.announced = False
        self.secured = False

    async def take(self) -> None:
        """Lock at once if free; else say once who holds it and wait up to the timeout."""
        conn = self.conn
        try:
            # A savepoint: NOWAIT's failure must not abort the migration's transaction.
            async with conn.transaction():
                await conn.execute(query("migration_lock_nowait"))
        except asyncpg.LockNotAvailableError:
            await self._wait()
        if not self.secured:
            # Under the lock, so concurrent runs never race on the table's ACL row.
            if await conn.fetchval(query("migration_history_public")):
                await conn.execute(query("migration_history_revoke"))
            self.secured = True

    async def _wait(self) -> None:
        conn = self.conn
        holders = [dict(row) for row in await conn.fetch(query("migration_lock_holders"))]
        if not self.announced:
            self.announced = True
            log.warning(
                "migration_lock_waiting",
                table="public.token_reset_migrations",
                holders=holders,
                timeout_seconds=self.timeout_seconds,
            )
        previous = await conn.fetchval(query("migration_lock_timeout_get"))
        await conn.execute(query("migration_lock_timeout_set"), f"{self.timeout_ms}ms")
        try:
            await conn.execute(query("migration_lock"))
        except asyncpg.LockNotAvailableError:
            raise MigrationLockTimeout(
                f"another session held the migration lock (public.token_reset_migrations) "
                f"for more than {self.timeout_seconds:g} s (MIGRATE_LOCK_TIMEOUT_SECONDS): "
                f"{_describe_holders(holders)}; end that session or raise the timeout"
            ) from None
        # The migration's own statements keep the session's lock_timeout.
        await conn.execute(query("migration_lock_timeout_set"), previous)


def _describe_holders(holders: list[dict[str, Any]]) -> str:
    if not holders:
        return "holder not visible"
    return ", ".join(
        f"pid {h['pid']} ({h['application_name'] or 'no application_name'}, "
        f"user {h['usename'] or '?'}, {h['mode']})"
        for h in holders
    )


async def _apply_derived(conn: asyncpg.Connection) -> tuple[str, ...]:
    """Regenerate what the settings row and the declared privileges imply.

    The period functions and the trigger's WHEN clause spell the configured zone out,
    and grants name roles that may appear after a migration ran; a later migration
    that re-creates one of them from older text is put right here, in the same run.
    """
    async with conn.transaction():
        await conn.execute(query("migration_apply_settings"))
        missing = tuple(await conn.fetchval(query("migration_apply_privileges")))
    if missing:
        log.warning(
            "roles_missing",
            roles=list(missing),
            hint="a role with CREATEROLE must create them (README: managed PostgreSQL); "
            "their grants are applied by the next migrate",
        )
    return missing


def _check_history(history: dict[int, asyncpg.Record], available: tuple[Migration, ...]) -> None:
    known = {m.version: m for m in available}
    for version, row in sorted(history.items()):
        migration = known.get(version)
        if migration is None:
            raise MigrationError(
                f"database has migration {version} ({row['name']}) that this version does not "
                "ship: it was migrated by a newer release"
            )
        if not migration.accepts(row["checksum"]):
            raise MigrationError(
                f"migration {version}_{migration.name}.sql was edited after it was applied "
                "(checksum differs): add a new migration instead"
            )
