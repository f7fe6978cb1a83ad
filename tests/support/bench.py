"""The benchmarks as their smoke tests run them: `python -m bench...` in a child process.

Like a user's `python -m bench`, from the repository root with it on PYTHONPATH, against
BENCH_DATABASE_URL or an embedded server of the benchmark's own.  A failed run fails the
test with everything the benchmark printed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support.cli import REPO

# Each smoke run is designed for < 20 s; the limit leaves room for a loaded CI machine.
SMOKE_TIMEOUT_SECONDS = 110


def run_module(
    module: str, *args: str, timeout: float = SMOKE_TIMEOUT_SECONDS
) -> subprocess.CompletedProcess[str]:
    """Run `python -m <module> <args>` from the repository root; fail with its output."""
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert done.returncode == 0, f"{module} failed:\n{done.stdout}\n{done.stderr}"
    return done


def run_smoke(
    name: str, output: Path, *extra: str, timeout: float = SMOKE_TIMEOUT_SECONDS
) -> dict[str, Any]:
    """`python -m bench.<name> --smoke --output <output> <extra>` and the JSON it wrote."""
    run_module(f"bench.{name}", "--smoke", "--output", str(output), *extra, timeout=timeout)
    result: dict[str, Any] = json.loads(output.read_text(encoding="utf-8"))
    return result


def listed_benchmarks() -> set[str]:
    """What `python -m bench --list` finds to run."""
    return set(run_module("bench", "--list", timeout=60).stdout.split())
