"""An embedded PostgreSQL the command owns: for `demo`, `--embedded` and the test suite.

The server binaries come from the PyPI package ``pgserver`` (a PostgreSQL 16 build in a
wheel), so a machine with only Python gets a real server with no system install.  We
drive initdb/pg_ctl ourselves rather than through pgserver's API because we want TCP on
a port we choose (the fault tests put a proxy in front of it) and a restart the tests
control.

PostgreSQL refuses to run as root, so as root the server runs as another user: the
owner of an existing data directory, else an existing `tokenreset` or `postgres` user,
else a `tokenreset` system user created for it (logged, naming it).  That user must be
able to enter every directory above the data directory.  We never change the mode of
a directory we did not create (a 0700 home directory stays 0700): when one is in the
way, we stop with one line saying what to do.  `private_data_root()` gives callers
whose data is throwaway (the demo, the tests, the benchmarks) a place that works: a
fresh 0700 directory under the temp directory, owned by the server user.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

SYSTEM_USER = "tokenreset"
# Users that may already exist to run PostgreSQL, in order of preference: ours, then
# the distribution's.  Reusing one adds nothing to the host.
EXISTING_SERVER_USERS = (SYSTEM_USER, "postgres")
DEFAULT_DATA_DIR = Path(".token-reset") / "pgdata"
_START_TIMEOUT_SECONDS = 60


class EmbeddedPostgresError(RuntimeError):
    """The embedded server could not be found, initialised or started."""


class VersionMismatch(EmbeddedPostgresError):
    """The data directory was initialised by another major version than the binaries."""

    def __init__(self, data_dir: Path, data_version: str, binaries_version: str) -> None:
        self.data_dir = data_dir
        self.data_version = data_version
        self.binaries_version = binaries_version
        super().__init__(
            f"{data_dir} holds a PostgreSQL {data_version} cluster but the embedded "
            f"binaries are PostgreSQL {binaries_version}; it was left untouched: pass "
            f"another --data-dir for a new cluster, set TOKEN_RESET_PG_BINDIR to "
            f"PostgreSQL {data_version}'s bin directory to use it, or upgrade it with "
            f"pg_upgrade"
        )


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


@dataclass(frozen=True)
class ServerUser:
    """The user the server runs as when we are root; `uid` None: not created yet."""

    name: str
    uid: int | None = None
    gids: frozenset[int] = frozenset()

    @classmethod
    def existing(cls, entry: pwd.struct_passwd) -> ServerUser:
        """From a passwd entry, with every group the user is in."""
        groups = os.getgrouplist(entry.pw_name, entry.pw_gid)
        return cls(entry.pw_name, entry.pw_uid, frozenset(groups))

    def can_enter(self, directory: Path) -> bool:
        """Search (x) permission on directory by its mode bits, as the kernel decides it."""
        info = directory.stat()
        if self.uid is not None and info.st_uid == self.uid:
            bit = stat.S_IXUSR
        elif info.st_gid in self.gids:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        return bool(info.st_mode & bit)


def choose_server_user(data_dir: Path) -> ServerUser | None:
    """None when we may run postgres ourselves; else who runs it (nothing is created here).

    An existing cluster must be run by its owner, so its owner wins; otherwise an
    existing user from EXISTING_SERVER_USERS; otherwise SYSTEM_USER, to be created.
    """
    if os.geteuid() != 0:
        return None
    with contextlib.suppress(OSError, KeyError):
        owner = data_dir.stat().st_uid
        if owner != 0:
            return ServerUser.existing(pwd.getpwuid(owner))
    for name in EXISTING_SERVER_USERS:
        with contextlib.suppress(KeyError):
            return ServerUser.existing(pwd.getpwnam(name))
    return ServerUser(SYSTEM_USER)


def blocking_directory(data_dir: Path, user: ServerUser | None) -> Path | None:
    """The first existing directory above data_dir that `user` cannot enter, if any."""
    if user is None:
        return None
    for parent in reversed(data_dir.resolve().parents):
        if not parent.is_dir():
            return None  # we create the rest ourselves
        if not user.can_enter(parent):
            return parent
    return None


def unreachable_message(data_dir: Path, user: ServerUser, blocked: Path) -> str:
    """One line: who cannot enter what, and the two ways out."""
    return (
        f"the embedded PostgreSQL runs as user {user.name} (PostgreSQL refuses to run as "
        f"root), who cannot enter {blocked} (mode {stat.S_IMODE(blocked.stat().st_mode):04o}) "
        f"above {data_dir}; nothing was changed: pass --data-dir in a directory {user.name} "
        f"can enter (e.g. under /var/tmp), or allow it yourself (chmod o+x {blocked})"
    )


def _ensure_user(user: ServerUser) -> str:
    """Create the system user if it does not exist yet; says so in one line."""
    if user.uid is None:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/bin/false", user.name],
            check=True,
            capture_output=True,
        )
        log.warning(
            "embedded_user_created",
            user=user.name,
            reason="PostgreSQL refuses to run as root; remove with `userdel " + user.name + "`",
        )
    return user.name


@contextlib.contextmanager
def private_data_root(prefix: str = "token-reset-") -> Iterator[Path]:
    """A fresh directory for throwaway data directories; removed (with them) on exit.

    mkdtemp makes it 0700 under the temp directory; as root it is handed to the server
    user, so the server can reach a data directory inside it and nobody else can.
    """
    root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        user = choose_server_user(root / "pgdata")
        if user is not None:
            blocked = blocking_directory(root, user)
            if blocked is not None:
                raise EmbeddedPostgresError(unreachable_message(root, user, blocked))
            name = _ensure_user(user)
            shutil.chown(root, name, name)  # ours: we just made it
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


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
        self._user: str | None = None

    def server_user(self) -> str | None:
        """Who runs the server (None: we do); checks it can reach data_dir, creates it once.

        Raises EmbeddedPostgresError, before anything is created, when a directory above
        data_dir is closed to that user: we never open it ourselves.
        """
        if self._user is not None:
            return self._user
        user = choose_server_user(self.data_dir)
        if user is None:
            return None
        blocked = blocking_directory(self.data_dir, user)
        if blocked is not None:
            raise EmbeddedPostgresError(unreachable_message(self.data_dir, user, blocked))
        self._user = _ensure_user(user)
        return self._user

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
        user = self.server_user()
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

    def binaries_version(self) -> str:
        """The binaries' major version as PG_VERSION spells it ("16"; "9.6" before 10)."""
        try:
            out = subprocess.run(
                [str(self.bindir / "postgres"), "--version"],
                check=True,
                capture_output=True,
                text=True,
                timeout=_START_TIMEOUT_SECONDS,
            ).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            raise EmbeddedPostgresError(f"cannot run {self.bindir / 'postgres'}: {exc}") from None
        found = re.search(r"\(PostgreSQL\) (\d+)(?:\.(\d+))?", out)
        if found is None:
            raise EmbeddedPostgresError(f"unexpected `postgres --version` output: {out.strip()}")
        major, minor = found.groups()
        return major if int(major) >= 10 else f"{major}.{minor}"

    def check_version(self) -> None:
        """Raise VersionMismatch when data_dir's cluster is of another major version.

        PostgreSQL would refuse to start it anyway, but only in its own log, after
        which pg_ctl reports a missing PID file; this says what happened first.
        A server already running on data_dir is adopted whatever its version.
        """
        try:
            data_version = (self.data_dir / "PG_VERSION").read_text().strip()
        except FileNotFoundError:
            return
        if self.running_port() is not None:
            return
        binaries_version = self.binaries_version()
        if data_version != binaries_version:
            raise VersionMismatch(self.data_dir, data_version, binaries_version)

    def init(self) -> bool:
        """Create the cluster if missing; returns True when it created one."""
        if self.initialised():
            return False
        user = self.server_user()
        created = self._make_data_dir(user)
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
        log.info(
            "embedded_cluster_created",
            data_dir=str(self.data_dir),
            created_directories=[str(path) for path in created],
            owner=user or pwd.getpwuid(os.geteuid()).pw_name,
        )
        return True

    def _make_data_dir(self, user: str | None) -> list[Path]:
        """Create data_dir (and missing parents) for the server user; returns what we made.

        Only directories made here get a mode or an owner: parents 0755 whatever the
        umask (the server user must enter them), the data directory 0700 and owned by
        the server user.  An existing data directory must already belong to it.
        """
        missing = [p for p in (self.data_dir, *self.data_dir.parents) if not p.exists()]
        for path in reversed(missing):
            path.mkdir()
            path.chmod(0o755 if path != self.data_dir else 0o700)
        if user is not None:
            if self.data_dir in missing:
                shutil.chown(self.data_dir, user, user)
            elif self.data_dir.stat().st_uid != pwd.getpwnam(user).pw_uid:
                raise EmbeddedPostgresError(
                    f"{self.data_dir} exists but does not belong to {user}, who runs the "
                    f"embedded PostgreSQL; nothing was changed: pass a --data-dir that does "
                    f"not exist yet, or `chown {user} {self.data_dir}` yourself"
                )
        return list(reversed(missing))

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
        self.server_user()  # reachable? before anything is created or started
        self.init()
        existing = self.running_port()
        if existing is not None:
            self.port = existing
            return self
        self.check_version()
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
