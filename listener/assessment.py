"""The missed-reset judgement: the facts the watchdog reads, and `assess`, which judges them.

Pure (no I/O): a `Snapshot` is what one query read (or what the watchdog lease holder
shared as JSON), an `Assessment` is its judgement at one instant.  The watchdog exports
and logs it, the Alertmanager push turns it into an alert body.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from listener.clock import iso

if TYPE_CHECKING:
    import asyncpg

Reason = Literal["stale_users", "no_resets"]


@dataclass(frozen=True)
class Snapshot:
    """The facts the watchdog judges, read in one statement."""

    period_start: datetime
    period_label: str
    stale_users: int
    month_resets: int
    last_reset_at: datetime | None
    previous_period_had_usage: bool
    # Read here, not only by the schedule: runs by an external cron (`token-reset
    # reset`) and restarts with the schedule off must still move the gauge.
    last_bulk_success_at: datetime | None = None
    # Usage analytics, exported but not judged (the usage counters, 0005 and 0011; the
    # deduction totals, 0010): users with usage this period, those at or above 80 %
    # and 100 % of their limit, this period's deducted tokens by feature (the largest
    # few by name, the rest as "other"), and every deduction ever refused.
    active_users: int = 0
    near_limit_users: int = 0
    at_limit_users: int = 0
    tokens_by_feature: tuple[tuple[str, int], ...] = ()
    # None when unknown (a snapshot shared by a replica of the release before).
    refused_deductions: int | None = None

    def to_json(self) -> str:
        """The snapshot as the lease holder shares it with the other replicas."""
        return json.dumps(
            {
                "period_start": self.period_start.isoformat(),
                "period_label": self.period_label,
                "stale_users": self.stale_users,
                "month_resets": self.month_resets,
                "last_reset_at": iso(self.last_reset_at),
                "previous_period_had_usage": self.previous_period_had_usage,
                "last_bulk_success_at": iso(self.last_bulk_success_at),
                "active_users": self.active_users,
                "near_limit_users": self.near_limit_users,
                "at_limit_users": self.at_limit_users,
                "tokens_by_feature": [list(pair) for pair in self.tokens_by_feature],
                "refused_deductions": self.refused_deductions,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Snapshot:
        """A snapshot another replica shared (see to_json)."""
        data = json.loads(text)
        for key in ("period_start", "last_reset_at", "last_bulk_success_at"):
            if data.get(key) is not None:
                data[key] = datetime.fromisoformat(data[key])
        return cls.from_row(data)

    @classmethod
    def from_row(cls, row: asyncpg.Record | Mapping[str, Any]) -> Snapshot:
        """Build from the `watchdog_snapshot` query's row."""
        return cls(
            period_start=row["period_start"],
            period_label=row["period_label"],
            stale_users=int(row["stale_users"]),
            month_resets=int(row["month_resets"]),
            last_reset_at=row["last_reset_at"],
            previous_period_had_usage=bool(row["previous_period_had_usage"]),
            last_bulk_success_at=row.get("last_bulk_success_at"),
            active_users=int(row.get("active_users") or 0),
            near_limit_users=int(row.get("near_limit_users") or 0),
            at_limit_users=int(row.get("at_limit_users") or 0),
            tokens_by_feature=_feature_pairs(row.get("tokens_by_feature")),
            refused_deductions=_optional_int(row.get("refused_deductions")),
        )


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _feature_pairs(value: str | list[list[Any]] | None) -> tuple[tuple[str, int], ...]:
    """[[feature, tokens], ...] as the query's jsonb (text) or as shared JSON (a list)."""
    pairs: list[list[Any]] = json.loads(value) if isinstance(value, str) else (value or [])
    return tuple((str(feature), int(tokens)) for feature, tokens in pairs)


@dataclass(frozen=True)
class Assessment:
    """The judgement of one snapshot at one instant."""

    snapshot: Snapshot
    seconds_into_period: float
    grace_seconds: float
    # What is wrong right now, whether or not the grace period is over.
    reasons: tuple[Reason, ...]

    @property
    def in_grace(self) -> bool:
        """True while the month is young enough that stale users are expected."""
        return self.seconds_into_period <= self.grace_seconds

    @property
    def missed(self) -> bool:
        """True when the reset was missed: past the grace period and something is wrong."""
        return not self.in_grace and bool(self.reasons)


def assess(snapshot: Snapshot, now: datetime, grace: float) -> Assessment:
    """Judge a snapshot at `now` (timezone-aware) with a grace of `grace` seconds."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (a naive time has no month)")
    reasons: list[Reason] = []
    if snapshot.stale_users > 0:
        reasons.append("stale_users")
    if snapshot.month_resets == 0 and snapshot.previous_period_had_usage:
        reasons.append("no_resets")
    return Assessment(
        snapshot=snapshot,
        seconds_into_period=(now - snapshot.period_start).total_seconds(),
        grace_seconds=grace,
        reasons=tuple(reasons),
    )
