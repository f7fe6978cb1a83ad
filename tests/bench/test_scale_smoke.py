"""bench/scale.py's --smoke run (2,000 and 20,000 users) still works end to end.

Its numbers mean nothing at this size; what is checked is the shape of scale.json (what
the README table and bench/plot_scale.py read), that every contender and workload ran
and was checked, and that the plot is drawn.  It runs as a subprocess, like
`python -m bench`, against BENCH_DATABASE_URL or an embedded server of its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.bench import listed_benchmarks, run_smoke

# The smoke run takes about 30 s here; the limit leaves room for a loaded CI machine.
SMOKE_TIMEOUT_SECONDS = 240
CONTENDERS = {"function", "committing", "minimal", "minimal_full", "bare"}
WORKLOADS = {"deduct", "update_triggers_on", "update_triggers_off", "bare_counter"}


def _positive_summary(value: dict[str, Any], what: str) -> None:
    assert value["min"] > 0, what
    assert value["median"] >= value["min"], what
    assert len(value["samples"]) >= 1, what


@pytest.mark.timeout(SMOKE_TIMEOUT_SECONDS + 10)
def test_scale_smoke_reports_every_size_and_section(tmp_path: Path) -> None:
    """Each smoke size has bulk, latency, listener, sizes and write results, and a plot."""
    output = tmp_path / "scale.json"
    result = run_smoke("scale", output, timeout=SMOKE_TIMEOUT_SECONDS)
    assert result["benchmark"] == "scale"
    assert result["smoke"] is True
    assert [r["users"] for r in result["results"]] == [2_000, 20_000]
    assert result["skipped"] == []
    assert result["machine"]["nproc"] >= 1
    assert result["server"]["server_version"]
    embedded = result["server"]["source"] == "embedded"
    for size in result["results"]:
        users = size["users"]
        contenders = size["bulk"]["contenders"]
        assert set(contenders) == CONTENDERS
        for name, data in contenders.items():
            _positive_summary(data["seconds"], f"{users} {name}")
            _positive_summary(data["nothing_to_do_seconds"], f"{users} {name} idle")
            assert 0 <= data["hot_update_ratio"]["median"] <= 1, name
            assert data["wal_bytes"]["min"] > 0, name
            if embedded:
                assert data["server_cpu_seconds"]["median"] >= 0, name
        for key in ("function/minimal", "function/bare", "committing/minimal", "minimal/bare"):
            assert size["bulk"]["ratios"][key]["median"] > 0, key
        assert set(size["latency"]) == {"watchdog_snapshot", "status_summary", "bare_count_users"}
        for name, data in size["latency"].items():
            _positive_summary(data["seconds"], name)
        listener = size["listener"]
        assert listener["resets"] == users
        assert listener["counted_seconds"]["median"] >= listener["ready_seconds"]["min"] > 0
        sizes = size["ledger_sizes"]
        assert sizes["rows"] == users * (result["ledger_per_user"] + 2)
        assert sizes["reset_rows"] == 2 * users
        assert "token_transactions" in sizes["relations"]
        assert any(r["kind"] == "index" for r in sizes["relations"].values())
        [entry] = size["writes"]
        assert (entry["clients"], entry["synchronous_commit"]) == (2, "on")
        assert set(entry["workloads"]) == WORKLOADS
        for name, data in entry["workloads"].items():
            assert data["tps"]["min"] > 0, name
        assert entry["deduct_over_bare"]["median"] > 0
        assert entry["trigger_overhead"]["median"] < 1
        assert set(entry["meets_targets"]) == {"deduct_over_bare", "trigger_overhead"}
        assert size["timings"]["total_seconds"] > 0
    assert output.with_suffix(".png").stat().st_size > 10_000


def test_bench_runner_discovers_scale_and_not_its_helpers() -> None:
    """`python -m bench --list` runs bench.scale but none of its helper modules."""
    names = listed_benchmarks()
    assert "scale" in names
    assert not {"scale_data", "scale_bulk", "scale_writes", "plot_scale"} & names
