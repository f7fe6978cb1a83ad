"""Benchmark: how the bulk reset, the write path, the watchdog and the listener scale with N.

For each N (default 100k, 1M, 10M users) one template is built through the migrations:
N stale users and a month of ledger (last period's reset row and ``--ledger-per-user``
deductions per user, usage equal to the deductions), vacuumed and analysed
(bench/scale_data.py).  On fresh file copies of it, interleaved and rotated across
repetitions (bench/scale_bulk.py):

- bulk reset: ``function`` (``SELECT reset_monthly_tokens_for_all_users()``),
  ``committing`` (listener.bulk.run_bulk_reset), ``minimal`` (one UPDATE feeding one
  INSERT into a ledger with only its key and the one-reset-per-period index),
  ``minimal_full`` (the same statement into the project's ledger) and ``bare`` (the
  UPDATE alone): seconds, server CPU, WAL, HOT ratio, table growth, and a second run
  that finds nobody stale;
- right after the runner's reset: watchdog_snapshot / status_summary latency, and the
  catch-up of a listener that was down during the run;
- ledger and index sizes per million rows;
- deduct TPS against a bare counter UPDATE on a plain table of the same N, and the row
  trigger's overhead, under pgbench (bench/scale_writes.py).

``python -m bench.scale [--sizes 100000,1000000,10000000] [--ledger-per-user 10]``;
``--smoke`` runs 2,000 and 20,000 users in seconds.  Writes bench/results/scale.json
and draws bench/results/scale.png beside it (bench/plot_scale.py).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import scale_bulk, scale_data, scale_writes
from bench.common import (
    BenchServer,
    add_sizes_option,
    base_parser,
    bench_server,
    chosen_sizes,
    machine,
    machine_since,
    output_path,
    print_table,
    publish,
    ratio,
    read_patch,
    rotated,
    summary,
)
from bench.plot_scale import draw
from bench.write_path import write_scripts

NAME = "scale"
TARGETS = {
    "deduct_over_bare_min": scale_writes.TARGET_DEDUCT_OVER_BARE,
    "trigger_overhead_max": scale_writes.TARGET_TRIGGER_OVERHEAD,
    "bulk_function_over_minimal_max": 1.3,
    "bulk_target_sizes": [1_000_000, 10_000_000],
    "latency": "about the same at 100k and 10M",
}
# Disk a size needs, from the bytes per user the previous size's template took: at
# most two databases of the size at a time (a template and a copy), plus WAL and slack.
DISK_COPIES = 3


async def run_size(
    server: BenchServer, users: int, args: Any, scripts: Path, *, patch: str | None
) -> dict[str, Any]:
    """Everything for one N; the templates are dropped afterwards."""
    started = time.perf_counter()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    load_before = machine()["loadavg"]
    print(f"\n== {users:,} users, {args.ledger_per_user} deductions each", flush=True)
    base, timings = await scale_data.build_base(server, users, args.ledger_per_user, patch)
    print(f"  template built in {timings['load_seconds'] + timings['vacuum_seconds']:.1f} s")
    write_template = None
    try:
        base_bytes = await _database_bytes(server, base)
        raw: dict[str, list[dict[str, Any]]] = {name: [] for name in args.contenders}
        for repetition in range(args.repetitions):
            for name in rotated(args.contenders, repetition):
                result = await scale_bulk.measure_once(
                    server,
                    base,
                    name,
                    users,
                    args.batch_size,
                    latency_runs=args.latency_runs,
                    extras=name == "committing",
                )
                print(
                    f"    rep {repetition + 1}/{args.repetitions} {name:<12} "
                    f"{result['seconds']:.2f} s (nothing to do: "
                    f"{result['nothing_to_do_seconds']:.3f} s)",
                    flush=True,
                )
                raw[name].append(result)
        bulk_done = time.perf_counter()
        write_template = await scale_data.build_after_reset(server, base, users)
        # Never three copies of a size on disk: the base is done with.
        await server.drop_database(base)
        sizes = await scale_data.ledger_sizes(server, write_template)
        writes: list[dict[str, Any]] = []
        if not args.skip_writes:
            writes = await scale_writes.measure(
                server,
                write_template,
                users=users,
                repetitions=args.repetitions,
                clients=args.clients,
                sync_modes=args.synchronous_commit,
                seconds=args.seconds,
                scripts=scripts,
            )
    finally:
        await server.drop_database(base)
        if write_template is not None:
            await server.drop_database(write_template)
    finished = time.perf_counter()
    return {
        "users": users,
        "ledger_per_user": args.ledger_per_user,
        "seeded_ledger_rows": users * (args.ledger_per_user + 1),
        "bulk": _bulk_summary(raw),
        "latency": _latency_summary(raw.get("committing", [])),
        "listener": _listener_summary(raw.get("committing", [])),
        "ledger_sizes": sizes,
        "writes": writes,
        "template_bytes": base_bytes,
        # Each size's own load: sizes may come from separate runs (--merge-into).
        "run": {
            "started_at": started_at,
            "loadavg_before": load_before,
            "loadavg_after": machine()["loadavg"],
        },
        "timings": {
            **timings,
            "bulk_phase_seconds": bulk_done - started - sum(timings.values()),
            "write_phase_seconds": finished - bulk_done,
            "total_seconds": finished - started,
        },
    }


async def _database_bytes(server: BenchServer, database: str) -> int:
    conn = await server.admin()
    try:
        size: int = await conn.fetchval("SELECT pg_database_size($1)", database)
    finally:
        await conn.close()
    return size


def _bulk_summary(raw: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    contenders: dict[str, Any] = {}
    for name, runs in raw.items():
        cpu = [r["server_cpu_seconds"] for r in runs]
        contenders[name] = {
            "description": scale_bulk.CONTENDERS[name].description,
            "seconds": summary([r["seconds"] for r in runs]),
            "server_cpu_seconds": None if None in cpu else summary(cpu),
            "wal_bytes": summary([float(r["wal_bytes"]) for r in runs]),
            "hot_update_ratio": summary([r["hot_update_ratio"] for r in runs]),
            "heap_growth": summary([r["heap_growth"] for r in runs]),
            "total_growth": summary([r["total_growth"] for r in runs]),
            "dead_tuples": summary([float(r["dead_tuples"]) for r in runs]),
            "nothing_to_do_seconds": summary([r["nothing_to_do_seconds"] for r in runs]),
        }
    ratios: dict[str, dict[str, float]] = {}
    for ours in ("function", "committing", "minimal_full", "minimal"):
        for baseline in ("minimal", "bare"):
            if ours == baseline or ours not in contenders or baseline not in contenders:
                continue
            mine, theirs = contenders[ours], contenders[baseline]
            entry = {s: ratio(mine["seconds"][s], theirs["seconds"][s]) for s in ("min", "median")}
            cpu = (mine["server_cpu_seconds"], theirs["server_cpu_seconds"])
            # At smoke sizes a contender can take less than one clock tick of CPU.
            if all(c and c["median"] > 0 for c in cpu):
                entry["cpu_median"] = ratio(
                    mine["server_cpu_seconds"]["median"], theirs["server_cpu_seconds"]["median"]
                )
            ratios[f"{ours}/{baseline}"] = entry
    return {"contenders": contenders, "ratios": ratios}


def _latency_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name in scale_bulk.LATENCY_QUERIES:
        samples = [s for r in runs for s in r["latency"][name]["samples"]]
        firsts = [r["latency"][name]["first_seconds"] for r in runs]
        if samples:
            found[name] = {"seconds": summary(samples), "first_seconds": summary(firsts)}
    return found


def _listener_summary(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not runs:
        return None
    fields = ("ready_seconds", "counted_seconds", "bare_read_seconds")
    found: dict[str, Any] = {f: summary([r["listener"][f] for r in runs]) for f in fields}
    found["resets"] = runs[0]["listener"]["resets"]
    found["windows"] = summary([float(r["listener"]["windows"]) for r in runs])
    return found


def _disk_free(server: BenchServer) -> int:
    where = server.embedded.data_dir if server.embedded is not None else Path("/")
    return shutil.disk_usage(where).free


async def run(args: Any, patch: str | None) -> dict[str, Any]:
    """Every size in turn on one server; a size the disk cannot hold is skipped, said so."""
    load_before = machine()["loadavg"]
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    scale_bulk.devnull_logs()
    with bench_server() as server, tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        settings = await server.describe()
        scripts = write_scripts(Path(tmp), scale_writes.SCRIPTS)
        min_free = _disk_free(server)
        for users in args.sizes:
            free = _disk_free(server)
            if results:
                previous = results[-1]
                needed = previous["template_bytes"] / previous["users"] * users * DISK_COPIES
                if needed > free:
                    print(f"\n== {users:,} users skipped: needs ~{needed / 2**30:.1f} GiB")
                    skipped.append({"users": users, "needed_bytes": needed, "free_bytes": free})
                    continue
            results.append(await run_size(server, users, args, scripts, patch=patch))
            min_free = min(min_free, free, _disk_free(server))
    return {
        "benchmark": NAME,
        "sizes": list(args.sizes),
        "ledger_per_user": args.ledger_per_user,
        "repetitions": args.repetitions,
        "batch_size": args.batch_size,
        "latency_runs": args.latency_runs,
        "pgbench": {
            "seconds": args.seconds,
            "clients": list(args.clients),
            "synchronous_commit": list(args.synchronous_commit),
            "scripts": scale_writes.SCRIPTS,
        },
        "patch": str(args.patch) if args.patch else None,
        "targets": TARGETS,
        "results": results,
        "skipped": skipped,
        "disk_min_free_bytes": min_free,
        "server": settings,
        "machine": {**machine_since(load_before), **_memory()},
    }


def merge(earlier: dict[str, Any], now: dict[str, Any]) -> dict[str, Any]:
    """`now` plus the sizes of an earlier run it did not measure; each size keeps its
    own settings and load (ratios are always within one size, so within one run)."""
    ran = {r["users"] for r in now["results"]}
    kept = [r for r in earlier["results"] if r["users"] not in ran]
    for size in kept:
        size.setdefault("ledger_per_user", earlier.get("ledger_per_user"))
        size.setdefault("repetitions", earlier.get("repetitions"))
    for size in now["results"]:
        size["repetitions"] = now["repetitions"]
    merged = dict(now)
    merged["results"] = sorted([*kept, *now["results"]], key=lambda r: r["users"])
    merged["sizes"] = [r["users"] for r in merged["results"]]
    merged["skipped"] = [s for s in now["skipped"] if s["users"] not in ran]
    merged["merged_from"] = [
        *earlier.get("merged_from", []),
        {"sizes": sorted(r["users"] for r in kept), "machine": earlier.get("machine")},
    ]
    return merged


def _memory() -> dict[str, int]:
    try:
        line = Path("/proc/meminfo").read_text(encoding="ascii").splitlines()[0]
    except OSError:
        return {}
    return {"memory_bytes": int(line.split()[1]) * 1024}


def report(payload: dict[str, Any]) -> None:
    """Tables per size: bulk, latency and listener, writes; then the sizes."""
    for size in payload["results"]:
        n = size["users"]
        bulk = size["bulk"]
        print_table(
            f"bulk reset, {n:,} stale users "
            f"({size.get('repetitions', payload['repetitions'])} reps)",
            ["contender", "min s", "median s", "CPU s", "HOT", "heap +", "idle run s"],
            [
                [
                    name,
                    c["seconds"]["min"],
                    c["seconds"]["median"],
                    c["server_cpu_seconds"]["median"] if c["server_cpu_seconds"] else "-",
                    f"{c['hot_update_ratio']['median']:.0%}",
                    f"{c['heap_growth']['median']:+.0%}",
                    c["nothing_to_do_seconds"]["median"],
                ]
                for name, c in bulk["contenders"].items()
            ],
        )
        print_table(
            "ratios (target function/minimal <= 1.3 at 1M and 10M)",
            ["ratio", "of mins", "of medians", "of CPU"],
            [
                [k, v["min"], v["median"], v.get("cpu_median", "-")]
                for k, v in bulk["ratios"].items()
            ],
        )
        rows = [
            [
                name,
                1000 * v["seconds"]["median"],
                1000 * v["seconds"]["min"],
                1000 * v["first_seconds"]["median"],
            ]
            for name, v in size["latency"].items()
        ]
        print_table("latency after the reset (ms)", ["query", "median", "min", "first"], rows)
        if size["listener"]:
            lis = size["listener"]
            print(
                f"listener catch-up of {lis['resets']:,} resets: ready "
                f"{lis['ready_seconds']['median']:.2f} s, counted "
                f"{lis['counted_seconds']['median']:.2f} s (bare read "
                f"{lis['bare_read_seconds']['median']:.3f} s)"
            )
        if size["writes"]:
            print_table(
                "writes (median TPS; targets deduct/bare >= 0.6, trigger overhead <= 10%)",
                ["sync", "c", "bare", "trg off", "trg on", "deduct", "d/bare", "cpu", "ovh", "cpu"],
                [
                    [
                        e["synchronous_commit"],
                        e["clients"],
                        *(
                            e["workloads"][w]["tps"]["median"]
                            for w in (
                                "bare_counter",
                                "update_triggers_off",
                                "update_triggers_on",
                                "deduct",
                            )
                        ),
                        e["deduct_over_bare"]["median"],
                        e["deduct_over_bare"].get("cpu", "-"),
                        f"{e['trigger_overhead']['median']:+.1%}",
                        f"{e['trigger_overhead'].get('cpu', 0):+.1%}",
                    ]
                    for e in size["writes"]
                ],
            )
        ledger = size["ledger_sizes"]
        print(
            f"ledger: {ledger['rows']:,} rows, {ledger['total_bytes'] / 2**20:.0f} MiB "
            f"({ledger['total_bytes_per_million_rows'] / 2**20:.0f} MiB per million rows); "
            f"size took {size['timings']['total_seconds']:.0f} s"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the scale benchmark; prints tables, writes the JSON and the plot."""
    parser = base_parser(__doc__, NAME)
    add_sizes_option(parser)
    parser.add_argument("--ledger-per-user", type=int, default=10, help="deductions per user")
    parser.add_argument("--batch-size", type=int, default=None, help="runner batch (10,000)")
    parser.add_argument("--seconds", type=int, default=None, help="pgbench -T (default 10)")
    parser.add_argument("--clients", default=None, help="pgbench clients (default 2,8)")
    parser.add_argument("--synchronous-commit", default=None, help="default on,off")
    parser.add_argument("--latency-runs", type=int, default=None, help="default 7")
    parser.add_argument(
        "--contenders",
        default=",".join(scale_bulk.CONTENDERS),
        help=f"bulk contenders, a subset of {','.join(scale_bulk.CONTENDERS)}",
    )
    parser.add_argument("--skip-writes", action="store_true", help="no pgbench phase")
    parser.add_argument("--no-plot", action="store_true", help="do not draw the PNG")
    parser.add_argument(
        "--merge-into",
        type=Path,
        default=None,
        help="an earlier scale.json: keep its other sizes, replace the sizes run now",
    )
    parser.add_argument("--patch", type=Path, default=None, help="SQL applied after migrating")
    args = parser.parse_args(argv)
    args.sizes = chosen_sizes(args)
    args.repetitions = args.repetitions or (1 if args.smoke else 3)
    args.batch_size = args.batch_size or (2_000 if args.smoke else 10_000)
    args.seconds = args.seconds or (1 if args.smoke else 10)
    args.clients = [int(c) for c in (args.clients or ("2" if args.smoke else "2,8")).split(",")]
    args.synchronous_commit = (args.synchronous_commit or ("on" if args.smoke else "on,off")).split(
        ","
    )
    args.latency_runs = args.latency_runs or (3 if args.smoke else 7)
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = [c for c in args.contenders if c not in scale_bulk.CONTENDERS]
    if unknown or not args.contenders:
        parser.error(f"unknown contenders {unknown}")
    if any(n <= 0 for n in args.sizes) or args.ledger_per_user < 0:
        parser.error("sizes must be positive and --ledger-per-user not negative")
    patch = read_patch(args.patch)
    payload = asyncio.run(run(args, patch))
    if args.merge_into is not None:
        payload = merge(json.loads(args.merge_into.read_text(encoding="utf-8")), payload)
    patched = args.patch is not None
    output = output_path(NAME, args, patched=patched)
    code = publish(payload, report, NAME, args, patched=patched)
    if not args.no_plot:
        print(f"plot written to {draw(payload, output.with_suffix('.png'))}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
