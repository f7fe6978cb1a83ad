"""Opening connections the same way everywhere: DATABASE_URL, else libpq's PG* variables.

Every connection of every command goes through `connect`, which owns the one default
connect timeout: a server that accepts TCP and never answers (a half-dead host, a
wrong port on a proxy) costs DEFAULT_CONNECT_TIMEOUT_SECONDS, not asyncpg's 60 s,
and the error says where it waited (host:port, never the URL with its password).

Every connection may go through PgBouncer, so two rules hold for all of them:

* **No startup parameters but application_name.**  PgBouncer refuses a client whose
  startup packet carries any parameter it does not track ("unsupported startup
  parameter"), in every pool mode.  A setting a connection needs is applied after
  connecting: ``SET LOCAL`` inside the transaction that needs it (or
  ``set_config(..., true)`` inside the one statement that needs it), never a session
  ``SET`` that a transaction-mode pool would leak to other clients.
* **No named prepared statements** (``statement_cache_size=0``).  Before PgBouncer
  1.21 a transaction-mode pool executes a statement prepared on one server
  connection on another ("prepared statement __asyncpg_stmt_N__ does not exist").
  With the cache off asyncpg sends Parse, Describe, Bind and Execute of the unnamed
  statement before a single Sync, which PgBouncer never splits.  The cost is one
  round trip per query, which no path of ours notices.
"""

from __future__ import annotations

import os
from typing import Any, Final

import asyncpg

from listener.config import Settings
from listener.dsn import DEFAULT_PORT, hosts

APPLICATION_NAME = "token-reset"
# Callers may pass another `timeout` (a cleanup path that must be quick, say).
DEFAULT_CONNECT_TIMEOUT_SECONDS: Final = 10.0


class ConnectTimeout(TimeoutError):
    """No connection within the timeout; the message names host:port, is one line."""


async def connect(
    settings: Settings,
    *,
    role: str = "cli",
    timeout: float = DEFAULT_CONNECT_TIMEOUT_SECONDS,  # noqa: ASYNC109  # asyncpg's own keyword
    **kwargs: Any,
) -> asyncpg.Connection:
    """One connection, tagged in pg_stat_activity so an operator can tell ours apart."""
    if "server_settings" in kwargs:
        raise TypeError(
            "startup parameters other than application_name are refused by PgBouncer: "
            "apply the setting with SET LOCAL after connecting"
        )
    kwargs.setdefault("statement_cache_size", 0)
    try:
        conn: asyncpg.Connection = await asyncpg.connect(
            settings.database_url,
            server_settings={"application_name": f"{APPLICATION_NAME}:{role}"},
            timeout=timeout,
            **kwargs,
        )
    except TimeoutError:
        # str(TimeoutError()) is empty: the operator would read "cannot connect: ".
        raise ConnectTimeout(
            f"connecting to {where(settings)} timed out after {timeout:g} s"
        ) from None
    return conn


def where(settings: Settings) -> str:
    """host:port of the configured server(s), for messages; no credentials."""
    if settings.database_url is not None:
        named = hosts(settings.database_url)
        if named:
            return ", ".join(named)
    host = os.environ.get("PGHOST", "").strip()
    port = os.environ.get("PGPORT", "").strip() or str(DEFAULT_PORT)
    return f"{host}:{port}" if host else "the default PostgreSQL server (PGHOST unset)"


class KeptConnection:
    """A periodic task's own connection: opened when needed, kept between checks, and
    dropped on any trouble so the next check starts on a fresh one.

    Dropped with terminate(), never close(): a dead socket can make close() hang.
    """

    def __init__(self, settings: Settings, role: str, *, timeout_seconds: float) -> None:
        self.settings = settings
        self.role = role
        # Both the connect timeout and every statement's.
        self.timeout_seconds = timeout_seconds
        self._conn: asyncpg.Connection | None = None

    async def get(self) -> asyncpg.Connection:
        """The kept connection, opened first if there is none (or it was closed)."""
        if self._conn is None or self._conn.is_closed():
            self._conn = await connect(
                self.settings,
                role=self.role,
                timeout=self.timeout_seconds,
                command_timeout=self.timeout_seconds,
            )
        return self._conn

    def drop(self) -> None:
        """Forget the connection (the next `get` opens another)."""
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None
