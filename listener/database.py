"""Opening connections the same way everywhere: DATABASE_URL, else libpq's PG* variables."""

from __future__ import annotations

from typing import Any

import asyncpg

from listener.config import Settings

APPLICATION_NAME = "token-reset"


async def connect(settings: Settings, *, role: str = "cli", **kwargs: Any) -> asyncpg.Connection:
    """One connection, tagged in pg_stat_activity so an operator can tell ours apart."""
    server_settings = {"application_name": f"{APPLICATION_NAME}:{role}"}
    server_settings.update(kwargs.pop("server_settings", {}))
    conn: asyncpg.Connection = await asyncpg.connect(
        settings.database_url, server_settings=server_settings, **kwargs
    )
    return conn
