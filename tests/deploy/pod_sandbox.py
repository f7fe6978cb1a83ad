"""Run a command locked down the way the Kubernetes manifests lock down their pods.

    python -m tests.deploy.pod_sandbox --uid 10001 --gid 10001 \
        [--expose PATH --stash DIR] [--must-be-read-only DIR ...] [--workdir DIR] \
        -- COMMAND [ARG ...]

In a mount namespace of its own: every mount read-only (readOnlyRootFilesystem; no
emptyDir either, so stricter than the pod), then the uid and gid given with no
supplementary groups (runAsUser, runAsGroup), so no capabilities remain
(capabilities: drop ALL), and no_new_privs set (allowPrivilegeEscalation: false);
then it checks all of that took effect and execs COMMAND with its environment.
It needs root (to make the namespace), as the test that uses it checks first.  The
network is the host's: the command reaches the test's database on the loopback.

The image's Python and venv are world-readable (/usr/local, /opt/venv); a developer's
may sit below a 0700 home (pyenv under /root).  `--expose PATH` makes just the way
to PATH passable for the uid inside the namespace: each closed directory on it is
covered by an empty tmpfs holding only the next directory of the path, bound back
from a stash under DIR.  Nothing else of that home shows, and nothing on the host
changes.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import sys
from collections.abc import Sequence
from pathlib import Path

CLONE_NEWNS = 0x00020000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x00000001
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (Linux 5.12+)
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39


class _MountAttr(ctypes.Structure):
    _fields_ = [  # ctypes' own declaration
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def _closed_ancestor(path: Path) -> Path | None:
    """The outermost directory above path that others may not pass (no o+x)."""
    for ancestor in reversed(path.parents):
        if not ancestor.stat().st_mode & 0o001:
            return ancestor
    return None


def _expose(libc: ctypes.CDLL, paths: Sequence[Path], stash: Path) -> None:
    """Cover each closed directory on the way to paths with a tmpfs showing only that way."""
    for _ in range(32):  # nested closed directories are opened outermost first
        closed = {a for p in paths if (a := _closed_ancestor(p)) is not None}
        if not closed:
            return
        ancestor = min(closed, key=lambda a: len(a.parts))
        children = sorted(
            {p.relative_to(ancestor).parts[0] for p in paths if ancestor in p.parents}
        )
        staged = []
        for child in children:
            place = stash / f"{len(list(stash.iterdir()))}"
            place.mkdir()
            source = bytes(ancestor / child)
            _check(libc.mount(source, bytes(place), None, MS_BIND | MS_REC, None), "bind")
            staged.append((child, place))
        _check(libc.mount(b"tmpfs", bytes(ancestor), b"tmpfs", 0, b"mode=0755"), "tmpfs")
        for child, place in staged:
            (ancestor / child).mkdir()
            _check(
                libc.mount(bytes(place), bytes(ancestor / child), None, MS_BIND | MS_REC, None),
                "bind",
            )
    raise SystemExit("pod_sandbox: too many closed directories to expose")


def lock_down(uid: int, gid: int, expose: Sequence[Path] = (), stash: Path | None = None) -> None:
    """Read-only mounts in a private namespace, then an unprivileged identity."""
    libc = ctypes.CDLL(None, use_errno=True)
    _check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    # Nothing done below may propagate back to the host's mounts.
    _check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
    if expose:
        assert stash is not None, "--expose needs --stash"
        _expose(libc, [p.resolve() for p in expose], stash)
    attr = _MountAttr(attr_set=MOUNT_ATTR_RDONLY)
    _check(
        libc.syscall(
            ctypes.c_long(SYS_MOUNT_SETATTR),
            ctypes.c_int(AT_FDCWD),
            ctypes.c_char_p(b"/"),
            ctypes.c_uint(AT_RECURSIVE),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        ),
        "mount_setattr(/, AT_RECURSIVE, MOUNT_ATTR_RDONLY)",
    )
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)  # from root to a non-zero uid: every capability goes
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


def verify(uid: int, gid: int, read_only: Sequence[Path]) -> None:
    """Fail loudly unless the lock-down is in force (a sandbox that did nothing proves nothing)."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    problems = []
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid) or os.getgroups():
        problems.append(f"identity {os.getresuid()} {os.getresgid()} {os.getgroups()}")
    for field in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        if int(status[field].strip(), 16) != 0:
            problems.append(f"{field} {status[field].strip()}")
    if status["NoNewPrivs"].strip() != "1":
        problems.append("no_new_privs is not set")
    for directory in read_only:
        probe = directory / ".pod-sandbox-write-probe"
        try:
            probe.write_text("x")
        except OSError as exc:
            if exc.errno != errno.EROFS:
                problems.append(f"{directory}: {exc} (expected EROFS)")
        else:
            probe.unlink()
            problems.append(f"{directory} is writable")
    if problems:
        raise SystemExit("pod_sandbox: not locked down: " + "; ".join(problems))


def main(argv: Sequence[str] | None = None) -> None:
    """Lock down, verify, exec the command."""
    parser = argparse.ArgumentParser(prog="python -m tests.deploy.pod_sandbox")
    parser.add_argument("--uid", type=int, required=True)
    parser.add_argument("--gid", type=int, required=True)
    parser.add_argument("--expose", type=Path, action="append", default=[])
    parser.add_argument("--stash", type=Path, help="an empty directory for --expose")
    parser.add_argument("--must-be-read-only", type=Path, action="append", default=[])
    parser.add_argument("--workdir", type=Path, help="directory to run the command in")
    parser.add_argument("command", nargs="+")
    args = parser.parse_args(argv)
    lock_down(args.uid, args.gid, args.expose, args.stash)
    verify(args.uid, args.gid, args.must_be_read_only)
    if args.workdir is not None:
        os.chdir(args.workdir)
    os.execvp(args.command[0], args.command)  # noqa: S606  # the command to sandbox


if __name__ == "__main__":
    main(sys.argv[1:])
