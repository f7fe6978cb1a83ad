"""Environments for the processes tests start: configured by the test, never by accident.

`clean_env` is the parent's environment without libpq's PG* variables and without any
variable the service reads; `cli_env` adds one database for a one-shot command;
`listener_env` configures `listen` with quick health checks, no schedule and a free port.
"""

from __future__ import annotations

import os

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
        "RESET_SCHEDULE": "off",
        "WATCHDOG_INTERVAL_SECONDS": "3600",
        "PROBE_INTERVAL_SECONDS": "1",
        "PROBE_TIMEOUT_SECONDS": "2",
        "RECONNECT_MAX_SECONDS": "0.5",
        "CATCHUP_INTERVAL_SECONDS": "30",
        "SHUTDOWN_TIMEOUT_SECONDS": "5",
        "PYTHONUNBUFFERED": "1",
    }
    values.update(settings)
    return clean_env(**values)
