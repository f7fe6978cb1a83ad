"""Login roles for privilege tests: what a deployment's app and listener connect as."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg


@asynccontextmanager
async def login_role(
    conn: asyncpg.Connection, database_url: str, member_of: str | None
) -> AsyncIterator[str]:
    """A login role (optionally a member of `member_of`) and a URL to connect as it."""
    name = f"tr_login_{uuid.uuid4().hex[:10]}"
    await conn.execute(f"CREATE ROLE {name} LOGIN")
    if member_of is not None:
        await conn.execute(f"GRANT {member_of} TO {name}")
    url = database_url.replace("://postgres@", f"://{name}@", 1)
    assert url != database_url, "the test server's URL names the postgres superuser"
    try:
        yield url
    finally:
        await conn.execute(f"DROP OWNED BY {name}")
        await conn.execute(f"DROP ROLE {name}")
