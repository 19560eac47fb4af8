"""The training benchmark runs end to end on the CPU with the tiny model, so it cannot rot."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench_train(monkeypatch):
    """``benchmarks/bench_train.py``, imported as the benchmark scripts run it."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("bench_train")


def test_workloads_follow_the_reference_definition(bench_train):
    short = bench_train.make_workload("short", 32064, 4000)
    assert len(short) == 4000
    assert min(map(len, short)) >= 32 and max(map(len, short)) <= 256
    assert all(2 <= t < 31998 for seq in short[:50] for t in seq)
    assert short == bench_train.make_workload("short", 32064, 4000)  # seeded
    assert {len(x) for x in bench_train.make_workload("long", 32064, 3)} == {1024}
    with pytest.raises(ValueError, match="Unknown workload"):
        bench_train.make_workload("medium", 100, 1)


def _bench(bench_train, results: Path, runs: list[str], *extra: str) -> dict[str, dict]:
    args = ["--model", "tiny", "--device", "cpu", "--runs", ",".join(runs), "--steps", "2",
            "--warmup", "1", "--scale", "0.02", "--results", str(results), *extra]  # fmt: skip
    rows = {r["run"]: r for r in bench_train.main(args)}
    for name in runs:
        assert "error" not in rows[name], rows[name]
        assert rows[name]["tokens"] > 0 and rows[name]["tok_s"] > 0
    return rows


def test_bench_runs_on_cpu_and_appends_a_dated_section(bench_train, tmp_path: Path, run_dir):
    results = tmp_path / "RESULTS.md"
    rows = _bench(bench_train, results, ["fast_pack_gc"], "--check")
    check = rows["check"]
    assert abs(check["packed"] - check["padded"]) < 1e-2 * check["padded"]
    text = results.read_text()
    assert "## bench_train:" in text and "tiny model" in text and "| fast_pack_gc |" in text
    _bench(bench_train, results, ["fast_b2"])
    assert results.read_text().count("## bench_train:") == 2  # appended, not overwritten


@pytest.mark.slow
def test_bench_original_recipes_run_on_cpu(bench_train, tmp_path: Path, run_dir):
    pytest.importorskip("trl")
    rows = _bench(bench_train, tmp_path / "RESULTS.md", ["trl_b2", "orig_b2"])
    assert "x original" in (tmp_path / "RESULTS.md").read_text()
    assert rows["trl_b2"]["steps"] == 2
