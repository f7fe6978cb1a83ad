"""The demo's plan and its reading of /metrics: pure functions, checked without a server."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import generate_latest

from listener.demo.scrape import STORY_ORDER, parse_metrics
from listener.demo.story import plan_population
from listener.metrics import RESET_SOURCES, Metrics


def test_population_is_what_the_readme_summary_says() -> None:
    """A fixed seed: the README's demo summary is what a fresh clone prints."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    users = re.search(
        r"^users\s+(\d+) \((\d+) with last month's usage, (\d+) untouched at 0 used, "
        r"(\d+) current\)",
        readme,
        re.MULTILINE,
    )
    by_source = re.search(
        r"^resets by source\s+function (\d+), trigger (\d+), bulk (\d+)", readme, re.MULTILINE
    )
    assert users is not None, "README lost its demo summary"
    assert by_source is not None, "README lost its demo summary"
    total, stale, idle, current = (int(g) for g in users.groups())
    population = plan_population(total)
    assert (len(population.stale), len(population.idle), len(population.current)) == (
        stale,
        idle,
        current,
    )
    function, trigger, bulk = (int(g) for g in by_source.groups())
    vias = [write.via for write in population.traffic]
    assert (vias.count("function"), vias.count("trigger")) == (function, trigger)
    assert stale - function - trigger == bulk
    assert plan_population(total) == population


def test_population_partitions_the_users() -> None:
    """Every user is in exactly one group; traffic touches only stale users with usage."""
    population = plan_population(50)
    ids, used, stale = population.columns()
    assert len(used) == len(ids)
    assert len(set(ids)) == len(ids) == population.total == 50
    assert (len(population.stale), len(population.idle), len(population.current)) == (40, 5, 5)
    assert all(u == 0 for _, u in population.idle)
    assert all(0 < u <= 400 for _, u in population.stale + population.current)
    assert sum(stale) == 45
    stale_ids = {user_id for user_id, _ in population.stale}
    assert {write.user_id for write in population.traffic} <= stale_ids
    assert (len(population.via("function")), len(population.via("trigger"))) == (2, 2)


def test_parse_metrics_reads_the_services_own_exposition() -> None:
    """The scrape parser understands exactly what the service exports."""
    metrics = Metrics.fresh()
    metrics.stale_users.set(7)
    metrics.missed_month.set(1)
    metrics.users_reset.labels(source="bulk").inc(5)
    metrics.users_reset.labels(source="trigger").inc(2)
    metrics.event_lag.observe(0.003)
    metrics.event_lag.observe(0.2)
    reading = parse_metrics(generate_latest(metrics.registry).decode(), at=1.5)
    assert (reading.stale_users, reading.missed_month, reading.total_resets) == (7, 1, 7)
    assert reading.resets == {"trigger": 2, "bulk": 5, "function": 0}
    assert reading.lag_bound() == 0.25
    assert reading.lag_mean() == (0.003 + 0.2) / 2
    assert sorted(STORY_ORDER) == sorted(RESET_SOURCES)
