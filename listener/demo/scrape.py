"""The demo's view of the service: plain HTTP calls and /metrics scrapes, as Prometheus sees it.

The demo reads the service only through its HTTP port (never through the in-process
registry), so what it prints is what a Prometheus scrape would show.  HTTP is one
httpx.AsyncClient per run (httpx is a core dependency; the Alertmanager push uses it
too), on the event loop like the service it talks to.  Proxies from the environment
are ignored: every address is loopback and the admin secret must not leave the host.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
from prometheus_client.parser import text_string_to_metric_families

from listener.metrics import RESET_SOURCES

HTTP_TIMEOUT_SECONDS = 30.0
# Reset sources in the order the story meets them: app traffic first, then the bulk run.
STORY_ORDER = ("function", "trigger", "bulk")


def demo_client() -> httpx.AsyncClient:
    """The run's HTTP client: no proxies or netrc from the environment (trust_env off)."""
    return httpx.AsyncClient(trust_env=False, timeout=HTTP_TIMEOUT_SECONDS)


async def http(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, str]:
    """(status, body) of one request; raises OSError when nothing answers.

    A non-2xx answer is an answer (503 from /readyz while starting), not a failure.
    """
    try:
        response = await client.request(method, url, headers=dict(headers or {}))
    except httpx.TransportError as exc:
        raise OSError(f"{method} {url}: {str(exc) or type(exc).__name__}") from exc
    return response.status_code, response.text


@dataclass(frozen=True)
class Reading:
    """One scrape of /metrics, reduced to the series the demo tells its story with."""

    at: float  # seconds since the demo started
    stale_users: float
    missed_month: float
    month_resets: float
    connected: float
    resets: dict[str, float]
    lag_sum: float
    lag_count: float
    # (upper bound, cumulative count) per histogram bucket, +Inf last.
    lag_buckets: tuple[tuple[float, float], ...]

    @property
    def total_resets(self) -> float:
        """token_reset_users_total summed over sources."""
        return sum(self.resets.values())

    def lag_mean(self) -> float | None:
        """Mean of token_reset_event_lag_seconds, None before any observation."""
        return self.lag_sum / self.lag_count if self.lag_count else None

    def lag_bound(self) -> float | None:
        """The smallest bucket bound every observed lag fits under, None before any."""
        if not self.lag_count:
            return None
        return next(le for le, count in self.lag_buckets if count >= self.lag_count)

    def to_json(self) -> dict[str, Any]:
        """The sample as written to --json-summary."""
        return {
            "t": round(self.at, 3),
            "stale_users": self.stale_users,
            "missed_month": self.missed_month,
            "month_resets": self.month_resets,
            "listener_connected": self.connected,
            "resets": dict(self.resets),
        }


def parse_metrics(text: str, at: float) -> Reading:
    """Pick the demo's series out of a Prometheus text exposition."""
    values: dict[str, float] = {}
    resets = dict.fromkeys(RESET_SOURCES, 0.0)
    buckets: list[tuple[float, float]] = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "token_reset_users_total":
                resets[sample.labels["source"]] = sample.value
            elif sample.name == "token_reset_event_lag_seconds_bucket":
                buckets.append((float(sample.labels["le"]), sample.value))
            else:
                values[sample.name] = sample.value
    return Reading(
        at=at,
        stale_users=values.get("token_reset_stale_users", 0.0),
        missed_month=values.get("token_reset_missed_month", 0.0),
        month_resets=values.get("token_reset_month_resets", 0.0),
        connected=values.get("token_reset_listener_connected", 0.0),
        resets=resets,
        lag_sum=values.get("token_reset_event_lag_seconds_sum", 0.0),
        lag_count=values.get("token_reset_event_lag_seconds_count", 0.0),
        lag_buckets=tuple(sorted(buckets)),
    )


class WaitTimeout(RuntimeError):
    """A condition the demo waits on did not come true before its deadline."""


@dataclass
class Timeline:
    """Scrapes of one demo run and its phase marks, for the summary and the picture."""

    metrics_url: str
    client: httpx.AsyncClient
    started: float = field(default_factory=time.monotonic)
    readings: list[Reading] = field(default_factory=list)
    marks: list[tuple[float, str]] = field(default_factory=list)

    def now(self) -> float:
        """Seconds since the demo started."""
        return time.monotonic() - self.started

    def mark(self, name: str) -> None:
        """Note that a phase of the story begins now."""
        self.marks.append((round(self.now(), 3), name))

    async def scrape(self) -> Reading:
        """One GET /metrics, recorded."""
        status, body = await http(self.client, "GET", self.metrics_url)
        if status != 200:
            raise OSError(f"GET {self.metrics_url} answered {status}")
        reading = parse_metrics(body, self.now())
        self.readings.append(reading)
        return reading

    async def record(self, interval: float) -> None:
        """Scrape every `interval` seconds until cancelled (the picture's time series)."""
        while True:
            # A failed scrape is a gap in the picture, not a reason to stop the demo.
            with contextlib.suppress(OSError):
                await self.scrape()
            await anyio.sleep(interval)

    async def wait_for(
        self, condition: Callable[[Reading], bool], what: str, deadline: float
    ) -> Reading:
        """Scrape until `condition` holds; WaitTimeout naming `what` after `deadline` s."""
        last = "no answer yet"
        with anyio.move_on_after(deadline):
            while True:
                try:
                    reading = await self.scrape()
                except OSError as exc:
                    last = str(exc)
                else:
                    if condition(reading):
                        return reading
                    last = describe(reading)
                await anyio.sleep(0.1)
        raise WaitTimeout(f"timed out after {deadline:g} s waiting for {what} (last: {last})")


def describe(reading: Reading) -> str:
    """The story's gauges on one line."""
    resets = " ".join(f"{source}={reading.resets[source]:g}" for source in STORY_ORDER)
    return (
        f"token_reset_missed_month={reading.missed_month:g} "
        f"token_reset_stale_users={reading.stale_users:g} "
        f"token_reset_month_resets={reading.month_resets:g} "
        f"token_reset_users_total{{{resets}}}"
    )
