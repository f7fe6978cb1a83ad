"""The demo's data and its summary: pure functions, the same numbers on every run.

A fixed seed makes the users, their usage and the application traffic identical
from run to run, so the README's summary is what a fresh clone prints.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from listener.admin_api import RESET_PATH
from listener.demo.scrape import STORY_ORDER, Reading

SEED = 20241002
LIMIT = 500
MAX_USED = 400
MAX_DEDUCT = 50

Via = Literal["function", "trigger"]


@dataclass(frozen=True)
class AppWrite:
    """One application write after midnight: deduct_tokens() or a direct UPDATE."""

    user_id: uuid.UUID
    amount: int
    via: Via


@dataclass(frozen=True)
class Population:
    """The demo's users: (id, used) per kind, and the traffic that touches some of them."""

    stale: tuple[tuple[uuid.UUID, int], ...]  # carry last month's usage: to be reset
    idle: tuple[tuple[uuid.UUID, int], ...]  # last reset last month, 0 used: nothing to reset
    current: tuple[tuple[uuid.UUID, int], ...]  # already reset this month, with usage
    traffic: tuple[AppWrite, ...]

    @property
    def total(self) -> int:
        """Every user."""
        return len(self.stale) + len(self.idle) + len(self.current)

    def via(self, via: Via) -> list[AppWrite]:
        """The traffic that resets through one path."""
        return [write for write in self.traffic if write.via == via]

    def columns(self) -> tuple[list[uuid.UUID], list[int], list[bool]]:
        """(ids, used, stale) arrays for the seed query's unnest()."""
        rows = [(u, used, True) for u, used in self.stale + self.idle]
        rows += [(u, used, False) for u, used in self.current]
        return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]

    def counts(self) -> dict[str, int]:
        """The population in numbers, for the JSON summary."""
        return {
            "total": self.total,
            "stale_with_usage": len(self.stale),
            "stale_idle": len(self.idle),
            "current": len(self.current),
            "reset_by_function": len(self.via("function")),
            "reset_by_trigger": len(self.via("trigger")),
        }


def plan_population(users: int, seed: int = SEED) -> Population:
    """80 % stale (with usage), 10 % untouched at 0 used, 10 % current; traffic for 1/10 stale."""
    rng = random.Random(seed)  # noqa: S311  # demo data, not a secret
    kinds = ["idle"] * (users // 10) + ["current"] * (users // 10)
    kinds += ["stale"] * (users - len(kinds))
    rng.shuffle(kinds)
    groups: dict[str, list[tuple[uuid.UUID, int]]] = {"stale": [], "idle": [], "current": []}
    for kind in kinds:
        user_id = uuid.UUID(int=rng.getrandbits(128), version=4)
        groups[kind].append((user_id, 0 if kind == "idle" else rng.randint(1, MAX_USED)))
    touched = groups["stale"][: len(groups["stale"]) // 10]
    traffic = tuple(
        AppWrite(user_id, rng.randint(1, MAX_DEDUCT), "function" if i % 2 == 0 else "trigger")
        for i, (user_id, _) in enumerate(touched)
    )
    return Population(
        stale=tuple(groups["stale"]),
        idle=tuple(groups["idle"]),
        current=tuple(groups["current"]),
        traffic=traffic,
    )


def summary_lines(
    *,
    base: str,
    population: Population,
    before: Reading,
    after: Reading,
    bulk: dict[str, Any],
    marks: dict[str, float],
    shown_bearer: str,
) -> list[str]:
    """The human summary printed at the end of the story."""
    by_source = ", ".join(f"{s} {after.resets[s]:g}" for s in STORY_ORDER)
    mean, bound = after.lag_mean(), after.lag_bound()
    lag = "no resets observed"
    if mean is not None and bound is not None:
        lag = f"mean {mean * 1000:.1f} ms, every batch within {bound:g} s"
    rollover = marks["all_counted"] - marks["app_traffic"]
    return [
        "",
        "== token-reset demo: summary ==",
        f"users              {population.total} ({len(population.stale)} with last month's "
        f"usage, {len(population.idle)} untouched at 0 used, {len(population.current)} current)",
        f"before rollover    token_reset_missed_month {before.missed_month:g}, "
        f"token_reset_stale_users {before.stale_users:g} "
        f"(seen {marks['missed_reset_seen']:.1f} s into the demo)",
        f"resets by source   {by_source} (total {after.total_resets:g} of "
        f"{len(population.stale)} stale users)",
        f"bulk endpoint      reset_count {bulk.get('reset_count')} in {bulk.get('batches')} "
        f"batch(es), {bulk.get('duration_ms')} ms, period {bulk.get('period')}",
        f"after rollover     token_reset_missed_month {after.missed_month:g}, "
        f"token_reset_stale_users {after.stale_users:g}, "
        f"token_reset_month_resets {after.month_resets:g}",
        f"event lag          {lag}",
        f"timing             rollover to metrics caught up {rollover:.1f} s, "
        f"demo {marks['all_counted']:.1f} s",
        f"metrics            {base}/metrics",
        f"health             {base}/healthz  {base}/readyz",
        f'cron endpoint      curl -X POST -H "Authorization: Bearer {shown_bearer}" '
        f"{base}{RESET_PATH}",
        "",
    ]
