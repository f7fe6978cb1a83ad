"""Each benchmark's --smoke run still works end to end (so the benchmarks never rot).

The smoke runs check that the code paths, the SQL they call and the results format
still hold; their numbers mean nothing.  They run as subprocesses, like `python -m
bench`, against BENCH_DATABASE_URL or an embedded server of their own.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.bench import SMOKE_TIMEOUT_SECONDS, listed_benchmarks, run_smoke


@pytest.mark.timeout(SMOKE_TIMEOUT_SECONDS + 10)
def test_bulk_reset_smoke_reports_every_contender_and_ratio(tmp_path: Path) -> None:
    """The bulk reset smoke run times all four contenders and both baselines' ratios."""
    result = run_smoke("bulk_reset", tmp_path / "bulk_reset.json")
    assert result["smoke"] is True
    assert result["users"] == 20_000
    assert set(result["contenders"]) == {"function", "committing", "minimal", "bare"}
    embedded = result["server"]["source"] == "embedded"
    for name, data in result["contenders"].items():
        assert data["seconds"]["min"] > 0, name
        assert data["seconds"]["median"] >= data["seconds"]["min"], name
        assert data["wal_bytes"]["min"] > 0, name
        if embedded:  # the backend is a process here, so its CPU time is measured
            assert data["cpu_seconds"]["median"] >= 0, name
    for key in ("function/minimal", "function/bare", "committing/minimal", "minimal/bare"):
        assert result["ratios"][key]["min"] > 0, key
        assert result["ratios"][key]["median"] > 0, key
    assert result["server"]["server_version"]
    assert result["machine"]["nproc"] >= 1


@pytest.mark.timeout(SMOKE_TIMEOUT_SECONDS + 10)
def test_write_path_smoke_reports_tps_and_both_ratios(tmp_path: Path) -> None:
    """The write-path smoke run gets TPS from pgbench for all three workloads."""
    result = run_smoke("write_path", tmp_path / "write_path.json")
    assert result["smoke"] is True
    [entry] = result["results"]
    assert (entry["clients"], entry["synchronous_commit"]) == (2, "on")
    assert set(entry["workloads"]) == {"deduct", "update_triggers_on", "bare"}
    embedded = result["server"]["source"] == "embedded"
    for name, data in entry["workloads"].items():
        assert data["tps"]["min"] > 0, name
        assert data["latency_ms"]["median"] > 0, name
        if embedded:  # the server's processes are here, so their CPU time is measured
            assert data["server_cpu_us_per_txn"]["median"] > 0, name
    assert entry["deduct_over_bare"]["median"] > 0
    assert entry["trigger_overhead"]["median"] < 1
    if embedded:
        assert entry["deduct_over_bare"]["cpu"] > 0
    assert isinstance(entry["meets_targets"], bool)


def test_bench_runner_discovers_every_benchmark() -> None:
    """`python -m bench --list` finds each benchmark module (and no helper module)."""
    names = listed_benchmarks()
    assert {"bulk_reset", "write_path", "periodic_cost", "scale"} <= names
    assert not {"common", "plot"} & names


@pytest.mark.timeout(SMOKE_TIMEOUT_SECONDS + 10)
def test_periodic_cost_smoke_reports_every_figure_per_size(tmp_path: Path) -> None:
    """The periodic-cost smoke run measures the watchdog, status and the no-op run."""
    result = run_smoke("periodic_cost", tmp_path / "periodic_cost.json")
    assert result["smoke"] is True
    assert [r["users"] for r in result["results"]] == [2_000, 20_000]
    for row in result["results"]:
        for key in (
            "watchdog_check_seconds",
            "status_seconds",
            "bare_stale_scan_seconds",
            "nothing_to_do_seconds",
            "bulk_function_seconds",
        ):
            assert row[key] > 0, key


@pytest.mark.timeout(SMOKE_TIMEOUT_SECONDS + 10)
def test_analytics_cost_smoke_reports_the_fold_the_baseline_and_the_hot_path(
    tmp_path: Path,
) -> None:
    """The usage-analytics smoke run times the fold, the check, the bare ledger sum and
    deduct_tokens as shipped and as the previous release had it."""
    result = run_smoke("analytics_cost", tmp_path / "analytics_cost.json")
    assert result["smoke"] is True
    assert [r["users"] for r in result["results"]] == [2_000, 20_000]
    for row in result["results"]:
        assert row["ledger_rows"] == 2 * row["users"]
        for key in (
            "fold_after_batch_seconds",
            "watchdog_check_seconds",
            "bare_ledger_sum_seconds",
            "deduct_seconds",
            "deduct_previous_release_seconds",
            "bare_update_seconds",
        ):
            assert row[key] > 0, key
