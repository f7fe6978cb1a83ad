"""A real PgBouncer in front of the test server, in session or transaction pooling mode.

`running_pgbouncer` writes a pgbouncer.ini and a userlist.txt into the test's tmp
directory, starts `pgbouncer` on a free loopback port and always stops it.  Settings are
PgBouncer's stock ones (the Debian package's 1.18 here) apart from what a test passes:
no `ignore_startup_parameters`, so whatever our code sends at startup meets the same
refusal it meets in production.  Authentication is `trust`, as the test server's own is.

PgBouncer refuses to run as root; as root it is told to switch to `nobody` (its `user`
setting), after it has read its files as root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import anyio
import pytest

from listener.embedded import free_port
from tests.fault.proxy import with_address
from tests.support.waiting import wait_until

PoolMode = Literal["session", "transaction"]
# The Debian package installs the binary outside a non-root user's PATH.
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
_UNPRIVILEGED_USER = "nobody"
STOP_SECONDS = 10.0
# Warning PgBouncer logs when a server connection that no client holds receives a
# notification: the NOTIFY is dropped, which is why LISTEN cannot work in transaction mode.
DROPPED_NOTIFICATION = "got packet 'A' from server when not linked"


def pgbouncer_binary() -> str:
    """The pgbouncer executable; a missing one fails the test (never skips) with the fix."""
    found = shutil.which("pgbouncer", path=_SEARCH_PATH)
    if found is None:
        pytest.fail("`pgbouncer` not found: install it with `apt-get install -y pgbouncer`")
    return found


@dataclass
class PgBouncer:
    """One running pgbouncer: where it listens, and its log."""

    port: int
    pool_mode: PoolMode
    log_path: Path
    process: subprocess.Popen[bytes]

    def url_for(self, database_url: str) -> str:
        """`database_url` (same user and database) reached through this pgbouncer."""
        return with_address(database_url, "127.0.0.1", self.port)

    def log(self) -> str:
        """Everything pgbouncer has logged so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")


def write_config(
    directory: Path,
    database_url: str,
    *,
    port: int,
    pool_mode: PoolMode,
    users: tuple[str, ...],
    settings: Mapping[str, str],
) -> Path:
    """pgbouncer.ini and userlist.txt in `directory`; returns the ini's path."""
    server = urlsplit(database_url)
    userlist = directory / "userlist.txt"
    # auth_type=trust still wants every user listed in the auth_file.
    userlist.write_text("".join(f'"{user}" ""\n' for user in users), encoding="utf-8")
    lines = [
        "[databases]",
        f"* = host={server.hostname or '127.0.0.1'} port={server.port or 5432}",
        "",
        "[pgbouncer]",
        "listen_addr = 127.0.0.1",
        f"listen_port = {port}",
        "unix_socket_dir =",
        "auth_type = trust",
        f"auth_file = {userlist}",
        f"pool_mode = {pool_mode}",
        # Log to stderr (a file the test owns); no pidfile, it runs in the foreground.
        "logfile =",
        "pidfile =",
    ]
    if os.geteuid() == 0:
        lines.append(f"user = {_UNPRIVILEGED_USER}")
    lines += [f"{key} = {value}" for key, value in settings.items()]
    ini = directory / "pgbouncer.ini"
    ini.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return ini


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def start_pgbouncer(
    database_url: str,
    directory: Path,
    *,
    pool_mode: PoolMode,
    users: tuple[str, ...],
    settings: Mapping[str, str],
) -> PgBouncer:
    """Write the configuration and spawn pgbouncer (not yet known to accept connections)."""
    directory.mkdir(parents=True, exist_ok=True)
    login = urlsplit(database_url).username or "postgres"
    port = free_port()
    ini = write_config(
        directory,
        database_url,
        port=port,
        pool_mode=pool_mode,
        users=tuple(dict.fromkeys((login, *users))),
        settings=settings,
    )
    log_path = directory / "pgbouncer.log"
    with log_path.open("wb") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(
            [pgbouncer_binary(), str(ini)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    return PgBouncer(port=port, pool_mode=pool_mode, log_path=log_path, process=process)


def stop(bouncer: PgBouncer) -> None:
    """SIGTERM (PgBouncer's immediate shutdown), SIGKILL if it lingers."""
    bouncer.process.terminate()
    try:
        bouncer.process.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        bouncer.process.kill()
        bouncer.process.wait(timeout=STOP_SECONDS)


@asynccontextmanager
async def running_pgbouncer(
    database_url: str,
    directory: Path,
    *,
    pool_mode: PoolMode,
    users: tuple[str, ...] = (),
    **settings: str,
) -> AsyncIterator[PgBouncer]:
    """A pgbouncer in front of `database_url`'s server, accepting; always stopped on exit."""
    bouncer = start_pgbouncer(
        database_url, directory, pool_mode=pool_mode, users=users, settings=settings
    )
    try:

        def up() -> bool:
            code = bouncer.process.poll()
            if code is not None:
                raise AssertionError(f"pgbouncer exited with {code}:\n{bouncer.log()}")
            return _accepts(bouncer.port)

        await wait_until(up, deadline=15, interval=0.02, what="pgbouncer to accept connections")
        yield bouncer
    finally:
        await anyio.to_thread.run_sync(stop, bouncer)
