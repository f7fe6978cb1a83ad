"""An embedded PostgreSQL the command owns: for `demo`, `--embedded` and the test suite.

The server binaries come from the PyPI package ``pgserver`` (a PostgreSQL 16 build in a
wheel), so a machine with only Python gets a real server with no system install.  We
drive initdb/pg_ctl ourselves rather than through pgserver's API because we want TCP on
a port we choose (the fault tests put a proxy in front of it) and a restart the tests
control.  PostgreSQL refuses to run as root, so as root the server runs as a dedicated
system user.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

SYSTEM_USER = "tokenreset"
DEFAULT_DATA_DIR = Path(".token-reset") / "pgdata"
_START_TIMEOUT_SECONDS = 60


class EmbeddedPostgresError(RuntimeError):
    """The embedded server could not be found, initialised or started."""


def find_bindir() -> Path:
    """Where initdb and pg_ctl live: $TOKEN_RESET_PG_BINDIR, pgserver's wheel, or PATH."""
    override = os.environ.get("TOKEN_RESET_PG_BINDIR")
    if override:
        return Path(override)
    # find_spec does not import pgserver (whose import has side effects we avoid).
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "pginstall" / "bin"
            if (candidate / "initdb").exists():
                return candidate
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    raise EmbeddedPostgresError(
        "no PostgreSQL binaries found: `pip install 'monthly-token-reset[embedded]'` "
        "(package pgserver) or put initdb/pg_ctl on PATH"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _system_user() -> str | None:
    """None when we may run postgres ourselves; a dedicated user when we are root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/bin/false", SYSTEM_USER],
            check=True,
            capture_output=True,
        )
    return SYSTEM_USER


def _let_user_traverse(path: Path) -> None:
    """Give others search (x) permission on every ancestor, so the server user reaches path."""
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH | stat.S_IXGRP)


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL cluster in data_dir, listening on 127.0.0.1:port only (no unix socket)."""

    data_dir: Path
    port: int = 0
    settings: Mapping[str, str] = field(default_factory=dict)
    bindir: Path = field(default_factory=find_bindir)

    def __post_init__(self) -> None:
        # The server tools run with cwd "/" (the server user may not read ours).
        self.data_dir = self.data_dir.resolve()

    @property
    def dsn(self) -> str:
        """Connection URL of the maintenance database."""
        return self.dsn_for("postgres")

    def dsn_for(self, database: str) -> str:
        """Connection URL of one database on this server."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    @property
    def log_file(self) -> Path:
        """The server's own log, kept beside the data for post-mortems."""
        return self.data_dir / "server.log"

    def _run(self, tool: str, *args: str, timeout: float = _START_TIMEOUT_SECONDS) -> str:
        user = _system_user()
        try:
            done = subprocess.run(
                [str(self.bindir / tool), *args],
                check=True,
                capture_output=True,
                text=True,
                timeout=timeout,
                user=user,
                cwd="/",
            )
        except subprocess.CalledProcessError as exc:
            raise EmbeddedPostgresError(
                f"{tool} failed ({exc.returncode}): {exc.stderr.strip() or exc.stdout.strip()}"
                + self._log_tail()
            ) from None
        return done.stdout

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            lines = self.log_file.read_text(errors="replace").splitlines()[-15:]
            return "\nserver log:\n" + "\n".join(lines)
        return ""

    def initialised(self) -> bool:
        """True when data_dir already holds a cluster."""
        return (self.data_dir / "PG_VERSION").exists()

    def init(self) -> bool:
        """Create the cluster if missing; returns True when it created one."""
        if self.initialised():
            return False
        self.data_dir.mkdir(parents=True, exist_ok=True)
        user = _system_user()
        if user is not None:
            _let_user_traverse(self.data_dir)
            shutil.chown(self.data_dir, user, user)
        self.data_dir.chmod(0o700)
        self._run(
            "initdb",
            "-D",
            str(self.data_dir),
            "--auth=trust",
            "--username=postgres",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )
        return True

    def running_port(self) -> int | None:
        """The port of a server already running on data_dir, if any."""
        pid_file = self.data_dir / "postmaster.pid"
        try:
            lines = pid_file.read_text().splitlines()
            pid, port = int(lines[0]), int(lines[3])
        except (OSError, ValueError, IndexError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            # Alive, but owned by another user (the dedicated server user): running.
            return port
        return port

    def start(self) -> EmbeddedPostgres:
        """Initialise if needed and start, or adopt a server already running here."""
        self.init()
        existing = self.running_port()
        if existing is not None:
            self.port = existing
            return self
        if not self.port:
            self.port = free_port()
        options = [f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories=''"]
        options += [f"-c {key}={value}" for key, value in self.settings.items()]
        self._run(
            "pg_ctl",
            "start",
            "-D",
            str(self.data_dir),
            "-w",
            "-t",
            str(_START_TIMEOUT_SECONDS),
            "-l",
            str(self.log_file),
            "-o",
            " ".join(options),
        )
        self._wait_accepting()
        return self

    def _wait_accepting(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1),
            ):
                return
            time.sleep(0.05)
        raise EmbeddedPostgresError(f"postgres did not accept connections{self._log_tail()}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server if it runs; safe to call twice."""
        if self.running_port() is None:
            return
        self._run("pg_ctl", "stop", "-D", str(self.data_dir), "-m", mode, "-w")

    def restart(self) -> None:
        """Stop and start on the same port: every client connection is cut."""
        self.stop()
        self.start()

    def destroy(self) -> None:
        """Stop and delete the data directory."""
        self.stop("immediate")
        shutil.rmtree(self.data_dir, ignore_errors=True)


@contextlib.contextmanager
def embedded_postgres(
    data_dir: Path, *, keep: bool = True, settings: Mapping[str, str] | None = None
) -> Iterator[EmbeddedPostgres]:
    """Run a server for the duration of the block; stop it (and delete it unless keep)."""
    server = EmbeddedPostgres(data_dir=data_dir, settings=dict(settings or {}))
    already_running = server.initialised() and server.running_port() is not None
    server.start()
    try:
        yield server
    finally:
        if not keep:
            server.destroy()
        elif not already_running:
            server.stop()
