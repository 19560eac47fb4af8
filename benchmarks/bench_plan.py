"""The planner's predicted peak GPU memory against the measured peak, run by run.

In one process on one GPU: the random-weight Phi-3-mini of ``bench_train.py`` (built locally, no
download), each run trained for a few steps through lit-cats' real Lightning step
(``bench_train.run``'s machinery), its peak ``torch.cuda.max_memory_allocated()`` after a reset
at the start of training, against :func:`lit_cats.plan.memory.estimate` for the same settings and
the largest step the run took. Target (issue 24): within +-10% for the original recipe at batch
2, fast.yaml packing 16k with checkpointing on and off, one 4,096-token sequence, and r 64.

    python benchmarks/bench_plan.py --out plan_accuracy.md          # GPU: every run, ~4 min
    python benchmarks/bench_plan.py --runs orig_b2,fast_4096
    python benchmarks/bench_plan.py --tiny                          # CPU smoke: tiny model

Prints the table and writes it to ``--out``; ``--results`` also appends it to RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train

from lit_cats.plan.memory import GIB, Architecture, estimate
from lit_cats.plan.planner import read_model_config, shape_of

_R64 = {"r": 64, "lora_alpha": 128}
#: The runs: bench_train's, a few steps each (the peak is reached by the second step, once the
#: optimizer state exists), and the r-64 variant of fast.yaml's packed run.
RUNS = {
    "orig_b2": bench_train.RUNS["orig_b2"],
    "fast_pack_gc": bench_train.RUNS["fast_pack_gc"],
    "fast_pack16k_nogc": bench_train.RUNS["fast_pack16k_nogc"],
    "fast_pack_gc_compile": bench_train.RUNS["fast_pack_gc_compile"],
    "fast_pack16k_nogc_compile": bench_train.RUNS["fast_pack16k_nogc_compile"],
    "orig_4096": bench_train.RUNS["orig_4096"],
    "fast_4096": bench_train.RUNS["fast_4096"],
    "fast_pack_gc_r64": dataclasses.replace(
        bench_train.RUNS["fast_pack_gc"],
        name="fast_pack_gc_r64",
        what="fast.yaml: packing 16k, GC on, LoRA r 64 (alpha 128)",
        model={**bench_train.RUNS["fast_pack_gc"].model, **_R64},
    ),
}
WARMUP, STEPS = 2, 4


def model_settings(run: bench_train.Run) -> dict[str, Any]:
    """The run's settings as a parsed config's ``model:`` section (what the planner reads)."""
    recipe = {
        "r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.05,
        "target_modules": bench_train.TARGETS,
    }
    model = {**recipe, **run.model}
    speed_keys = ("loss_chunk_size", "fast_lora", "upcast_to_fp32", "liger_kernels", "compile",
                  "uncheckpointed_layers", "keep_dequantized_weights")  # fmt: skip
    speed = {k: model.pop(k) for k in speed_keys if k in model}
    speed["gradient_checkpointing"] = run.gradient_checkpointing
    optimizer = "torch.optim.AdamW" if run.fast_optimizer else "bitsandbytes.optim.PagedAdamW32bit"
    return {**model, "speed": speed, "optimizer": {"class_path": optimizer}}


class _Peak:
    """Largest step (tokens of ``input_ids``) and the peak allocated memory of a fit."""

    def __init__(self, device: str) -> None:
        import lightning as L

        self.device, self.tokens = device, 0
        outer = self

        class Callback(L.Callback):
            def on_train_start(self, trainer: Any, pl_module: Any) -> None:
                if outer.device == "cuda":
                    torch.cuda.reset_peak_memory_stats()

            def on_train_batch_start(self, trainer: Any, m: Any, batch: Any, i: int) -> None:
                outer.tokens = max(outer.tokens, batch["input_ids"].numel())

        self.callback = Callback()

    def peak(self) -> float | None:
        return torch.cuda.max_memory_allocated() / GIB if self.device == "cuda" else None

    def reserved(self) -> float | None:
        return torch.cuda.max_memory_reserved() / GIB if self.device == "cuda" else None


def measure(run: bench_train.Run, model_dir: Path, device: str, vocab: int, scale: float) -> dict:
    """Train ``run`` for a few steps; its largest step, measured peak and predicted peak."""
    if run.model.get("compile"):
        import torch._dynamo as dynamo

        dynamo.reset()
    count = {"short": int(4000 * scale)}.get(run.workload, WARMUP + STEPS + 2)
    data = bench_train.make_workload(run.workload, vocab, max(count, WARMUP + STEPS + 2))
    optimizer = None
    if run.fast_optimizer:

        def optimizer(params: Any) -> torch.optim.Optimizer:
            return torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, foreach=True)

    model = model_settings(run)
    speed = {**model["speed"]}
    module = bench_train.qlora_module(
        model_dir,
        **{k: v for k, v in model.items() if k not in ("speed", "optimizer")},
        **speed,
        **({"optimizer": optimizer} if optimizer else {}),
    )
    dm = bench_train.workload_datamodule(
        model_dir, data, run.batch_size, run.packing, run.max_tokens, device == "cuda",
        run.pad_to_multiple_of,
    )  # fmt: skip
    probe = _Peak(device)
    accelerator = "gpu" if device == "cuda" else "cpu"
    bench_train.fit_timed(module, dm, probe.callback, WARMUP + STEPS, accelerator)
    arch = Architecture.from_config(read_model_config(str(model_dir)))
    predicted = estimate(arch, shape_of(model, probe.tokens))
    result = {
        "run": run.name,
        "what": run.what,
        "tokens": probe.tokens,
        "predicted_gib": predicted.peak / GIB,
        "terms_gib": {k: round(v / GIB, 3) for k, v in predicted.terms.items()},
        "measured_gib": probe.peak(),
        "reserved_gib": probe.reserved(),
    }
    del module, dm
    bench_train._free()
    return result


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| run | settings | largest step (tokens) | predicted GiB | measured alloc GiB "
        "| reserved GiB | error | within +-10% |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['run']} | {r['what']} | failed: {r['error']} ||||||")
            continue
        measured = r["measured_gib"]
        if measured is None:
            err, ok, meas, res = "-", "-", "- (no GPU)", "-"
        else:
            rel = r["predicted_gib"] / measured - 1
            err, ok = f"{rel:+.1%}", "yes" if abs(rel) <= 0.10 else "**no**"
            meas, res = f"{measured:.2f}", f"{r['reserved_gib']:.2f}"
        lines.append(
            f"| {r['run']} | {r['what']} | {r['tokens']:,} | {r['predicted_gib']:.2f} | {meas} "
            f"| {res} | {err} | {ok} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated: " + ",".join(RUNS))
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model, 2 runs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "phi3-random"
    )
    parser.add_argument("--scale", type=float, default=0.05, help="fraction of the short workload")
    parser.add_argument("--out", type=Path, default=Path("bench_plan.md"), help="table file")
    parser.add_argument("--results", type=Path, help="also append the table to this RESULTS.md")
    parser.add_argument("--commit", help="commit to record (where the tree has no .git)")
    args = parser.parse_args(argv)
    device = "cpu" if args.tiny else args.device
    names = "orig_b2,fast_pack_gc" if args.tiny and args.runs == ",".join(RUNS) else args.runs
    model_dir = bench_train.build_random_phi3(args.model_dir, device, args.tiny)
    vocab = Architecture.from_config(read_model_config(str(model_dir))).vocab_size
    rows = []
    for name in names.split(","):
        run = RUNS[name]
        if args.tiny:  # the tiny model: short steps, small budgets
            run = dataclasses.replace(run, max_tokens=2048, workload=run.workload.replace(
                "len=4096", "len=256"))  # fmt: skip
        try:
            row = measure(run, model_dir, device, vocab, 1.0 if args.tiny else args.scale)
        except Exception as exc:  # one failed run must not lose the others' numbers
            bench_train._free()
            row = {"run": name, "what": run.what, "error": repr(exc)[:200]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    body = table(rows)
    print(body)
    args.out.write_text(body + "\n")
    if args.results:
        env = bench_train.environment(device)
        if args.commit:
            env["commit"] = args.commit
        note = f"{'tiny' if args.tiny else 'phi3-mini'} model; {WARMUP + STEPS} steps per run"
        bench_train.append_results(args.results, env, body, note, section="bench_plan")
    return rows


if __name__ == "__main__":
    main()
