"""Benchmark: the listener's end-to-end lag and sustained rate, beside a bare LISTEN loop.

The workload is the one the issue names: one reset per transaction, as fast as the
machine produces them.  ``pgbench`` (C, several connections) runs

    UPDATE user_tokens SET monthly_tokens_used = monthly_tokens_used + 1
     WHERE user_id = <the next stale user>

so every transaction wakes the row trigger, which writes one ledger reset row and
one NOTIFY.  Producers run with synchronous_commit off (the fastest writes this
machine can make; the server itself keeps PostgreSQL's durable defaults).

Contenders, each in its own process, each in its own phase on a fresh clone of the
same database (2 cores: running them at once would measure their fight for CPU):

* ``listener``: the real service (listener.service.Service: doorbell buffer, ledger
  horizon, windows, cursor writes, metrics, JSON logs to /dev/null), timestamping
  each ledger window it finishes;
* ``bare``: an asyncpg ``add_listener`` callback that only records (time, payload):
  the floor any NOTIFY consumer pays.

Lag is per reset row: processed time (listener: its window was counted; bare: its
doorbell arrived) minus the row's commit time (``pg_xact_commit_timestamp``, so the
embedded server runs with track_commit_timestamp on; without it, the row's
created_at, the writing transaction's start, is used and the results say so).
Rate is rows processed per second from the first commit to the last row processed.

``python -m bench.listener_lag [--smoke] [--seconds S] [--clients N]``
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import asyncpg

from bench.common import (
    BenchServer,
    base_parser,
    bench_server,
    bindir,
    clone,
    listener_settings,
    machine,
    output_path,
    print_table,
    rotated,
    write_results,
)
from listener.logs import configure_logging
from listener.payload import CHANNEL
from listener.service import Service

NAME = "listener_lag"
CONTENDERS = ("listener", "bare")
SENTINEL = '{"bench":"done"}'
CONSUMER = "bench"
READY = "READY"
DRAIN_SECONDS = 60.0

CREATE_USERS = """
CREATE SEQUENCE public.bench_lag_next_user;
INSERT INTO public.user_tokens (user_id, monthly_tokens_used, last_monthly_reset)
SELECT md5(g::text)::uuid, 10, public.token_reset_period_start() - interval '1 day'
  FROM generate_series(1, {users}) AS g;
ANALYZE public.user_tokens;
"""
# The scalar subquery runs once per statement (an InitPlan): one user per transaction.
PGBENCH_SCRIPT = """\
UPDATE public.user_tokens SET monthly_tokens_used = monthly_tokens_used + 1
 WHERE user_id = md5((SELECT nextval('public.bench_lag_next_user'))::text)::uuid;
"""
ROWS_WITH_COMMIT_TIME = """
SELECT id, extract(epoch FROM pg_xact_commit_timestamp(xmin))::float8 AS committed
  FROM public.token_transactions WHERE operation = 'reset' ORDER BY id
"""
ROWS_WITH_START_TIME = """
SELECT id, extract(epoch FROM created_at)::float8 AS committed
  FROM public.token_transactions WHERE operation = 'reset' ORDER BY id
"""


# ------------------------------------------------------------------ roles ---
async def listener_role(url: str, out: Path) -> None:
    """The real service; records (time, after, upper, rows) per counted window."""
    # Logs are rendered as in production (that cost is part of the listener), then dropped.
    with open(os.devnull, "w", encoding="utf-8") as sink:  # noqa: ASYNC230  # before any I/O
        configure_logging("json", "INFO", stream=sink)
        settings = listener_settings(url, CONSUMER)
        service = Service(settings, handle_signals=True)
        marks: list[tuple[float, int, int, int]] = []
        service.ledger.on_window = lambda after, upper, rows: marks.append(
            (time.time(), after, upper, rows)
        )
        async with anyio.create_task_group() as group:
            await group.start(service.run)
            with anyio.fail_after(30):
                # Readiness is a plain flag (what /readyz serves): poll it.
                while service.state.not_ready():  # noqa: ASYNC110
                    await anyio.sleep(0.01)
            print(READY, flush=True)
        result = {"windows": marks, "reads": service.ledger.reads}
    await anyio.Path(out).write_text(json.dumps(result), encoding="utf-8")


async def bare_role(url: str, out: Path) -> None:
    """The baseline: a callback that records (time, payload) and nothing else."""
    conn = await asyncpg.connect(url)
    seen: list[tuple[float, str]] = []
    done = anyio.Event()

    def on_notify(connection: object, pid: int, channel: str, payload: object) -> None:
        seen.append((time.time(), str(payload)))
        if payload == SENTINEL:
            done.set()

    await conn.add_listener(CHANNEL, on_notify)
    print(READY, flush=True)
    await done.wait()
    await conn.close()
    await anyio.Path(out).write_text(json.dumps({"notifications": seen[:-1]}), encoding="utf-8")


# ----------------------------------------------------------------- phases ---
async def prepare_template(server: BenchServer, users: int) -> str:
    """A migrated database with `users` stale users; each phase clones it."""
    name, url = await server.migrated_database("bench_lag_template")
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(CREATE_USERS.format(users=int(users)))
    finally:
        await conn.close()
    return name


def spawn_role(role: str, url: str, out: Path) -> subprocess.Popen[str]:
    """Start a contender process and wait for it to say it is listening."""
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.listener_lag", "--role", role, "--url", url, "--out", out],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if line != READY:
        process.kill()
        raise RuntimeError(f"{role} did not start (said {line!r})")
    return process


def run_pgbench(url: str, seconds: float, clients: int, script: Path) -> dict[str, Any]:
    """The producers: `clients` connections, one reset per transaction, for `seconds`."""
    env = {**os.environ, "PGOPTIONS": "-c synchronous_commit=off"}
    command = [
        str(bindir() / "pgbench"),
        "-n",
        "-M",
        "prepared",
        "-c",
        str(clients),
        "-j",
        str(min(clients, os.cpu_count() or 1)),
        "-T",
        str(max(1, round(seconds))),
        "-f",
        str(script),
        url,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    tps = [line for line in done.stdout.splitlines() if line.startswith("tps")]
    return {"tps": float(tps[-1].split()[2]) if tps else None, "clients": clients}


async def wait_for_cursor(url: str, last_id: int) -> None:
    """Until the listener's stored cursor has passed every ledger row."""
    conn = await asyncpg.connect(url)
    try:
        with anyio.fail_after(DRAIN_SECONDS):
            while True:
                cursor = await conn.fetchval(
                    "SELECT last_id FROM token_reset_listener_cursors WHERE consumer = $1",
                    CONSUMER,
                )
                if cursor is not None and cursor >= last_id:
                    return
                await anyio.sleep(0.05)
    finally:
        await conn.close()


async def ledger_rows(url: str) -> tuple[list[int], list[float], str]:
    """Reset row ids and their commit times (or start times, when commits are not tracked)."""
    conn = await asyncpg.connect(url)
    try:
        tracked = await conn.fetchval("SELECT current_setting('track_commit_timestamp')")
        sql = ROWS_WITH_COMMIT_TIME if tracked == "on" else ROWS_WITH_START_TIME
        rows = await conn.fetch(sql)
    finally:
        await conn.close()
    clock = "commit" if tracked == "on" else "transaction start (created_at)"
    return [r["id"] for r in rows], [r["committed"] for r in rows], clock


async def phase(role: str, url: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """One contender against one fresh database: produce, drain, measure."""
    out = workdir / f"{role}.json"
    process = spawn_role(role, url, out)
    try:
        producers = await anyio.to_thread.run_sync(
            run_pgbench, url, args.seconds, args.clients, workdir / "script.sql"
        )
        conn = await asyncpg.connect(url)
        try:
            last_id = await conn.fetchval("SELECT coalesce(max(id), 0) FROM token_transactions")
            if role == "bare":
                await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, SENTINEL)
        finally:
            await conn.close()
        if role == "listener":
            await wait_for_cursor(url, last_id)
            process.terminate()
        code = await anyio.to_thread.run_sync(lambda: process.wait(timeout=DRAIN_SECONDS))
        if code != 0:
            raise RuntimeError(f"{role} exited with {code}")
    finally:
        if process.poll() is None:
            process.kill()
    ids, committed, clock = await ledger_rows(url)
    recorded = json.loads(out.read_text(encoding="utf-8"))
    processed = processed_times(role, recorded, ids)
    return measure(
        ids=ids,
        committed=committed,
        processed=processed,
        producers=producers,
        clock=clock,
        reads=recorded.get("reads"),
    )


def processed_times(role: str, recorded: dict[str, Any], ids: list[int]) -> list[float]:
    """When each ledger row reached the contender (NaN if it never did)."""
    if role == "bare":
        arrived: dict[int, float] = {}
        for at, payload in recorded["notifications"]:
            first_id = json.loads(payload).get("first_id")
            if isinstance(first_id, int):
                arrived.setdefault(first_id, at)
        return [arrived.get(row_id, float("nan")) for row_id in ids]
    windows = sorted(recorded["windows"], key=lambda w: w[2])
    uppers = [upper for _, _, upper, _ in windows]
    times: list[float] = []
    for row_id in ids:
        index = bisect.bisect_left(uppers, row_id)
        times.append(windows[index][0] if index < len(windows) else float("nan"))
    return times


def measure(
    *,
    ids: list[int],
    committed: list[float],
    processed: list[float],
    producers: dict[str, Any],
    clock: str,
    reads: int | None,
) -> dict[str, Any]:
    """Lag percentiles, rates and completeness of one phase."""
    lags = sorted(p - c for p, c in zip(processed, committed, strict=True) if not math.isnan(p))
    if not lags:
        raise RuntimeError("no row was processed")
    seen = [p for p in processed if not math.isnan(p)]
    span = max(seen) - min(committed)
    return {
        "resets": len(ids),
        "processed": len(lags),
        "producer_tps": producers["tps"],
        "clients": producers["clients"],
        "lag_p50_ms": 1000 * percentile(lags, 0.50),
        "lag_p99_ms": 1000 * percentile(lags, 0.99),
        "lag_max_ms": 1000 * lags[-1],
        "rate_per_second": len(lags) / span if span > 0 else None,
        "drain_after_last_commit_ms": 1000 * (max(seen) - max(committed)),
        "lag_measured_from": clock,
        "ledger_reads": reads,
    }


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


# ------------------------------------------------------------------- main ---
async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every repetition of both contenders; returns the results document."""
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in CONTENDERS}
    # The embedded server records commit times: the lag is measured from them.
    commit_times = {"track_commit_timestamp": "on"}
    with (
        bench_server("token-reset-lag-", commit_times) as server,
        tempfile.TemporaryDirectory() as tmp,
    ):
        workdir = Path(tmp)
        (workdir / "script.sql").write_text(PGBENCH_SCRIPT, encoding="utf-8")
        template = await prepare_template(server, args.users)
        settings = await server.describe()
        try:
            for repetition in range(args.repetitions):
                for role in rotated(CONTENDERS, repetition):
                    async with clone(server, template, "bench_lag") as (_, url):
                        results[role].append(await phase(role, url, args, workdir))
                    print(f"  {role} repetition {repetition + 1}: {results[role][-1]}", flush=True)
        finally:
            await server.drop_database(template)
    return {
        "benchmark": NAME,
        "smoke": args.smoke,
        "workload": {
            "seconds": args.seconds,
            "clients": args.clients,
            "users": args.users,
            "producer_synchronous_commit": "off",
            "statement": PGBENCH_SCRIPT.strip(),
        },
        "server": settings,
        "machine": machine(),
        "results": results,
        "median": {role: medians(runs) for role, runs in results.items()},
    }


def medians(runs: list[dict[str, Any]]) -> dict[str, float | None]:
    """Per numeric field, the median over repetitions."""
    keys = [k for k, v in runs[0].items() if isinstance(v, int | float)]
    return {
        key: statistics.median(r[key] for r in runs if r[key] is not None)
        if any(r[key] is not None for r in runs)
        else None
        for key in keys
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or, with --role, one contender process of it)."""
    parser = base_parser(__doc__, NAME)
    parser.add_argument("--seconds", type=float, default=None, help="producer run per phase")
    parser.add_argument("--clients", type=int, default=4, help="producer connections")
    parser.add_argument("--users", type=int, default=None, help="stale users to reset")
    parser.add_argument("--role", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role is not None:
        role = listener_role if args.role == "listener" else bare_role
        anyio.run(role, args.url, args.out)
        return 0
    args.seconds = args.seconds or (2.0 if args.smoke else 20.0)
    args.users = args.users or (20_000 if args.smoke else 400_000)
    args.repetitions = args.repetitions or (1 if args.smoke else 2)
    document = anyio.run(run, args)
    rows = [
        [
            role,
            m["resets"],
            m["producer_tps"],
            m["rate_per_second"],
            m["lag_p50_ms"],
            m["lag_p99_ms"],
            m["lag_max_ms"],
            m["drain_after_last_commit_ms"],
        ]
        for role, m in document["median"].items()
    ]
    clock = document["results"]["listener"][0]["lag_measured_from"]
    print_table(
        f"{NAME}: one reset per transaction, {args.clients} producers, medians of "
        f"{args.repetitions} run(s); lag from {clock}",
        ["contender", "resets", "producer tps", "rate/s", "p50 ms", "p99 ms", "max ms", "drain ms"],
        rows,
    )
    output = write_results(document, output_path(NAME, args))
    print(f"\nresults: {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
