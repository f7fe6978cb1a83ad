"""Shared benchmark plumbing: a server, fresh migrated databases, timing, results.

Every benchmark measures a contender against a bare baseline in the same run, on a
fresh copy of the same data, several times; it reports min and median and writes a
JSON file under bench/results/.  The server is BENCH_DATABASE_URL (a superuser URL:
we create and drop databases on it) or an embedded PostgreSQL started in a temp dir
with PostgreSQL's default durability (fsync and synchronous_commit on).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NamedTuple

import asyncpg

from listener.config import Settings
from listener.embedded import find_bindir, private_data_root
from tests.support.database import TestServer, embedded_server, unique_name

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Durability stays at PostgreSQL's defaults (fsync, synchronous_commit and
# full_page_writes on).  Two sizes are raised as any production server would: with
# the default 128MB of shared_buffers a 1M-user reset (about 400MB of heap and
# indexes) is decided by dirty-buffer evictions, each of which may wait for a WAL
# flush, and a larger WAL budget keeps a size-triggered checkpoint out of the timed
# window (each measurement starts right after an explicit CHECKPOINT).
# BENCH_PG_SETTINGS="name=value,name=value" overrides them (e.g. shared_buffers=128MB).
EMBEDDED_SETTINGS = {
    "shared_buffers": "1GB",
    "max_wal_size": "4GB",
    "checkpoint_timeout": "30min",
}

REPORTED_SETTINGS = (
    "server_version",
    "shared_buffers",
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "wal_level",
    "max_wal_size",
    "checkpoint_timeout",
)


@dataclass
class BenchServer(TestServer):
    """The tests' server class, cloning by file copy, with what a benchmark reports."""

    file_copy: bool = True

    async def describe(self) -> dict[str, str]:
        """The server settings that decide write cost, for the results file."""
        conn = await self.admin()
        try:
            rows = await conn.fetch(
                "SELECT name, current_setting(name) AS value FROM pg_settings"
                " WHERE name = ANY($1::text[])",
                list(REPORTED_SETTINGS),
            )
        finally:
            await conn.close()
        found = {row["name"]: row["value"] for row in rows}
        found["source"] = "embedded" if self.embedded is not None else "BENCH_DATABASE_URL"
        return found


@contextmanager
def bench_server(
    prefix: str = "token-reset-bench-", settings: Mapping[str, str] | None = None
) -> Iterator[BenchServer]:
    """BENCH_DATABASE_URL's server, or an embedded one in a temp dir (named by prefix),
    destroyed after; `settings` are what a benchmark's measurement needs on top of
    EMBEDDED_SETTINGS and BENCH_PG_SETTINGS."""
    url = os.environ.get("BENCH_DATABASE_URL", "").strip()
    if url:
        yield BenchServer(admin_url=url)
        return
    merged = {**EMBEDDED_SETTINGS, **_settings_from_env(), **(settings or {})}
    # As root, a directory the server user can reach without opening anyone else's.
    with (
        private_data_root(prefix) as tmp,
        _sigterm_unwinds(),
        embedded_server(tmp / "pgdata", merged, BenchServer) as server,
    ):
        yield server


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """A benchmark stopped with SIGTERM (a CI timeout, kill) unwinds like Ctrl-C, so
    its embedded server is stopped and deleted instead of left running."""
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    del frame
    raise SystemExit(128 + signum)


def _settings_from_env() -> dict[str, str]:
    """BENCH_PG_SETTINGS as a dict: "shared_buffers=128MB,max_wal_size=1GB"."""
    found: dict[str, str] = {}
    for item in os.environ.get("BENCH_PG_SETTINGS", "").split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ValueError(f"BENCH_PG_SETTINGS item {item!r} is not name=value")
        found[name.strip()] = value.strip()
    return found


def bindir() -> Path:
    """Where pgbench and friends live (pgserver's wheel, or PATH)."""
    return find_bindir()


def listener_settings(url: str, listener_name: str) -> Settings:
    """The service as a benchmark runs it in-process: no fixed HTTP port to collide on,
    no schedule of its own, and a watchdog that never wakes inside a measurement."""
    return Settings(
        database_url=url,
        http_port=0,
        reset_schedule="off",
        listener_name=listener_name,
        watchdog_interval_seconds=3600.0,
    )


# ---------------------------------------------------------------- timing ---
async def timed(action: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    """Seconds one awaited action took (monotonic clock), and what it returned."""
    started = time.perf_counter()
    result = await action()
    return time.perf_counter() - started, result


def local_backend_pid(conn: asyncpg.Connection, database: str) -> int | None:
    """The server process behind conn when it runs on this machine, else None: the pid
    must be a postgres backend serving `database` here (a remote server's pid is not)."""
    pid = conn.get_server_pid()
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return None
    return pid if title.startswith("postgres:") and f" {database} " in title else None


def _proc_stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat fields from field 3 on (after the parenthesised name)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def backend_cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) a local server process has used, or None when the
    server is not on this machine.  On a shared machine CPU time moves far less
    with other tenants' load than wall time does, so both are reported."""
    fields = _proc_stat(pid)
    if fields is None:
        return None
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return ticks / os.sysconf("SC_CLK_TCK")


def postmaster_pid(backend_pid: int) -> int | None:
    """The postmaster of a local backend (its parent process), or None."""
    fields = _proc_stat(backend_pid)
    return None if fields is None else int(fields[1])  # ppid (field 4)


def unreaped_children(postmaster: int) -> int:
    """Children of the postmaster that have exited but not been reaped yet: their CPU
    time shows in neither their own entry nor the postmaster's children total."""
    count = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _proc_stat(int(entry.name))
            if fields is not None and fields[1] == str(postmaster) and fields[0] == "Z":
                count += 1
    return count


def server_cpu_seconds(postmaster: int) -> float | None:
    """CPU time of the whole local server: the postmaster, every live child, and the
    children it has already reaped (backends of finished pgbench clients)."""
    own = _proc_stat(postmaster)
    if own is None:
        return None
    ticks = sum(int(v) for v in own[11:15])  # utime, stime, cutime, cstime
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _proc_stat(int(entry.name))
        if fields is not None and fields[1] == str(postmaster):
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def summary(samples: Sequence[float]) -> dict[str, Any]:
    """Min and median of repeated measurements, with the samples themselves."""
    if not samples:
        raise ValueError("no samples to summarise")
    return {
        "min": min(samples),
        "median": statistics.median(samples),
        "samples": list(samples),
    }


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, refusing a zero baseline loudly."""
    if denominator <= 0:
        raise ValueError(f"baseline must be positive, got {denominator}")
    return numerator / denominator


def rotated(items: Sequence[str], shift: int) -> list[str]:
    """items rotated by shift: each repetition starts with another contender, so slow
    drift on a shared machine does not always land on the same one."""
    if not items:
        return []
    shift %= len(items)
    return [*items[shift:], *items[:shift]]


# --------------------------------------------------------------- results ---
def machine() -> dict[str, Any]:
    """What the numbers ran on: cores, load (noise from other tenants), Python."""
    return {
        "nproc": os.cpu_count(),
        "loadavg": list(os.getloadavg()),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def write_results(payload: Mapping[str, Any], output: Path) -> Path:
    """Write the results JSON (creating the folder) and return where it went."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return output


def machine_since(load_before: Sequence[float]) -> dict[str, Any]:
    """machine() after a run, with the load average taken before it: a run that shared
    the machine with another tenant shows a rise between the two."""
    return {**machine(), "loadavg_before": list(load_before)}


def measured(run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """run()'s results with "machine" set: machine_since the load before the run."""
    load_before = machine()["loadavg"]
    payload = run()
    payload["machine"] = machine_since(load_before)
    return payload


def publish(
    payload: dict[str, Any],
    report: Callable[[dict[str, Any]], None],
    name: str,
    args: argparse.Namespace,
    *,
    patched: bool = False,
) -> int:
    """The end of every benchmark's main(): print its table, write its JSON (to --output,
    or default_output's place), say where."""
    payload["smoke"] = args.smoke
    report(payload)
    path = write_results(payload, output_path(name, args, patched=patched))
    print(f"\nresults written to {path}")
    return 0


class Copy(NamedTuple):
    """A database a measurement has to itself: its name, URL and one open connection."""

    name: str
    url: str
    conn: asyncpg.Connection


@asynccontextmanager
async def clone(
    server: BenchServer, template: str | None, prefix: str
) -> AsyncIterator[tuple[str, str]]:
    """A new database (a copy of template, or empty) for the block: (name, URL).  Dropped
    however the block ends, so a failed measurement leaves no copy on the server."""
    name = unique_name(prefix)
    url = await server.create_database(name, template)
    try:
        yield name, url
    finally:
        await server.drop_database(name)


@asynccontextmanager
async def fresh_copy(server: BenchServer, template: str | None, prefix: str) -> AsyncIterator[Copy]:
    """clone() with a connection to the copy, closed before the copy is dropped."""
    async with clone(server, template, prefix) as (name, url):
        conn = await asyncpg.connect(url)
        try:
            yield Copy(name, url, conn)
        finally:
            await conn.close()


async def per_size(
    name: str,
    sizes: Sequence[int],
    measure: Callable[[asyncpg.Connection, int], Awaitable[dict[str, Any]]],
) -> dict[str, Any]:
    """Each size measured on a fresh database of one server: the payload of a per-size
    benchmark (its name, the machine, the server's settings, a result per size)."""
    results = []
    with bench_server() as server:
        settings = await server.describe()
        for users in sizes:
            async with fresh_copy(server, None, f"bench_{name}") as copy:
                results.append({"users": users, **await measure(copy.conn, users)})
    return {"benchmark": name, "machine": machine(), "server": settings, "results": results}


def stale_users_sql(seed: str) -> str:
    """INSERT of $1 users with usage, last reset 40 days ago (so before the current
    period's start: each is stale), to load a benchmark's template with.

    md5 of seed and the number gives random-looking, reproducible uuids: the heap is in
    insertion order while the primary key (which the keyset walk follows) is in random
    order, as with real uuid v4 user ids."""
    return f"""
INSERT INTO user_tokens (user_id, monthly_token_limit, monthly_tokens_used,
                         last_monthly_reset, created_at, updated_at)
SELECT md5('{seed}' || n)::uuid, 500, 1 + n % 499,
       now() - interval '40 days', now() - interval '400 days', now() - interval '40 days'
  FROM generate_series(1, $1::integer) AS n
"""


async def build_template(
    server: BenchServer, prefix: str, load_users: str, users: int, patch: str | None = None
) -> str:
    """A migrated database loaded by `load_users` ($1 = users), frozen and analysed.

    Frozen and all-visible, so no contender cloned from it pays for hint bits or a
    visibility-map pass the others skipped.
    """
    name, url = await server.migrated_database(prefix)
    conn = await asyncpg.connect(url)
    try:
        if patch:
            # A proposed change (CREATE OR REPLACE ...) measured against the same baselines.
            await conn.execute(patch)
        await conn.execute(load_users, users)
        await conn.execute("VACUUM (FREEZE, ANALYZE) user_tokens")
        await conn.execute("VACUUM (FREEZE, ANALYZE) token_transactions")
    finally:
        await conn.close()
    return name


def default_output(name: str, smoke: bool, *, patched: bool = False) -> Path:
    """bench/results/<name>.json; smoke runs write beside it so they never clobber it,
    and runs with a proposed SQL patch go to results/patched/ (git-ignored), out of the
    plot's way."""
    folder = RESULTS_DIR / "patched" if patched else RESULTS_DIR
    return folder / (f"{name}.smoke.json" if smoke else f"{name}.json")


def output_path(name: str, args: argparse.Namespace, *, patched: bool = False) -> Path:
    """Where a run's results go: --output when given, else default_output's place."""
    output: Path | None = args.output
    return output or default_output(name, args.smoke, patched=patched)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain fixed-width table on stdout."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def base_parser(doc: str | None, name: str) -> argparse.ArgumentParser:
    """Flags every benchmark takes: --smoke, --repetitions, --output; the help describes
    the benchmark by its module docstring's first line (its name without one)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else name)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny quick run (CI): checks it works, not speed"
    )
    parser.add_argument(
        "--repetitions", type=int, default=None, help="measurements per contender (default 3)"
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="results JSON (default bench/results/)"
    )
    return parser


USER_SIZES: Final = (100_000, 1_000_000, 10_000_000)
SMOKE_USER_SIZES: Final = (2_000, 20_000)


def add_sizes_option(parser: argparse.ArgumentParser) -> None:
    """--sizes: the user counts of the benchmarks measured per size."""
    parser.add_argument(
        "--sizes",
        type=_sizes,
        default=None,
        help="comma-separated user counts (default 100k,1M,10M; with --smoke 2k,20k)",
    )


def sized_run_args(
    argv: Sequence[str] | None, doc: str | None, name: str
) -> tuple[argparse.Namespace, list[int], int]:
    """The arguments of a benchmark measured per size: (args, sizes, repetitions), the
    repetitions 2 for a smoke run and 5 otherwise unless given."""
    parser = base_parser(doc, name)
    add_sizes_option(parser)
    args = parser.parse_args(argv)
    return args, chosen_sizes(args), args.repetitions or (2 if args.smoke else 5)


def chosen_sizes(args: argparse.Namespace) -> list[int]:
    """The --sizes given, else the defaults for a full or a smoke run."""
    if args.sizes is not None:
        return list(args.sizes)
    return list(SMOKE_USER_SIZES if args.smoke else USER_SIZES)


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(size) for size in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not comma-separated whole numbers: {text!r}") from None
    if any(size <= 0 for size in sizes):
        raise argparse.ArgumentTypeError("sizes must be positive")
    return sizes


def add_patch_option(parser: argparse.ArgumentParser) -> None:
    """--patch: the flag of the benchmarks that can measure a proposed SQL change."""
    parser.add_argument(
        "--patch",
        type=Path,
        default=None,
        help="SQL file applied after migrating (e.g. CREATE OR REPLACE of a proposed body)",
    )


def read_patch(patch: Path | None) -> str | None:
    """The --patch file's SQL, or None without one."""
    return patch.read_text(encoding="utf-8") if patch else None
