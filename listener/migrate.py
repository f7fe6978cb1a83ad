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


class MigrationError(RuntimeError):
    """The database's migration history does not match the migrations shipped here."""


@dataclass(frozen=True)
class MigrationReport:
    """What one run did: the versions it applied and the version it left the database at."""

    applied: tuple[int, ...]
    current_version: int


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
        return MigrationReport(applied=tuple(applied), current_version=current)
    finally:
        await conn.execute(query("migration_unlock"))


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
