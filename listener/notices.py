"""Rollover notices: one message per destination when a period's rollover is complete.

People want to hear "November's rollover is done: 12,345 users reset, 4 min after
midnight, nothing left" without reading a dashboard, and "it is NOT done" once when
the grace period runs out.  Every WATCHDOG_INTERVAL_SECONDS the notifier asks the
database (sql/queries/notices.sql):

* **complete**: no user carries last period's usage (the watchdog's stale_users is 0)
  and no bulk run is still in flight.  Normally right after the first bulk run of the
  period.  The message states the period, the users reset by path (trigger, function,
  bulk: the period's ledger reset rows by metadata->>'source'), how long after the
  period start the last reset happened, the period's bulk runs and batches, and what
  is left stale.
* **overdue**: still incomplete past RESET_GRACE_SECONDS (how far into the period
  comes from the injectable clock, as for the watchdog).

Each (period, kind) is sent once per destination, across replicas and restarts: the
first replica to see it due freezes the facts in token_reset_notices, and every
delivery is claimed atomically in token_reset_notice_deliveries (migration 0007) with
a lease.  A failed send is retried with exponential backoff (NOTICE_RETRY_SECONDS,
doubling, capped at an hour); a claim whose replica died runs out after
LEASE_SECONDS and another replica sends.  The one gap that no protocol closes: a
replica killed after the destination accepted the message but before the database
recorded it; the message is then sent again when the lease runs out.

Sends run in a worker thread (apprise is synchronous) inside the service's supervised
"notices" task, so a slow destination never delays counting or the HTTP server.
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal

import anyio
import asyncpg
import structlog

from listener.clock import Clock, iso, utc_now
from listener.config import Settings
from listener.database import KeptConnection
from listener.destinations import (
    SEND_TIMEOUT_SECONDS,
    Destination,
    NoticeType,
    SendResult,
    load_destinations,
    send,
)
from listener.metrics import Metrics
from listener.periodic import CheckLoop
from listener.sql import query

Kind = Literal["complete", "overdue"]
# A live sender is done (or has given up, SEND_TIMEOUT_SECONDS) well within this; a
# claim older than this belongs to a replica that died mid-send.
LEASE_SECONDS: Final = 3 * SEND_TIMEOUT_SECONDS
RETRY_CAP_SECONDS: Final = 3600.0
DB_TIMEOUT_SECONDS: Final = 10.0
SOURCES: Final = ("bulk", "trigger", "function")

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Facts:
    """What a notice states; frozen in the database when first seen due."""

    period: str
    period_start: datetime
    zone: str
    observed_at: datetime
    stale_users: int
    resets_by_source: dict[str, int]
    last_reset_at: datetime | None
    bulk_runs: dict[str, int]
    bulk_batches: int
    # How far into the period the replica that froze the facts was, by its clock (the
    # same injectable clock the watchdog judges the grace by).
    seconds_into_period: float
    bulk_running: int = 0

    @classmethod
    def from_row(cls, row: asyncpg.Record, seconds_into_period: float) -> Facts:
        """From the `notice_facts` query, at `seconds_into_period` by the listener's clock."""
        return cls(
            seconds_into_period=seconds_into_period,
            period=row["period"],
            period_start=row["period_start"],
            zone=row["zone"],
            observed_at=row["observed_at"],
            stale_users=int(row["stale_users"]),
            resets_by_source={k: int(v) for k, v in json.loads(row["resets_by_source"]).items()},
            last_reset_at=row["last_reset_at"],
            bulk_runs={k: int(v) for k, v in json.loads(row["bulk_runs"]).items()},
            bulk_batches=int(row["bulk_batches"]),
            bulk_running=int(row["bulk_running"]),
        )

    def to_json(self) -> str:
        """For token_reset_notices.facts."""
        return json.dumps(
            {
                "period": self.period,
                "period_start": self.period_start.isoformat(),
                "zone": self.zone,
                "observed_at": self.observed_at.isoformat(),
                "stale_users": self.stale_users,
                "resets_by_source": self.resets_by_source,
                "last_reset_at": iso(self.last_reset_at),
                "bulk_runs": self.bulk_runs,
                "bulk_batches": self.bulk_batches,
                "seconds_into_period": self.seconds_into_period,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> Facts:
        """Back from token_reset_notices.facts."""
        data: dict[str, Any] = json.loads(text)
        last = data.get("last_reset_at")
        return cls(
            period=data["period"],
            period_start=datetime.fromisoformat(data["period_start"]),
            zone=data["zone"],
            observed_at=datetime.fromisoformat(data["observed_at"]),
            stale_users=int(data["stale_users"]),
            resets_by_source={k: int(v) for k, v in data["resets_by_source"].items()},
            last_reset_at=None if last is None else datetime.fromisoformat(last),
            bulk_runs={k: int(v) for k, v in data["bulk_runs"].items()},
            bulk_batches=int(data["bulk_batches"]),
            seconds_into_period=float(data["seconds_into_period"]),
        )

    @property
    def users_reset(self) -> int:
        """Reset rows of the period, every path."""
        return sum(self.resets_by_source.values())

    @property
    def completed_after_seconds(self) -> float:
        """How long after the period start its last reset happened (0: nothing to reset)."""
        if self.last_reset_at is None:
            return 0.0
        return max(0.0, (self.last_reset_at - self.period_start).total_seconds())


@dataclass(frozen=True)
class Message:
    """A rendered notice."""

    title: str
    body: str
    notice_type: NoticeType


def duration(seconds: float) -> str:
    """A human duration: '4 min 12 s', '6 h 0 min', '29 d 14 h'."""
    whole = round(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"


def _utc(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _by_source(facts: Facts) -> str:
    known = [f"{s} {facts.resets_by_source.get(s, 0)}" for s in SOURCES]
    others = [f"{s} {n}" for s, n in sorted(facts.resets_by_source.items()) if s not in SOURCES]
    return ", ".join(known + others)


def _bulk(facts: Facts) -> str:
    runs = sum(facts.bulk_runs.values())
    if not runs:
        return "Bulk runs this period: none."
    outcomes = ", ".join(f"{n} {o}" for o, n in sorted(facts.bulk_runs.items()))
    batches = f"{facts.bulk_batches} batch{'es' if facts.bulk_batches != 1 else ''}"
    return f"Bulk runs this period: {runs} ({outcomes}), {batches}."


def render(kind: Kind, facts: Facts, *, grace_seconds: float) -> Message:
    """The title and plain-text body every destination gets (apprise formats per service)."""
    head = f"Period {facts.period} (zone {facts.zone}), started {_utc(facts.period_start)}."
    if kind == "complete":
        if facts.last_reset_at is None:
            when = "Complete at the period start: nobody carried last period's usage."
        else:
            when = (
                f"Complete {duration(facts.completed_after_seconds)} after the period start "
                f"(last reset {_utc(facts.last_reset_at)})."
            )
        lines = [
            head,
            when,
            f"Users reset: {facts.users_reset} ({_by_source(facts)}).",
            _bulk(facts),
            f"Left stale: {facts.stale_users} users carry last period's usage.",
        ]
        return Message(f"Token rollover {facts.period} complete", "\n".join(lines), "success")
    lines = [
        head,
        f"NOT complete {duration(facts.seconds_into_period)} into the period "
        f"(grace {duration(grace_seconds)}): "
        f"{facts.stale_users} users still carry last period's usage.",
        f"Users reset so far: {facts.users_reset} ({_by_source(facts)}).",
        _bulk(facts),
        "Run `token-reset reset` (or SELECT reset_monthly_tokens_for_all_users()) and find "
        "out why the scheduled reset did not run.",
    ]
    return Message(
        f"Token rollover {facts.period} NOT complete after the grace period",
        "\n".join(lines),
        "warning",
    )


def retry_delay(attempts: int, base: float, rng: random.Random) -> float:
    """Exponential backoff from `base`, capped at an hour, jittered to 50-100 %."""
    ceiling = min(RETRY_CAP_SECONDS, base * 2 ** min(attempts - 1, 20))
    return rng.uniform(ceiling / 2, ceiling)


@dataclass
class Notifier:
    """One replica's notifier; many may run against one database (claims decide)."""

    settings: Settings
    metrics: Metrics
    clock: Clock = utc_now
    destinations: tuple[Destination, ...] | None = None
    lease_seconds: float = LEASE_SECONDS
    rng: random.Random = field(default_factory=random.Random)
    _db_available: bool = True
    _connection: KeptConnection = field(init=False)
    _loop: CheckLoop = field(init=False)

    def __post_init__(self) -> None:
        if self.destinations is None:
            self.destinations = load_destinations(self.settings.notice_urls)
        self._connection = KeptConnection(
            self.settings, "notices", timeout_seconds=DB_TIMEOUT_SECONDS
        )
        self._loop = CheckLoop(self.settings.watchdog_interval_seconds, self._connection)

    @property
    def claimer(self) -> str:
        """Who claims deliveries: the replica's stable name."""
        return self.settings.listener_name

    async def run(self) -> None:
        """Check every WATCHDOG_INTERVAL_SECONDS until cancelled."""
        log.info(
            "notices_started",
            destinations=[d.label for d in self.destinations or ()],
            interval_seconds=self.settings.watchdog_interval_seconds,
        )
        await self._loop.run(self.check_once)

    @property
    def checks(self) -> int:
        """Checks completed by the loop (tests wait on it)."""
        return self._loop.count

    async def check_once(self) -> None:
        """One check; database trouble is logged once and retried at the next check."""
        try:
            await self._check()
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            self._connection.drop()
            if self._db_available:
                self._db_available = False
                log.warning("notices_db_unavailable", error=type(exc).__name__)
            return
        if not self._db_available:
            self._db_available = True
            log.info("notices_db_recovered")

    async def _check(self) -> None:
        destinations = self.destinations or ()
        if not destinations:
            return
        conn = await self._connection.get()
        digests = [d.digest for d in destinations]
        state = await conn.fetchrow(query("notice_state"), digests, timeout=DB_TIMEOUT_SECONDS)
        if state is None:
            raise RuntimeError("notice_state returned no row")
        complete_pending = state["complete_sent"] < len(destinations)
        into = (self.clock() - state["period_start"]).total_seconds()
        past_grace = into > self.settings.reset_grace_seconds
        overdue_pending = past_grace and state["overdue_sent"] < len(destinations)
        log.debug(
            "notices_checked",
            period=state["period"],
            complete_pending=complete_pending,
            overdue_pending=overdue_pending,
        )
        if not (complete_pending or overdue_pending):
            return
        row = await conn.fetchrow(query("notice_facts"), timeout=DB_TIMEOUT_SECONDS)
        if row is None:
            raise RuntimeError("notice_facts returned no row")
        facts = Facts.from_row(row, into)
        kind: Kind
        if complete_pending and facts.stale_users == 0 and facts.bulk_running == 0:
            kind = "complete"
        elif overdue_pending and facts.stale_users > 0:
            kind = "overdue"
        else:
            return
        await conn.execute(query("notice_freeze"), facts.period, kind, facts.to_json())
        frozen = await conn.fetchval(query("notice_frozen_facts"), facts.period, kind)
        grace = self.settings.reset_grace_seconds
        message = render(kind, Facts.from_json(frozen), grace_seconds=grace)
        for destination in destinations:
            await self._deliver(conn, facts.period, kind, destination, message)

    async def _deliver(
        self,
        conn: asyncpg.Connection,
        period: str,
        kind: Kind,
        destination: Destination,
        message: Message,
    ) -> None:
        """Claim, send, record under the claim; nothing when another replica holds it."""
        key = (period, kind, destination.digest)
        attempt = await conn.fetchval(
            query("notice_claim"), *key, destination.label, self.claimer, self.lease_seconds
        )
        if attempt is None:
            return  # sent already, leased to a live replica, or waiting for its retry time
        result = await deliver(destination, message)
        fields = {"period": period, "kind": kind, "destination": destination.label}
        if result.ok:
            self.metrics.notices.labels(outcome="sent").inc()
            recorded = await conn.fetchval(query("notice_sent"), *key, self.claimer, attempt)
            if recorded is None:
                log.warning("notice_claim_lost", **fields, attempt=attempt)
            else:
                log.info("notice_sent", **fields, attempt=attempt)
            return
        self.metrics.notices.labels(outcome="failure").inc()
        delay = retry_delay(attempt, self.settings.notice_retry_seconds, self.rng)
        await conn.fetchval(
            query("notice_failed"), *key, self.claimer, attempt, result.reason, delay
        )
        log.warning(
            "notice_failed",
            **fields,
            attempt=attempt,
            reason=result.reason,
            retry_in_seconds=round(delay, 1),
        )


SAMPLE = Facts(
    period="2026-12",
    period_start=datetime(2026, 12, 1, tzinfo=UTC),
    zone="UTC",
    observed_at=datetime(2026, 12, 1, 0, 5, 9, tzinfo=UTC),
    stale_users=0,
    resets_by_source={"bulk": 216, "trigger": 12, "function": 12},
    last_reset_at=datetime(2026, 12, 1, 0, 5, 7, tzinfo=UTC),
    bulk_runs={"success": 1},
    bulk_batches=1,
    seconds_into_period=309.0,
)


async def deliver(destination: Destination, message: Message) -> SendResult:
    """Send one message to one destination in a worker thread (apprise blocks)."""
    return await anyio.to_thread.run_sync(
        functools.partial(
            send,
            destination,
            title=message.title,
            body=message.body,
            notice_type=message.notice_type,
        ),
        abandon_on_cancel=True,
    )


def sample_message() -> Message:
    """What `notify --test` sends: a sample 'complete' notice, marked as a test."""
    sample = render("complete", SAMPLE, grace_seconds=21600)
    return Message(
        "TEST from token-reset: " + sample.title,
        "This is a test of NOTICE_URLS (token-reset notify --test); the numbers are a "
        "sample.\n\n" + sample.body,
        "info",
    )
