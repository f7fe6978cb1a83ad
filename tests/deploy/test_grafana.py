"""The Grafana dashboard and its provisioning: only contract metrics, valid PromQL."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from listener.metrics import metric_names

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "token-reset.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yaml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "token-reset.yaml"
COMPOSE = REPO / "deploy" / "compose.yaml"

# What the service really exports (its registry is the truth), plus the scrape's `up`.
CONTRACT_METRICS = metric_names() | {"up"}

_TOKEN_RESET_NAME = re.compile(r"\btoken_reset_[a-z_]+")
_HISTOGRAM_SUFFIX = re.compile(r"_(bucket|sum|count)$")
_IDENTIFIER = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_PROMQL_WORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "offset",
        "inf",
        "nan",
    }
)


def load_dashboard() -> dict[str, Any]:
    """Parse the dashboard JSON."""
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def data_panels() -> list[dict[str, Any]]:
    """Panels that show data (everything but rows)."""
    return [p for p in all_panels(load_dashboard()["panels"]) if p["type"] != "row"]


def exprs() -> list[str]:
    """Every PromQL expression of every panel target."""
    return [t["expr"] for p in data_panels() for t in p.get("targets", [])]


def names_in(expr: str) -> set[str]:
    """Metric names an expression selects: token_reset_* (histogram series folded) and others."""
    names = {_HISTOGRAM_SUFFIX.sub("", n) for n in _TOKEN_RESET_NAME.findall(expr)}
    # Also catch any other bare identifier that is not a function, keyword, label or variable.
    stripped = re.sub(r'"[^"]*"', "", expr)
    stripped = re.sub(r"\{[^}]*\}", "", stripped)
    stripped = re.sub(r"\[[^\]]*\]", "", stripped)
    stripped = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", stripped
    )
    stripped = re.sub(r"\$\{?\w+\}?", "", stripped)
    for match in _IDENTIFIER.finditer(stripped):
        word = match.group(0)
        rest = stripped[match.end() :].lstrip()
        if rest.startswith("(") or word.lower() in _PROMQL_WORDS:
            continue
        names.add(_HISTOGRAM_SUFFIX.sub("", word))
    return names


def promql_for_promtool(expr: str) -> str:
    """Replace Grafana variables so promtool can parse the expression."""
    return (
        expr.replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "1d")
        .replace("$job", "token-reset")
    )


def test_metric_name_extraction_sees_typos_and_up() -> None:
    """The extractor finds contract names, `up`, histogram series and unknown identifiers."""
    assert names_in(
        "histogram_quantile(0.99, sum by (le) (rate(token_reset_event_lag_seconds_bucket"
        '{job=~"$job"}[$__rate_interval]))) + on (job) up'
    ) == {"token_reset_event_lag_seconds", "up"}
    assert "token_rest_users_total" in names_in("sum(rate(token_rest_users_total[5m]))")


def test_every_panel_has_a_target() -> None:
    """Each non-row panel queries at least one expression."""
    panels = data_panels()
    assert panels
    empty = [p["title"] for p in panels if not [t for t in p.get("targets", []) if t.get("expr")]]
    assert not empty


def test_dashboard_uses_only_contract_metrics() -> None:
    """Every metric a panel queries is one the listener exports (or `up`)."""
    unknown = {name for expr in exprs() for name in names_in(expr)} - CONTRACT_METRICS
    assert not unknown


def test_dashboard_covers_every_contract_metric() -> None:
    """Every token_reset_* metric appears on the dashboard, and the process's memory and CPU."""
    used = {name for expr in exprs() for name in names_in(expr)}
    ours = {name for name in CONTRACT_METRICS if name.startswith("token_reset_")}
    assert used >= ours, ours - used
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total"} <= used


# Each replica counts the bulk runs it made (or stepped aside from), never the others':
# the only series whose replicas add up.
# Counted once, by the one replica that did it: a bulk run, a rollover notice sent.
SUMMED_ACROSS_REPLICAS = {"token_reset_bulk_runs_total", "token_reset_notices_total"}


def test_replicas_are_combined_with_max() -> None:
    """Every replica reads the whole ledger and hears every doorbell: combine with max.

    A sum would count each reset once per replica (README, Scaling).  Aggregations
    that keep `instance` show replicas side by side and combine nothing.
    """
    offenders = []
    for expr in exprs():
        for match in re.finditer(r"\b(sum|avg|min|max|count)\b\s*(by\s*\(([^)]*)\))?", expr):
            operator, grouping = match.group(1), match.group(3) or ""
            if "instance" in grouping or operator in {"max", "count"}:
                continue
            if operator == "sum" and names_in(expr) <= SUMMED_ACROSS_REPLICAS:
                continue
            offenders.append(expr)
    assert not offenders
    combined = " ".join(exprs())
    for needle in (
        "max by (source) (increase(token_reset_users_total",
        "max by (outcome) (rate(token_reset_notifications_total",
        "max by (le) (rate(token_reset_event_lag_seconds_bucket",
    ):
        assert needle in combined, needle


def test_build_info_shows_the_versions_running() -> None:
    """One panel tells which release each replica runs."""
    assert any("by (version)" in e and "token_reset_build_info" in e for e in exprs())


@pytest.mark.parametrize(
    "needle",
    [
        "histogram_quantile(0.5,",
        "histogram_quantile(0.99,",
        "time() - max(token_reset_last_reset_timestamp_seconds",
        "time() - max(token_reset_bulk_last_success_timestamp_seconds",
        "by (source)",
        "by (outcome) (rate(token_reset_notifications_total",
        "by (outcome) (increase(token_reset_bulk_runs_total",
    ],
)
def test_dashboard_has_required_queries(needle: str) -> None:
    """The panels the runbooks refer to exist (lag quantiles, ages, breakdowns)."""
    assert any(needle in expr for expr in exprs()), needle


def test_panels_use_the_datasource_variable() -> None:
    """Panels and targets use ${datasource}, a Prometheus datasource template variable."""
    dashboard = load_dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    refs = [p["datasource"] for p in data_panels()]
    refs += [t["datasource"] for p in data_panels() for t in p["targets"]]
    assert refs
    assert all(r == {"type": "prometheus", "uid": "${datasource}"} for r in refs)


def test_panel_ids_unique_and_positioned() -> None:
    """Panel ids are unique and every panel has a grid position within 24 columns."""
    panels = list(all_panels(load_dashboard()["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
    assert load_dashboard()["uid"] == "token-reset"


def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    """promtool parses every panel expression (Grafana variables substituted)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("`promtool` not found on PATH: install it with `apt-get install -y prometheus`")
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:expr_{i}", "expr": promql_for_promtool(e)}
                    for i, e in enumerate(exprs())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    result = subprocess.run(
        [promtool, "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_provisioning_matches_compose() -> None:
    """The datasource points at compose's prometheus and the provider path holds the dashboard."""
    datasource = yaml.safe_load(DATASOURCES.read_text(encoding="utf-8"))["datasources"][0]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert "prometheus" in compose["services"]
    provider = yaml.safe_load(PROVIDERS.read_text(encoding="utf-8"))["providers"][0]
    mounts = [str(v).split(":") for v in compose["services"]["grafana"]["volumes"]]
    dashboard_targets = [m[1] for m in mounts if m[0] == "./grafana/token-reset.json"]
    assert len(dashboard_targets) == 1
    assert str(PurePosixPath(dashboard_targets[0]).parent) == provider["options"]["path"]
    assert ["./grafana/provisioning", "/etc/grafana/provisioning", "ro"] in mounts
