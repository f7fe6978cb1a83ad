"""Prometheus metrics, on a registry the caller owns (tests build their own).

No user id ever becomes a label: labels are small closed sets (source, outcome).
Besides the service's own metrics, the registry carries prometheus_client's standard
process_* metrics (CPU, memory, file descriptors, start time: the global registry
has them, a private one must add them) and token_reset_build_info{version}.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Final, Literal, get_args

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from listener import __version__

if TYPE_CHECKING:
    from listener.assessment import Snapshot

# The *_created series double every counter's output and no rule or panel uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped upstream

ResetSource = Literal["trigger", "bulk", "function"]
NotificationOutcome = Literal["ok", "malformed", "probe", "overflow"]
BulkOutcome = Literal["success", "failure", "skipped"]
NoticeOutcome = Literal["sent", "failure"]
# The service's supervised long-running tasks (listener.supervisor).
TaskName = Literal["listener", "watchdog", "schedule", "alertmanager", "http", "notices"]

# The label values, in the order of their Literal (one definition each).
RESET_SOURCES: Final[tuple[str, ...]] = get_args(ResetSource)
NOTIFICATION_OUTCOMES: Final[tuple[str, ...]] = get_args(NotificationOutcome)
BULK_OUTCOMES: Final[tuple[str, ...]] = get_args(BulkOutcome)
NOTICE_OUTCOMES: Final[tuple[str, ...]] = get_args(NoticeOutcome)
TASKS: Final[tuple[str, ...]] = get_args(TaskName)
# token_reset_users_near_limit's thresholds, as shares of the limit (0011's
# token_reset_limit_reached counts 80 and 100 percent).
NEAR_LIMIT_THRESHOLDS: Final = ("0.8", "1")
# The feature label of every feature beyond the largest few (listener.watchdog).
OTHER_FEATURES: Final = "other"
# Commit-to-metric lag: sub-millisecond when healthy, minutes after an outage.
LAG_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
)


class DatabaseCounter(Collector):
    """A counter whose value the database keeps: exported as read, never incremented.

    prometheus_client's Counter only counts up from the process's start; this one
    reports the database's running total, so a restart neither resets nor repeats it.
    """

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        # None until the database was read: a 0 after each restart would make
        # increase() count every refusal since the install again.
        self.value: float | None = None
        registry.register(self)

    def set(self, value: float) -> None:
        """The database's total, as last read."""
        self.value = value

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation)
        if self.value is not None:
            family.add_metric([], self.value)
        yield family

    def describe(self) -> Iterator[Metric]:
        return self.collect()


class Metrics:
    """Every metric the service exports.

    Names, types and labels are a contract with deploy/prometheus/rules.yml, the
    Grafana dashboard and README.md's metrics table; tests/unit/test_metrics.py pins it.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.users_reset = Counter(
            "token_reset_users_total",
            "Users whose monthly usage was reset, by the path that reset them "
            "(one per ledger reset row, counted once).",
            ["source"],
            registry=registry,
        )
        self.last_reset_timestamp = Gauge(
            "token_reset_last_reset_timestamp_seconds",
            "Ledger time of the newest monthly reset (from the database).",
            registry=registry,
        )
        self.month_resets = Gauge(
            "token_reset_month_resets",
            "Resets recorded in the ledger for the current period (from the database).",
            registry=registry,
        )
        self.stale_users = Gauge(
            "token_reset_stale_users",
            "Users still carrying a previous period's usage (from the database).",
            registry=registry,
        )
        self.period_active_users = Gauge(
            "token_reset_period_active_users",
            "Users with usage in the current period (from the database's usage counters).",
            registry=registry,
        )
        self.period_tokens_deducted = Gauge(
            "token_reset_period_tokens_deducted",
            "Tokens deducted in the current period (from the ledger), by feature: the "
            'largest features by name, every other one summed as feature="other".',
            ["feature"],
            registry=registry,
        )
        self.users_near_limit = Gauge(
            "token_reset_users_near_limit",
            "Users of the current period at or above `threshold` (0.8, 1) of their monthly "
            "limit (from the database's usage counters).",
            ["threshold"],
            registry=registry,
        )
        self.deductions_refused = DatabaseCounter(
            "token_reset_deductions_refused",
            "deduct_tokens calls refused for being over the allowance (the database's "
            "running total).",
            registry,
        )
        self.missed_month = Gauge(
            "token_reset_missed_month",
            "1 when, past the grace period, the monthly reset has not happened.",
            registry=registry,
        )
        self.notifications = Counter(
            "token_reset_notifications_total",
            "NOTIFY payloads received on token_resets, by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.listener_connected = Gauge(
            "token_reset_listener_connected",
            "1 while the LISTEN connection is up and its probe answers.",
            registry=registry,
        )
        self.listener_pooled = Gauge(
            "token_reset_listener_pooled_connection",
            "1 when the LISTEN connection answers queries but other sessions' notifications "
            "do not reach it: a transaction-mode pooler (PgBouncer pool_mode=transaction) "
            "is in the path.",
            registry=registry,
        )
        self.reconnects = Counter(
            "token_reset_reconnects_total",
            "Times the listener connection was re-established after a loss.",
            registry=registry,
        )
        self.ledger_held_back = Gauge(
            "token_reset_ledger_held_back_seconds",
            "Seconds the ledger reader has been waiting for open transactions that wrote "
            "token_transactions: resets after them are not counted meanwhile (0 = none).",
            registry=registry,
        )
        self.event_lag = Histogram(
            "token_reset_event_lag_seconds",
            "Time from a reset's ledger row to the listener processing it.",
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self.bulk_runs = Counter(
            "token_reset_bulk_runs_total",
            "Bulk backup reset runs, by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.admin_unauthorized = Counter(
            "token_reset_admin_unauthorized_total",
            "Requests to the cron endpoint refused with 401 (missing, malformed or wrong "
            "credentials); logged at most once per interval, counted here in full.",
            registry=registry,
        )
        self.bulk_last_success = Gauge(
            "token_reset_bulk_last_success_timestamp_seconds",
            "Unix time of the last bulk backup run that succeeded.",
            registry=registry,
        )
        self.notices = Counter(
            "token_reset_notices_total",
            "Rollover notice sends to a NOTICE_URLS destination, by outcome (a failure is "
            "retried with backoff).",
            ["outcome"],
            registry=registry,
        )
        # Not pre-created: a series exists for each task this process runs (no
        # "alertmanager" without ALERTMANAGER_URL), so 0 always means "dead", never
        # "not configured".  The supervisor creates it at 0 before the task's first start.
        self.task_up = Gauge(
            "token_reset_task_up",
            "1 while the service's task runs, 0 while it is dead or being restarted.",
            ["task"],
            registry=registry,
        )
        self.build_info = Gauge(
            "token_reset_build_info",
            "Always 1; the version label says which release this process runs.",
            ["version"],
            registry=registry,
        )
        self.build_info.labels(version=__version__).set(1)
        # process_cpu_seconds_total, process_resident_memory_bytes, ... (Linux /proc).
        ProcessCollector(registry=registry)
        # Pre-create label sets so every series exists (at 0) from the first scrape:
        # rate() and absent() then behave, and dashboards show zeros, not gaps.
        for source in RESET_SOURCES:
            self.users_reset.labels(source=source)
        for outcome in NOTIFICATION_OUTCOMES:
            self.notifications.labels(outcome=outcome)
        for bulk_outcome in BULK_OUTCOMES:
            self.bulk_runs.labels(outcome=bulk_outcome)
        for notice_outcome in NOTICE_OUTCOMES:
            self.notices.labels(outcome=notice_outcome)
        for threshold in NEAR_LIMIT_THRESHOLDS:
            self.users_near_limit.labels(threshold=threshold)
        self.period_tokens_deducted.labels(feature=OTHER_FEATURES)

    def export_usage(self, snapshot: Snapshot) -> None:
        """The usage analytics of one watchdog snapshot.

        The feature series are replaced as a set: a feature that left the largest few
        (or a new period with none yet) must not keep its old value.  "other" always
        exists, so the sum over features is never empty.
        """
        self.period_active_users.set(snapshot.active_users)
        near = (snapshot.near_limit_users, snapshot.at_limit_users)
        for threshold, users in zip(NEAR_LIMIT_THRESHOLDS, near, strict=True):
            self.users_near_limit.labels(threshold=threshold).set(users)
        if snapshot.refused_deductions is not None:
            self.deductions_refused.set(snapshot.refused_deductions)
        self.period_tokens_deducted.clear()
        self.period_tokens_deducted.labels(feature=OTHER_FEATURES)
        for feature, tokens in snapshot.tokens_by_feature:
            self.period_tokens_deducted.labels(feature=feature).set(tokens)

    @classmethod
    def fresh(cls) -> Metrics:
        """Metrics on a new private registry."""
        return cls(CollectorRegistry(auto_describe=True))


def metric_names() -> frozenset[str]:
    """The exported family names, for tests that check dashboards and rules against them."""
    metrics = Metrics.fresh()
    return frozenset(
        family.name if family.type != "counter" else family.name + "_total"
        for family in metrics.registry.collect()
    )
