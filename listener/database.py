"""Opening connections the same way everywhere: DATABASE_URL, else libpq's PG* variables.

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

from typing import Any

import asyncpg

from listener.config import Settings

APPLICATION_NAME = "token-reset"


async def connect(settings: Settings, *, role: str = "cli", **kwargs: Any) -> asyncpg.Connection:
    """One connection, tagged in pg_stat_activity so an operator can tell ours apart."""
    if "server_settings" in kwargs:
        raise TypeError(
            "startup parameters other than application_name are refused by PgBouncer: "
            "apply the setting with SET LOCAL after connecting"
        )
    kwargs.setdefault("statement_cache_size", 0)
    conn: asyncpg.Connection = await asyncpg.connect(
        settings.database_url,
        server_settings={"application_name": f"{APPLICATION_NAME}:{role}"},
        **kwargs,
    )
    return conn
