"""A kept data directory of another PostgreSQL major version (real clusters, real processes).

The demo keeps `.token-reset/demo-pgdata` across runs.  When the binaries moved to
another major version, `demo --once` used to exit 1 with "pg_ctl: could not open PID
file" after the server logged that the data directory was initialised by another
version.  The demo's data is throwaway, so it now starts fresh (and says so);
`--embedded` keeps the directory untouched and says in one line what to do.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from listener.embedded import EmbeddedPostgres, find_bindir, private_data_root
from tests.acceptance.test_demo import demo_env
from tests.support.cli import run_cli

pytestmark = pytest.mark.acceptance

RUN_SECONDS = 120
# The machine's own PostgreSQL, when installed: a cluster truly made by another version.
SYSTEM_PG15 = Path("/usr/lib/postgresql/15/bin")


def binaries_major() -> str:
    """The major version of the binaries the embedded server uses."""
    out = subprocess.run(
        [str(find_bindir() / "postgres"), "--version"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = re.search(r"\(PostgreSQL\) (\d+)", out)
    assert found, out
    return found.group(1)


def make_other_version_cluster(data_dir: Path) -> str:
    """A cluster in data_dir of another major version than the embedded binaries; its version.

    initdb of the machine's PostgreSQL 15 when that differs from the embedded
    binaries; otherwise a cluster of ours whose PG_VERSION says the version before.
    """
    ours = binaries_major()
    if (SYSTEM_PG15 / "initdb").exists() and ours != "15":
        EmbeddedPostgres(data_dir=data_dir, bindir=SYSTEM_PG15).init()
    else:
        EmbeddedPostgres(data_dir=data_dir).init()
        (data_dir / "PG_VERSION").write_text(f"{int(ours) - 1}\n")
    version = (data_dir / "PG_VERSION").read_text().strip()
    assert version != ours
    return version


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A directory the embedded server's user can reach (as root too)."""
    with private_data_root("token-reset-version-test-") as root:
        yield root


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """`python -m listener ...` as a user runs it."""
    return run_cli(*argv, env=demo_env(), cwd=cwd, timeout=RUN_SECONDS)


def test_demo_starts_fresh_over_a_cluster_of_another_version(workdir: Path) -> None:
    """The kept demo cluster is of another version: one line says so, the story is told."""
    data_dir = workdir / ".token-reset" / "demo-pgdata"
    old = make_other_version_cluster(data_dir)
    done = run(["demo", "--once", "--users", "20"], cwd=workdir)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "== token-reset demo: summary ==" in done.stdout
    said = [line for line in done.stdout.splitlines() if f"PostgreSQL {old}" in line]
    assert len(said) == 1, done.stdout
    assert "starting fresh" in said[0]
    assert (data_dir / "PG_VERSION").read_text().strip() == binaries_major()


def test_embedded_keeps_a_cluster_of_another_version_and_says_what_to_do(workdir: Path) -> None:
    """`--embedded` on another version's cluster: exit 2, one line, the directory untouched."""
    data_dir = workdir / "pgdata"
    old = make_other_version_cluster(data_dir)
    before = sorted(p.name for p in data_dir.iterdir())
    done = run(["migrate", "--embedded", "--data-dir", str(data_dir)], cwd=workdir)
    assert done.returncode == 2, done.stdout + done.stderr
    error = done.stderr.strip()
    assert len(error.splitlines()) == 1, error
    assert error.startswith("token-reset: error:")
    assert f"PostgreSQL {old}" in error
    assert f"PostgreSQL {binaries_major()}" in error
    assert "--data-dir" in error
    assert (data_dir / "PG_VERSION").read_text().strip() == old
    assert sorted(p.name for p in data_dir.iterdir()) == before
