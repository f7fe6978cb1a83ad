"""Render the README's picture from a real `token-reset demo` run.

    python -m bench.plot_demo                       # run the demo, then plot it
    python -m bench.plot_demo --from demo.json      # plot a run's --json-summary file

Without --from it runs `python -m listener demo --once --json-summary ...` on a fresh
embedded server in a temp directory, keeps the run's JSON beside the picture
(bench/results/demo_rollover.json) and draws bench/results/demo_rollover.png from
what the demo scraped off /metrics: stale users and resets by source on top, the
missed-month alert below, the story's phases as vertical lines.  Needs matplotlib
(the `bench` extra).  The entry point is not called `main` on purpose: `python -m
bench` runs every bench module's main() as a benchmark, and this is not one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_OUTPUT = RESULTS / "demo_rollover.png"
DEMO_TIMEOUT_SECONDS = 180
SOURCES = (("function", "deduct_tokens()"), ("trigger", "write trigger"), ("bulk", "bulk endpoint"))
COLOURS = {"function": "#4c72b0", "trigger": "#55a868", "bulk": "#8172b2"}
PHASES = {
    "app_traffic": "app traffic\n(after midnight)",
    "bulk_endpoint": "POST /api/admin/\nreset-monthly-tokens",
    "all_counted": "metrics\ncaught up",
}


def run_demo(users: int, summary: Path) -> dict[str, Any]:
    """One real demo run on its own embedded server; returns its --json-summary."""
    with tempfile.TemporaryDirectory(prefix="token-reset-demo-") as tmp:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "listener",
                "demo",
                "--once",
                "--users",
                str(users),
                "--data-dir",
                str(Path(tmp) / "pgdata"),
                "--json-summary",
                str(summary),
            ],
            capture_output=True,
            text=True,
            timeout=DEMO_TIMEOUT_SECONDS,
            env={**os.environ, "LOG_FORMAT": "json"},
            check=False,
        )
    if done.returncode != 0:
        raise SystemExit(f"the demo failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    print("\n".join(line for line in done.stdout.splitlines() if not line.startswith("{")))
    data: dict[str, Any] = json.loads(summary.read_text(encoding="utf-8"))
    return data


def plot(data: dict[str, Any], output: Path) -> None:
    """Draw the run: gauges and counters on top, the alert below, phases as lines."""
    import matplotlib  # noqa: PLC0415  # optional dependency, only when plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    # Time from the moment the listener was ready (before that: starting PostgreSQL).
    zero = next(m["t"] for m in data["marks"] if m["phase"] == "listener_ready")
    samples = data["samples"]
    t = [s["t"] - zero for s in samples]
    users = data["users"]
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(10, 5.6), sharex=True, gridspec_kw={"height_ratios": [4, 1]}
    )
    top.stackplot(
        t,
        *[[s["resets"][source] for s in samples] for source, _ in SOURCES],
        labels=[f"token_reset_users_total{{source={s}}}: {label}" for s, label in SOURCES],
        colors=[COLOURS[s] for s, _ in SOURCES],
        alpha=0.55,
        step="post",
    )
    top.step(
        t,
        [s["stale_users"] for s in samples],
        where="post",
        color="#c44e52",
        linewidth=2.4,
        label="token_reset_stale_users (last month's usage still on the row)",
    )
    top.set_ylabel("users")
    top.set_ylim(0, users["stale_with_usage"] * 1.18)
    top.legend(loc="center left", fontsize=8, framealpha=0.9)
    top.grid(alpha=0.3)
    bottom.fill_between(
        t, [s["missed_month"] for s in samples], step="post", color="#c44e52", alpha=0.7
    )
    bottom.set_ylim(0, 1.25)
    bottom.set_yticks([0, 1])
    bottom.set_ylabel("missed\nmonth", fontsize=9)
    bottom.set_xlabel(
        "seconds since the listener was ready (a real run, /metrics scraped every 0.2 s)"
    )
    bottom.set_xlim(left=0)
    bottom.grid(alpha=0.3)
    for mark in data["marks"]:
        label = PHASES.get(mark["phase"])
        if label is None:
            continue
        for axis in (top, bottom):
            axis.axvline(mark["t"] - zero, color="#555555", linestyle="--", linewidth=0.8)
        top.annotate(
            label,
            (mark["t"] - zero, users["stale_with_usage"] * 1.16),
            fontsize=7.5,
            ha="left",
            va="top",
            xytext=(3, 0),
            textcoords="offset points",
        )
    bulk = data["bulk"]
    top.set_title(
        f"token-reset demo: {users['total']} users, {users['stale_with_usage']} carrying "
        f"last month's usage.  App traffic resets {users['reset_by_function']} "
        f"(deduct_tokens) + {users['reset_by_trigger']} (trigger);\n"
        f"the bulk endpoint resets the other {bulk['reset_count']} in {bulk['duration_ms']} ms "
        "and the missed-month alert clears",
        fontsize=10,
    )
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)


def cli(argv: Sequence[str] | None = None) -> int:
    """Run (or read) a demo and write the PNG."""
    parser = argparse.ArgumentParser(prog="python -m bench.plot_demo", description=__doc__)
    parser.add_argument("--from", dest="source", type=Path, help="a demo's --json-summary file")
    parser.add_argument("--users", type=int, default=300, help="users for a new run (300)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    if args.source is not None:
        data = json.loads(args.source.read_text(encoding="utf-8"))
    else:
        data = run_demo(args.users, args.output.with_suffix(".json"))
    plot(data, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
