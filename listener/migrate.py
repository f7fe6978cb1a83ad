"""Applies sql/migrations in order, once each, under an advisory lock.

Two `token-reset migrate` runs at once (two replicas starting, a deploy racing a
manual run) serialise on the lock; the second finds nothing left to do.  Every
applied migration is recorded with its checksum, so an edited, already-applied file
is refused instead of silently diverging.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
import structlog

from listener.sql import Migration, migrations, query

log = structlog.get_logger("listener.migrate")

# The first migration whose settings and privileges are derived by functions of its own.
DERIVED_OBJECTS_SINCE = 4


class MigrationError(RuntimeError):
    """The database's migration history does not match the migrations shipped here."""


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
    conn: asyncpg.Connection, *, target: int | None = None
) -> MigrationReport:
    """Bring the database to `target` (default: the newest migration)."""
    available = migrations()
    target = available[-1].version if target is None else target
    await conn.execute(query("migration_lock"))
    try:
        await conn.execute(query("migration_history_create"))
        history = {row["version"]: row for row in await conn.fetch(query("migration_history"))}
        _check_history(history, available)
        applied: list[int] = []
        for migration in available:
            if migration.version in history or migration.version > target:
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    query("migration_record"),
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            applied.append(migration.version)
            log.info("migration_applied", version=migration.version, name=migration.name)
        current = max([*history, *applied], default=0)
        missing: tuple[str, ...] = ()
        if current >= DERIVED_OBJECTS_SINCE:
            missing = await _apply_derived(conn)
        return MigrationReport(
            applied=tuple(applied), current_version=current, missing_roles=missing
        )
    finally:
        await conn.execute(query("migration_unlock"))


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
        if row["checksum"] != migration.checksum:
            raise MigrationError(
                f"migration {version}_{migration.name}.sql was edited after it was applied "
                "(checksum differs): add a new migration instead"
            )
