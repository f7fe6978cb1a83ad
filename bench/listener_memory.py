"""Benchmark 4: the real `token-reset listen` process's memory under 1M doorbells and 1M resets.

Per repetition, on a fresh file copy of one template database (N stale users, ledger
ids advanced so the doorbells name ids the ledger has handed out):

1. start ``python -m listener listen`` (JSON logs to a file, schedule off) and wait
   for /readyz;
2. warm up: a small burst of doorbells and a small trigger reset, processed (read
   from /metrics); then read VmRSS from /proc: the warm start;
3. N doorbells (pg_notify in transactions of 50,000), until /metrics has accounted
   for every one (ok, malformed or overflow); read VmRSS;
4. N resets: ``CALL token_reset_bulk_committing(10000)`` (one transaction, one
   ledger INSERT and one NOTIFY per batch), until token_reset_users_total has them
   all; read VmRSS;
5. SIGTERM; the process must exit 0.

Target: RSS grows by at most 20 MB from warm start after each phase.  VmHWM (peak)
is reported beside it.  ``python -m bench.listener_memory --help``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg

from bench.common import (
    BenchServer,
    base_parser,
    bench_server,
    clone,
    measured,
    print_table,
    publish,
    stale_users_sql,
    summary,
)
from bench.listener_drain import ADVANCE_LEDGER_IDS, notify_burst
from listener.embedded import free_port
from tests.support.metrics import Scrape
from tests.support.processes import Process, memory_kib

NAME = "listener_memory"
TARGET_GROWTH_MB = 20.0
WARM_DOORBELLS = 1_000
WARM_RESETS = 1_000
ROOT = Path(__file__).resolve().parents[1]

LOAD_USERS = stale_users_sql("bench-memory-")
# A write to a stale user resets it through the row trigger (source "trigger").
WARM_RESET = """
UPDATE user_tokens SET monthly_tokens_used = monthly_tokens_used + 1
 WHERE user_id IN (SELECT user_id FROM user_tokens ORDER BY user_id LIMIT $1)
"""
BULK_RESET = "CALL token_reset_bulk_committing(10000)"
LISTEN_COMMAND = (sys.executable, "-m", "listener", "listen", "--no-schedule")


class ListenerProcess(Process):
    """The real service as a child process (the tests' Process), its /metrics read over HTTP."""

    def __init__(self, url: str, workdir: Path) -> None:
        self.port = free_port()
        self.peak_kb = 0
        env = {
            **os.environ,
            "DATABASE_URL": url,
            "LOG_FORMAT": "json",
            "LISTENER_NAME": "bench-memory",
            "PYTHONPATH": str(ROOT),
        }
        argv = [*LISTEN_COMMAND, "--http-port", str(self.port)]
        super().__init__("listener", argv, workdir, env, cwd=ROOT)

    def get(self, path: str) -> tuple[int, str]:
        """(status, body) of a GET on the service's port."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return int(r.status), r.read().decode("utf-8")
        except urllib.error.HTTPError as exc:
            return exc.code, ""
        except OSError:
            return 0, ""

    def metrics(self) -> dict[str, float]:
        """Reset and notification counters: users (all sources) and each outcome."""
        status, body = self.get("/metrics")
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}")
        scrape = Scrape.parse(body)
        found = {
            "users": scrape.total("token_reset_users_total"),
            **scrape.by_label("token_reset_notifications_total", "outcome"),
        }
        found["accounted"] = sum(found.get(k, 0.0) for k in ("ok", "malformed", "overflow"))
        return found

    def memory(self) -> dict[str, int]:
        """VmRSS/VmHWM of the listener process (VmHWM at least every RSS sampled)."""
        rss, peak = memory_kib(self.pid)
        # The kernel updates VmHWM lazily; the samples taken while waiting fill the gap.
        self.peak_kb = max(self.peak_kb, rss, peak)
        return {"VmRSS": rss, "VmHWM": self.peak_kb}

    async def wait(self, check: Callable[[], bool], seconds: float, what: str) -> float:
        """Poll `check` until true (deadline `seconds`); returns how long it took."""
        started = time.monotonic()
        while not check():
            if self.popen.poll() is not None:
                raise RuntimeError(f"listener exited ({self.popen.returncode}):\n{self.tail()}")
            if time.monotonic() - started > seconds:
                raise TimeoutError(f"{what}: not within {seconds:g}s")
            self.memory()
            await asyncio.sleep(0.05)
        return time.monotonic() - started


async def prepare_template(server: BenchServer, users: int, doorbells: int) -> str:
    """A migrated database with the stale users and the ledger ids the doorbells name."""
    name, url = await server.migrated_database("bench_memory_template")
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(LOAD_USERS, users + WARM_RESETS)
        await conn.fetchval(ADVANCE_LEDGER_IDS, doorbells + WARM_DOORBELLS)
        await conn.execute("VACUUM ANALYZE user_tokens")
    finally:
        await conn.close()
    return name


async def repetition(url: str, doorbells: int, resets: int, workdir: Path) -> dict[str, Any]:
    """One listener process through warm-up, the doorbells and the resets."""
    deadline = 120 + (doorbells + resets) / 2_000
    listener = ListenerProcess(url, workdir)
    conn = await asyncpg.connect(url)
    try:
        await listener.wait(lambda: listener.get("/readyz")[0] == 200, 60, "ready")
        await notify_burst(conn, WARM_DOORBELLS)
        await conn.execute(WARM_RESET, WARM_RESETS)
        await listener.wait(
            lambda: (
                listener.metrics()["users"] >= WARM_RESETS
                and listener.metrics()["accounted"] >= WARM_DOORBELLS
            ),
            60,
            "warm-up processed",
        )
        warm = listener.memory()
        before = listener.metrics()["accounted"]
        await notify_burst(conn, doorbells, first_id=WARM_DOORBELLS + 1)
        doorbell_seconds = await listener.wait(
            lambda: listener.metrics()["accounted"] >= before + doorbells,
            deadline,
            f"{doorbells} doorbells processed",
        )
        after_doorbells = listener.memory()
        started = time.monotonic()
        await conn.execute(BULK_RESET, timeout=deadline)
        await listener.wait(
            lambda: listener.metrics()["users"] >= WARM_RESETS + resets,
            deadline,
            f"{resets} resets counted",
        )
        reset_seconds = time.monotonic() - started
        after_resets = listener.memory()
        final = listener.metrics()
    finally:
        await conn.close()
        code = listener.stop(within=20.0)
    if code != 0:
        raise RuntimeError(f"listener exited {code} on SIGTERM")
    if final["users"] != WARM_RESETS + resets:
        raise RuntimeError(f"counted {final['users']} resets, expected {WARM_RESETS + resets}")
    return {
        "warm_rss_kb": warm["VmRSS"],
        "after_doorbells_rss_kb": after_doorbells["VmRSS"],
        "after_resets_rss_kb": after_resets["VmRSS"],
        "peak_rss_kb": after_resets["VmHWM"],
        "doorbells_growth_mb": (after_doorbells["VmRSS"] - warm["VmRSS"]) / 1024,
        "resets_growth_mb": (after_resets["VmRSS"] - warm["VmRSS"]) / 1024,
        "peak_growth_mb": (after_resets["VmHWM"] - warm["VmRSS"]) / 1024,
        "doorbells_seconds": doorbell_seconds,
        "resets_seconds": reset_seconds,
        "overflow": final.get("overflow", 0.0),
        "malformed": final.get("malformed", 0.0),
    }


async def run(doorbells: int, resets: int, repetitions: int) -> dict[str, Any]:
    """Every repetition on its own copy of the template; results as a JSON-ready dict."""
    samples: list[dict[str, Any]] = []
    with bench_server() as server, tempfile.TemporaryDirectory() as tmp:
        described = await server.describe()
        template = await prepare_template(server, resets, doorbells)
        try:
            for rep in range(repetitions):
                async with clone(server, template, "bench_memory") as (_, url):
                    samples.append(await repetition(url, doorbells, resets, Path(tmp)))
                print(f"  repetition {rep + 1}: {samples[-1]}", flush=True)
        finally:
            await server.drop_database(template)
    keys = [k for k in samples[0] if k.endswith(("_mb", "_kb", "_seconds"))]
    growth = max(max(s["doorbells_growth_mb"], s["resets_growth_mb"]) for s in samples)
    return {
        "benchmark": NAME,
        "doorbells": doorbells,
        "resets": resets,
        "repetitions": repetitions,
        "target_growth_mb": TARGET_GROWTH_MB,
        "server": described,
        "samples": samples,
        "summary": {key: summary([float(s[key]) for s in samples]) for key in keys},
        "meets_target": growth <= TARGET_GROWTH_MB,
    }


def report(payload: dict[str, Any]) -> None:
    """Print the RSS table."""
    s = payload["summary"]
    rows = [
        ["warm start", s["warm_rss_kb"]["median"] / 1024, "-", "-"],
        [
            f"after {payload['doorbells']} doorbells",
            s["after_doorbells_rss_kb"]["median"] / 1024,
            s["doorbells_growth_mb"]["min"],
            s["doorbells_growth_mb"]["median"],
        ],
        [
            f"after {payload['resets']} resets",
            s["after_resets_rss_kb"]["median"] / 1024,
            s["resets_growth_mb"]["min"],
            s["resets_growth_mb"]["median"],
        ],
        ["peak (VmHWM)", s["peak_rss_kb"]["median"] / 1024, "-", s["peak_growth_mb"]["median"]],
    ]
    print_table(
        f"listener RSS, {payload['repetitions']} repetition(s), target growth <= "
        f"{TARGET_GROWTH_MB:g} MB",
        ["point", "RSS MB (median)", "growth MB min", "growth MB median"],
        rows,
    )
    print(f"meets target (every repetition): {payload['meets_target']}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the memory benchmark; prints a table and writes the JSON results."""
    parser = base_parser(__doc__, NAME)
    parser.add_argument("--doorbells", type=int, default=None, help="default 1,000,000")
    parser.add_argument("--resets", type=int, default=None, help="default 1,000,000")
    args = parser.parse_args(argv)
    doorbells = args.doorbells or (20_000 if args.smoke else 1_000_000)
    resets = args.resets or (20_000 if args.smoke else 1_000_000)
    repetitions = args.repetitions or (1 if args.smoke else 2)
    payload = measured(lambda: asyncio.run(run(doorbells, resets, repetitions)))
    return publish(payload, report, NAME, args)


if __name__ == "__main__":
    raise SystemExit(main())
