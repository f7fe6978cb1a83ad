"""Time as the service sees it, injectable so tests cross a month boundary without waiting."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    """The wall clock, timezone-aware UTC."""
    return datetime.now(UTC)


def iso(moment: datetime | None) -> str | None:
    """ISO-8601 text of an instant, None for none (JSON fields, log fields)."""
    return None if moment is None else moment.isoformat()
