"""`token-reset status`: who still carries last period's usage, and how the bulk runs went.

A human table by default, `--json` for machines.  Every number comes from the
database (its clock and configured zone), so two operators in different time zones
see the same answer.  The words are the metrics' words: `stale_users` is the number
token_reset_stale_users exports (users still carrying last period's usage), and
`users_untouched_this_period` adds those last reset before this period at 0 used,
who need no reset.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any

import asyncpg

from listener.clock import iso
from listener.config import Settings
from listener.database import connect
from listener.sql import query


async def gather_status(conn: asyncpg.Connection) -> dict[str, Any]:
    """The status as plain JSON-ready data.

    The usage counters are folded first (as the watchdog does every check), so the
    summary reads one row per period even where no listener has run for a while.
    """
    with contextlib.suppress(asyncpg.InsufficientPrivilegeError):  # a reader's role: skip
        await conn.execute(query("watchdog_compact"))
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        summary = await conn.fetchrow(query("status_summary"))
        last_run = await conn.fetchrow(query("status_last_run"))
        last_success = await conn.fetchrow(query("status_last_success"))
    if summary is None:
        raise RuntimeError("status_summary returned no row")
    return {
        "checked_at": iso(summary["database_now"]),
        "period": summary["period"],
        "period_start": iso(summary["period_start"]),
        "users_total": summary["users_total"],
        "stale_users": summary["stale_users"],
        "users_untouched_this_period": summary["untouched_this_period"],
        "users_active_this_period": summary["active_this_period"],
        "users_near_limit_this_period": summary["near_limit_this_period"],
        "users_at_limit_this_period": summary["at_limit_this_period"],
        "period_resets": summary["period_resets"],
        "last_reset_at": iso(summary["last_reset_at"]),
        "last_bulk_run": _run(last_run),
        "last_successful_bulk_run": _run(last_success),
    }


async def command(settings: Settings, args: argparse.Namespace) -> int:
    """Print the status; exit 1 with one line when the database cannot answer."""
    try:
        conn = await connect(settings, role="status")
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        print(f"token-reset: error: cannot connect to the database: {exc}", file=sys.stderr)
        return 1
    try:
        status = await gather_status(conn)
    except (asyncpg.UndefinedTableError, asyncpg.UndefinedFunctionError) as exc:
        print(
            f"token-reset: error: database not migrated ({exc}): run `token-reset migrate`",
            file=sys.stderr,
        )
        return 1
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        print(f"token-reset: error: status query failed: {exc}", file=sys.stderr)
        return 1
    finally:
        await conn.close()
    if getattr(args, "json", False):
        print(json.dumps(status))
    else:
        print(render_table(status))
    return 0


def render_table(status: dict[str, Any]) -> str:
    """Two aligned columns for a terminal."""
    rows = [
        ("period", f"{status['period']} (since {status['period_start']})"),
        ("users", str(status["users_total"])),
        ("stale users", f"{status['stale_users']} still carrying last period's usage"),
        ("not yet touched this period", _untouched(status)),
        ("active this period", str(status["users_active_this_period"])),
        (
            "near their limit",
            f"{status['users_near_limit_this_period']} at 80 % or more, "
            f"{status['users_at_limit_this_period']} at 100 %",
        ),
        ("resets this period", str(status["period_resets"])),
        ("last reset", status["last_reset_at"] or "never"),
        ("last bulk run", _describe_run(status["last_bulk_run"])),
        ("last successful bulk run", _describe_run(status["last_successful_bulk_run"])),
        ("checked at", status["checked_at"]),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def _untouched(status: dict[str, Any]) -> str:
    """The untouched count, and how many of those need nothing (0 used)."""
    untouched, stale = status["users_untouched_this_period"], status["stale_users"]
    return f"{untouched} (the stale users and {untouched - stale} at 0 used: nothing to reset)"


def _describe_run(run: dict[str, Any] | None) -> str:
    if run is None:
        return "never"
    text = (
        f"{run['outcome']} ({run['source']}) started {run['started_at']}, "
        f"{run['reset_count']} reset in {run['batches']} batches, run {run['run_id']}"
    )
    if run["error"]:
        text += f": {run['error']}"
    return text


def _run(row: asyncpg.Record | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {
        "run_id": str(row["run_id"]),
        "source": row["source"],
        "outcome": row["outcome"],
        "started_at": iso(row["started_at"]),
        "finished_at": iso(row["finished_at"]),
        "reset_count": row["reset_count"],
        "batches": row["batches"],
        "error": row["error"],
    }
