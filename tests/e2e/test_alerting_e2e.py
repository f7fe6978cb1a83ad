"""End to end, the way an SRE team runs it: stale users page, a bulk reset resolves the page.

Real PostgreSQL, the real `token-reset listen` process, a real Prometheus (Debian
package) scraping it with the repo's rules, a real Alertmanager routing to a webhook
this test serves on 127.0.0.1.  The listener also pushes its own alert straight to
that Alertmanager (ALERTMANAGER_URL), so the real API accepts what it sends.  Only
the timings are shortened: 1 s scrapes and rule evaluations, `for:` of the two
missed-reset alerts cut to 1 s, a watchdog interval of 1 s and a grace period of a few
seconds.  The month is never faked: users are made stale by moving last_monthly_reset,
and the grace is measured from the database's token_reset_period_start(), so the test
holds on any day, the 1st included.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest
import yaml

from listener.embedded import free_port
from tests.support.cli import LISTENER
from tests.support.env import clean_env
from tests.support.processes import (
    ALERTMANAGER,
    PROMETHEUS,
    Process,
    require_binaries,
    wait_for_log_event,
    wait_until_ready,
)
from tests.support.recording_server import Received, RecordingServer

pytestmark = [pytest.mark.acceptance, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "rules.yml"
# The README quotes a page from a real run; set SAVE_ALERT_PAGE=1 to refresh it.
PAGE_EXAMPLE = REPO / "bench" / "results" / "alert_page_example.json"
# The alerts this test waits for, with their `for:` shortened so it runs in seconds.
FAST_FOR = {"TokenResetMissedMonth": "1s", "TokenResetStaleUsers": "1s"}
PAGE_ALERT = "TokenResetMissedMonth"
GRACE_SECONDS = 5
STALE_USERS = 3
PAGE_DEADLINE_SECONDS = 60.0
START_DEADLINE_SECONDS = 30.0


def sql(database_url: str, statement: str) -> Any:
    """Run one statement on the test's database and return its first value."""

    async def run() -> Any:
        conn = await asyncpg.connect(database_url)
        try:
            return await conn.fetchval(statement)
        finally:
            await conn.close()

    return anyio.run(run)


def fast_rules(target: Path) -> None:
    """A copy of the repo's rules with 1 s evaluation and short `for:` on the paged alerts."""
    rules = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    seen = set()
    for group in rules["groups"]:
        group["interval"] = "1s"
        for rule in group["rules"]:
            if rule.get("alert") in FAST_FOR:
                rule["for"] = FAST_FOR[rule["alert"]]
                seen.add(rule["alert"])
    assert seen == set(FAST_FOR), f"rules.yml lacks alerts {set(FAST_FOR) - seen}"
    target.write_text(yaml.safe_dump(rules, sort_keys=False), encoding="utf-8")


def alertmanager_config(target: Path, webhook_url: str) -> None:
    """Everything to the test's webhook, one group per alert name, resolved sent too."""
    config = {
        "route": {
            "receiver": "test-webhook",
            "group_by": ["alertname"],
            "group_wait": "1s",
            "group_interval": "1s",
            "repeat_interval": "1m",
        },
        "receivers": [
            {
                "name": "test-webhook",
                "webhook_configs": [{"url": webhook_url, "send_resolved": True}],
            }
        ],
    }
    target.write_text(yaml.safe_dump(config), encoding="utf-8")


def prometheus_config(target: Path, rules: Path, listener_port: int, am_port: int) -> None:
    """Scrape the listener as job token-reset (the rules' job), alert to our Alertmanager."""
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "alerting": {
            "alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]
        },
        "scrape_configs": [
            {
                "job_name": "token-reset",
                "static_configs": [{"targets": [f"127.0.0.1:{listener_port}"]}],
            }
        ],
    }
    target.write_text(yaml.safe_dump(config), encoding="utf-8")


def notifications(received: list[Received], status: str, after: float = 0.0) -> list[Any]:
    """Webhook bodies for the page alert with this status, received after `after`."""
    return [
        item.body
        for item in received
        if item.at >= after
        and isinstance(item.body, dict)
        and item.body.get("status") == status
        and item.body.get("groupLabels", {}).get("alertname") == PAGE_ALERT
    ]


def listener_env(database_url: str, *, alertmanager_url: str) -> dict[str, str]:
    """The listener's environment: short watchdog timings, no built-in schedule."""
    return clean_env(
        DATABASE_URL=database_url,
        HTTP_HOST="127.0.0.1",
        HTTP_PORT="0",
        LOG_FORMAT="json",
        LOG_LEVEL="INFO",
        WATCHDOG_INTERVAL_SECONDS="1",
        RESET_GRACE_SECONDS=str(GRACE_SECONDS),
        # Off: the built-in daily bulk reset must not fix the stale users by itself.
        RESET_SCHEDULE="off",
        ALERTMANAGER_URL=alertmanager_url,
    )


def test_stale_users_page_and_bulk_reset_resolves(database_url: str, tmp_path: Path) -> None:
    """Stale users past the grace period page through Prometheus and Alertmanager; the bulk
    reset sends the resolved notification."""
    require_binaries()
    sql(
        database_url,
        "INSERT INTO user_tokens (user_id, monthly_tokens_used, last_monthly_reset) "
        "SELECT gen_random_uuid(), 77, token_reset_period_start() - interval '10 days' "
        f"FROM generate_series(1, {STALE_USERS})",
    )
    # How far into the month the database is: at most GRACE_SECONDS of waiting is added
    # when the test runs in the first seconds of a month.
    seconds_in = float(
        sql(database_url, "SELECT extract(epoch FROM now() - token_reset_period_start())")
    )
    page_deadline = PAGE_DEADLINE_SECONDS + max(0.0, GRACE_SECONDS - seconds_in)

    processes: list[Process] = []
    with RecordingServer() as webhook:
        try:
            am_port = free_port()
            alertmanager_config(tmp_path / "alertmanager.yml", webhook.url + "/webhook")
            alertmanager = Process(
                "alertmanager",
                [
                    str(ALERTMANAGER),
                    f"--config.file={tmp_path / 'alertmanager.yml'}",
                    f"--storage.path={tmp_path / 'am-data'}",
                    f"--web.listen-address=127.0.0.1:{am_port}",
                    "--cluster.listen-address=",
                    "--log.level=warn",
                ],
                tmp_path,
            )
            processes.append(alertmanager)
            am_url = f"http://127.0.0.1:{am_port}"
            wait_until_ready(alertmanager, f"{am_url}/-/ready", START_DEADLINE_SECONDS)

            listener = Process(
                "listener",
                [*LISTENER, "listen"],
                tmp_path,
                env=listener_env(database_url, alertmanager_url=am_url),
            )
            processes.append(listener)
            listening = wait_for_log_event(listener, "http_listening", START_DEADLINE_SECONDS)
            listener_port = int(listening["port"])

            fast_rules(tmp_path / "rules.yml")
            prometheus_config(
                tmp_path / "prometheus.yml", tmp_path / "rules.yml", listener_port, am_port
            )
            prometheus_port = free_port()
            prometheus = Process(
                "prometheus",
                [
                    str(PROMETHEUS),
                    f"--config.file={tmp_path / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp_path / 'prom-data'}",
                    f"--web.listen-address=127.0.0.1:{prometheus_port}",
                    "--rules.alert.resend-delay=1s",
                    "--log.level=warn",
                ],
                tmp_path,
            )
            processes.append(prometheus)
            wait_until_ready(
                prometheus, f"http://127.0.0.1:{prometheus_port}/-/ready", START_DEADLINE_SECONDS
            )

            # The page arrives at the webhook, through both paths: Prometheus' rule
            # (labels job/instance) and the listener's direct push (label service).
            paged = webhook.wait_for(
                lambda got: page_sources(notifications(got, "firing")) == {"rule", "push"},
                page_deadline,
            )
            assert paged, failure_report("no firing page from both paths", webhook, processes)
            page = next(
                body
                for body in notifications(webhook.snapshot(), "firing")
                if "rule" in page_sources([body])
            )
            alert = next(a for a in page["alerts"] if "job" in a["labels"])
            assert alert["labels"]["severity"] == "page"
            assert alert["labels"]["job"] == "token-reset"
            assert alert["annotations"]["summary"]
            save_page_example(page)

            # The bulk backup reset fixes the month; the page resolves (both alerts).
            reset_at = time.monotonic()
            result = json.loads(sql(database_url, "SELECT reset_monthly_tokens_for_all_users()"))
            assert result["reset_count"] == STALE_USERS
            resolved = webhook.wait_for(
                lambda got: bool(notifications(got, "resolved", after=reset_at)),
                PAGE_DEADLINE_SECONDS,
            )
            assert resolved, failure_report("no resolved notification", webhook, processes)
            for process in processes:
                process.assert_running()
        finally:
            codes = {process.name: process.stop() for process in reversed(processes)}
    events = [line.get("event") for line in listener.json_lines()]
    assert "missed_reset_alert_raised" in events, listener.tail()
    assert "missed_reset_alert_cleared" in events, listener.tail()
    assert "alertmanager_push_failed" not in events, listener.tail()
    assert codes["listener"] == 0, f"listener exit code {codes['listener']}:\n{listener.tail()}"


def page_sources(bodies: list[Any]) -> set[str]:
    """Which paths the alerts in these notifications came from: "rule" or "push"."""
    sources = set()
    for body in bodies:
        for alert in body["alerts"]:
            labels = alert["labels"]
            if labels.get("job") == "token-reset":
                sources.add("rule")
            elif labels.get("service") == "token-reset":
                sources.add("push")
    return sources


def save_page_example(page: dict[str, Any]) -> None:
    """Keep the real webhook JSON of the page for the README's excerpt."""
    if os.environ.get("SAVE_ALERT_PAGE") == "1":
        PAGE_EXAMPLE.write_text(json.dumps(page, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def failure_report(what: str, webhook: RecordingServer, processes: list[Process]) -> str:
    """Everything needed to see why: what the webhook got and each process' log tail."""
    parts = [f"{what}; webhook received: {[item.body for item in webhook.snapshot()]!r}"]
    parts += [f"--- {process.name}:\n{process.tail()}" for process in processes]
    return "\n".join(parts)
