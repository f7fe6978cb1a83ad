"""Benchmark 3a: doorbells drained per second, ours against a bare loop and asyncpg-listen.

One run, one server, the same burst for every consumer:

1. each consumer opens its own connection and LISTENs on token_resets, and gets a
   warm-up burst through its whole path;
2. each consumer's connection opens a transaction (BEGIN): PostgreSQL delivers
   nothing to a session inside a transaction block, so the burst queues on the
   server while one producer connection sends N distinct doorbells (the trigger's
   JSON, ids the ledger has handed out) in transactions of CHUNK;
3. consumers are released one at a time (COMMIT on their connection; the order
   rotates per repetition): the server streams the whole queue to that client, and
   we time the first notification received to the last one processed.

Contenders (bench/drain_consumers.py): ``bare`` an asyncpg add_listener callback that
only counts (the baseline); ``bare_json`` the same plus json.loads (a reference);
``ours`` the real components of one listener session (listener/service.py); ``peer``
the library asyncpg-listen.  Targets: ours >= 0.5x bare, ours >= 2x peer.
``python -m bench.listener_drain --help``.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

import asyncpg

from bench.common import (
    base_parser,
    bench_server,
    measured,
    print_table,
    publish,
    ratio,
    rotated,
    summary,
)
from bench.drain_consumers import CONSUMERS, Consumer, Drain
from listener.logs import configure_logging
from listener.payload import CHANNEL

NAME = "listener_drain"
TARGETS = {"ours/bare": 0.5, "ours/peer": 2.0}
CHUNK = 50_000
WARM_UP = 1_000

# The payload the ledger's statement trigger sends, built the same way.
NOTIFY_RANGE = """
SELECT count(pg_catalog.pg_notify($1, pg_catalog.json_build_object(
           'v', 1, 'first_id', i, 'last_id', i, 'count', 1)::text))
  FROM pg_catalog.generate_series($2::bigint, $3::bigint) AS i
"""
# Doorbells must name ids the ledger has handed out, or ours counts them as forged.
ADVANCE_LEDGER_IDS = """
SELECT pg_catalog.setval(pg_catalog.pg_get_serial_sequence('public.token_transactions', 'id'),
                         $1::bigint)
"""


async def notify_burst(
    conn: asyncpg.Connection, count: int, *, first_id: int = 1, chunk: int = CHUNK
) -> float:
    """Send `count` distinct doorbells (ids first_id..) in transactions of `chunk`; seconds."""
    started = time.perf_counter()
    sent = 0
    while sent < count:
        size = min(chunk, count - sent)
        low = first_id + sent
        await conn.fetchval(NOTIFY_RANGE, CHANNEL, low, low + size - 1)
        sent += size
    return time.perf_counter() - started


async def repetition(
    url: str, notifications: int, names: Sequence[str], shift: int
) -> dict[str, Drain]:
    """Start every consumer, queue one burst for all, drain them one at a time."""
    consumers: dict[str, Consumer] = {}
    producer = await asyncpg.connect(url)
    try:
        for name in names:
            consumers[name] = CONSUMERS[name](url)
            await consumers[name].start()
        await notify_burst(producer, WARM_UP)
        for consumer in consumers.values():
            await consumer.wait_for(WARM_UP, deadline_seconds=60)
        for consumer in consumers.values():
            await consumer.hold()
        produce_seconds = await notify_burst(producer, notifications)
        drains: dict[str, Drain] = {}
        for name in rotated(list(names), shift):
            drains[name] = await consumers[name].release_and_drain(
                notifications, deadline_seconds=120 + notifications / 2_000
            )
            drains[name].extra["produce_seconds"] = produce_seconds
        return drains
    finally:
        for consumer in consumers.values():
            await consumer.close()
        await producer.close()


async def run(bursts: Sequence[int], repetitions: int, names: Sequence[str]) -> dict[str, Any]:
    """Every burst size, `repetitions` times, every consumer; results as a JSON-ready dict."""
    with bench_server() as server:
        described = await server.describe()
        name, url = await server.migrated_database("bench_drain")
        try:
            conn = await asyncpg.connect(url)
            try:
                await conn.fetchval(ADVANCE_LEDGER_IDS, max(*bursts, WARM_UP))
            finally:
                await conn.close()
            results = []
            for notifications in bursts:
                samples: dict[str, list[Drain]] = {n: [] for n in names}
                for rep in range(repetitions):
                    drains = await repetition(url, notifications, names, rep)
                    for contender, drain in drains.items():
                        samples[contender].append(drain)
                    print(
                        f"  {notifications} notifications, repetition {rep + 1}: "
                        + ", ".join(f"{n} {d.rate:.0f}/s" for n, d in drains.items()),
                        flush=True,
                    )
                results.append(summarise(notifications, samples))
        finally:
            await server.drop_database(name)
    return {
        "benchmark": NAME,
        "bursts": list(bursts),
        "repetitions": repetitions,
        "chunk": CHUNK,
        "warm_up": WARM_UP,
        "targets": TARGETS,
        "server": described,
        "results": results,
    }


def summarise(notifications: int, samples: dict[str, list[Drain]]) -> dict[str, Any]:
    """Seconds (min, median), the rates they give, extras, and ratios for one burst size."""
    contenders: dict[str, Any] = {}
    for name, drains in samples.items():
        entry: dict[str, Any] = {}
        for kind, attribute in (("rate", "seconds"), ("cpu_rate", "cpu_seconds")):
            seconds = summary([getattr(d, attribute) for d in drains])
            entry[attribute] = seconds
            # The fastest repetition's rate, and the median repetition's.
            entry[kind] = {
                "best": notifications / seconds["min"],
                "median": notifications / seconds["median"],
                "samples": [notifications / x for x in seconds["samples"]],
            }
        entry["release_seconds"] = summary([d.release_seconds for d in drains])
        for key in sorted({k for d in drains for k in d.extra}):
            entry[key] = summary([float(d.extra[key]) for d in drains])
        contenders[name] = entry
    ratios: dict[str, Any] = {}
    for key in ("ours/bare", "ours/bare_json", "ours/peer", "peer/bare"):
        top, bottom = key.split("/")
        if top in contenders and bottom in contenders:
            ratios[key] = {
                f"{kind}_{which}": ratio(
                    contenders[top][kind][which], contenders[bottom][kind][which]
                )
                for kind in ("rate", "cpu_rate")
                for which in ("best", "median")
            }
            # Each repetition's own ratio: its drains ran back to back, so slow drift
            # in the other tenants' load cancels out better than across repetitions.
            ratios[key]["rate_paired_median"] = statistics.median(
                ratio(a.rate, b.rate) for a, b in zip(samples[top], samples[bottom], strict=True)
            )
    meets = all(ratios[k]["rate_median"] >= t for k, t in TARGETS.items() if k in ratios)
    return {
        "notifications": notifications,
        "contenders": contenders,
        "ratios": ratios,
        "meets_targets": meets,
    }


def report(payload: dict[str, Any]) -> None:
    """Print one table per burst size, then the ratios against the targets."""
    for entry in payload["results"]:
        rows = []
        for name, data in entry["contenders"].items():
            reads = data.get("ledger_reads")
            rows.append(
                [
                    name,
                    data["rate"]["best"],
                    data["rate"]["median"],
                    data["cpu_rate"]["median"],
                    data["seconds"]["min"],
                    data["seconds"]["median"],
                    "-" if reads is None else f"{reads['min']:.0f}-{max(reads['samples']):.0f}",
                ]
            )
        print_table(
            f"{entry['notifications']} notifications, {payload['repetitions']} repetitions",
            ["consumer", "best/s", "median/s", "per CPU s", "min s", "median s", "ledger reads"],
            rows,
        )
        ratio_rows = [
            [
                key,
                v["rate_best"],
                v["rate_median"],
                v["rate_paired_median"],
                v["cpu_rate_median"],
                TARGETS.get(key, "-"),
            ]
            for key, v in entry["ratios"].items()
        ]
        print_table(
            "ratios of rates (best: of the fastest repetitions; paired: median of each"
            " repetition's ratio; CPU: per CPU second of this process)",
            ["ratio", "best", "median", "paired", "CPU median", "target >="],
            ratio_rows,
        )
        print(f"meets targets (medians): {entry['meets_targets']}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the drain benchmark; prints tables and writes the JSON results."""
    parser = base_parser(__doc__, NAME)
    parser.add_argument(
        "--notifications",
        type=int,
        action="append",
        default=None,
        help="burst size (repeatable; default 100000 and 1000000, smoke 10000)",
    )
    parser.add_argument(
        "--contenders", default=",".join(CONSUMERS), help=f"subset of {','.join(CONSUMERS)}"
    )
    args = parser.parse_args(argv)
    bursts = args.notifications or ([10_000] if args.smoke else [100_000, 1_000_000])
    repetitions = args.repetitions or (1 if args.smoke else 5)
    names = [n.strip() for n in args.contenders.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONSUMERS]
    if unknown or not names or min(bursts) < 1:
        parser.error(f"unknown contenders {unknown}; choose from {','.join(CONSUMERS)}")
    # Our components log like the service does (JSON lines), to nowhere: the cost
    # stays in the measurement, the lines stay out of the table.
    with open(os.devnull, "w", encoding="utf-8") as sink:
        configure_logging("json", "INFO", stream=sink)
        payload = measured(lambda: asyncio.run(run(bursts, repetitions, names)))
    return publish(payload, report, NAME, args)


if __name__ == "__main__":
    raise SystemExit(main())
