"""The loop of the service's periodic checks (the watchdog, the rollover notices).

Start to start, not end to start: a check that takes a second does not push every later
one back by a second, and a check longer than the interval is followed at once by the
next.  Cancellation (shutdown, the supervisor's restart) ends it between or inside a
check; the caller's `finally` drops what the check held.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio


async def every(interval_seconds: float, check: Callable[[], Awaitable[object]]) -> None:
    """Run `check` every `interval_seconds`, until cancelled."""
    while True:
        started = anyio.current_time()
        await check()
        await anyio.sleep_until(started + interval_seconds)
