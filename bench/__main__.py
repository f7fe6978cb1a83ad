"""`python -m bench [--only NAME ...] [--smoke] [...]`: run every benchmark in bench/.

A benchmark is any module in this package with a ``main(argv) -> int`` function,
except the helpers listed in NOT_BENCHMARKS and plot*.py; new ones are picked up
without editing this file.  Flags other than --only and --list are passed to every benchmark, so
shared ones (--smoke, --repetitions) apply to all.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

NOT_BENCHMARKS = frozenset({"common", "plot", "__main__"})

BenchMain = Callable[[Sequence[str] | None], int]


def discover() -> dict[str, BenchMain]:
    """Every benchmark module's main(), by module name, in alphabetical order."""
    found: dict[str, BenchMain] = {}
    package_dir = Path(__file__).resolve().parent
    for info in sorted(pkgutil.iter_modules([str(package_dir)]), key=lambda m: m.name):
        if info.name in NOT_BENCHMARKS or info.name.startswith(("_", "plot")) or info.ispkg:
            continue
        module = importlib.import_module(f"bench.{info.name}")
        entry = getattr(module, "main", None)
        if callable(entry):
            found[info.name] = entry
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected benchmarks one after another; non-zero if any failed."""
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--only", action="append", default=[], help="run just this benchmark")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args, passthrough = parser.parse_known_args(argv)
    benchmarks = discover()
    if args.list:
        print("\n".join(benchmarks))
        return 0
    unknown = [name for name in args.only if name not in benchmarks]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; known: {', '.join(benchmarks)}")
    selected = args.only or list(benchmarks)
    failed: list[str] = []
    for name in selected:
        print(f"\n=== {name} {' '.join(passthrough)}", flush=True)
        started = time.monotonic()
        try:
            code = benchmarks[name](passthrough)
        except SystemExit as exc:  # argparse refusing a flag this benchmark lacks
            code = exc.code if isinstance(exc.code, int) else 2
        except Exception as exc:  # one broken benchmark must not hide the others' numbers
            print(f"{name} failed: {exc!r}", file=sys.stderr)
            code = 1
        print(f"=== {name} done in {time.monotonic() - started:.1f} s (exit {code})", flush=True)
        if code != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
