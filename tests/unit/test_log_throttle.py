"""LogThrottle: one line per interval, and the next line says how many were swallowed."""

from __future__ import annotations

from listener.throttle import LogThrottle


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_one_line_per_interval_with_the_count_of_the_rest() -> None:
    """First call logs; the rest of the interval is counted; the next line reports them."""
    clock = FakeClock()
    throttle = LogThrottle(10.0, clock=clock)
    assert throttle.admit() == 0
    assert [throttle.admit() for _ in range(499)] == [None] * 499
    clock.now += 9.99
    assert throttle.admit() is None
    clock.now += 0.01
    assert throttle.admit() == 500
    assert throttle.admit() is None
    clock.now += 60
    assert throttle.admit() == 1
