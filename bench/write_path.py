"""Benchmark 2: the write path under pgbench, against the bare UPDATE.

Three workloads on fresh copies of the same users (none stale, limits so high that no
deduction is refused), each a pgbench custom script run with ``-n -M prepared``:

- deduct: ``SELECT deduct_tokens(uid, 1, 'bench')`` (it also writes a ledger row);
- update_triggers_on: ``UPDATE user_tokens SET monthly_tokens_used = monthly_tokens_used
  + 1 WHERE user_id = uid`` with the row triggers in place (a write that needs no reset);
- bare: the same UPDATE with the triggers disabled.

Users have uuids computed from a number, so pgbench draws ``random(1, :nusers)`` and
every workload pays for the same expression.  Targets: deduct >= 0.5x bare, trigger
overhead (1 - on/off) <= 15 %, at 2 and 8 clients, with synchronous_commit on and off.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from bench.common import (
    BenchServer,
    Copy,
    add_patch_option,
    base_parser,
    bench_server,
    bindir,
    build_template,
    fresh_copy,
    local_backend_pid,
    machine,
    machine_since,
    postmaster_pid,
    print_table,
    publish,
    ratio,
    read_patch,
    rotated,
    server_cpu_seconds,
    summary,
    unreaped_children,
)

NAME = "write_path"
TARGET_DEDUCT_OVER_BARE = 0.5
TARGET_TRIGGER_OVERHEAD = 0.15
SETTLE_SECONDS = 10.0

# The same text builds the ids in the data and in every script.
USER_ID = "('00000000-0000-0000-0000-' || lpad(to_hex({n}), 12, '0'))::uuid"

LOAD_USERS = f"""
INSERT INTO user_tokens (user_id, monthly_token_limit, monthly_tokens_used, last_monthly_reset)
SELECT {USER_ID.format(n="n")}, 2147483647, 0, now()
  FROM generate_series(1, $1::integer) AS n
"""

_PICK = "\\set n random(1, :nusers)\n"
SCRIPTS = {
    "deduct": _PICK + f"SELECT deduct_tokens({USER_ID.format(n=':n::integer')}, 1, 'bench');\n",
    "update": _PICK
    + "UPDATE user_tokens SET monthly_tokens_used = monthly_tokens_used + 1"
    + f" WHERE user_id = {USER_ID.format(n=':n::integer')};\n",
}


@dataclass(frozen=True)
class Workload:
    """A pgbench script and whether the user_tokens triggers are disabled for it."""

    script: str
    triggers_off: bool
    description: str


WORKLOADS = {
    "deduct": Workload("deduct", False, "SELECT deduct_tokens(uid, 1, 'bench')"),
    "update_triggers_on": Workload("update", False, "UPDATE ... + 1, triggers on"),
    "bare": Workload("update", True, "UPDATE ... + 1, triggers off"),
}

_TPS = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.MULTILINE)
_LATENCY = re.compile(r"^latency average = ([0-9.]+) ms", re.MULTILINE)
_FAILED = re.compile(r"^number of failed transactions: ([0-9]+)", re.MULTILINE)
_PROCESSED = re.compile(r"^number of transactions actually processed: ([0-9]+)", re.MULTILINE)


def pgbench_path() -> Path:
    """pgbench from the embedded server's binaries, else the one on PATH."""
    candidate = bindir() / "pgbench"
    if candidate.exists():
        return candidate
    found = shutil.which("pgbench")
    if found is None:
        raise RuntimeError("pgbench not found: install pgserver (bench extra) or PostgreSQL")
    return Path(found)


@dataclass(frozen=True)
class Run:
    """One pgbench run's parameters."""

    workload: str
    clients: int
    synchronous_commit: str
    seconds: int
    users: int


async def run_pgbench(url: str, run: Run, scripts: Path) -> dict[str, float]:
    """Run pgbench once; returns tps and average latency, refusing any failed transaction."""
    workload = WORKLOADS[run.workload]
    return await pgbench(
        url,
        scripts / f"{workload.script}.sql",
        clients=run.clients,
        seconds=run.seconds,
        synchronous_commit=run.synchronous_commit,
        defines={"nusers": run.users},
    )


async def pgbench(
    url: str,
    script: Path,
    *,
    clients: int,
    seconds: int,
    synchronous_commit: str,
    defines: dict[str, int],
) -> dict[str, float]:
    """One `pgbench -n -M prepared -T s -c c -j c -f script` run (also used by
    bench/scale.py): tps, average latency and transactions, refusing any failure."""
    env = {**os.environ, "PGOPTIONS": f"-c synchronous_commit={synchronous_commit}"}
    variables = [arg for name, value in defines.items() for arg in ("-D", f"{name}={value}")]
    process = await asyncio.create_subprocess_exec(
        str(pgbench_path()),
        "-n",
        "-M",
        "prepared",
        "-T",
        str(seconds),
        "-c",
        str(clients),
        "-j",
        str(clients),
        *variables,
        "-f",
        str(script),
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await process.communicate()
    text = out.decode(errors="replace")
    tps = _TPS.search(text)
    failed = _FAILED.search(text)
    if process.returncode != 0 or tps is None or (failed and int(failed.group(1)) > 0):
        raise RuntimeError(
            f"pgbench {script.name} c={clients} failed ({process.returncode}):\n{text}\n"
            f"{err.decode(errors='replace')}"
        )
    latency = _LATENCY.search(text)
    processed = _PROCESSED.search(text)
    return {
        "tps": float(tps.group(1)),
        "latency_ms": float(latency.group(1)) if latency else 0.0,
        "transactions": float(processed.group(1)) if processed else 0.0,
    }


async def measure_once(
    server: BenchServer, template: str, run: Run, scripts: Path
) -> dict[str, float | None]:
    """One pgbench run on a fresh copy of the template, plus the HOT update ratio and,
    on a local server, the server's CPU time per transaction (all its processes)."""
    async with fresh_copy(server, template, "bench_write") as copy:
        if WORKLOADS[run.workload].triggers_off:
            await copy.conn.execute("ALTER TABLE user_tokens DISABLE TRIGGER USER")
        result = await pgbench_with_cpu(copy, lambda: run_pgbench(copy.url, run, scripts))
        # pgbench's backends flushed their statistics when they exited.
        row = await copy.conn.fetchrow(
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'user_tokens'"
        )
        assert row is not None
        updates, hot = int(row["n_tup_upd"]), int(row["n_tup_hot_upd"])
    return {**result, "hot_update_ratio": hot / updates if updates else 0.0}


async def pgbench_with_cpu(
    copy: Copy, pgbench_run: Callable[[], Awaitable[dict[str, float]]]
) -> dict[str, float | None]:
    """A pgbench run on a fresh copy, after a CHECKPOINT, with the server's CPU time per
    transaction (all its processes) on a local server, else None (also bench/scale.py)."""
    await copy.conn.execute("CHECKPOINT")
    pid = local_backend_pid(copy.conn, copy.name)
    postmaster = postmaster_pid(pid) if pid else None
    cpu_before = server_cpu_seconds(postmaster) if postmaster else None
    result = await pgbench_run()
    if postmaster:
        await settle(copy.conn, postmaster)
    cpu_after = server_cpu_seconds(postmaster) if postmaster else None
    cpu_per_txn = None
    if cpu_before is not None and cpu_after is not None and result["transactions"] > 0:
        cpu_per_txn = (cpu_after - cpu_before) / result["transactions"] * 1e6
    return {**result, "server_cpu_us_per_txn": cpu_per_txn}


async def settle(conn: asyncpg.Connection, postmaster: int) -> None:
    """Wait (bounded) until pgbench's backends have exited and been reaped, so their CPU
    time is in the postmaster's children total when we read it (also bench/scale.py).

    A backend leaves pg_stat_activity before its process ends; read in that gap, its
    CPU time could be in neither the live children nor the reaped total, so the wait
    also covers every process whose title names this database."""
    database = await conn.fetchval("SELECT current_database()")
    own = conn.get_server_pid()
    deadline = time.monotonic() + SETTLE_SECONDS
    while time.monotonic() < deadline:
        others = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            # An autovacuum worker may run for minutes after a big write: not ours to wait.
            " AND backend_type = 'client backend'"
        )
        if (
            others == 0
            and unreaped_children(postmaster) == 0
            and not _serving(postmaster, database, own)
        ):
            return
        await asyncio.sleep(0.02)
    raise RuntimeError(f"pgbench's backends still there after {SETTLE_SECONDS} s")


def _serving(postmaster: int, database: str, own: int) -> bool:
    """True while a child of the postmaster other than `own` serves `database`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == own:
            continue
        try:
            stat = (entry / "stat").read_text(encoding="ascii", errors="replace")
            title = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[1] == str(postmaster) and f" {database} " in title:
            return True
    return False


def write_scripts(folder: Path, scripts: Mapping[str, str] = SCRIPTS) -> Path:
    """The pgbench custom scripts, one file per script name (bench/scale.py has its own)."""
    for name, text in scripts.items():
        (folder / f"{name}.sql").write_text(text, encoding="utf-8")
    return folder


async def run(
    users: int,
    repetitions: int,
    seconds: int,
    clients: Sequence[int],
    sync_modes: Sequence[str],
    *,
    patch: Path | None = None,
) -> dict[str, Any]:
    """Measure every workload at every client count and commit mode, interleaved."""
    load_before = machine()["loadavg"]
    names = list(WORKLOADS)
    raw: dict[tuple[str, int, str], list[dict[str, float | None]]] = {}
    with bench_server() as server, tempfile.TemporaryDirectory(prefix="bench-pgbench-") as tmp:
        settings = await server.describe()
        scripts = write_scripts(Path(tmp))
        template = await build_template(
            server, "bench_write_tpl", LOAD_USERS, users, read_patch(patch)
        )
        try:
            for sync in sync_modes:
                for repetition in range(repetitions):
                    for count in clients:
                        for name in rotated(names, repetition):
                            spec = Run(name, count, sync, seconds, users)
                            result = await measure_once(server, template, spec, scripts)
                            print(
                                f"  sync={sync} rep {repetition + 1}/{repetitions} "
                                f"c={count} {name:<18} {result['tps']:.0f} tps"
                            )
                            raw.setdefault((name, count, sync), []).append(result)
        finally:
            await server.drop_database(template)
    return {
        "benchmark": NAME,
        "users": users,
        "seconds": seconds,
        "repetitions": repetitions,
        "patch": str(patch) if patch else None,
        "clients": list(clients),
        "synchronous_commit": list(sync_modes),
        "pgbench": str(pgbench_path()),
        "scripts": SCRIPTS,
        "results": _summarise(raw),
        "target": {
            "deduct_over_bare_min": TARGET_DEDUCT_OVER_BARE,
            "trigger_overhead_max": TARGET_TRIGGER_OVERHEAD,
        },
        "server": settings,
        "machine": machine_since(load_before),
    }


def _summarise(
    raw: dict[tuple[str, int, str], list[dict[str, float | None]]],
) -> list[dict[str, Any]]:
    """One entry per (clients, synchronous_commit): each workload's TPS and the ratios."""
    groups = sorted({(count, sync) for _, count, sync in raw}, key=lambda g: (g[1] != "on", g[0]))
    entries = []
    for count, sync in groups:
        workloads: dict[str, Any] = {}
        for name in WORKLOADS:
            samples = raw.get((name, count, sync))
            if not samples:
                continue
            tps = [_number(s["tps"]) for s in samples]
            cpu = [s["server_cpu_us_per_txn"] for s in samples]
            workloads[name] = {
                "tps": {**summary(tps), "max": max(tps)},
                "latency_ms": summary([_number(s["latency_ms"]) for s in samples]),
                "hot_update_ratio": summary([_number(s["hot_update_ratio"]) for s in samples]),
                "server_cpu_us_per_txn": (
                    summary([c for c in cpu if c is not None]) if None not in cpu else None
                ),
            }
        entry: dict[str, Any] = {"clients": count, "synchronous_commit": sync}
        entry["workloads"] = workloads
        bare = workloads["bare"]["tps"]
        entry["deduct_over_bare"] = {
            stat: ratio(workloads["deduct"]["tps"][stat], bare[stat]) for stat in ("median", "max")
        }
        entry["trigger_overhead"] = {
            stat: 1 - ratio(workloads["update_triggers_on"]["tps"][stat], bare[stat])
            for stat in ("median", "max")
        }
        # The same two ratios from the server's CPU per transaction (capacity on a
        # CPU-bound server), far steadier than TPS on a shared machine.
        per_txn = {name: w["server_cpu_us_per_txn"] for name, w in workloads.items()}
        if all(per_txn.values()):
            bare_cpu = per_txn["bare"]["median"]
            entry["deduct_over_bare"]["cpu"] = ratio(bare_cpu, per_txn["deduct"]["median"])
            entry["trigger_overhead"]["cpu"] = 1 - ratio(
                bare_cpu, per_txn["update_triggers_on"]["median"]
            )
        entry["meets_targets"] = (
            entry["deduct_over_bare"]["median"] >= TARGET_DEDUCT_OVER_BARE
            and entry["trigger_overhead"]["median"] <= TARGET_TRIGGER_OVERHEAD
        )
        entries.append(entry)
    return entries


def _number(value: float | None) -> float:
    assert value is not None
    return value


def report(payload: dict[str, Any]) -> None:
    """The human tables: median TPS and the two ratios per group, then server CPU."""
    rows = []
    cpu_rows = []
    for entry in payload["results"]:
        w = entry["workloads"]
        tag = [entry["synchronous_commit"], entry["clients"]]
        rows.append(
            [
                *tag,
                w["bare"]["tps"]["median"],
                w["update_triggers_on"]["tps"]["median"],
                w["deduct"]["tps"]["median"],
                entry["deduct_over_bare"]["median"],
                entry["deduct_over_bare"]["max"],
                f"{entry['trigger_overhead']['median']:+.1%}",
                f"{entry['trigger_overhead']['max']:+.1%}",
            ]
        )
        if "cpu" in entry["deduct_over_bare"]:
            cpu_rows.append(
                [
                    *tag,
                    *(w[name]["server_cpu_us_per_txn"]["median"] for name in WORKLOADS),
                    entry["deduct_over_bare"]["cpu"],
                    f"{entry['trigger_overhead']['cpu']:+.1%}",
                ]
            )
    print_table(
        f"write path, {payload['users']:,} users, {payload['seconds']} s x "
        f"{payload['repetitions']} reps (median TPS; targets deduct/bare >= 0.5, "
        "trigger overhead <= 15%)",
        ["sync", "clients", "bare", "trig on", "deduct", "deduct/bare", "best", "trig ovh", "best"],
        rows,
    )
    if cpu_rows:
        print_table(
            "server CPU per transaction (us, median) and the same ratios from it",
            ["sync", "clients", *WORKLOADS, "deduct/bare", "trig ovh"],
            cpu_rows,
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the write-path benchmark; prints a table and writes the JSON results."""
    parser = base_parser(__doc__, NAME)
    parser.add_argument("--users", type=int, default=None, help="users (default 100,000)")
    parser.add_argument("--seconds", type=int, default=None, help="pgbench -T (default 10)")
    parser.add_argument("--clients", default=None, help="comma-separated (default 2,8)")
    parser.add_argument(
        "--synchronous-commit", default=None, help="comma-separated on/off (default on,off)"
    )
    add_patch_option(parser)
    args = parser.parse_args(argv)
    users = args.users or (1_000 if args.smoke else 100_000)
    seconds = args.seconds or (1 if args.smoke else 10)
    repetitions = args.repetitions or (1 if args.smoke else 3)
    clients = [int(c) for c in (args.clients or ("2" if args.smoke else "2,8")).split(",")]
    sync_modes = (args.synchronous_commit or ("on" if args.smoke else "on,off")).split(",")
    if any(mode not in {"on", "off", "local", "remote_write"} for mode in sync_modes):
        parser.error(f"unknown synchronous_commit mode in {sync_modes}")
    if any(count <= 0 for count in clients) or users <= 0 or seconds <= 0:
        parser.error("users, seconds and clients must be positive")
    payload = asyncio.run(run(users, repetitions, seconds, clients, sync_modes, patch=args.patch))
    return publish(payload, report, NAME, args, patched=args.patch is not None)


if __name__ == "__main__":
    raise SystemExit(main())
