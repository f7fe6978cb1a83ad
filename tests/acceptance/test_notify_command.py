"""`token-reset notify --test` as a real process against a local HTTP receiver."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from listener.embedded import free_port
from tests.support.cli import run_cli
from tests.support.env import clean_env
from tests.support.notices import JSON_PATH, MATTERMOST_PATH, accepted, leaked, notice_urls
from tests.support.recording_server import RecordingServer

pytestmark = pytest.mark.acceptance

REPO = Path(__file__).resolve().parents[2]


def notify(urls: list[str], level: str = "DEBUG") -> subprocess.CompletedProcess[str]:
    """Run the command with these destinations, at DEBUG (where URLs would show)."""
    env = clean_env(NOTICE_URLS=" ".join(urls), LOG_LEVEL=level, LOG_FORMAT="json")
    return run_cli("notify", "--test", env=env)


def test_every_destination_gets_a_test_message_and_one_line_without_secrets() -> None:
    """Two working destinations and one nobody listens on: a line each, exit 1; the
    working ones received a message marked TEST; no piece of a secret is printed."""
    dead = f"json://127.0.0.1:{free_port()}/notify/PathTokQrstUvwxYzMnop"
    with RecordingServer() as receiver:
        good = list(notice_urls(receiver.url))
        failed = notify([*good, dead])
        passed = notify(good)
        received = receiver.snapshot()
    lines = failed.stdout.splitlines()
    assert failed.returncode == 1, failed.stderr
    assert len(lines) == 3
    assert lines[0].startswith("#1 JSON ")
    assert lines[0].endswith(": ok")
    assert lines[1].startswith("#2 Mattermost ")
    assert lines[1].endswith(": ok")
    assert lines[2].startswith("#3 JSON ")
    assert ": FAILED: " in lines[2]
    assert passed.returncode == 0, passed.stderr
    assert [line.endswith(": ok") for line in passed.stdout.splitlines()] == [True, True]
    assert len(accepted(received, JSON_PATH)) == 2
    assert len(accepted(received, MATTERMOST_PATH)) == 2
    assert all(
        r.body["title"].startswith("TEST from token-reset") for r in received if "title" in r.body
    )
    for result in (failed, passed):
        assert not leaked(result.stdout + result.stderr)


def test_without_destinations_it_says_so_in_one_line() -> None:
    """Nothing to test is a configuration problem: exit 2, one line."""
    result = notify([], level="INFO")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "token-reset: error: NOTICE_URLS is not set: no destination to test"
    ]


def test_a_url_apprise_cannot_use_is_refused_without_echoing_it() -> None:
    """A bad entry: exit 2 naming its position, never its text."""
    result = notify(["json://127.0.0.1:9/x", "nope://PwXyzzyQwopRstuvGhijk@somewhere"])
    assert result.returncode == 2
    assert "destination #2 (nope://…)" in result.stderr
    assert not leaked(result.stdout + result.stderr)
