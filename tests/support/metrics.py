"""Reading metrics: a /metrics answer over HTTP, or an in-process registry, by public API.

`Scrape` parses the Prometheus text format with prometheus_client's own parser (what
a real Prometheus would read); `sample` and friends read a `Metrics` registry through
`get_sample_value`, never prometheus_client's private attributes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from listener.metrics import NOTIFICATION_OUTCOMES, RESET_SOURCES, Metrics


@dataclass(frozen=True)
class Scrape:
    """One /metrics answer: sample value by (sample name, labels)."""

    samples: Mapping[tuple[str, frozenset[tuple[str, str]]], float]

    @classmethod
    def parse(cls, text: str) -> Scrape:
        """Parse the Prometheus text format."""
        samples = {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }
        return cls(samples)

    def value(self, name: str, **labels: str) -> float:
        """One sample's value; a missing series is a failure, not a zero."""
        key = (name, frozenset(labels.items()))
        assert key in self.samples, f"no sample {name}{labels} in /metrics"
        return self.samples[key]

    def users_reset(self) -> dict[str, int]:
        """token_reset_users_total per source."""
        return {
            source: int(self.value("token_reset_users_total", source=source))
            for source in RESET_SOURCES
        }

    def notifications(self) -> dict[str, int]:
        """token_reset_notifications_total per outcome."""
        return {
            outcome: int(self.value("token_reset_notifications_total", outcome=outcome))
            for outcome in NOTIFICATION_OUTCOMES
        }

    @property
    def connected(self) -> int:
        """token_reset_listener_connected."""
        return int(self.value("token_reset_listener_connected"))

    @property
    def reconnects(self) -> int:
        """token_reset_reconnects_total."""
        return int(self.value("token_reset_reconnects_total"))

    def by_label(self, name: str, label: str) -> dict[str, float]:
        """A sample's value per value of one label, for the label sets it has."""
        return {
            dict(labels)[label]: value
            for (sample_name, labels), value in self.samples.items()
            if sample_name == name and label in dict(labels)
        }

    def total(self, name: str) -> float:
        """The sum of a sample's values over all its label sets (0 when absent)."""
        return sum(value for (sample, _), value in self.samples.items() if sample == name)


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    """One sample of the in-process registry; None when the series does not exist."""
    return metrics.registry.get_sample_value(name, labels)


def counted(metrics: Metrics) -> dict[str, int]:
    """What the service exported: token_reset_users_total per source."""
    return {
        source: int(sample(metrics, "token_reset_users_total", source=source) or 0)
        for source in RESET_SOURCES
    }


def notifications(metrics: Metrics, outcome: str) -> int:
    """token_reset_notifications_total for one outcome."""
    return int(sample(metrics, "token_reset_notifications_total", outcome=outcome) or 0)
