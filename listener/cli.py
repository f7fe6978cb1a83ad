"""The `token-reset` command line: listen, migrate, reset, status, notify, demo.

Configuration comes from the environment (see listener.config); flags override it.
Each subcommand's work lives in its own module, listener/commands/<verb>.py, as
``async def command(settings, args)`` (the table COMMANDS); this module only parses,
sets up logging, owns the optional embedded server, and turns configuration errors
into one clear line and a non-zero exit.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NoReturn, cast

import anyio

from listener import __version__
from listener.config import (
    LOG_FORMATS,
    ConfigError,
    Settings,
    batch_size,
    database_url,
    flag,
    http_port,
    log_level,
)
from listener.dsn import redact_dsn
from listener.embedded import DEFAULT_DATA_DIR, EmbeddedPostgresError, embedded_postgres
from listener.logs import configure_logging

CommandFn = Callable[[Settings, argparse.Namespace], Awaitable[int]]


@dataclass(frozen=True)
class Command:
    """How the CLI runs one verb; its work lives in listener/commands/<verb>.py."""

    # Refuses to run without a configured database (no silent fallback).
    needs_database: bool
    # The service and the demo log to stdout; one-shot commands print their result
    # there, so their logs go to stderr and a script can parse the result.
    logs_to_stdout: bool = False

    def module(self, verb: str) -> str:
        """The module holding the verb's `command` coroutine (imported only when run)."""
        return f"listener.commands.{verb}"


COMMANDS: Final[Mapping[str, Command]] = {
    "listen": Command(needs_database=True, logs_to_stdout=True),
    "migrate": Command(needs_database=True),
    "reset": Command(needs_database=True),
    "status": Command(needs_database=True),
    "notify": Command(needs_database=False),
    "demo": Command(needs_database=False, logs_to_stdout=True),
}


class _Parser(argparse.ArgumentParser):
    """argparse, keeping the one-line promise: a bad flag is one line and exit 2."""

    def error(self, message: str) -> NoReturn:
        # "argument --x: --x must be ..." (our validators name the flag) -> "--x must be ..."
        message = re.sub(r"^argument (\S+): \1 ", r"\1 ", message)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """All subcommands and their flags."""
    parser = _Parser(
        prog="token-reset",
        description="Monthly token allowances that reset for every user, with alerts.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser, *, embedded: bool = True) -> None:
        p.add_argument(
            "--database-url",
            type=flag(database_url, "--database-url"),
            help="PostgreSQL URL (default: $DATABASE_URL / PG*)",
        )
        p.add_argument("--log-format", choices=LOG_FORMATS, help="default: $LOG_FORMAT")
        p.add_argument(
            "--log-level", type=flag(log_level, "--log-level"), help="default: $LOG_LEVEL or INFO"
        )
        if embedded:
            p.add_argument(
                "--embedded",
                action="store_true",
                help="start a local PostgreSQL this command owns (pip package pgserver)",
            )
            p.add_argument(
                "--data-dir",
                type=Path,
                default=DEFAULT_DATA_DIR,
                help=f"embedded server's data directory (default {DEFAULT_DATA_DIR})",
            )

    listen = sub.add_parser(
        "listen", help="run the service: notifications -> logs, metrics, alerts"
    )
    common(listen)
    listen.add_argument("--http-host", help="default: $HTTP_HOST or 127.0.0.1")
    listen.add_argument(
        "--http-port", type=flag(http_port, "--http-port"), help="default: $HTTP_PORT or 8080"
    )
    listen.add_argument("--no-schedule", action="store_true", help="turn the built-in schedule off")

    migrate = sub.add_parser("migrate", help="apply sql/ migrations (idempotent, concurrency-safe)")
    common(migrate)
    migrate.add_argument("--target", type=int, help="stop at this migration version")

    reset = sub.add_parser("reset", help="run the bulk backup reset now (for cron)")
    common(reset)
    reset.add_argument(
        "--batch-size",
        type=flag(batch_size, "--batch-size"),
        help="rows per transaction (default: $BULK_BATCH_SIZE or 10000)",
    )

    status = sub.add_parser("status", help="who still needs a reset, last runs")
    common(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")

    notify = sub.add_parser("notify", help="check NOTICE_URLS: send a test message to each")
    common(notify, embedded=False)
    notify.add_argument(
        "--test", action="store_true", required=True, help="send a sample rollover notice"
    )

    demo = sub.add_parser("demo", help="embedded Postgres + listener + a simulated month rollover")
    common(demo, embedded=False)
    demo.add_argument(
        "--data-dir",
        type=Path,
        help="throwaway data directory (default .token-reset/demo-pgdata, or a private "
        "temporary one when the server user cannot reach that)",
    )
    demo.add_argument(
        "--http-port", type=flag(http_port, "--http-port"), help="default: a free port"
    )
    demo.add_argument("--users", type=int, default=300, help="users to create (default 300)")
    demo.add_argument("--once", action="store_true", help="exit 0 after the summary")
    demo.add_argument("--json-summary", type=Path, help="write the scraped time series here")
    return parser


def settings_from(args: argparse.Namespace, env: dict[str, str] | None = None) -> Settings:
    """Environment first, then flags (already validated by their argparse types)."""
    settings = Settings.from_env(os.environ if env is None else env)
    return settings.with_overrides(
        database_url=getattr(args, "database_url", None),
        log_format=getattr(args, "log_format", None),
        log_level=getattr(args, "log_level", None),
        http_host=getattr(args, "http_host", None),
        http_port=getattr(args, "http_port", None),
        reset_schedule="off" if getattr(args, "no_schedule", False) else None,
        bulk_batch_size=getattr(args, "batch_size", None),
    )


@contextlib.contextmanager
def _maybe_embedded(args: argparse.Namespace, settings: Settings) -> Iterator[Settings]:
    if not getattr(args, "embedded", False):
        yield settings
        return
    with embedded_postgres(args.data_dir) as server:
        print(
            f"token-reset: embedded PostgreSQL at {redact_dsn(server.dsn)} (data: {args.data_dir})",
            file=sys.stderr,
        )
        yield settings.with_overrides(database_url=server.dsn)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    spec = COMMANDS[args.command]
    try:
        settings = settings_from(args)
        if spec.needs_database and not getattr(args, "embedded", False):
            settings.require_database()
        if args.command == "listen":
            settings.validate_cron_secret()
    except ConfigError as exc:
        print(f"token-reset: error: {exc}", file=sys.stderr)
        return 2
    log_stream = sys.stdout if spec.logs_to_stdout else sys.stderr
    configure_logging(settings.log_format, settings.log_level, stream=log_stream)
    module = importlib.import_module(spec.module(args.command))
    command = cast(CommandFn, module.command)
    try:
        with _maybe_embedded(args, settings) as effective:
            return anyio.run(command, effective, args)
    except (ConfigError, EmbeddedPostgresError) as exc:
        print(f"token-reset: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
