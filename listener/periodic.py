"""The loop of the service's periodic checks (the watchdog, the rollover notices).

Start to start, not end to start: a check that takes a second does not push every later
one back by a second, and a check longer than the interval is followed at once by the
next.  Cancellation (shutdown, the supervisor's restart) ends it between or inside a
check, and the check's kept connection is dropped on the way out.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio

from listener.database import KeptConnection


class CheckLoop:
    """Runs one check every interval on its kept connection; counts the checks done
    (tests wait on the count instead of sleeping)."""

    def __init__(self, interval_seconds: float, connection: KeptConnection) -> None:
        self.interval_seconds = interval_seconds
        self.connection = connection
        self.count = 0

    async def run(self, check: Callable[[], Awaitable[object]]) -> None:
        """Until cancelled."""
        try:
            while True:
                started = anyio.current_time()
                await check()
                self.count += 1
                await anyio.sleep_until(started + self.interval_seconds)
        finally:
            self.connection.drop()
