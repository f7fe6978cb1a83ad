"""Missed-reset watchdog (issue 5).  STUB: interface fixed, body to be written."""

from __future__ import annotations

import anyio

from listener.clock import Clock, utc_now
from listener.config import Settings
from listener.metrics import Metrics


async def run_watchdog(settings: Settings, metrics: Metrics, *, clock: Clock = utc_now) -> None:
    """Runs until cancelled: every WATCHDOG_INTERVAL_SECONDS, computes the gauges from the DB."""
    await anyio.sleep_forever()
