"""The exported metrics are a contract (rules, dashboard, README): names, types, labels."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from listener import __version__
from listener.metrics import (
    BULK_OUTCOMES,
    LAG_BUCKETS,
    NOTICE_OUTCOMES,
    NOTIFICATION_OUTCOMES,
    RESET_SOURCES,
    TASKS,
    Metrics,
    metric_names,
)

# Written out here, not derived from the code under test: what deploy/prometheus/rules.yml,
# deploy/grafana/token-reset.json and README.md's metrics table rely on.
CONTRACT = {
    "token_reset_users_total": ("counter", {"source"}),
    "token_reset_last_reset_timestamp_seconds": ("gauge", set()),
    "token_reset_month_resets": ("gauge", set()),
    "token_reset_stale_users": ("gauge", set()),
    "token_reset_period_active_users": ("gauge", set()),
    "token_reset_period_tokens_deducted": ("gauge", {"feature"}),
    "token_reset_users_near_limit": ("gauge", {"threshold"}),
    "token_reset_deductions_refused_total": ("counter", set()),
    "token_reset_missed_month": ("gauge", set()),
    "token_reset_notifications_total": ("counter", {"outcome"}),
    "token_reset_listener_connected": ("gauge", set()),
    "token_reset_listener_pooled_connection": ("gauge", set()),
    "token_reset_reconnects_total": ("counter", set()),
    "token_reset_ledger_held_back_seconds": ("gauge", set()),
    "token_reset_event_lag_seconds": ("histogram", set()),
    "token_reset_bulk_runs_total": ("counter", {"outcome"}),
    "token_reset_bulk_last_success_timestamp_seconds": ("gauge", set()),
    "token_reset_task_up": ("gauge", {"task"}),
    "token_reset_admin_unauthorized_total": ("counter", set()),
    "token_reset_notices_total": ("counter", {"outcome"}),
    "token_reset_build_info": ("gauge", {"version"}),
}
# prometheus_client's ProcessCollector (Linux /proc), on the service's registry.
PROCESS_METRICS = {
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_start_time_seconds",
    "process_open_fds",
    "process_max_fds",
}
# Labels whose values could be a person: none may ever exist.
FORBIDDEN_LABELS = {"user", "user_id", "uid", "email", "account", "customer", "id"}


def scraped_families(metrics: Metrics) -> dict[str, tuple[str, set[str]]]:
    """Family name (as scraped) -> (type, label names), parsed from the exposition text.

    token_reset_task_up has a series per task the service runs (the supervisor makes
    them); one is made here so its label shows in the exposition.
    """
    metrics.task_up.labels(task=TASKS[0])
    text = generate_latest(metrics.registry).decode()
    families: dict[str, tuple[str, set[str]]] = {}
    for family in text_string_to_metric_families(text):
        name = family.name + "_total" if family.type == "counter" else family.name
        labels = {
            label
            for sample in family.samples
            if not sample.name.endswith("_created")
            for label in sample.labels
            if label != "le"
        }
        families[name] = (family.type, labels)
    return families


def token_reset_families(metrics: Metrics) -> dict[str, tuple[str, set[str]]]:
    """The service's own families (the process_* ones are prometheus_client's standard)."""
    return {
        name: family
        for name, family in scraped_families(metrics).items()
        if name.startswith("token_reset_")
    }


def test_names_types_and_labels_match_the_contract() -> None:
    """Exactly the contract's metrics, with its types and label names, nothing else."""
    assert token_reset_families(Metrics.fresh()) == CONTRACT


def test_metric_names_helper_agrees_with_the_contract() -> None:
    """metric_names(), used by dashboard and rule tests, lists the same names."""
    assert metric_names() == frozenset(CONTRACT) | PROCESS_METRICS


def test_process_metrics_are_on_the_service_registry() -> None:
    """/metrics carries process_* (CPU, memory, fds, start time) from its own registry."""
    families = scraped_families(Metrics.fresh())
    assert set(families) >= PROCESS_METRICS
    text = generate_latest(Metrics.fresh().registry).decode()
    assert "process_resident_memory_bytes " in text


def test_build_info_carries_the_version() -> None:
    """token_reset_build_info{version} 1: which release each replica runs."""
    registry = Metrics.fresh().registry
    assert registry.get_sample_value("token_reset_build_info", {"version": __version__}) == 1


def test_no_label_can_carry_a_user_id() -> None:
    """Labels are small closed sets: no label name looks like a person."""
    for _, labels in scraped_families(Metrics.fresh()).values():
        assert not labels & FORBIDDEN_LABELS


def test_labelled_series_exist_from_the_first_scrape() -> None:
    """Every source and outcome is exported at 0 before anything happens."""
    text = generate_latest(Metrics.fresh().registry).decode()
    for source in RESET_SOURCES:
        assert f'token_reset_users_total{{source="{source}"}} 0.0' in text
    for outcome in NOTIFICATION_OUTCOMES:
        assert f'token_reset_notifications_total{{outcome="{outcome}"}} 0.0' in text
    for outcome in BULK_OUTCOMES:
        assert f'token_reset_bulk_runs_total{{outcome="{outcome}"}} 0.0' in text
    assert NOTICE_OUTCOMES == ("sent", "failure")
    for outcome in NOTICE_OUTCOMES:
        assert f'token_reset_notices_total{{outcome="{outcome}"}} 0.0' in text


def test_lag_buckets_span_milliseconds_to_an_hour() -> None:
    """Healthy lag is sub-millisecond to milliseconds; an outage's is minutes."""
    assert list(LAG_BUCKETS) == sorted(LAG_BUCKETS)
    assert LAG_BUCKETS[0] <= 0.001
    assert LAG_BUCKETS[-1] >= 3600


def test_metrics_live_on_the_injected_registry_only() -> None:
    """Two Metrics objects coexist (tests, replicas in one process); the global one is untouched."""
    registry = CollectorRegistry()
    Metrics(registry)
    Metrics.fresh()
    assert registry.get_sample_value("token_reset_reconnects_total") == 0.0
    assert REGISTRY.get_sample_value("token_reset_reconnects_total") is None
