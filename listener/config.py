"""Configuration: one frozen object, read once from the environment, validated at start.

A bad value stops the process before anything starts, with one line naming the
variable.  libpq's own PG* variables pass through to asyncpg untouched.
"""

from __future__ import annotations

import dataclasses
import math
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from listener.secret_files import with_secret_files

LogFormat = Literal["json", "console"]
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# A bearer secret shorter than this is guessable online; refused at start-up.
MIN_CRON_SECRET_LENGTH = 16
DEFAULT_HTTP_PORT = 8080


class ConfigError(ValueError):
    """A configuration value is missing or wrong; the message is one line for the operator."""


@dataclass(frozen=True)
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
    # "HH:MM" UTC for the built-in daily bulk backup, or "off".
    reset_schedule: str = "00:05"
    libpq_configured: bool = False
    # The listener's ledger cursor is stored under this name: stable across restarts.
    listener_name: str = dataclasses.field(default_factory=socket.gethostname)

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, stdout_is_tty: bool | None = None) -> Settings:
        """Build settings from a mapping such as os.environ; raises ConfigError."""
        env = with_secret_files(env, ConfigError)  # CRON_SECRET_FILE, DATABASE_URL_FILE
        tty = sys.stdout.isatty() if stdout_is_tty is None else stdout_is_tty
        log_format = env.get("LOG_FORMAT", "console" if tty else "json").strip().lower()
        if log_format not in ("json", "console"):
            raise ConfigError(f"LOG_FORMAT must be 'json' or 'console', got {log_format!r}")
        log_level = env.get("LOG_LEVEL", "INFO").strip().upper()
        if log_level not in LOG_LEVELS:
            raise ConfigError(
                f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}"
            )
        return cls(
            database_url=_optional(env, "DATABASE_URL"),
            cron_secret=_optional(env, "CRON_SECRET"),
            http_host=env.get("HTTP_HOST", cls.http_host).strip() or cls.http_host,
            http_port=_int(env, "HTTP_PORT", cls.http_port, low=0, high=65535),
            log_format=log_format,  # type: ignore[arg-type]  # checked just above
            log_level=log_level,
            watchdog_interval_seconds=_float(env, "WATCHDOG_INTERVAL_SECONDS", 60.0),
            reset_grace_seconds=_float(env, "RESET_GRACE_SECONDS", 21600.0, low=0.0),
            alertmanager_url=_http_url(env, "ALERTMANAGER_URL"),
            catchup_interval_seconds=_float(env, "CATCHUP_INTERVAL_SECONDS", 30.0),
            probe_interval_seconds=_float(env, "PROBE_INTERVAL_SECONDS", 15.0),
            probe_timeout_seconds=_float(env, "PROBE_TIMEOUT_SECONDS", 5.0),
            reconnect_max_seconds=_float(env, "RECONNECT_MAX_SECONDS", 30.0),
            shutdown_timeout_seconds=_float(env, "SHUTDOWN_TIMEOUT_SECONDS", 10.0),
            bulk_batch_size=_int(env, "BULK_BATCH_SIZE", 10_000, low=1, high=1_000_000),
            reset_schedule=_schedule(env.get("RESET_SCHEDULE", cls.reset_schedule)),
            libpq_configured=any(env.get(k) for k in ("PGHOST", "PGSERVICE", "PGDATABASE")),
            listener_name=_listener_name(env),
        )

    def with_overrides(self, **changes: object) -> Settings:
        """Command-line flags win over the environment; None means "not given"."""
        given = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **given)  # type: ignore[arg-type]

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
    def schedule_time(self) -> tuple[int, int] | None:
        """(hour, minute) UTC of the daily bulk backup, or None when turned off."""
        if self.reset_schedule == "off":
            return None
        hour, minute = self.reset_schedule.split(":")
        return int(hour), int(minute)


def _optional(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name, "").strip()
    return value or None


def _listener_name(env: Mapping[str, str]) -> str:
    value = env.get("LISTENER_NAME", "").strip() or socket.gethostname()
    if len(value) > 200 or not value.isprintable():
        raise ConfigError("LISTENER_NAME must be 1-200 printable characters")
    return value


def _http_url(env: Mapping[str, str], name: str) -> str | None:
    value = _optional(env, name)
    if value is not None and not value.lower().startswith(("http://", "https://")):
        # The value is not echoed: it may carry basic-auth credentials.
        raise ConfigError(f"{name} must be an http:// or https:// URL")
    return value


def _int(env: Mapping[str, str], name: str, default: int, *, low: int, high: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, *, low: float = 0.001) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got {raw!r}") from None
    if not math.isfinite(value) or value < low:
        raise ConfigError(f"{name} must be a finite number >= {low}, got {raw!r}")
    return value


def _schedule(raw: str) -> str:
    value = raw.strip().lower()
    if value in ("off", "none", "false", "0", ""):
        return "off"
    parts = value.split(":")
    if len(parts) == 2 and all(p.isdigit() for p in parts):
        hour, minute = int(parts[0]), int(parts[1])
        if 0 <= hour < 24 and 0 <= minute < 60:
            return f"{hour:02d}:{minute:02d}"
    raise ConfigError(f"RESET_SCHEDULE must be 'HH:MM' (UTC) or 'off', got {raw!r}")
