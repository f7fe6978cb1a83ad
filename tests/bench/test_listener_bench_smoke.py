"""The listener benchmarks' --smoke runs still work end to end (and bench/plot.py draws them).

Their numbers mean nothing at this size; what is checked is that every contender ran,
the results carry the keys the README table and bench/plot.py read, and the numbers
are positive.  They run as subprocesses, like `python -m bench`, against
BENCH_DATABASE_URL or an embedded server of their own.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.bench import SMOKE_TIMEOUT_SECONDS, run_module, run_smoke


@pytest.mark.timeout(SMOKE_TIMEOUT_SECONDS + 10)
def test_listener_drain_smoke_times_every_consumer_and_both_target_ratios(
    tmp_path: Path,
) -> None:
    """The drain smoke run drains 10k doorbells through all four consumers."""
    result = run_smoke("listener_drain", tmp_path / "listener_drain.json")
    assert result["smoke"] is True
    [entry] = result["results"]
    assert entry["notifications"] == 10_000
    assert set(entry["contenders"]) == {"bare", "bare_json", "ours", "peer"}
    for name, data in entry["contenders"].items():
        assert data["seconds"]["min"] > 0, name
        assert data["rate"]["best"] >= data["rate"]["median"] > 0, name
        assert data["cpu_rate"]["median"] > 0, name
    ours = entry["contenders"]["ours"]
    # Coalescing: a 10k burst costs a handful of ledger reads, not one per doorbell.
    assert 1 <= ours["ledger_reads"]["min"] <= 100
    assert ours["malformed"]["median"] == 0
    assert ours["parsed_ok"]["min"] + ours["overflow"]["min"] == 10_000
    for key in ("ours/bare", "ours/peer"):
        assert entry["ratios"][key]["rate_median"] > 0, key
        assert key in result["targets"]
    assert isinstance(entry["meets_targets"], bool)
    assert result["machine"]["nproc"] >= 1
    assert result["server"]["server_version"]
    # bench/plot.py draws this results file (the README's picture comes from it).
    picture = tmp_path / "benchmarks.png"
    done = run_module("bench.plot", "--results", str(tmp_path), "--output", str(picture))
    assert "1 panels" in done.stdout
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(SMOKE_TIMEOUT_SECONDS + 10)
def test_listener_memory_smoke_reads_rss_of_the_real_process(tmp_path: Path) -> None:
    """The memory smoke run takes the real listener through 20k doorbells and 20k resets."""
    result = run_smoke("listener_memory", tmp_path / "listener_memory.json")
    assert result["smoke"] is True
    assert (result["doorbells"], result["resets"]) == (20_000, 20_000)
    [sample] = result["samples"]
    for key in ("warm_rss_kb", "after_doorbells_rss_kb", "after_resets_rss_kb", "peak_rss_kb"):
        assert sample[key] > 10_000, key  # a Python process with asyncpg is > 10 MB
    assert sample["peak_rss_kb"] >= sample["after_resets_rss_kb"]
    assert sample["doorbells_seconds"] > 0
    assert sample["resets_seconds"] > 0
    assert sample["malformed"] == 0
    assert result["summary"]["resets_growth_mb"]["median"] == sample["resets_growth_mb"]
    assert isinstance(result["meets_target"], bool)
