"""The one CLI runner: `python -m listener <args>` in a child process, to its end.

`run_cli` blocks (for synchronous tests); `cli` awaits (anyio), so a test can run
commands concurrently or beside an in-process service.  Both capture stdout and
stderr as text and never raise on a non-zero exit: the test asserts on the code.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import anyio

REPO = Path(__file__).resolve().parents[2]
LISTENER = (sys.executable, "-m", "listener")


class CliResult(NamedTuple):
    """A finished command: its exit code and what it printed."""

    code: int
    stdout: str
    stderr: str


def run_cli(
    *args: str, env: Mapping[str, str], cwd: Path = REPO, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run `python -m listener <args>` with exactly `env`; its whole output."""
    return subprocess.run(
        [*LISTENER, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
        env=dict(env),
    )


async def cli(
    *args: str, env: Mapping[str, str], within: float = 60.0, stderr: int | None = None
) -> CliResult:
    """The same from async code; `stderr` may redirect the child's stderr (None: captured)."""
    with anyio.fail_after(within):
        done = await anyio.run_process(
            [*LISTENER, *args],
            env=dict(env),
            cwd=REPO,
            check=False,
            stderr=subprocess.PIPE if stderr is None else stderr,
        )
    return CliResult(done.returncode, done.stdout.decode(), (done.stderr or b"").decode())
