"""CRON_SECRET_FILE and DATABASE_URL_FILE: secrets from files (Docker/Kubernetes secrets).

An orchestrator mounts a secret as a file; putting it in the environment instead
leaks it to `docker inspect`, `/proc/<pid>/environ` and crash reporters.  Every
error names the variable and the path, never the content.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from listener.config import ConfigError, Settings
from tests.support.cli import run_cli

SECRET = "s3cr3t-" + "x" * 25
URL = "postgresql://app:p%40ss@db.internal:5432/tokens"
REPO = Path(__file__).resolve().parents[2]


def test_cron_secret_and_database_url_are_read_from_files(tmp_path: Path) -> None:
    """The file's content, without the trailing newline editors and `echo` add."""
    (tmp_path / "cron").write_text(SECRET + "\n", encoding="utf-8")
    (tmp_path / "url").write_text(URL + "\r\n", encoding="utf-8")
    settings = Settings.from_env(
        {"CRON_SECRET_FILE": str(tmp_path / "cron"), "DATABASE_URL_FILE": str(tmp_path / "url")},
        stdout_is_tty=False,
    )
    assert settings.cron_secret == SECRET
    assert settings.database_url == URL
    assert settings.database_configured


def test_the_variable_and_its_file_variant_together_are_refused(tmp_path: Path) -> None:
    """Two sources for one secret: which one wins would be a guess."""
    (tmp_path / "cron").write_text(SECRET, encoding="utf-8")
    with pytest.raises(ConfigError, match=r"CRON_SECRET and CRON_SECRET_FILE"):
        Settings.from_env(
            {"CRON_SECRET": SECRET, "CRON_SECRET_FILE": str(tmp_path / "cron")},
            stdout_is_tty=False,
        )


def test_a_missing_file_is_one_clear_error_naming_variable_and_path(tmp_path: Path) -> None:
    """The operator learns which variable points where; nothing is read from elsewhere."""
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"DATABASE_URL_FILE": str(missing)}, stdout_is_tty=False)
    message = str(caught.value)
    assert "DATABASE_URL_FILE" in message
    assert str(missing) in message
    assert "\n" not in message


def test_errors_never_echo_the_content(tmp_path: Path) -> None:
    """A secret file that is not a secret (binary junk, a directory) fails without content."""
    junk = tmp_path / "junk"
    junk.write_bytes(b"\xff\xfe" + SECRET.encode())
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"CRON_SECRET_FILE": str(junk)}, stdout_is_tty=False)
    assert SECRET not in str(caught.value)
    with pytest.raises(ConfigError, match="CRON_SECRET_FILE"):
        Settings.from_env({"CRON_SECRET_FILE": str(tmp_path)}, stdout_is_tty=False)


def test_an_empty_file_means_unset_like_an_empty_variable(tmp_path: Path) -> None:
    """CRON_SECRET empty keeps the endpoint closed; an empty file must mean the same."""
    (tmp_path / "empty").write_text("\n", encoding="utf-8")
    (tmp_path / "url").write_text(URL, encoding="utf-8")
    settings = Settings.from_env(
        {"CRON_SECRET_FILE": str(tmp_path / "empty"), "DATABASE_URL_FILE": str(tmp_path / "url")},
        stdout_is_tty=False,
    )
    assert (settings.cron_secret, settings.database_url) == (None, URL)


def test_the_cli_reads_them_and_exits_2_on_a_bad_one(tmp_path: Path) -> None:
    """The real command line: a missing file is exit 2 with one line, as any bad setting."""
    env = {"PATH": "/usr/bin:/bin", "DATABASE_URL_FILE": str(tmp_path / "absent")}
    done = run_cli("status", env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("token-reset: error: DATABASE_URL_FILE")
    assert len(done.stderr.strip().splitlines()) == 1
