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


# ------------------------------------------------------------------ bench_plan, bench_seed_job
def _import(monkeypatch, name: str):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module(name)


def test_bench_plan_runs_on_cpu_and_writes_its_table(monkeypatch, tmp_path: Path, run_dir):
    """Predicted peaks for the runs it trains (no GPU: nothing measured to compare with)."""
    bench_plan = _import(monkeypatch, "bench_plan")
    out = tmp_path / "plan.md"
    rows = bench_plan.main(["--tiny", "--runs", "orig_b2,fast_pack_gc_r64", "--out", str(out)])
    assert [r["run"] for r in rows] == ["orig_b2", "fast_pack_gc_r64"]
    assert all("error" not in r and r["tokens"] > 0 and r["predicted_gib"] > 0 for r in rows)
    r16 = bench_plan.model_settings(bench_plan.RUNS["fast_pack_gc"])
    r64 = bench_plan.model_settings(bench_plan.RUNS["fast_pack_gc_r64"])
    assert (r16["r"], r64["r"]) == (16, 64) and r16["speed"] == r64["speed"]
    assert "| fast_pack_gc_r64 |" in out.read_text()


def test_bench_seed_job_times_a_real_fit_on_cpu(monkeypatch, tmp_path: Path, run_dir):
    """One arm: the real `lit-cats fit` in a subprocess, timed by phase, adapter saved."""
    bench = _import(monkeypatch, "bench_seed_job")
    out, work = tmp_path / "seed.md", tmp_path / "work"
    (row,) = bench.main(["--tiny", "--arms", "auto", "--work", str(work), "--out", str(out)])
    assert "error" not in row, row
    phases = ("start_s", "plan_and_tokenize_s", "load_s", "train_s", "validate_s", "end_s")
    assert all(row[p] >= 0 for p in phases) and row["steps"] > 0 and not row["compiled"]
    assert sum(row[p] for p in phases) <= row["wall_s"]
    assert (work / "logs" / "phi3-cats" / "version_0" / "adapter" / "adapter_config.json").is_file()
    assert "| auto |" in out.read_text()


@pytest.mark.slow
def test_bench_seed_job_runs_the_original_recipe_on_cpu(monkeypatch, tmp_path: Path, run_dir):
    pytest.importorskip("trl")
    bench = _import(monkeypatch, "bench_seed_job")
    (row,) = bench.main(["--tiny", "--arms", "trl", "--work", str(tmp_path), "--out",
                         str(tmp_path / "seed.md")])  # fmt: skip
    assert "error" not in row, row
    assert row["steps"] == 4 and row["extrapolated_train_s"] >= row["train_s"]
