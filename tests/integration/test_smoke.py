"""The harness itself: a migrated database per test."""

import asyncpg
import pytest

pytestmark = pytest.mark.anyio


async def test_each_test_gets_a_migrated_database(conn: asyncpg.Connection) -> None:
    """The contract's tables exist and are empty."""
    assert await conn.fetchval("SELECT count(*) FROM user_tokens") == 0
