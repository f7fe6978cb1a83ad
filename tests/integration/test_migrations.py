"""Migrations are tested like code: idempotent, concurrency-safe, stepwise == at once."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import anyio
import asyncpg
import pytest

from listener.migrate import MigrationError, apply_migrations
from listener.sql import RELEASED_CHECKSUMS, Migration, migrations
from tests.support.cli import run_cli as run
from tests.support.database import TestServer, unique_name

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[2]

# Everything a migration can create, rendered as comparable text.
CATALOG = """
SELECT 'relation ' || c.relname || ' ' || c.relkind::text || ' '
       || coalesce(array_to_string(c.reloptions, ','), '')
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'public'
UNION ALL
SELECT 'column ' || c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
       || ' ' || a.attnotnull || ' ' || coalesce(pg_get_expr(d.adbin, d.adrelid), '')
  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace
  LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
 WHERE n.nspname = 'public' AND a.attnum > 0 AND NOT a.attisdropped
UNION ALL
SELECT 'constraint ' || conrelid::regclass || ' ' || conname || ' ' || pg_get_constraintdef(oid)
  FROM pg_constraint WHERE connamespace = 'public'::regnamespace
UNION ALL
SELECT 'index ' || indexname || ' ' || indexdef FROM pg_indexes WHERE schemaname = 'public'
UNION ALL
SELECT 'function ' || p.oid::regprocedure || ' ' || md5(pg_get_functiondef(p.oid))
  FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace
UNION ALL
SELECT 'trigger ' || tgname || ' ' || pg_get_triggerdef(t.oid)
  FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
 WHERE c.relnamespace = 'public'::regnamespace AND NOT t.tgisinternal
UNION ALL
SELECT 'view ' || viewname || ' ' || md5(definition) FROM pg_views WHERE schemaname = 'public'
UNION ALL
SELECT 'acl ' || c.relname || ' ' || coalesce(c.relacl::text, '')
  FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace
ORDER BY 1
"""


async def catalog(url: str) -> list[str]:
    """The public schema's catalog, minus the migration history's timestamps."""
    conn = await asyncpg.connect(url)
    try:
        return [row[0] for row in await conn.fetch(CATALOG)]
    finally:
        await conn.close()


async def migrate(url: str, target: int | None = None) -> tuple[int, ...]:
    """Run the migrator on its own connection; returns the versions it applied."""
    conn = await asyncpg.connect(url)
    try:
        return (await apply_migrations(conn, target=target)).applied
    finally:
        await conn.close()


def test_migration_files_are_numbered_without_gaps() -> None:
    """Files are NNNN_snake_case.sql, contiguous from 1 (the loader refuses anything else)."""
    versions = [m.version for m in migrations()]
    assert versions == list(range(1, len(versions) + 1))
    names = sorted(p.name for p in (ROOT / "sql" / "migrations").glob("*.sql"))
    assert len(names) == len(versions)


async def test_migrate_twice_changes_nothing(empty_database_url: str) -> None:
    """The second run applies nothing and leaves the catalog as it was."""
    everything = tuple(m.version for m in migrations())
    assert await migrate(empty_database_url) == everything
    first = await catalog(empty_database_url)
    assert await migrate(empty_database_url) == ()
    assert await catalog(empty_database_url) == first


async def test_concurrent_migrations_apply_each_file_once(empty_database_url: str) -> None:
    """Four migrators racing (replicas starting together) apply each migration exactly once."""
    results: list[tuple[int, ...]] = []

    async def one() -> None:
        results.append(await migrate(empty_database_url))

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(one)
    applied = sorted(v for r in results for v in r)
    assert applied == [m.version for m in migrations()]


async def test_stepwise_upgrades_equal_a_fresh_install(pg_server: TestServer) -> None:
    """Upgrading from every earlier version gives the same catalog as migrating at once."""
    fresh = unique_name("tr_fresh")
    fresh_url = await pg_server.create_database(fresh)
    try:
        await migrate(fresh_url)
        expected = await catalog(fresh_url)
        for stop in range(1, len(migrations())):
            name = unique_name("tr_step")
            url = await pg_server.create_database(name)
            try:
                assert await migrate(url, target=stop) == tuple(range(1, stop + 1))
                await migrate(url)
                assert await catalog(url) == expected, f"upgrade from {stop} differs"
            finally:
                await pg_server.drop_database(name)
    finally:
        await pg_server.drop_database(fresh)


async def test_edited_migration_is_refused(database_url: str) -> None:
    """A checksum that no longer matches means someone edited history: refuse loudly."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("UPDATE token_reset_migrations SET checksum = 'x' WHERE version = 1")
        with pytest.raises(MigrationError, match="edited after it was applied"):
            await apply_migrations(conn)
    finally:
        await conn.close()


async def test_database_from_a_newer_release_is_refused(database_url: str) -> None:
    """An unknown applied version means this binary is older than the schema."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO token_reset_migrations (version, name, checksum) VALUES (9999, 'x', 'y')"
        )
        with pytest.raises(MigrationError, match="newer release"):
            await apply_migrations(conn)
    finally:
        await conn.close()


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`python -m listener ...` with exactly `env` (plus PATH)."""
    return run(*args, env={"PATH": "/usr/bin:/bin", **env})


def test_migrate_without_a_database_says_how_to_configure_one() -> None:
    """No DATABASE_URL and no PG* variables: exit 2 with one line, no silent fallback."""
    done = run_cli("migrate", env={})
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "DATABASE_URL" in lines[0]
    assert "--embedded" in lines[0]


def test_migrate_command_reports_what_it_did(empty_database_url: str) -> None:
    """The CLI prints one JSON line with the versions applied, then nothing on a rerun."""
    first = run_cli("migrate", env={"DATABASE_URL": empty_database_url, "LOG_LEVEL": "WARNING"})
    assert first.returncode == 0, first.stderr
    assert f'"current_version": {len(migrations())}' in first.stdout
    second = run_cli("migrate", env={"DATABASE_URL": empty_database_url, "LOG_LEVEL": "WARNING"})
    assert second.returncode == 0
    assert '"applied": []' in second.stdout


def test_wheel_carries_the_sql_folder(tmp_path: Path) -> None:
    """An installed package must find its migrations: the wheel holds listener/sql/."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(tmp_path.glob("*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for migration in migrations():
        assert f"listener/sql/migrations/{migration.version:04d}_{migration.name}.sql" in names
    assert any(n.startswith("listener/sql/queries/") for n in names)


async def test_databases_migrated_by_the_first_release_keep_migrating(database_url: str) -> None:
    """That release recorded checksums of the whole text; comments have been corrected
    since (a comment-only edit keeps the checksum now), and its records are accepted."""
    conn = await asyncpg.connect(database_url)
    try:
        for version, checksum in RELEASED_CHECKSUMS.items():
            await conn.execute(
                "UPDATE token_reset_migrations SET checksum = $2 WHERE version = $1",
                version,
                checksum,
            )
        report = await apply_migrations(conn)
        assert report.applied == ()
    finally:
        await conn.close()


def test_a_comment_only_edit_keeps_the_checksum_and_a_code_edit_does_not() -> None:
    original = Migration(9, "x", "-- says one thing\nSELECT 1;\n")
    recommented = Migration(9, "x", "-- says another thing\n  -- and more\nSELECT 1;\n")
    edited = Migration(9, "x", "-- says one thing\nSELECT 2;\n")
    assert original.checksum == recommented.checksum
    assert original.checksum != edited.checksum
