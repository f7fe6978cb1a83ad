"""A malformed DATABASE_URL: every command exits 2 with one line, never its password.

Before, `migrate` and `status` printed a traceback and exited 1, `reset` said
"unexpected OverflowError", and `listen` logged a traceback on every reconnect, forever.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support.cli import run_cli
from tests.support.env import clean_env
from tests.support.leaks import assert_no_secret, distinctive_secret

pytestmark = pytest.mark.acceptance

REPO = Path(__file__).resolve().parents[2]
PASSWORD = distinctive_secret(32)
CRON_SECRET = distinctive_secret()
MALFORMED = {
    "not-a-url": "notaurl",
    "port-99999": f"postgresql://app:{PASSWORD}@127.0.0.1:99999/app",
    "unclosed-bracket": f"postgresql://app:{PASSWORD}@[::1/app",
    "password-with-slash": f"postgresql://app:{PASSWORD[:5]}/{PASSWORD[5:]}@127.0.0.1/app",
}
COMMANDS = ("migrate", "status", "reset", "listen")
# A refusal is immediate; the old `listen` never stopped at all.
SECONDS = 30


def run(argv: list[str], database_url: str | None) -> subprocess.CompletedProcess[str]:
    """`python -m listener ...` with no database configured except `database_url`."""
    env = clean_env(CRON_SECRET=CRON_SECRET, LOG_FORMAT="json", HTTP_PORT="0")
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    return run_cli(*argv, env=env, timeout=SECONDS)


def assert_one_line_refusal(done: subprocess.CompletedProcess[str], named: str) -> None:
    """Exit 2, nothing on stdout, one line on stderr naming the culprit, no secret."""
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, lines[:5]
    assert lines[0].startswith("token-reset")
    assert named in lines[0]
    assert_no_secret(done.stdout + done.stderr, PASSWORD, CRON_SECRET)


@pytest.mark.parametrize("url", MALFORMED.values(), ids=MALFORMED.keys())
@pytest.mark.parametrize("command", COMMANDS)
def test_a_malformed_database_url_in_the_environment(command: str, url: str) -> None:
    """DATABASE_URL is checked when the configuration is read, before any connection."""
    assert_one_line_refusal(run([command], url), "DATABASE_URL")


@pytest.mark.parametrize("command", COMMANDS)
def test_a_malformed_database_url_flag(command: str) -> None:
    """--database-url goes through the same check (an argparse type), same promise."""
    done = run([command, "--database-url", MALFORMED["port-99999"]], None)
    assert_one_line_refusal(done, "--database-url")
