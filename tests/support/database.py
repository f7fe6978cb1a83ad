"""Where the tests' PostgreSQL comes from, and per-test databases cloned from a template.

The benchmarks use the same server class (bench/common.py's BenchServer extends it).

TEST_DATABASE_URL (a superuser URL of any database on the server) wins; otherwise the
suite starts an embedded server of its own.  Nothing here ever skips: no database is a
failure with the reason.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg

from listener.embedded import EmbeddedPostgres, private_data_root
from listener.migrate import apply_migrations

# Durability is not what these tests measure; turning it off makes the suite faster.
TEST_SERVER_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
}


def with_database(url: str, database: str) -> str:
    """The same server URL pointing at another database."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


@dataclass
class TestServer:
    """A server the suite may create and drop databases on."""

    __test__ = False  # not a test class, despite the name
    admin_url: str
    embedded: EmbeddedPostgres | None = None
    # Clone templates by copying their files (PostgreSQL 15+): a large template (the
    # benchmarks' million users) costs seconds instead of a flood of WAL.
    file_copy: bool = False

    async def admin(self) -> asyncpg.Connection:
        """A connection to the maintenance database."""
        conn: asyncpg.Connection = await asyncpg.connect(self.admin_url)
        return conn

    def url(self, database: str) -> str:
        """URL of one database on this server."""
        return with_database(self.admin_url, database)

    async def create_database(self, name: str, template: str | None = None) -> str:
        """Create a database (optionally cloned) and return its URL."""
        conn = await self.admin()
        try:
            clause = f" TEMPLATE {template}" if template else ""
            if clause and self.file_copy and conn.get_server_version().major >= 15:
                clause += " STRATEGY FILE_COPY"
            await conn.execute(f"CREATE DATABASE {name}{clause}")
        finally:
            await conn.close()
        return self.url(name)

    async def migrated_database(self, prefix: str) -> tuple[str, str]:
        """A new database with every migration applied; returns (name, url)."""
        name = unique_name(prefix)
        url = await self.create_database(name)
        conn = await asyncpg.connect(url)
        try:
            await apply_migrations(conn)
        finally:
            await conn.close()
        return name, url

    async def drop_database(self, name: str) -> None:
        """Drop a database even if something still holds a connection to it."""
        conn = await self.admin()
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await conn.close()


ServerT = TypeVar("ServerT", bound=TestServer)


@contextmanager
def test_server(tmp_dir: Path) -> Iterator[TestServer]:
    """TEST_DATABASE_URL's server, or an embedded one under tmp_dir for the session."""
    url = os.environ.get("TEST_DATABASE_URL", "").strip()
    if url:
        yield TestServer(admin_url=url)
        return
    # The embedded server speaks no TLS, so no connection of the session (the tests', the
    # services' they start, their children's) asks it to: asyncpg's default
    # sslmode=prefer sends an SSLRequest first, and a connect cancelled at the wrong
    # instant of that exchange (a session torn down while its probe connection opens)
    # leaves a future whose "unexpected connection_lost() call" nobody retrieves, which
    # the test runner reports as a failure of whatever test is running.
    ours = "PGSSLMODE" not in os.environ
    os.environ.setdefault("PGSSLMODE", "disable")
    try:
        with embedded_server(tmp_dir / "pgdata", TEST_SERVER_SETTINGS, TestServer) as server:
            yield server
    finally:
        if ours:
            os.environ.pop("PGSSLMODE", None)


@contextmanager
def embedded_server(
    data_dir: Path, settings: Mapping[str, str], kind: type[ServerT]
) -> Iterator[ServerT]:
    """An embedded server started in data_dir, as a `kind` (the tests' class or the
    benchmarks'); destroyed however the block ends, so no run leaves a server behind."""
    server = EmbeddedPostgres(data_dir=data_dir, settings=dict(settings))
    server.start()
    try:
        yield kind(admin_url=server.dsn, embedded=server)
    finally:
        server.destroy()


@contextmanager
def own_cluster(
    prefix: str, settings: Mapping[str, str], bindir: Path | None = None
) -> Iterator[EmbeddedPostgres]:
    """A cluster of a test's own, not the shared test server: for what the shared one
    must not have (roles missing, a preloaded extension, another major version).  In
    a private temp dir named by prefix; destroyed after, and a failure to destroy it
    never hides the test's own result."""
    with private_data_root(prefix) as root:
        if bindir is None:
            server = EmbeddedPostgres(data_dir=root / "pgdata", settings=dict(settings))
        else:
            server = EmbeddedPostgres(
                data_dir=root / "pgdata", bindir=bindir, settings=dict(settings)
            )
        server.start()
        try:
            yield server
        finally:
            with contextlib.suppress(Exception):
                server.destroy()


def unique_name(prefix: str) -> str:
    """A database name no other test (or concurrent test run) uses."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


async def make_migrated_template(server: TestServer) -> str:
    """Create and migrate a template database; returns its name."""
    name, _ = await server.migrated_database("tr_template")
    return name


@asynccontextmanager
async def open_transaction(
    database_url: str,
    statement: str,
    *args: object,
    application_name: str | None = None,
    commit: bool = False,
) -> AsyncIterator[asyncpg.Connection]:
    """A session of its own that ran `statement` in a transaction left open (holding its
    locks, as a long application transaction would) until the block ends; then rolled
    back, or committed with `commit`."""
    settings = {} if application_name is None else {"application_name": application_name}
    holder = await asyncpg.connect(database_url, server_settings=settings)
    try:
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute(statement, *args)
        try:
            yield holder
        finally:
            await (transaction.commit() if commit else transaction.rollback())
    finally:
        await holder.close()


async def sessions_waiting_on_lock(conn: asyncpg.Connection, application_name: str) -> int:
    """How many sessions of this database with that application_name wait on a lock."""
    count: int = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = $1 AND wait_event_type = 'Lock'",
        application_name,
    )
    return count


def run_sync(coro_fn, *args):  # type: ignore[no-untyped-def]
    """Run a coroutine function from synchronous fixture code."""
    return anyio.run(coro_fn, *args)
