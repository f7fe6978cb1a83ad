"""`token-reset migrate`: apply sql/ and say what was done."""

from __future__ import annotations

import argparse
import json
import sys

import asyncpg

from listener.config import Settings
from listener.database import connect
from listener.migrate import MigrationError, apply_migrations


async def command(settings: Settings, args: argparse.Namespace) -> int:
    """Migrate and print one JSON line: versions applied and the version now current."""
    try:
        conn = await connect(settings, role="migrate")
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"token-reset: error: cannot connect to the database: {exc}", file=sys.stderr)
        return 1
    try:
        report = await apply_migrations(
            conn,
            target=getattr(args, "target", None),
            lock_timeout_seconds=settings.migrate_lock_timeout_seconds,
        )
    except MigrationError as exc:
        print(f"token-reset: error: {exc}", file=sys.stderr)
        return 1
    finally:
        await conn.close()
    print(
        json.dumps(
            {
                "success": True,
                "applied": list(report.applied),
                "current_version": report.current_version,
                "missing_roles": list(report.missing_roles),
            }
        )
    )
    return 0
