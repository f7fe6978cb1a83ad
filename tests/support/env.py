"""Environments for the processes tests start: configured by the test, never by accident.

`clean_env` is the parent's environment without libpq's PG* variables and without any
variable the service reads; `cli_env` adds one database for a one-shot command;
`listener_env` configures `listen` with quick health checks, no schedule and a free port.
Their in-process twins build `Settings`: `settings_for` (the defaults and one database)
and `listener_settings` (the same quick checks as `listener_env`).
"""

from __future__ import annotations

import os
from typing import Any

from listener.config import Settings

# Every variable listener.config reads (and the *_FILE forms of the secrets).
SERVICE_VARIABLES = frozenset(
    {
        "ALERTMANAGER_URL",
        "BULK_BATCH_SIZE",
        "BULK_RUN_TIMEOUT_SECONDS",
        "CATCHUP_INTERVAL_SECONDS",
        "CRON_SECRET",
        "CRON_SECRET_FILE",
        "DATABASE_URL",
        "DATABASE_URL_FILE",
        "HTTP_HOST",
        "HTTP_PORT",
        "LISTENER_NAME",
        "LOG_FORMAT",
        "LOG_LEVEL",
        "MIGRATE_LOCK_TIMEOUT_SECONDS",
        "NOTICE_RETRY_SECONDS",
        "NOTICE_URLS",
        "PROBE_INTERVAL_SECONDS",
        "PROBE_TIMEOUT_SECONDS",
        "RECONNECT_MAX_SECONDS",
        "RESET_GRACE_SECONDS",
        "RESET_SCHEDULE",
        "SHUTDOWN_TIMEOUT_SECONDS",
        "WATCHDOG_INTERVAL_SECONDS",
    }
)


# A test's listener: no schedule, and quick health checks so trouble shows within seconds.
QUICK_CHECKS: dict[str, str | float] = {
    "reset_schedule": "off",
    "probe_interval_seconds": 1.0,
    "probe_timeout_seconds": 2.0,
    "reconnect_max_seconds": 0.5,
    "catchup_interval_seconds": 30.0,
    "shutdown_timeout_seconds": 5.0,
}
# The cursor name of an in-process test service.
CONSUMER = "listener-test"


def clean_env(**values: str | float) -> dict[str, str]:
    """The inherited environment minus anything that configures the service or libpq."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("PG") and key not in SERVICE_VARIABLES
    }
    env.update({key: str(value) for key, value in values.items()})
    return env


def cli_env(database_url: str, **values: str | float) -> dict[str, str]:
    """A one-shot command against one database, logging JSON at INFO."""
    return clean_env(DATABASE_URL=database_url, LOG_FORMAT="json", LOG_LEVEL="INFO", **values)


def listener_env(database_url: str, *, name: str, **settings: str | float) -> dict[str, str]:
    """A clean environment for `listen`: quick health checks, no schedule, a free port."""
    values: dict[str, str | float] = {
        "DATABASE_URL": database_url,
        "LISTENER_NAME": name,
        "HTTP_HOST": "127.0.0.1",
        "HTTP_PORT": "0",
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "INFO",
        "WATCHDOG_INTERVAL_SECONDS": "3600",
        **{key.upper(): value for key, value in QUICK_CHECKS.items()},
        "PYTHONUNBUFFERED": "1",
    }
    values.update(settings)
    return clean_env(**values)


def settings_for(database_url: str, **changes: object) -> Settings:
    """Settings pointing at a test database, the defaults otherwise."""
    return Settings(database_url=database_url).with_overrides(**changes)


def listener_settings(database_url: str, **overrides: Any) -> Settings:
    """Settings for an in-process service: free port, no schedule, quick health checks."""
    values: dict[str, Any] = {
        "database_url": database_url,
        "http_port": 0,
        "listener_name": CONSUMER,
        **QUICK_CHECKS,
    }
    values.update(overrides)
    return Settings(**values)
