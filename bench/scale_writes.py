"""The write part of bench/scale.py: deduct_tokens against a bare counter UPDATE.

pgbench (bench/write_path.py's runner: ``-n -M prepared``) on fresh copies of the size's
write template: N users just reset by the listener's runner (so current: no write needs
a reset) with last month's ledger and this month's reset rows behind them, and a plain
counter table of the same N users.  Every script draws ``random(1, :nusers)`` and pays
the same ``md5('bench-user-' || n)::uuid`` for the key:

| workload | statement |
|---|---|
| deduct | ``SELECT deduct_tokens(uid, 1, 'bench')`` |
| update_triggers_on | ``UPDATE user_tokens SET monthly_tokens_used = ... + 1 WHERE user_id = uid``|
| update_triggers_off | the same with ``ALTER TABLE user_tokens DISABLE TRIGGER USER`` |
| bare_counter | ``UPDATE bench.counter SET used = used + 1 WHERE user_id = uid`` |

deduct/bare_counter is the write target; 1 - on/off is the row trigger's overhead on
writes that need no reset.  On a local server both are also given from the server's
CPU time per transaction (every server process), steadier than TPS on a shared machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    BenchServer,
    fresh_copy,
    ratio,
    rotated,
    summary,
)
from bench.write_path import pgbench, pgbench_with_cpu

TARGET_DEDUCT_OVER_BARE = 0.6
TARGET_TRIGGER_OVERHEAD = 0.10

_UID = "md5('bench-user-' || :n::integer)::uuid"
_PICK = "\\set n random(1, :nusers)\n"
SCRIPTS = {
    "deduct": _PICK + f"SELECT deduct_tokens({_UID}, 1, 'bench');\n",
    "update": _PICK
    + "UPDATE user_tokens SET monthly_tokens_used = monthly_tokens_used + 1"
    + f" WHERE user_id = {_UID};\n",
    "counter": _PICK + f"UPDATE bench.counter SET used = used + 1 WHERE user_id = {_UID};\n",
}


@dataclass(frozen=True)
class Workload:
    """A pgbench script and whether user_tokens' triggers are disabled for it."""

    script: str
    triggers_off: bool


WORKLOADS = {
    "deduct": Workload("deduct", False),
    "update_triggers_on": Workload("update", False),
    "update_triggers_off": Workload("update", True),
    "bare_counter": Workload("counter", False),
}


async def measure_once(
    server: BenchServer,
    template: str,
    workload: str,
    *,
    users: int,
    clients: int,
    sync: str,
    seconds: int,
    scripts: Path,
) -> dict[str, Any]:
    """One pgbench run on a fresh copy, with the server's CPU per transaction."""
    spec = WORKLOADS[workload]
    async with fresh_copy(server, template, "bench_scale_w") as copy:
        if spec.triggers_off:
            await copy.conn.execute("ALTER TABLE user_tokens DISABLE TRIGGER USER")
        return await pgbench_with_cpu(
            copy,
            lambda: pgbench(
                copy.url,
                scripts / f"{spec.script}.sql",
                clients=clients,
                seconds=seconds,
                synchronous_commit=sync,
                defines={"nusers": users},
            ),
        )


async def measure(
    server: BenchServer,
    template: str,
    *,
    users: int,
    repetitions: int,
    clients: Sequence[int],
    sync_modes: Sequence[str],
    seconds: int,
    scripts: Path,
) -> list[dict[str, Any]]:
    """Every workload at every client count and commit mode, interleaved and rotated."""
    raw: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for sync in sync_modes:
        for repetition in range(repetitions):
            for count in clients:
                for name in rotated(list(WORKLOADS), repetition):
                    result = await measure_once(
                        server,
                        template,
                        name,
                        users=users,
                        clients=count,
                        sync=sync,
                        seconds=seconds,
                        scripts=scripts,
                    )
                    print(
                        f"    sync={sync} rep {repetition + 1}/{repetitions} c={count} "
                        f"{name:<20} {result['tps']:.0f} tps",
                        flush=True,
                    )
                    raw.setdefault((name, count, sync), []).append(result)
    return summarise(raw)


def summarise(raw: dict[tuple[str, int, str], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One entry per (clients, synchronous_commit): TPS per workload and the ratios."""
    groups = sorted({(c, s) for _, c, s in raw}, key=lambda g: (g[1] != "on", g[0]))
    entries = []
    for count, sync in groups:
        workloads: dict[str, Any] = {}
        for name in WORKLOADS:
            samples = raw[(name, count, sync)]
            tps = [s["tps"] for s in samples]
            cpu = [s["server_cpu_us_per_txn"] for s in samples]
            workloads[name] = {
                "tps": {**summary(tps), "max": max(tps)},
                "latency_ms": summary([s["latency_ms"] for s in samples]),
                "server_cpu_us_per_txn": None if None in cpu else summary(cpu),
            }
        tps_of = {name: w["tps"] for name, w in workloads.items()}
        entry: dict[str, Any] = {"clients": count, "synchronous_commit": sync}
        entry["workloads"] = workloads
        entry["deduct_over_bare"] = {
            stat: ratio(tps_of["deduct"][stat], tps_of["bare_counter"][stat])
            for stat in ("median", "max")
        }
        entry["deduct_over_triggers_off"] = {
            stat: ratio(tps_of["deduct"][stat], tps_of["update_triggers_off"][stat])
            for stat in ("median", "max")
        }
        entry["trigger_overhead"] = {
            stat: 1 - ratio(tps_of["update_triggers_on"][stat], tps_of["update_triggers_off"][stat])
            for stat in ("median", "max")
        }
        per_txn = {name: w["server_cpu_us_per_txn"] for name, w in workloads.items()}
        if all(value and value["median"] > 0 for value in per_txn.values()):
            med = {name: value["median"] for name, value in per_txn.items()}
            entry["deduct_over_bare"]["cpu"] = ratio(med["bare_counter"], med["deduct"])
            entry["deduct_over_triggers_off"]["cpu"] = ratio(
                med["update_triggers_off"], med["deduct"]
            )
            entry["trigger_overhead"]["cpu"] = 1 - ratio(
                med["update_triggers_off"], med["update_triggers_on"]
            )
        entry["meets_targets"] = {
            "deduct_over_bare": entry["deduct_over_bare"]["median"] >= TARGET_DEDUCT_OVER_BARE,
            "trigger_overhead": entry["trigger_overhead"]["median"] <= TARGET_TRIGGER_OVERHEAD,
        }
        entries.append(entry)
    return entries
