"""At most one log line per interval for events anyone on the network can trigger.

A refused request costs the caller nothing; a log line per request would let anyone
who reaches the port flood the log pipeline (and the disk behind it).  The count is
never lost: the next line says how many were swallowed, and a metric counts them all.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class LogThrottle:
    """Admits one line per `interval` seconds and counts the calls it swallowed."""

    def __init__(self, interval: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._last = float("-inf")
        self._suppressed = 0

    def admit(self) -> int | None:
        """None: stay quiet (counted).  Else log now, with the number swallowed since the last."""
        now = self._clock()
        if now - self._last < self.interval:
            self._suppressed += 1
            return None
        suppressed, self._suppressed, self._last = self._suppressed, 0, now
        return suppressed
