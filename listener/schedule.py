"""Built-in bulk-reset schedule (issue 4).  STUB: interface fixed, body to be written."""

from __future__ import annotations

import anyio

from listener.clock import Clock, utc_now
from listener.config import Settings
from listener.metrics import Metrics


async def run_schedule(settings: Settings, metrics: Metrics, *, clock: Clock = utc_now) -> None:
    """Runs until cancelled: the daily/monthly bulk backup, led by one replica."""
    await anyio.sleep_forever()
