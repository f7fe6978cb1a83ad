"""Shared fixtures: a real PostgreSQL, a migrated template, and one database per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from listener.embedded import private_data_root
from tests.support.database import (
    TestServer,
    make_migrated_template,
    run_sync,
    test_server,
    unique_name,
)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """The listener runs on asyncio (asyncpg needs it)."""
    return "asyncio"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[TestServer]:
    """The PostgreSQL server for the whole session (TEST_DATABASE_URL or embedded)."""
    # Not under pytest's tmp_path: pytest prunes old basetemp directories and resets
    # their modes, which would pull the data directory from under a running server
    # when two sessions share a machine; and as root the server's user could not
    # enter pytest's 0700 basetemp.
    with private_data_root("token-reset-tests-") as data_root, test_server(data_root) as server:
        yield server


@pytest.fixture(scope="session")
def migrated_template(pg_server: TestServer) -> Iterator[str]:
    """A database migrated once, cloned by every test that needs a database."""
    name: str = run_sync(make_migrated_template, pg_server)
    yield name
    run_sync(pg_server.drop_database, name)


@pytest.fixture
def database_url(pg_server: TestServer, migrated_template: str) -> Iterator[str]:
    """URL of a fresh, migrated database that only this test uses."""
    name = unique_name("tr_test")
    url: str = run_sync(pg_server.create_database, name, migrated_template)
    yield url
    run_sync(pg_server.drop_database, name)


@pytest.fixture
def empty_database_url(pg_server: TestServer) -> Iterator[str]:
    """URL of a fresh database with nothing migrated (for migration tests)."""
    name = unique_name("tr_empty")
    url: str = run_sync(pg_server.create_database, name)
    yield url
    run_sync(pg_server.drop_database, name)


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to this test's database."""
    connection = await asyncpg.connect(database_url)
    try:
        yield connection
    finally:
        await connection.close()
