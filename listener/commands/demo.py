"""`token-reset demo`: the rollover story of listener.demo, told from the command line."""

from __future__ import annotations

import argparse
import contextlib
import sys

import anyio

from listener.config import Settings
from listener.demo.run import MAX_USERS, Demo, choose_data_dir, quiet_terminal, say
from listener.embedded import EmbeddedPostgresError


async def command(settings: Settings, args: argparse.Namespace) -> int:
    """`token-reset demo`: tell the rollover story; --once exits 0 after the summary."""
    if not 1 <= int(args.users) <= MAX_USERS:
        print(f"token-reset demo: error: --users must be 1..{MAX_USERS}", file=sys.stderr)
        return 2
    if settings.database_url is not None:
        say("ignoring DATABASE_URL: the demo always runs its own embedded PostgreSQL")
    quiet_terminal(settings, args)
    with contextlib.ExitStack() as stack:
        try:
            data_dir = choose_data_dir(args.data_dir, stack)
        except EmbeddedPostgresError as exc:
            print(f"token-reset demo: error: {exc}", file=sys.stderr, flush=True)
            return 2
        demo = Demo(settings, args, data_dir)
        async with anyio.create_task_group() as group:
            await group.start(demo.watch_signals)
            code = await demo.run()
            group.cancel_scope.cancel()
    return code
