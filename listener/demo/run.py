"""`token-reset demo`: a month rollover on an embedded PostgreSQL, watched by the real service.

The story, on a fresh database every run (same seed, same numbers):

1. users whose usage dates from last month (the classic bug: 77/500 on the 2nd);
2. the real listener service, in this process, with the watchdog's grace at 0 so
   /metrics shows the missed reset at once (`token_reset_missed_month` 1);
3. the rollover: application traffic resets the users it touches (deduct_tokens()
   and direct writes through the trigger), then the cron endpoint's bulk reset
   clears everyone else;
4. the metrics catch up (`token_reset_users_total` = users reset, the alert clears),
   and a human summary with the URLs.

On a terminal the service's log lines are console-rendered and only warnings and
errors show, so the story's "demo:" lines and the summary are what a person reads;
with LOG_FORMAT=json (or --log-format json), or when stdout is not a terminal, the
service's JSON lines stream to stdout as they happen and `grep '^{'` keeps them.
Every wait has a deadline.  SIGINT/SIGTERM stop the service, then the embedded server.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import secrets
import signal
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import httpx
from anyio.abc import TaskStatus

from listener.admin_api import RESET_PATH
from listener.config import MIN_CRON_SECRET_LENGTH, Settings
from listener.database import connect
from listener.demo.scrape import Reading, Timeline, WaitTimeout, demo_client, describe, http
from listener.demo.story import Population, plan_population, summary_lines
from listener.embedded import (
    EmbeddedPostgres,
    EmbeddedPostgresError,
    VersionMismatch,
    blocking_directory,
    choose_server_user,
    private_data_root,
)
from listener.logs import configure_logging
from listener.migrate import apply_migrations
from listener.service import Service
from listener.sql import query

DEFAULT_DATA_DIR = Path(".token-reset") / "demo-pgdata"
DEMO_DATABASE = "token_reset_demo"  # the name sql/queries/demo.sql drops and creates
MAX_USERS = 100_000
WAIT_SECONDS = 30.0  # each wait on the service (ready, alert raised, metrics caught up)
MIGRATE_SECONDS = 60.0
# Fast enough that the gauges follow the story; the check is a few ms on a demo table.
WATCHDOG_SECONDS = 0.5
SCRAPE_SECONDS = 0.2
# Application traffic is spread over this long, so the picture shows it trickle in.
TRAFFIC_SECONDS = 2.0
# With --json-summary, the time series goes on this long after the metrics caught up.
AFTERGLOW_SECONDS = 1.0


class DemoError(RuntimeError):
    """The demo could not tell its story; the message says which step failed."""


def say(text: str) -> None:
    """One human line on stdout, among the service's JSON lines."""
    print(f"demo: {text}", flush=True)


class Demo:
    """One demo run: embedded server, fresh database, service, story, summary."""

    def __init__(self, settings: Settings, args: argparse.Namespace, data_dir: Path) -> None:
        self.settings = settings
        self.args = args
        self.data_dir = data_dir
        self.started = time.monotonic()
        # A signal cancels the whole run while setting up; once the service runs, only
        # the story, so the service stops in order (service.stop()) before the server.
        self.scope = anyio.CancelScope()
        self.story = anyio.CancelScope()
        self.service: Service | None = None
        self.signal: signal.Signals | None = None
        self.told = False  # the summary was printed

    async def watch_signals(self, *, task_status: TaskStatus[None]) -> None:
        """SIGINT/SIGTERM: stop everything (once; the shutdown is bounded anyway)."""
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for signum in signals:
                if self.signal is None:
                    self.signal = signal.Signals(signum)
                    say(f"{self.signal.name}: stopping the listener, then the embedded server")
                    (self.scope if self.service is None else self.story).cancel()

    async def run(self) -> int:
        """The whole demo; returns the exit code."""
        server = EmbeddedPostgres(data_dir=self.data_dir)
        failed = False
        try:
            with self.scope:
                await self._run(server)
        # except*: a failing step may surface from inside a task group, wrapped.
        except* (DemoError, WaitTimeout, EmbeddedPostgresError) as errors:
            failed = True
            for exc in _leaves(errors):
                print(f"token-reset demo: error: {exc}", file=sys.stderr, flush=True)
        finally:
            with anyio.CancelScope(shield=True):
                failed = not await self._stop(server) or failed
        if failed:
            return 1
        if self.signal is None or self.told:
            # --once, or serving after the summary until interrupted: both are success.
            return 0
        return 128 + self.signal.value  # interrupted before the story was told

    async def _stop(self, server: EmbeddedPostgres) -> bool:
        """Stop the embedded server; False (after saying why) when it would not stop."""
        try:
            await anyio.to_thread.run_sync(server.stop)
        except EmbeddedPostgresError as exc:
            print(f"token-reset demo: error: stopping PostgreSQL: {exc}", file=sys.stderr)
            return False
        say("embedded PostgreSQL stopped")
        return True

    async def _run(self, server: EmbeddedPostgres) -> None:
        await anyio.to_thread.run_sync(server.start)
        say(
            f"embedded PostgreSQL on 127.0.0.1:{server.port} (data: {server.data_dir}), "
            f"fresh database {DEMO_DATABASE}"
        )
        population = plan_population(int(self.args.users))
        dsn = server.dsn_for(DEMO_DATABASE)
        await self._prepare(server.dsn, dsn, population)
        say(
            f"{population.total} users: {len(population.stale)} with last month's usage, "
            f"{len(population.idle)} untouched at 0 used, {len(population.current)} current"
        )
        secret = self.settings.cron_secret or ""
        shown_bearer = "$CRON_SECRET"
        if len(secret) < MIN_CRON_SECRET_LENGTH:
            # A throwaway secret for a throwaway local server; shown so you can try it.
            secret = shown_bearer = secrets.token_hex(16)
        self.service = service = Service(self._service_settings(dsn, secret), handle_signals=False)
        async with anyio.create_task_group() as group:
            try:
                with self.story:
                    try:
                        await group.start(service.run)
                    except RuntimeError as exc:
                        raise DemoError(
                            "the listener service did not start (see its log above)"
                        ) from exc
                    base = f"http://127.0.0.1:{service.state.http_port}"
                    await self._tell(base, population, dsn, secret, shown_bearer)
                    self.told = True
                    if not self.args.once:
                        say(f"serving {base}/metrics; press Ctrl-C to stop")
                        await anyio.sleep_forever()
            finally:
                service.stop()

    async def _prepare(self, admin_dsn: str, dsn: str, population: Population) -> None:
        """Drop and create the demo database, migrate it, create the users."""
        try:
            admin = await connect(self._at(admin_dsn), role="demo")
            try:
                await admin.execute(query("demo_drop_database"))
                await admin.execute(query("demo_create_database"))
            finally:
                await admin.close()
            conn = await connect(self._at(dsn), role="demo")
            try:
                with anyio.fail_after(MIGRATE_SECONDS):
                    await apply_migrations(conn)
                await conn.execute(query("demo_seed_users"), *population.columns())
            finally:
                await conn.close()
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            raise DemoError(f"preparing the demo database failed: {exc}") from exc

    async def _tell(
        self, base: str, population: Population, dsn: str, secret: str, shown_bearer: str
    ) -> None:
        """Steps 2-4 of the story, then the summary (and --json-summary's file)."""
        async with demo_client() as client:
            await self._story(
                client, base, population, dsn=dsn, secret=secret, shown_bearer=shown_bearer
            )

    async def _story(
        self,
        client: httpx.AsyncClient,
        base: str,
        population: Population,
        *,
        dsn: str,
        secret: str,
        shown_bearer: str,
    ) -> None:
        timeline = Timeline(f"{base}/metrics", client, started=self.started)
        async with anyio.create_task_group() as recorder:
            await self._wait_ready(client, f"{base}/readyz")
            timeline.mark("listener_ready")
            recorder.start_soon(timeline.record, SCRAPE_SECONDS)
            say(f"listener ready: {base}/metrics, {base}/readyz")
            stale = len(population.stale)
            before = await timeline.wait_for(
                lambda r: r.missed_month == 1 and r.stale_users == stale,
                f"token_reset_missed_month=1 and token_reset_stale_users={stale}",
                WAIT_SECONDS,
            )
            timeline.mark("missed_reset_seen")
            say(f"the missed reset, as Prometheus sees it: {describe(before)}")
            timeline.mark("app_traffic")
            await self._app_traffic(dsn, population)
            say(
                f"app traffic: {len(population.via('function'))} deduct_tokens() calls and "
                f"{len(population.via('trigger'))} direct UPDATEs reset the users they touched"
            )
            timeline.mark("bulk_endpoint")
            status, body = await http(
                client, "POST", f"{base}{RESET_PATH}", {"Authorization": f"Bearer {secret}"}
            )
            say(f"POST {RESET_PATH} -> {status} {body}")
            if status != 200:
                raise DemoError(f"the reset endpoint answered {status}: {body}")
            after = await timeline.wait_for(
                lambda r: r.total_resets == stale and r.missed_month == 0 and r.stale_users == 0,
                f"token_reset_users_total to sum to {stale} and the alert to clear",
                WAIT_SECONDS,
            )
            timeline.mark("all_counted")
            if getattr(self.args, "json_summary", None) is not None:
                # The picture shows the settled state too, not only its first instant.
                await anyio.sleep(AFTERGLOW_SECONDS)
            recorder.cancel_scope.cancel()
        lines = summary_lines(
            base=base,
            population=population,
            before=before,
            after=after,
            bulk=json.loads(body),
            marks={name: at for at, name in timeline.marks},
            shown_bearer=shown_bearer,
        )
        print("\n".join(lines), flush=True)
        summary = self._summary_json(population, before, after, json.loads(body), timeline)
        path = getattr(self.args, "json_summary", None)
        if path is not None:
            await anyio.Path(path).write_text(
                json.dumps(summary, indent=1) + "\n", encoding="utf-8"
            )
            say(f"time series written to {path}")

    async def _wait_ready(self, client: httpx.AsyncClient, url: str) -> None:
        last = "no answer yet"
        with anyio.move_on_after(WAIT_SECONDS):
            while True:
                try:
                    status, body = await http(client, "GET", url)
                except OSError as exc:
                    last = str(exc)
                else:
                    if status == 200:
                        return
                    last = f"{status} {body}"
                await anyio.sleep(0.1)
        raise DemoError(f"the service was not ready after {WAIT_SECONDS:g} s: {last}")

    async def _app_traffic(self, dsn: str, population: Population) -> None:
        """The application after midnight: each write resets its own user first."""
        pause = TRAFFIC_SECONDS / max(len(population.traffic), 1)
        conn = await connect(self._at(dsn), role="demo-app")
        try:
            for write in population.traffic:
                sql = query("demo_deduct") if write.via == "function" else query("demo_app_write")
                await conn.execute(sql, write.user_id, write.amount)
                await anyio.sleep(pause)  # pacing the simulated traffic, not a wait
        except (OSError, asyncpg.PostgresError) as exc:
            raise DemoError(f"application traffic failed: {exc}") from exc
        finally:
            await conn.close()

    def _summary_json(
        self,
        population: Population,
        before: Reading,
        after: Reading,
        bulk: dict[str, Any],
        timeline: Timeline,
    ) -> dict[str, Any]:
        return {
            "version": 1,
            "users": population.counts(),
            "before": before.to_json(),
            "after": after.to_json(),
            "bulk": bulk,
            "event_lag": {"mean_seconds": after.lag_mean(), "bound_seconds": after.lag_bound()},
            "marks": [{"t": at, "phase": name} for at, name in timeline.marks],
            "samples": [reading.to_json() for reading in timeline.readings],
            "duration_seconds": round(time.monotonic() - self.started, 3),
        }

    def _at(self, dsn: str) -> Settings:
        return dataclasses.replace(self.settings, database_url=dsn)

    def _service_settings(self, dsn: str, secret: str) -> Settings:
        return dataclasses.replace(
            self.settings,
            database_url=dsn,
            cron_secret=secret,
            http_host="127.0.0.1",
            http_port=0 if self.args.http_port is None else int(self.args.http_port),
            watchdog_interval_seconds=WATCHDOG_SECONDS,
            # Grace 0: the demo's month began long ago, the alert shows at once.
            reset_grace_seconds=0.0,
            reset_schedule="off",  # the demo calls the endpoint itself
            alertmanager_url=None,  # a demo never pages anyone
            listener_name="token-reset-demo",
        )


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    """The exceptions inside a (nested) exception group."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


def quiet_terminal(settings: Settings, args: argparse.Namespace) -> None:
    """On a terminal, keep the story readable: console lines, the service's at WARNING.

    The format is already console on a terminal and JSON elsewhere (LOG_FORMAT and
    --log-format win).  Left at INFO, some forty service lines would bury the story's
    dozen, so a terminal shows only warnings and errors (the missed-reset alert is an
    error, so it shows) unless LOG_LEVEL or --log-level asks for more.
    """
    level_asked = getattr(args, "log_level", None) is not None or "LOG_LEVEL" in os.environ
    if settings.log_format != "console" or not sys.stdout.isatty() or level_asked:
        return
    configure_logging("console", "WARNING", stream=sys.stdout)
    say("service log lines below WARNING are hidden here: LOG_LEVEL=INFO shows them")


def choose_data_dir(explicit: Path | None, stack: contextlib.ExitStack) -> Path:
    """Where this run's throwaway cluster lives, without changing any directory's mode.

    An explicit --data-dir is used or refused (EmbeddedPostgresError, one line): a
    directory the user named is never deleted, even one of another PostgreSQL version.
    The default under the current directory is the demo's own: when its cluster is of
    another major version (the binaries were upgraded), it is deleted and made anew,
    in one line.  It is used when the server user can reach it (as root, a 0700 home
    directory is in the way); otherwise the run moves to a private directory it
    creates, says so in one line, and removes it at exit (`stack`).
    """
    if explicit is not None:
        server = EmbeddedPostgres(data_dir=explicit)
        server.server_user()
        server.check_version()
        return explicit
    user = choose_server_user(DEFAULT_DATA_DIR)
    blocked = blocking_directory(DEFAULT_DATA_DIR, user)
    if user is None or blocked is None:
        server = EmbeddedPostgres(data_dir=DEFAULT_DATA_DIR)
        try:
            server.check_version()
        except VersionMismatch as exc:
            say(
                f"{exc.data_dir} holds a PostgreSQL {exc.data_version} cluster and the "
                f"binaries are PostgreSQL {exc.binaries_version}: the demo's data is "
                "throwaway, starting fresh"
            )
            server.destroy()
        return DEFAULT_DATA_DIR
    root = stack.enter_context(private_data_root("token-reset-demo-"))
    say(
        f"the server user {user.name} cannot enter {blocked} "
        f"(mode {stat.S_IMODE(blocked.stat().st_mode):04o}) above {DEFAULT_DATA_DIR.resolve()}, "
        f"and the demo changes no permissions: this run keeps its data in {root} "
        "(removed at exit)"
    )
    return root / "pgdata"
