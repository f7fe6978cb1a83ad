"""Configuration: one frozen object, read once from the environment, validated at start.

A bad value stops the process before anything starts, with one line naming the
variable.  libpq's own PG* variables pass through to asyncpg untouched.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, TypedDict, TypeVar, Unpack, get_args

from listener.destinations import DestinationError, load_destinations, split_urls
from listener.dsn import REDACTED, check_dsn, redact_dsn, redact_url
from listener.secret_files import with_secret_files
from listener.slots import DEFAULT_SCHEDULE, ScheduleSpec, parse_schedule

LogFormat = Literal["json", "console"]
LOG_FORMATS: Final[tuple[LogFormat, ...]] = get_args(LogFormat)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# A bearer secret shorter than this is guessable online; refused at start-up.
MIN_CRON_SECRET_LENGTH = 16
DEFAULT_HTTP_PORT = 8080
MAX_BATCH_SIZE = 1_000_000
# How long `migrate` waits for another migration (a deploy racing a manual run).
DEFAULT_MIGRATE_LOCK_TIMEOUT_SECONDS = 300.0
_T = TypeVar("_T")


class ConfigError(ValueError, argparse.ArgumentTypeError):
    """A configuration value is missing or wrong; the message is one line for the operator.

    Also an ArgumentTypeError, so a validator used as an argparse ``type=`` shows this
    message, not argparse's generic "invalid value: '<the value>'" (which would echo
    a DATABASE_URL's password).
    """


@dataclass(frozen=True, repr=False)
class Settings:
    """Everything the service reads from its environment."""

    database_url: str | None = None
    cron_secret: str | None = None
    http_host: str = "127.0.0.1"
    http_port: int = DEFAULT_HTTP_PORT
    log_format: LogFormat = "json"
    log_level: str = "INFO"
    watchdog_interval_seconds: float = 60.0
    reset_grace_seconds: float = 21600.0
    alertmanager_url: str | None = None
    # Safety net: read the ledger this often even when no doorbell rang.
    catchup_interval_seconds: float = 30.0
    # Liveness probe: NOTIFY ourselves this often, expect it back within the timeout.
    probe_interval_seconds: float = 15.0
    probe_timeout_seconds: float = 5.0
    reconnect_max_seconds: float = 30.0
    shutdown_timeout_seconds: float = 10.0
    bulk_batch_size: int = 10_000
    # A bulk run that has not finished by then fails (and releases its lock): a stalled
    # backend must not make every other caller answer "skipped" for ever.
    bulk_run_timeout_seconds: float = 3600.0
    # The built-in bulk backup: five cron fields read in the period zone, "HH:MM"
    # (daily, UTC), or "off".  Stored normalised; `schedule` is the parsed form.
    reset_schedule: str = DEFAULT_SCHEDULE
    migrate_lock_timeout_seconds: float = DEFAULT_MIGRATE_LOCK_TIMEOUT_SECONDS
    # Rollover notices: apprise URLs (secrets: kept out of repr), and the first retry
    # delay after a failed send (doubling, capped at an hour).
    notice_urls: tuple[str, ...] = dataclasses.field(default=(), repr=False)
    notice_retry_seconds: float = 30.0
    libpq_configured: bool = False
    # The listener's ledger cursor is stored under this name: stable across restarts.
    listener_name: str = dataclasses.field(default_factory=socket.gethostname)

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, stdout_is_tty: bool | None = None) -> Settings:
        """Build settings from a mapping such as os.environ; raises ConfigError.

        An empty variable means its default, for every variable.
        """
        env = with_secret_files(env, ConfigError)  # CRON_SECRET_FILE, DATABASE_URL_FILE
        tty = sys.stdout.isatty() if stdout_is_tty is None else stdout_is_tty

        def read(name: str, check: Callable[[str, str], _T], default: _T) -> _T:
            raw = env.get(name, "").strip()
            return check(raw, name) if raw else default

        return cls(
            database_url=read("DATABASE_URL", database_url, None),
            cron_secret=_optional(env, "CRON_SECRET"),
            http_host=read("HTTP_HOST", _text, cls.http_host),
            http_port=read("HTTP_PORT", http_port, cls.http_port),
            log_format=read("LOG_FORMAT", log_format, "console" if tty else "json"),
            log_level=read("LOG_LEVEL", log_level, cls.log_level),
            watchdog_interval_seconds=read("WATCHDOG_INTERVAL_SECONDS", seconds, 60.0),
            reset_grace_seconds=read("RESET_GRACE_SECONDS", _seconds_or_zero, 21600.0),
            alertmanager_url=read("ALERTMANAGER_URL", http_url, None),
            catchup_interval_seconds=read("CATCHUP_INTERVAL_SECONDS", seconds, 30.0),
            probe_interval_seconds=read("PROBE_INTERVAL_SECONDS", seconds, 15.0),
            probe_timeout_seconds=read("PROBE_TIMEOUT_SECONDS", seconds, 5.0),
            reconnect_max_seconds=read("RECONNECT_MAX_SECONDS", seconds, 30.0),
            shutdown_timeout_seconds=read("SHUTDOWN_TIMEOUT_SECONDS", seconds, 10.0),
            bulk_batch_size=read("BULK_BATCH_SIZE", batch_size, cls.bulk_batch_size),
            bulk_run_timeout_seconds=read("BULK_RUN_TIMEOUT_SECONDS", seconds, 3600.0),
            reset_schedule=read("RESET_SCHEDULE", reset_schedule, cls.reset_schedule),
            migrate_lock_timeout_seconds=read(
                "MIGRATE_LOCK_TIMEOUT_SECONDS", seconds, DEFAULT_MIGRATE_LOCK_TIMEOUT_SECONDS
            ),
            notice_urls=_notice_urls(env),
            notice_retry_seconds=read("NOTICE_RETRY_SECONDS", seconds, 30.0),
            libpq_configured=_libpq_configured(env),
            listener_name=read("LISTENER_NAME", listener_name, socket.gethostname()),
        )

    def with_overrides(self, **changes: Unpack[Overrides]) -> Settings:
        """Command-line flags win over the environment; None means "not given".

        Each given value passes the same validator as its environment variable.
        """
        given: dict[str, Any] = {}
        for key, value in changes.items():
            if value is None:
                continue
            check = _CHECKS.get(key)
            given[key] = value if check is None else check(value, _ENV_NAMES[key])
        return dataclasses.replace(self, **given)

    def __repr__(self) -> str:
        """Every field, with the password, the cron secret and URL credentials as ***.

        A Settings ends up in log lines and error reports; its secrets must not.
        """
        shown: dict[str, object] = {
            field.name: getattr(self, field.name)
            for field in dataclasses.fields(self)
            if field.repr
        }
        if self.database_url is not None:
            shown["database_url"] = redact_dsn(self.database_url)
        if self.cron_secret is not None:
            shown["cron_secret"] = REDACTED
        if self.alertmanager_url is not None:
            shown["alertmanager_url"] = redact_url(self.alertmanager_url)
        # Destination URLs carry tokens in their paths too: only how many there are.
        shown["notice_urls"] = f"<{len(self.notice_urls)} destination(s)>"
        return f"Settings({', '.join(f'{key}={value!r}' for key, value in shown.items())})"

    @property
    def database_configured(self) -> bool:
        """True when DATABASE_URL or libpq variables say where the database is."""
        return self.database_url is not None or self.libpq_configured

    def require_database(self) -> None:
        """Refuse to guess a database: say how to configure one."""
        if not self.database_configured:
            raise ConfigError(
                "no database configured: set DATABASE_URL (or PGHOST/PGDATABASE), "
                "or pass --database-url, or --embedded for a local throwaway Postgres"
            )

    def validate_cron_secret(self) -> None:
        """An empty secret keeps the endpoint closed; a short one is refused outright."""
        if self.cron_secret is not None and len(self.cron_secret) < MIN_CRON_SECRET_LENGTH:
            raise ConfigError(
                f"CRON_SECRET is too short: at least {MIN_CRON_SECRET_LENGTH} characters "
                "(e.g. `openssl rand -hex 32`)"
            )

    @property
    def schedule(self) -> ScheduleSpec | None:
        """The built-in bulk backup's cron expression and zone, or None when turned off."""
        return parse_schedule(self.reset_schedule)


class Overrides(TypedDict, total=False):
    """What `Settings.with_overrides` accepts: any field, None meaning "not given"."""

    database_url: str | None
    cron_secret: str | None
    http_host: str | None
    http_port: int | None
    log_format: LogFormat | None
    log_level: str | None
    watchdog_interval_seconds: float | None
    reset_grace_seconds: float | None
    alertmanager_url: str | None
    catchup_interval_seconds: float | None
    probe_interval_seconds: float | None
    probe_timeout_seconds: float | None
    reconnect_max_seconds: float | None
    shutdown_timeout_seconds: float | None
    bulk_batch_size: int | None
    reset_schedule: str | None
    migrate_lock_timeout_seconds: float | None
    libpq_configured: bool | None
    listener_name: str | None


# Validators: each takes the raw text of a variable or flag (or, from with_overrides,
# the typed value) and the name to blame, and returns the normalised value or raises
# ConfigError.  `flag(validator, "--name")` makes one an argparse `type=`.


def database_url(value: str, name: str = "DATABASE_URL") -> str:
    """A postgresql:// URL asyncpg accepts, checked without connecting; never echoed."""
    value = value.strip()
    try:
        check_dsn(value)
    except ValueError as exc:
        raise ConfigError(f"{name} {exc}") from None
    return value


def http_port(value: str | int, name: str = "HTTP_PORT") -> int:
    """0-65535; 0 lets the kernel pick a free port."""
    return _integer(value, name, low=0, high=65535)


def _libpq_configured(env: Mapping[str, str]) -> bool:
    """True when libpq's variables say where the database is; a bad PGPORT is refused
    now (exit 2, one line), not retried for ever by `listen`."""
    port = env.get("PGPORT", "").strip()
    if port:
        _integer(port, "PGPORT", low=1, high=65535)
    return any(env.get(k) for k in ("PGHOST", "PGSERVICE", "PGDATABASE"))


def batch_size(value: str | int, name: str = "BULK_BATCH_SIZE") -> int:
    """Users per bulk transaction."""
    return _integer(value, name, low=1, high=MAX_BATCH_SIZE)


def log_level(value: str, name: str = "LOG_LEVEL") -> str:
    """One of LOG_LEVELS, any case."""
    level = value.strip().upper()
    if level not in LOG_LEVELS:
        raise ConfigError(f"{name} must be one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return level


def log_format(value: str, name: str = "LOG_FORMAT") -> LogFormat:
    """json or console, any case."""
    chosen = value.strip().lower()
    if chosen not in LOG_FORMATS:
        raise ConfigError(f"{name} must be 'json' or 'console', got {value!r}")
    return chosen


def reset_schedule(value: str, name: str = "RESET_SCHEDULE") -> str:
    """Five cron fields (period zone), "HH:MM" (daily, UTC), or "off": the only way to
    turn the schedule off.  Stored normalised; HH:MM keeps its form (it says UTC)."""
    try:
        spec = parse_schedule(value)
    except ValueError as exc:
        raise ConfigError(str(exc).replace("RESET_SCHEDULE", name, 1)) from None
    if spec is None:
        return "off"
    if spec.utc:
        minute, hour = (int(f) for f in spec.expression.split()[:2])
        return f"{hour:02d}:{minute:02d}"
    return spec.expression


def seconds(value: str | float, name: str, *, low: float = 0.001) -> float:
    """A finite number of seconds, at least `low`."""
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise ConfigError(f"{name} must be a number of seconds, got {value!r}") from None
    else:
        number = float(value)
    if not math.isfinite(number) or number < low:
        raise ConfigError(f"{name} must be a finite number >= {low}, got {value!r}")
    return number


def http_url(value: str, name: str) -> str:
    """An http(s) URL; not echoed, it may carry basic-auth credentials."""
    value = value.strip()
    if not value.lower().startswith(("http://", "https://")):
        raise ConfigError(f"{name} must be an http:// or https:// URL")
    return value


def listener_name(value: str, name: str = "LISTENER_NAME") -> str:
    """1-200 printable characters (it is stored as the cursor's key)."""
    value = value.strip()
    if not value or len(value) > 200 or not value.isprintable():
        raise ConfigError(f"{name} must be 1-200 printable characters")
    return value


def flag(validator: Callable[[str, str], _T], option: str) -> Callable[[str], _T]:
    """The validator as an argparse ``type=``, blaming the option instead of the variable."""

    def parse(raw: str) -> _T:
        return validator(raw, option)

    parse.__name__ = option
    return parse


def _seconds_or_zero(value: str | float, name: str) -> float:
    return seconds(value, name, low=0.0)


def _text(value: str, name: str) -> str:
    return value.strip()


def _integer(value: str | int, name: str, *, low: int, high: int) -> int:
    if isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {value!r}") from None
    else:
        number = value
    if isinstance(number, bool) or not low <= number <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {number}")
    return number


def _optional(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name, "").strip()
    return value or None


# with_overrides: the validator of each field that has one, and the name it blames.
_CHECKS: dict[str, Callable[[Any, str], Any]] = {
    "database_url": database_url,
    "http_port": http_port,
    "log_format": log_format,
    "log_level": log_level,
    "watchdog_interval_seconds": seconds,
    "reset_grace_seconds": _seconds_or_zero,
    "alertmanager_url": http_url,
    "catchup_interval_seconds": seconds,
    "probe_interval_seconds": seconds,
    "probe_timeout_seconds": seconds,
    "reconnect_max_seconds": seconds,
    "shutdown_timeout_seconds": seconds,
    "bulk_batch_size": batch_size,
    "reset_schedule": reset_schedule,
    "migrate_lock_timeout_seconds": seconds,
    "notice_retry_seconds": seconds,
    "listener_name": listener_name,
}
_ENV_NAMES = {field.name: field.name.upper() for field in dataclasses.fields(Settings)}


def _notice_urls(env: Mapping[str, str]) -> tuple[str, ...]:
    """NOTICE_URLS, each checked by apprise now; an error names a position, never a URL."""
    urls = split_urls(env.get("NOTICE_URLS", ""))
    if urls:
        try:
            load_destinations(urls)
        except DestinationError as exc:
            raise ConfigError(str(exc)) from None
    return urls
