"""Settings.from_env: documented defaults, and one clear error naming each bad variable."""

from __future__ import annotations

import socket

import pytest

from listener.config import DEFAULT_HTTP_PORT, ConfigError, Settings
from listener.slots import ScheduleSpec


def test_defaults_are_the_documented_ones() -> None:
    """An empty environment gives DESIGN's defaults and no database (refused later)."""
    settings = Settings.from_env({}, stdout_is_tty=False)
    assert settings.database_url is None
    assert not settings.database_configured
    assert settings.cron_secret is None
    assert (settings.http_host, settings.http_port) == ("127.0.0.1", DEFAULT_HTTP_PORT)
    assert (settings.log_format, settings.log_level) == ("json", "INFO")
    assert settings.watchdog_interval_seconds == 60.0
    assert settings.reset_grace_seconds == 21600.0
    assert settings.alertmanager_url is None
    assert settings.shutdown_timeout_seconds == 10.0
    assert settings.listener_name == socket.gethostname()
    # 00:05 in the period zone, daily: a few minutes after every period boundary.
    assert settings.schedule == ScheduleSpec("5 0 * * *", utc=False)


def test_console_logs_by_default_on_a_terminal() -> None:
    """A human at a TTY gets console rendering unless LOG_FORMAT says otherwise."""
    assert Settings.from_env({}, stdout_is_tty=True).log_format == "console"
    assert Settings.from_env({"LOG_FORMAT": "json"}, stdout_is_tty=True).log_format == "json"


def test_values_are_read_and_normalised() -> None:
    """Every variable is read; case and surrounding blanks do not matter where harmless."""
    settings = Settings.from_env(
        {
            "DATABASE_URL": " postgresql://db/app ",
            "HTTP_HOST": "::1",
            "HTTP_PORT": "0",
            "LOG_FORMAT": "CONSOLE",
            "LOG_LEVEL": "debug",
            "WATCHDOG_INTERVAL_SECONDS": "5",
            "RESET_GRACE_SECONDS": "0",
            "CATCHUP_INTERVAL_SECONDS": "2.5",
            "RESET_SCHEDULE": "off",
            "LISTENER_NAME": "replica-1",
        }
    )
    assert settings.database_url == "postgresql://db/app"
    assert (settings.http_host, settings.http_port) == ("::1", 0)
    assert (settings.log_format, settings.log_level) == ("console", "DEBUG")
    assert settings.watchdog_interval_seconds == 5.0
    assert settings.reset_grace_seconds == 0.0
    assert settings.catchup_interval_seconds == 2.5
    assert settings.schedule is None
    assert settings.listener_name == "replica-1"


@pytest.mark.parametrize(
    ("raw", "stored", "spec"),
    [
        ("*/30  2 * * 1-5", "*/30 2 * * 1-5", ScheduleSpec("*/30 2 * * 1-5", utc=False)),
        ("8:05", "08:05", ScheduleSpec("5 8 * * *", utc=True)),
        ("OFF", "off", None),
    ],
)
def test_reset_schedule_takes_cron_in_the_period_zone_or_hh_mm_in_utc(
    raw: str, stored: str, spec: ScheduleSpec | None
) -> None:
    """Five cron fields are read in the period zone; HH:MM keeps meaning daily UTC."""
    settings = Settings.from_env({"RESET_SCHEDULE": raw})
    assert (settings.reset_schedule, settings.schedule) == (stored, spec)


def test_libpq_variables_count_as_a_configured_database() -> None:
    """PGHOST and friends pass through to asyncpg; they satisfy require_database."""
    Settings.from_env({"PGHOST": "db"}).require_database()
    with pytest.raises(ConfigError, match="DATABASE_URL"):
        Settings.from_env({}).require_database()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("HTTP_PORT", "eighty"),
        ("HTTP_PORT", "-1"),
        ("HTTP_PORT", "65536"),
        ("LOG_FORMAT", "xml"),
        ("LOG_LEVEL", "LOUD"),
        ("WATCHDOG_INTERVAL_SECONDS", "soon"),
        ("WATCHDOG_INTERVAL_SECONDS", "0"),
        ("WATCHDOG_INTERVAL_SECONDS", "nan"),
        ("RESET_GRACE_SECONDS", "-5"),
        ("RESET_GRACE_SECONDS", "inf"),
        ("CATCHUP_INTERVAL_SECONDS", "0"),
        ("PROBE_INTERVAL_SECONDS", "x"),
        ("PROBE_TIMEOUT_SECONDS", "-1"),
        ("RECONNECT_MAX_SECONDS", "never"),
        ("SHUTDOWN_TIMEOUT_SECONDS", "0"),
        ("BULK_BATCH_SIZE", "0"),
        ("BULK_BATCH_SIZE", "ten"),
        ("RESET_SCHEDULE", "25:00"),
        ("RESET_SCHEDULE", "midnight"),
        ("RESET_SCHEDULE", "5 0 * * * *"),
        ("RESET_SCHEDULE", "0 0 31 2 *"),
        ("RESET_SCHEDULE", "61 0 * * *"),
        ("ALERTMANAGER_URL", "ftp://alerts"),
        ("LISTENER_NAME", "x" * 201),
        ("LISTENER_NAME", "tab\there"),
    ],
)
def test_each_bad_value_is_refused_naming_its_variable(variable: str, value: str) -> None:
    """The error message names the variable, so the operator knows what to fix."""
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env({variable: value})


def test_a_short_cron_secret_is_refused_without_echoing_it() -> None:
    """A guessable secret stops the start; the message never contains the secret."""
    settings = Settings.from_env({"CRON_SECRET": "hunter2"})
    with pytest.raises(ConfigError, match="CRON_SECRET") as raised:
        settings.validate_cron_secret()
    assert "hunter2" not in str(raised.value)
    Settings.from_env({"CRON_SECRET": "s" * 32}).validate_cron_secret()


def test_flags_override_the_environment_and_none_means_not_given() -> None:
    """with_overrides replaces only what a flag actually set."""
    settings = Settings.from_env({"HTTP_PORT": "9000", "LOG_LEVEL": "WARNING"})
    overridden = settings.with_overrides(http_port=0, log_level=None)
    assert (overridden.http_port, overridden.log_level) == (0, "WARNING")


PASSWORD = "hQmZrKtWvXyPnLsJ"
CRON = "cRoNsEcReTvAlUeWiThNoHeXiNiTaTaLlQzXwVbNmKjHgFdSaPoIuYtReWqAsDfGh"


@pytest.mark.parametrize(
    "url",
    [
        "notaurl",
        f"postgresql://app:{PASSWORD}@db:99999/app",
        f"postgresql://app:{PASSWORD}@[::1/x",
        f"mysql://app:{PASSWORD}@db/app",
        f"postgresql://app:{PASSWORD}@db/app?sslmode=sometimes",
    ],
)
def test_a_malformed_database_url_is_refused_at_start_without_echoing_it(url: str) -> None:
    """Parsed without connecting: one message naming DATABASE_URL, no password in it."""
    with pytest.raises(ConfigError, match="DATABASE_URL") as refused:
        Settings.from_env({"DATABASE_URL": url})
    assert PASSWORD[:8] not in str(refused.value)
    with pytest.raises(ConfigError, match="DATABASE_URL"):
        Settings().with_overrides(database_url=url)


def test_an_empty_reset_schedule_means_the_default_and_only_off_turns_it_off() -> None:
    """Like every other variable, empty is the default; `off` is the one way to say off."""
    default = Settings().reset_schedule
    assert Settings.from_env({"RESET_SCHEDULE": ""}).reset_schedule == default
    assert Settings.from_env({"RESET_SCHEDULE": "  "}).reset_schedule == default
    assert Settings.from_env({"RESET_SCHEDULE": "OFF"}).schedule is None
    for alias in ("none", "false", "0", "no"):
        with pytest.raises(ConfigError, match="RESET_SCHEDULE"):
            Settings.from_env({"RESET_SCHEDULE": alias})


def test_migrate_lock_timeout_has_a_default_and_is_validated() -> None:
    """MIGRATE_LOCK_TIMEOUT_SECONDS: 300 unless set; a number of seconds above zero."""
    assert Settings.from_env({}).migrate_lock_timeout_seconds == 300.0
    assert (
        Settings.from_env({"MIGRATE_LOCK_TIMEOUT_SECONDS": "2.5"}).migrate_lock_timeout_seconds
        == 2.5
    )
    for bad in ("0", "-1", "soon", "inf"):
        with pytest.raises(ConfigError, match="MIGRATE_LOCK_TIMEOUT_SECONDS"):
            Settings.from_env({"MIGRATE_LOCK_TIMEOUT_SECONDS": bad})


def test_with_overrides_validates_like_the_environment() -> None:
    """A flag's value obeys the same rules as the variable; values are normalised."""
    settings = Settings()
    assert settings.with_overrides(log_level="debug").log_level == "DEBUG"
    assert settings.with_overrides(reset_schedule="7:5").reset_schedule == "07:05"
    with pytest.raises(ConfigError, match="HTTP_PORT"):
        settings.with_overrides(http_port=70000)
    with pytest.raises(ConfigError, match="BULK_BATCH_SIZE"):
        settings.with_overrides(bulk_batch_size=0)
    with pytest.raises(ConfigError, match="LOG_LEVEL"):
        settings.with_overrides(log_level="LOUD")
    with pytest.raises(ConfigError, match="RESET_SCHEDULE"):
        settings.with_overrides(reset_schedule="none")


def test_repr_redacts_every_credential() -> None:
    """A Settings in a log line or a traceback shows where, never the secrets."""
    settings = Settings(
        database_url=f"postgresql://app:{PASSWORD}@db:5432/app",
        cron_secret=CRON,
        alertmanager_url=f"https://am:{PASSWORD[::-1]}@alerts:9093",
    )
    text = repr(settings)
    assert "postgresql://app:***@db:5432/app" in text
    assert "https://***@alerts:9093" in text
    assert "cron_secret='***'" in text
    for secret in (PASSWORD, PASSWORD[::-1], CRON):
        for start in range(len(secret) - 7):
            assert secret[start : start + 8] not in text
    assert str(settings) == text
    assert "cron_secret=None" in repr(Settings())


@pytest.mark.parametrize("port", ["99999", "0", "five", "-1"])
def test_a_bad_pgport_is_a_configuration_error_not_a_reconnect_loop(port: str) -> None:
    """With no DATABASE_URL, libpq's PGPORT is where listen would connect: checked at
    start like DATABASE_URL's port, naming the variable."""
    with pytest.raises(ConfigError, match="PGPORT"):
        Settings.from_env({"PGHOST": "127.0.0.1", "PGPORT": port})
    assert Settings.from_env({"PGHOST": "127.0.0.1", "PGPORT": "5433"}).database_configured
