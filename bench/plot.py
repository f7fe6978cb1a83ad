"""Render bench/results/benchmarks.png: one panel per benchmark, each figure beside its target.

    python -m bench.plot [--results DIR] [--output PNG] [--smoke]

Reads every ``<name>.json`` in the results folder (``--smoke``: the ``*.smoke.json``
files instead) and draws, per benchmark, each contender as a ratio to its bare
baseline measured in the same run: the bar is the median repetition, the black tick
the best one, the red segment the target (green bar: target met, orange: missed,
grey: a reference without a target).  Memory and lag have no bare ratio to show and
are drawn in MB and ms against their absolute targets.  Needs matplotlib (``bench``
extra).  Not a benchmark: ``python -m bench`` skips this module.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MET, MISSED, REFERENCE = "#55a868", "#dd8452", "#a0a0a0"
LEGEND = (
    "bar = median repetition, black tick = from the best repetitions, red dashes = target "
    "(under each label); green = target met, orange = missed, grey = reference"
)


@dataclass(frozen=True)
class Bar:
    """One figure: its median, its best repetition, and the target it must meet."""

    label: str
    median: float
    best: float | None = None
    target: float | None = None
    higher_is_better: bool = True

    def meets(self) -> bool | None:
        """Whether the median meets the target (None: no target)."""
        if self.target is None:
            return None
        if self.higher_is_better:
            return self.median >= self.target
        return self.median <= self.target


@dataclass(frozen=True)
class Panel:
    """One benchmark's subplot."""

    title: str
    ylabel: str
    bars: list[Bar]
    baseline: float | None = 1.0  # the bare baseline's own ratio, drawn as a line


def bulk_reset(data: dict[str, Any]) -> Panel:
    """Time ratios of the bulk reset (lower is better); target function <= 1.5x minimal."""
    ratios = data["ratios"]
    wanted = [
        ("function/minimal", 1.5),
        ("function/bare", None),
        ("committing/minimal", None),
        ("minimal/bare", None),
    ]
    bars = [
        Bar(key, ratios[key]["median"], ratios[key].get("min"), target, higher_is_better=False)
        for key, target in wanted
        if key in ratios
    ]
    return Panel(
        f"Bulk reset of {data.get('users', 0):,} users\ntime ÷ baseline (lower is better)",
        "time ratio",
        bars,
    )


def write_path(data: dict[str, Any]) -> Panel:
    """TPS ratios of the write path per (clients, synchronous_commit)."""
    bars = []
    for entry in data["results"]:
        tag = f"{entry['clients']}c, {entry['synchronous_commit']}"
        deduct = entry["deduct_over_bare"]
        bars.append(Bar(f"deduct\n{tag}", deduct["median"], deduct.get("max"), 0.5))
        overhead = entry["trigger_overhead"]
        best = overhead.get("max")
        bars.append(
            Bar(
                f"trigger\n{tag}",
                1 - overhead["median"],
                None if best is None else 1 - best,
                0.85,
            )
        )
    return Panel(
        "Write path (pgbench): TPS ÷ bare UPDATE (higher is better)\n"
        "deduct_tokens, and UPDATE with the trigger; Nc = clients, on/off = synchronous_commit",
        "TPS ratio",
        bars,
    )


def listener_drain(data: dict[str, Any]) -> Panel:
    """Doorbell drain-rate ratios per burst size (higher is better)."""
    targets = data.get("targets", {})
    bars = []
    for entry in data["results"]:
        size = _count(entry["notifications"])
        for key in ("ours/bare", "ours/peer", "peer/bare", "ours/bare_json"):
            value = entry["ratios"].get(key)
            if value is not None:
                bars.append(
                    Bar(
                        f"{key}\n{size}",
                        value["rate_median"],
                        value.get("rate_best"),
                        targets.get(key),
                    )
                )
    return Panel(
        "Listener: doorbells drained per second\nrate ÷ other consumer's rate (higher is better)",
        "rate ratio",
        bars,
    )


def listener_lag(data: dict[str, Any]) -> Panel:
    """End-to-end lag p50/p99 in ms for the listener and the bare loop; p99 < 50 ms."""
    bars = []
    for role in ("listener", "bare"):
        runs = data["results"].get(role) or []
        median = data.get("median", {}).get(role) or {}
        for key, label, target in (("lag_p50_ms", "p50", None), ("lag_p99_ms", "p99", 50.0)):
            values = [r[key] for r in runs if r.get(key) is not None]
            if key in median and median[key] is not None:
                bars.append(
                    Bar(
                        f"{role}\n{label}",
                        float(median[key]),
                        min(values) if values else None,
                        target if role == "listener" else None,
                        higher_is_better=False,
                    )
                )
    return Panel(
        "Listener: lag commit -> metric (ms)\none reset per transaction (lower is better)",
        "ms",
        bars,
        baseline=None,
    )


def listener_memory(data: dict[str, Any]) -> Panel:
    """RSS growth from warm start in MB; target <= 20 MB."""
    summary = data["summary"]
    target = float(data.get("target_growth_mb", 20.0))
    wanted = (
        ("doorbells_growth_mb", f"after {_count(data['doorbells'])}\ndoorbells", target),
        ("resets_growth_mb", f"after {_count(data['resets'])}\nresets", target),
        ("peak_growth_mb", "peak\n(VmHWM)", None),
    )
    bars = [
        Bar(label, summary[key]["median"], summary[key]["min"], tgt, higher_is_better=False)
        for key, label, tgt in wanted
        if key in summary
    ]
    return Panel(
        "Listener memory: RSS growth from warm start\n(MB, lower is better)",
        "MB",
        bars,
        baseline=None,
    )


def generic(data: dict[str, Any]) -> Panel | None:
    """Any other benchmark with a {"ratios": {name: {"median": x}}} section."""
    ratios = data.get("ratios")
    if not isinstance(ratios, dict):
        return None
    bars = [
        Bar(key, float(value["median"]), value.get("min"))
        for key, value in ratios.items()
        if isinstance(value, dict) and isinstance(value.get("median"), int | float)
    ]
    return Panel(str(data.get("benchmark", "benchmark")), "ratio", bars) if bars else None


ADAPTERS: dict[str, Callable[[dict[str, Any]], Panel]] = {
    "bulk_reset": bulk_reset,
    "write_path": write_path,
    "listener_drain": listener_drain,
    "listener_lag": listener_lag,
    "listener_memory": listener_memory,
}
ORDER = list(ADAPTERS)


def _count(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 and n % 1_000_000 == 0 else f"{n // 1000}k"


def load_panels(folder: Path, smoke: bool) -> tuple[list[Panel], list[dict[str, Any]]]:
    """Every results file in the folder as a panel (known ones first, in ORDER)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("*.json")):
        if path.name.endswith(".smoke.json") != smoke:
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "benchmark" in data:
            found[str(data["benchmark"])] = data
    names = [n for n in ORDER if n in found] + sorted(n for n in found if n not in ADAPTERS)
    panels = []
    for name in names:
        adapter = ADAPTERS.get(name)
        panel = adapter(found[name]) if adapter is not None else generic(found[name])
        if panel is not None and panel.bars:
            panels.append(panel)
    return panels, [found[n] for n in names]


def describe_machine(documents: Sequence[dict[str, Any]]) -> str:
    """One line naming the machine and server the figures come from."""
    for data in documents:
        machine, server = data.get("machine", {}), data.get("server", {})
        if machine:
            return (
                f"{machine.get('nproc')} cores (shared), Python {machine.get('python')}, "
                f"PostgreSQL {server.get('server_version', '?')}\n" + LEGEND
            )
    return LEGEND


def draw(panels: Sequence[Panel], subtitle: str, output: Path) -> Path:
    """Lay the panels out two per row and save the PNG."""
    import matplotlib  # noqa: PLC0415  # optional (bench extra); imported only to draw

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    columns = 2 if len(panels) > 1 else 1
    rows = (len(panels) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(7.5 * columns, 4.6 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        _draw_panel(ax, panel)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle("monthly-token-reset benchmarks\n" + subtitle, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def _draw_panel(ax: Any, panel: Panel) -> None:
    positions = range(len(panel.bars))
    colours = [
        REFERENCE if bar.meets() is None else MET if bar.meets() else MISSED for bar in panel.bars
    ]
    ax.bar(positions, [bar.median for bar in panel.bars], color=colours, width=0.6, zorder=2)
    top = max(
        [bar.median for bar in panel.bars]
        + [bar.best or 0.0 for bar in panel.bars]
        + [bar.target or 0.0 for bar in panel.bars]
        + [panel.baseline or 0.0]
    )
    for x, bar in zip(positions, panel.bars, strict=True):
        if bar.best is not None:
            ax.plot([x - 0.18, x + 0.18], [bar.best] * 2, color="black", lw=1.5, zorder=3)
        if bar.target is not None:
            ax.plot([x - 0.42, x + 0.42], [bar.target] * 2, color="#c44e52", lw=2.2, ls="--")
        ax.annotate(
            f"{bar.median:.2f}" if bar.median < 100 else f"{bar.median:.0f}",
            (x, bar.median),
            fontsize=8,
            ha="center",
            va="bottom",
            xytext=(0, 2),
            textcoords="offset points",
        )
    if panel.baseline is not None:
        ax.axhline(panel.baseline, color="black", lw=0.8, alpha=0.6, zorder=1)
        ax.annotate(
            "baseline = 1",
            (-0.55, panel.baseline),
            fontsize=7,
            ha="left",
            va="bottom",
            alpha=0.7,
        )
    ax.set_ylim(0, top * 1.18 if top > 0 else 1)
    ax.set_xticks(list(positions))
    ax.set_xticklabels(
        [_tick_label(bar) for bar in panel.bars], fontsize=8 if len(panel.bars) <= 6 else 7
    )
    ax.set_title(panel.title, fontsize=10)
    ax.set_ylabel(panel.ylabel)
    ax.grid(axis="y", alpha=0.3, zorder=0)


def _tick_label(bar: Bar) -> str:
    if bar.target is None:
        return bar.label
    sign = ">=" if bar.higher_is_better else "<="
    return f"{bar.label}\n{sign} {bar.target:g}"


def main(argv: Sequence[str] | None = None) -> int:
    """Draw the PNG from whatever results are present; 1 if there are none."""
    parser = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__)
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder of JSON")
    parser.add_argument("--output", type=Path, default=None, help="PNG path")
    parser.add_argument("--smoke", action="store_true", help="plot the *.smoke.json files")
    args = parser.parse_args(argv)
    panels, documents = load_panels(args.results, args.smoke)
    if not panels:
        print(f"no benchmark results in {args.results}")
        return 1
    name = "benchmarks.smoke.png" if args.smoke else "benchmarks.png"
    path = draw(panels, describe_machine(documents), args.output or args.results / name)
    print(f"wrote {path} ({len(panels)} panels)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
