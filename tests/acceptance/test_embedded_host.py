"""The embedded server leaves the host's permissions alone (real processes, run as root here).

As root, PostgreSQL runs as a system user who must be able to enter every directory
above its data directory.  The embedded server used to `chmod o+x` each one that it
could not enter: a private 0700 directory became 0711, and under /root it opened /root.
Now `--embedded` refuses in one line saying what to do, and `demo` (whose data is
throwaway) moves to a private directory it creates itself.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.acceptance.test_demo import demo_env
from tests.support.cli import run_cli

pytestmark = pytest.mark.acceptance

RUN_SECONDS = 120
AS_ROOT = os.geteuid() == 0


@pytest.fixture
def private_dir() -> Iterator[Path]:
    """A 0700 directory owned by us, as a home directory or a pytest basetemp is."""
    path = Path(tempfile.mkdtemp(prefix="token-reset-private-"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    yield path
    shutil.rmtree(path, ignore_errors=True)


def mode(path: Path) -> int:
    """The permission bits of path."""
    return stat.S_IMODE(path.stat().st_mode)


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """`python -m listener ...` as a user runs it."""
    return run_cli(*argv, env=demo_env(), cwd=cwd, timeout=RUN_SECONDS)


def test_embedded_under_a_private_directory_changes_no_permissions(private_dir: Path) -> None:
    """`migrate --embedded` below a 0700 directory: it stays 0700; as root, one clear line."""
    data_dir = private_dir / "pgdata"
    done = run(["migrate", "--embedded", "--data-dir", str(data_dir)], cwd=Path("/"))
    assert mode(private_dir) == 0o700, "the embedded server changed a directory it did not make"
    if not AS_ROOT:
        assert done.returncode == 0, done.stderr
        return
    assert done.returncode == 2, done.stdout + done.stderr
    error = done.stderr.strip()
    assert len(error.splitlines()) == 1, error
    assert error.startswith("token-reset: error:")
    assert str(private_dir) in error
    assert "--data-dir" in error
    assert not data_dir.exists(), "nothing is created when it cannot run"


def test_demo_in_a_private_directory_changes_no_permissions(private_dir: Path) -> None:
    """`demo --once` run from a 0700 directory tells its story and leaves the mode alone."""
    done = run(["demo", "--once", "--users", "20"], cwd=private_dir)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "== token-reset demo: summary ==" in done.stdout
    assert mode(private_dir) == 0o700, "the demo changed a directory it did not make"
    if AS_ROOT:
        # It said where it went instead, and cleaned up after itself.
        moved = [line for line in done.stdout.splitlines() if "cannot enter" in line]
        assert len(moved) == 1, done.stdout
        assert str(private_dir) in moved[0]
        assert not any(Path(tempfile.gettempdir()).glob("token-reset-demo-*/pgdata"))


def test_demo_with_an_unreachable_data_dir_says_what_to_do(private_dir: Path) -> None:
    """An explicit --data-dir the server user cannot reach: one line, exit 2, nothing changed."""
    data_dir = private_dir / "pgdata"
    done = run(["demo", "--once", "--users", "20", "--data-dir", str(data_dir)], cwd=Path("/"))
    assert mode(private_dir) == 0o700
    if not AS_ROOT:
        assert done.returncode == 0, done.stdout + done.stderr
        return
    assert done.returncode == 2, done.stdout + done.stderr
    error = done.stderr.strip()
    assert len(error.splitlines()) == 1, error
    assert str(private_dir) in error
    assert not data_dir.exists()
