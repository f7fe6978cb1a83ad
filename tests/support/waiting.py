"""Waiting on a condition with a deadline: the only synchronisation tests use."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

import anyio


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]],
    *,
    deadline: float = 15.0,
    interval: float = 0.01,
    what: str = "condition",
) -> None:
    """Poll `condition` until true; fail with `what` named if `deadline` seconds pass first."""
    try:
        with anyio.fail_after(deadline):
            while True:
                result = condition()
                if inspect.isawaitable(result):
                    result = await result
                if result:
                    return
                # Polling is deliberate: the state lives in another connection or process.
                await anyio.sleep(interval)
    except TimeoutError:
        raise AssertionError(f"timed out after {deadline}s waiting for {what}") from None
