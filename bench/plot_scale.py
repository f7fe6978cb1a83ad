"""Render bench/results/scale.png from scale.json: four panels against N users.

    python -m bench.plot_scale [--results bench/results/scale.json] [--output PNG]

1. bulk reset seconds (median; whiskers to the best repetition) of the four contenders
   and the minimal statement into the project's full ledger, log-log;
2. watchdog_snapshot and status_summary latency right after the reset, beside a bare
   ``count(*)`` of the users, log-log;
3. deduct_tokens TPS over the bare counter UPDATE per (synchronous_commit, clients),
   median TPS and by server CPU per transaction, with the 0.6 target;
4. the row trigger's overhead on writes needing no reset, the same way, with 10 %.

The machine, the server and the load average are in the title.  bench/scale.py calls
draw() after every run; this module is not a benchmark (``python -m bench`` skips it).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "scale.json"
BULK_STYLE = {
    "function": ("reset_monthly_tokens_for_all_users()", "#c44e52", "-"),
    "committing": ("run_bulk_reset (listener runner)", "#dd8452", "-"),
    "minimal": ("minimal: UPDATE -> INSERT, lean ledger", "#4c72b0", "-"),
    "minimal_full": ("minimal into the full ledger (ref.)", "#8172b3", "--"),
    "bare": ("bare UPDATE", "#55a868", "-"),
}
LATENCY_STYLE = {
    "watchdog_snapshot": ("watchdog_snapshot", "#c44e52"),
    "status_summary": ("status_summary", "#dd8452"),
    "bare_count_users": ("bare count(*) of users", "#55a868"),
}


def _count(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 else f"{n // 1000}k"


def describe(payload: dict[str, Any]) -> str:
    """Two lines: the machine and the server; the data and the load of each size."""
    machine, server = payload.get("machine", {}), payload.get("server", {})
    memory = machine.get("memory_bytes")
    ram = f", {memory / 2**30:.0f} GiB RAM" if memory else ""
    sizes = []
    for r in payload["results"]:
        run = r.get("run", {})
        load = run.get("loadavg_before", [None])[0], run.get("loadavg_after", [None])[0]
        where = f"{_count(r['users'])}: {r['ledger_per_user']} deductions/user"
        where += f", {r.get('repetitions', payload.get('repetitions'))} reps"
        if None not in load:
            where += f", load {load[0]:.1f}->{load[1]:.1f}"
        sizes.append(where)
    return (
        f"{machine.get('nproc')} vCPUs (shared){ram}, {machine.get('platform', '')}, "
        f"PostgreSQL {server.get('server_version', '?')} ({server.get('source', '?')}, "
        f"shared_buffers {server.get('shared_buffers', '?')})\n" + "; ".join(sizes)
    )


def _log_log(ax: Any, xlabel: str, ylabel: str, title: str) -> None:
    """The two time panels' axes: both logarithmic (sizes and times span decades)."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)


def _bulk(ax: Any, results: list[dict[str, Any]]) -> None:
    for name, (label, color, style) in BULK_STYLE.items():
        points = [
            (r["users"], r["bulk"]["contenders"][name]["seconds"])
            for r in results
            if name in r["bulk"]["contenders"]
        ]
        if not points:
            continue
        xs = [p[0] for p in points]
        med = [p[1]["median"] for p in points]
        low = [p[1]["median"] - p[1]["min"] for p in points]
        ax.errorbar(
            xs,
            med,
            yerr=[low, [0] * len(low)],
            label=label,
            color=color,
            linestyle=style,
            marker="o",
            capsize=3,
        )
    _log_log(ax, "stale users", "seconds (median; whisker to best)", "bulk reset")


GROUP_COLORS = {
    ("on", 2): "#4c72b0",
    ("on", 8): "#55a868",
    ("off", 2): "#c44e52",
    ("off", 8): "#8172b3",
}


def _write_series(
    ax: Any, results: list[dict[str, Any]], key: str, target: float, target_label: str
) -> None:
    """One line per (synchronous_commit, clients) of a write ratio against N."""
    groups = sorted({(e["synchronous_commit"], e["clients"]) for r in results for e in r["writes"]})
    for sync, clients in groups:
        xs, ys, best = [], [], []
        for r in results:
            for e in r["writes"]:
                if (e["synchronous_commit"], e["clients"]) == (sync, clients):
                    xs.append(r["users"])
                    ys.append(e[key]["median"])
                    best.append(e[key].get("cpu"))
        color = GROUP_COLORS.get((sync, clients))
        ax.plot(xs, ys, marker="o", color=color, label=f"sync {sync}, {clients} clients: TPS")
        if None not in best:
            ax.plot(xs, best, marker="x", linestyle=":", color=color, label="  same, by server CPU")
    ax.axhline(target, color="red", linestyle="--", linewidth=1, label=target_label)
    ax.set_xscale("log")
    ax.set_xlabel("users")
    ax.legend(fontsize=6)
    ax.grid(True, which="both", alpha=0.3)


def _writes(ax: Any, results: list[dict[str, Any]], target: float) -> None:
    _write_series(ax, results, "deduct_over_bare", target, f"target >= {target}")
    ax.set_ylabel("deduct TPS / bare counter TPS (median)")
    ax.set_title("deduct_tokens against a bare counter UPDATE")


def _overhead(ax: Any, results: list[dict[str, Any]], target: float) -> None:
    _write_series(ax, results, "trigger_overhead", target, f"target <= {target:.0%}")
    ax.set_ylabel("1 - TPS(triggers on) / TPS(triggers off)")
    ax.set_title("row trigger overhead, writes needing no reset")


def _latency(ax: Any, results: list[dict[str, Any]]) -> None:
    for name, (label, color) in LATENCY_STYLE.items():
        points = [
            (r["users"], r["latency"][name]["seconds"]) for r in results if name in r["latency"]
        ]
        if not points:
            continue
        ax.plot(
            [p[0] for p in points],
            [1000 * p[1]["median"] for p in points],
            marker="o",
            color=color,
            label=label,
        )
    _log_log(ax, "users", "ms (median)", "latency right after the bulk reset")


def draw(payload: dict[str, Any], output: Path) -> Path:
    """Four panels, the machine in the title; returns the path."""
    import matplotlib  # noqa: PLC0415  # optional (bench extra); imported only to draw

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    results = payload["results"]
    fig, grid = plt.subplots(2, 2, figsize=(15, 10.5))
    axes = grid.flat
    _bulk(axes[0], results)
    _latency(axes[1], results)
    _writes(axes[2], results, payload["targets"]["deduct_over_bare_min"])
    _overhead(axes[3], results, payload["targets"]["trigger_overhead_max"])
    skipped = ", ".join(f"{s['users']:,}" for s in payload.get("skipped", []))
    title = "monthly-token-reset at scale" + (
        " (SMOKE: numbers mean nothing)" if payload.get("smoke") else ""
    )
    fig.suptitle(
        f"{title}\n{describe(payload)}" + (f"\nskipped (disk): {skipped}" if skipped else ""),
        fontsize=9,
    )
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def main(argv: Sequence[str] | None = None) -> int:
    """Draw the PNG from a scale.json."""
    parser = argparse.ArgumentParser(prog="python -m bench.plot_scale", description=__doc__)
    parser.add_argument("--results", type=Path, default=RESULTS, help="scale.json")
    parser.add_argument("--output", type=Path, default=None, help="PNG path")
    args = parser.parse_args(argv)
    payload = json.loads(args.results.read_text(encoding="utf-8"))
    print(f"wrote {draw(payload, args.output or args.results.with_suffix('.png'))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
