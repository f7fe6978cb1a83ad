"""Prometheus rules and Alertmanager config, checked with promtool and amtool."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from listener.alertmanager import RUNBOOK_URL
from listener.metrics import metric_names

REPO = Path(__file__).resolve().parents[2]
PROM_DIR = REPO / "deploy" / "prometheus"
RULES = PROM_DIR / "rules.yml"
RULES_TEST = PROM_DIR / "rules_test.yml"
PROM_CONFIG = PROM_DIR / "prometheus.yml"
AM_CONFIG = REPO / "deploy" / "alertmanager" / "alertmanager.yml"
RUNBOOK = REPO / "deploy" / "README.md"

# What the service really exports (its registry is the truth), plus the scrape's `up`.
CONTRACT_METRICS = metric_names() | {"up"}

# Alert name -> severity the team agreed on.
EXPECTED_ALERTS = {
    "TokenResetMissedMonth": "page",
    "TokenResetStaleUsers": "page",
    "TokenResetBulkBackupFailing": "ticket",
    "TokenResetListenerDown": "page",
    "TokenResetListenerDisconnected": "page",
    "TokenResetListenerAbsent": "page",
    "TokenResetTaskDown": "page",
    "TokenResetCountingHeldBack": "ticket",
}

MAX_RANGE_SECONDS = 15 * 86400
_UNIT_SECONDS = {
    "ms": 0.001,
    "s": 1,
    "m": 60,
    "h": 3600,
    "d": 86400,
    "w": 7 * 86400,
    "y": 365 * 86400,
}
_DURATION_PART = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")


def tool(name: str, package: str) -> str:
    """Return the path of a CLI tool, failing the test (never skipping) if it is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` not found on PATH: install it with `apt-get install -y {package}`")
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    """Run a command from the repository root and capture its output."""
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=110, check=False)


def duration_seconds(text: str) -> float:
    """Parse a Prometheus duration such as 2d1h or 90s into seconds."""
    parts = _DURATION_PART.findall(text)
    assert "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(int(n) * _UNIT_SECONDS[u] for n, u in parts)


def load_yaml(path: Path) -> Any:
    """Parse one YAML file."""
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def rules() -> list[dict[str, Any]]:
    """Every rule (alerting and recording) in rules.yml."""
    return [rule for group in load_yaml(RULES)["groups"] for rule in group["rules"]]


def alerts() -> dict[str, dict[str, Any]]:
    """Alerting rules by name."""
    return {rule["alert"]: rule for rule in rules() if "alert" in rule}


def test_promtool_check_rules() -> None:
    """`promtool check rules` accepts rules.yml and finds every rule in it."""
    result = run(tool("promtool", "prometheus"), "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    """`promtool test rules` passes every case in rules_test.yml."""
    result = run(tool("promtool", "prometheus"), "test", "rules", str(RULES_TEST))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    assert "FAILED" not in result.stdout


def test_promtool_check_config() -> None:
    """`promtool check config` accepts prometheus.yml and the rule file it references."""
    result = run(tool("promtool", "prometheus"), "check", "config", str(PROM_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout


def test_amtool_check_config() -> None:
    """`amtool check-config` accepts alertmanager.yml."""
    result = run(tool("amtool", "prometheus-alertmanager"), "check-config", str(AM_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize(
    ("labels", "receivers"),
    [
        (("severity=page", "alertname=TokenResetMissedMonth"), "pager,chat"),
        (("severity=ticket", "alertname=TokenResetBulkBackupFailing"), "chat"),
        (("alertname=SomethingUnlabelled",), "chat"),
    ],
)
def test_alertmanager_routes(labels: tuple[str, ...], receivers: str) -> None:
    """Pages reach the pager and chat; everything else reaches chat only."""
    result = run(
        tool("amtool", "prometheus-alertmanager"),
        "config",
        "routes",
        "test",
        f"--config.file={AM_CONFIG}",
        f"--verify.receivers={receivers}",
        *labels,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == receivers


def test_alertmanager_groups_by_alertname() -> None:
    """The top-level route groups notifications by alert name."""
    route = load_yaml(AM_CONFIG)["route"]
    assert "alertname" in route["group_by"]
    assert duration_seconds(route["group_wait"]) <= 60
    assert duration_seconds(route["repeat_interval"]) >= 3600


def test_required_alerts_and_severities() -> None:
    """rules.yml defines exactly the agreed alerts, each with the agreed severity."""
    found = {name: rule.get("labels", {}).get("severity") for name, rule in alerts().items()}
    assert found == EXPECTED_ALERTS


def runbook_base() -> str:
    """The one runbook base URL, as documented in rules.yml's header."""
    match = re.search(r"^# Runbook base URL: (\S+)$", RULES.read_text(encoding="utf-8"), re.M)
    assert match, "rules.yml does not document its runbook base URL"
    return match.group(1)


def test_runbook_base_is_absolute_and_documented() -> None:
    """An absolute https URL (a pager shows it as a link), named in deploy/README.md too."""
    base = runbook_base()
    assert base.startswith("https://")
    assert "#" not in base
    assert base in RUNBOOK.read_text(encoding="utf-8")


def test_the_listeners_own_alert_uses_the_same_runbook_base() -> None:
    """The watchdog's direct Alertmanager push links the same runbook as the rule."""
    assert f"{runbook_base()}#tokenresetmissedmonth" == RUNBOOK_URL


@pytest.mark.parametrize("name", sorted(EXPECTED_ALERTS))
def test_alert_has_for_annotations_and_runbook(name: str) -> None:
    """Each alert has a `for:`, summary, description and base#anchor, an anchor that exists."""
    rule = alerts()[name]
    assert duration_seconds(rule["for"]) >= 60
    annotations = rule["annotations"]
    assert annotations["summary"].strip()
    assert annotations["description"].strip()
    url = annotations["runbook_url"]
    assert url == f"{runbook_base()}#{name.lower()}"
    headings = re.findall(r"^#+\s+(.+?)\s*$", RUNBOOK.read_text(encoding="utf-8"), re.M)
    anchors = {re.sub(r"[^a-z0-9 _-]", "", h.lower()).replace(" ", "-") for h in headings}
    assert name.lower() in anchors, f"deploy/README.md has no heading for {name}"


# Alerts about the month: their description names the period (YYYY-MM, UTC).
MONTH_ALERTS = {"TokenResetMissedMonth", "TokenResetStaleUsers", "TokenResetBulkBackupFailing"}
_PERIOD = '{{ with query "time()" }}{{ (. | first | value | toTime).Format "2006-01" }}{{ end }}'


@pytest.mark.parametrize("name", sorted(EXPECTED_ALERTS))
def test_alert_description_carries_period_and_counts(name: str) -> None:
    """The page says which month, how long, and how many: a count from $value or a query."""
    description = " ".join(alerts()[name]["annotations"]["description"].split())
    assert "$value" in description or "| query" in description or "with query" in description
    assert "minutes" in description  # how long the condition has held
    if name in MONTH_ALERTS:
        assert description.startswith(f"Period {_PERIOD}:"), description


def test_every_recording_rule_is_used_by_the_dashboard() -> None:
    """A recording rule nothing reads is only load; the dashboard is its only reader."""
    dashboard = (REPO / "deploy" / "grafana" / "token-reset.json").read_text(encoding="utf-8")
    unused = [r["record"] for r in rules() if "record" in r and r["record"] not in dashboard]
    assert not unused


@pytest.mark.parametrize("name", sorted(EXPECTED_ALERTS))
def test_alert_is_unit_tested_firing_and_quiet(name: str) -> None:
    """rules_test.yml expects each alert both to fire and to stay quiet somewhere."""
    cases = [
        case
        for test in load_yaml(RULES_TEST)["tests"]
        for case in test.get("alert_rule_test", [])
        if case["alertname"] == name
    ]
    assert any(case["exp_alerts"] for case in cases), f"{name} is never expected to fire"
    assert any(not case["exp_alerts"] for case in cases), f"{name} is never expected quiet"


def test_stale_users_tested_across_month_boundary() -> None:
    """Stale users are tested quiet at 00:00 on 1 Feb 1970 (744h) and firing after 06:00."""
    cases = [
        (duration_seconds(case["eval_time"]), bool(case["exp_alerts"]))
        for test in load_yaml(RULES_TEST)["tests"]
        for case in test.get("alert_rule_test", [])
        if case["alertname"] == "TokenResetStaleUsers"
    ]
    boundary = 744 * 3600
    assert (boundary - 300, False) in cases
    assert (boundary, False) in cases
    assert any(not fires for t, fires in cases if boundary < t < boundary + 6 * 3600)
    assert any(fires for t, fires in cases if boundary + 6 * 3600 <= t < boundary + 86400)


def test_rule_tests_use_contract_metric_names() -> None:
    """Input series in rules_test.yml only use metric names from the listener contract."""
    names = {
        re.sub(r"_(bucket|sum|count)$", "", series["series"].split("{", 1)[0].strip())
        for test in load_yaml(RULES_TEST)["tests"]
        for series in test.get("input_series", [])
    }
    assert names <= CONTRACT_METRICS, names - CONTRACT_METRICS


def test_no_range_longer_than_15_days() -> None:
    """No range selector or subquery in rules.yml looks back more than 15 days."""
    exprs = [rule["expr"] for rule in rules()]
    ranges = [m for expr in exprs for m in re.findall(r"\[([0-9a-z]+)(?::[0-9a-z]*)?\]", expr)]
    assert ranges, "expected range selectors in rules.yml"
    too_long = [r for r in ranges if duration_seconds(r) > MAX_RANGE_SECONDS]
    assert not too_long


def test_stale_users_rule_excludes_month_start_window() -> None:
    """The stale-users alert suppresses the first 6 h (UTC) of the 1st, not a whole day."""
    expr = " ".join(alerts()["TokenResetStaleUsers"]["expr"].split())
    assert "unless on () (day_of_month() == 1 and hour() < 6)" in expr


def test_prometheus_config_scrapes_listener_and_alerts() -> None:
    """prometheus.yml scrapes job token-reset at listener:8080 and alerts alertmanager:9093."""
    config = load_yaml(PROM_CONFIG)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = [t for sc in jobs["token-reset"]["static_configs"] for t in sc["targets"]]
    assert targets == ["listener:8080"]
    assert jobs["token-reset"].get("metrics_path", "/metrics") == "/metrics"
    am_targets = [
        t
        for am in config["alerting"]["alertmanagers"]
        for sc in am["static_configs"]
        for t in sc["targets"]
    ]
    assert am_targets == ["alertmanager:9093"]
    assert [(PROM_DIR / f).resolve() for f in config["rule_files"]] == [RULES.resolve()]
