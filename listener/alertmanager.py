"""Optional direct push of the missed-reset alert to Alertmanager (ALERTMANAGER_URL).

Prometheus rules are the primary path; this one pages even when no Prometheus
scrapes the listener.  Alertmanager resolves an alert that is not re-sent, so the
watchdog re-submits it every interval while it is active (with an endsAt a few
intervals ahead, as Prometheus does) and sends endsAt=now once when it clears.
Every replica sends the same labels (the answer comes from the database), so
Alertmanager deduplicates them into one alert.

HTTP happens in the pusher's own task with a timeout: a slow or dead Alertmanager
never delays the watchdog or the listener.  Only the newest submission is kept;
a failed one is retried with capped exponential backoff unless a newer one replaces
it, and failures are counted and logged once per streak.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any, Final

import anyio
import httpx
import structlog

from listener.assessment import Assessment

log = structlog.get_logger(__name__)

ALERT_NAME: Final = "TokenResetMissedMonth"
ALERT_LABELS: Final = {"alertname": ALERT_NAME, "severity": "page", "service": "token-reset"}
# Absolute, so a pager shows a link: the base documented at the top of
# deploy/prometheus/rules.yml (tests/deploy/test_promtool.py holds the two equal).
RUNBOOK_BASE_URL: Final = "https://runbooks.example.com/token-reset"
RUNBOOK_URL: Final = f"{RUNBOOK_BASE_URL}#tokenresetmissedmonth"
# An active alert's endsAt lies this many watchdog intervals ahead (at least a minute):
# if the listener dies, Alertmanager resolves the alert by itself afterwards.
TTL_INTERVALS: Final = 4
MIN_TTL_SECONDS: Final = 60.0

Alerts = list[dict[str, Any]]


def alert_body(assessment: Assessment, *, starts_at: datetime, ends_at: datetime) -> dict[str, Any]:
    """One alert in Alertmanager's /api/v2/alerts format, built from an assessment."""
    snapshot = assessment.snapshot
    problems = []
    if "stale_users" in assessment.reasons:
        problems.append(f"{snapshot.stale_users} users still carry last period's usage")
    if "no_resets" in assessment.reasons:
        problems.append("no reset was recorded this period although last period had usage")
    description = (
        f"Period {snapshot.period_label}, {_duration(assessment.seconds_into_period)} in "
        f"(grace {_duration(assessment.grace_seconds)}): {'; '.join(problems) or 'unknown'}. "
        f"Resets recorded this period: {snapshot.month_resets}. "
        "Run `token-reset reset` (or SELECT reset_monthly_tokens_for_all_users()) "
        "and find out why the scheduled reset did not run."
    )
    return {
        "labels": dict(ALERT_LABELS),
        "annotations": {
            "summary": "Monthly token reset was missed",
            "description": description,
            "runbook_url": RUNBOOK_URL,
        },
        "startsAt": starts_at.isoformat(),
        "endsAt": ends_at.isoformat(),
    }


def _duration(seconds: float) -> str:
    """Human-sized: '5 s', '12 min', '6.5 h', '23 d 4 h'."""
    if seconds >= 86400:
        return f"{int(seconds // 86400)} d {int(seconds % 86400 // 3600)} h"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{int(seconds // 60)} min"
    return f"{max(seconds, 0):.0f} s"


class AlertmanagerPusher:
    """Sends the newest alert state to Alertmanager from its own task."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 5.0,
        initial_backoff: float = 1.0,
        max_backoff: float = 30.0,
    ) -> None:
        self.endpoint = base_url.rstrip("/") + "/api/v2/alerts"
        # httpx logs each request at INFO with its URL: a line per interval, and the
        # URL may carry basic-auth credentials.  Our own events say what matters.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        # Credentials in the URL are used for basic auth, never logged.
        self.target = str(httpx.URL(self.endpoint).copy_with(userinfo=b""))
        self.timeout = timeout
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.sent = 0
        self.failures = 0
        self._streak = 0
        self._pending: Alerts | None = None
        self._current: dict[str, Any] | None = None
        self._wake = anyio.Event()

    def fire(
        self, assessment: Assessment, *, starts_at: datetime, now: datetime, interval_seconds: float
    ) -> None:
        """Submit the active alert (call every interval while it is active)."""
        ttl = max(TTL_INTERVALS * interval_seconds, MIN_TTL_SECONDS)
        alert = alert_body(assessment, starts_at=starts_at, ends_at=now + timedelta(seconds=ttl))
        self._current = alert
        self._submit([alert])

    def resolve(self, now: datetime) -> None:
        """Submit the resolution of the active alert: same labels, endsAt = now."""
        if self._current is None:
            return
        resolved = {**self._current, "endsAt": now.isoformat()}
        self._current = None
        self._submit([resolved])

    def _submit(self, alerts: Alerts) -> None:
        # Newest wins: an older, unsent state is worthless once a newer one exists.
        self._pending = alerts
        self._wake.set()

    async def run(self) -> None:
        """Runs until cancelled, posting whatever was submitted last."""
        async with httpx.AsyncClient(timeout=self.timeout) as client:
            backoff = self.initial_backoff
            while True:
                if self._pending is None:
                    await self._wake.wait()
                self._wake = anyio.Event()
                alerts, self._pending = self._pending, None
                if alerts is None:
                    continue
                if await self._post(client, alerts):
                    backoff = self.initial_backoff
                    continue
                if self._pending is None:
                    self._pending = alerts  # retry it, unless something newer came in
                # Backoff between attempts (not synchronisation): newer submissions
                # only replace the pending state meanwhile.
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)

    async def _post(self, client: httpx.AsyncClient, alerts: Alerts) -> bool:
        try:
            with anyio.fail_after(self.timeout + 1):
                response = await client.post(self.endpoint, json=alerts)
        except (httpx.HTTPError, TimeoutError, OSError) as exc:
            return self._failed(type(exc).__name__, str(exc) or type(exc).__name__)
        if response.is_error:
            return self._failed("HTTPStatus", f"{response.status_code} {response.text[:200]}")
        if self._streak:
            log.info(
                "alertmanager_push_recovered", target=self.target, failed_attempts=self._streak
            )
        self._streak = 0
        self.sent += 1
        log.debug("alertmanager_pushed", target=self.target, ends_at=alerts[0]["endsAt"])
        return True

    def _failed(self, error_type: str, error: str) -> bool:
        self.failures += 1
        self._streak += 1
        report = log.warning if self._streak == 1 else log.debug
        report(
            "alertmanager_push_failed",
            target=self.target,
            error_type=error_type,
            error=error,
            failures_total=self.failures,
        )
        return False
