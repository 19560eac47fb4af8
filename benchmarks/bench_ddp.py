"""Data-parallel scaling: lit-cats' training tokens/s on 1 GPU vs N GPUs of one host (DDP).

Weak scaling, as users scale: the per-GPU batch stays the same, so N GPUs train on N times the
tokens per step. For each setup and device count a fresh process runs lit-cats' real training
step (``QLoRAModule`` + ``CatsDataModule`` with its rank sharding, Lightning's ``ddp`` strategy
as ``configs/ddp.yaml`` sets it) on the random-weight Phi-3-mini and the "short" workload
(4,000 random sequences of 32-256 tokens) that ``bench_train.make_workload`` builds. Real tokens
(label-carrying) of every rank are counted between device synchronisations, after the warm-up
steps; seconds are the slowest rank's. Scaling efficiency = tok/s on N / (N x tok/s on 1).
Prints a table and appends it, dated, with the GPUs, versions and commit, to RESULTS.md.

    python benchmarks/bench_ddp.py                       # 1 vs 2 GPUs, every setup
    python benchmarks/bench_ddp.py --devices 1,2,4 --setups b16
    python benchmarks/bench_ddp.py --model tiny --accelerator cpu --steps 3 --warmup 1  # smoke

Needs torch, transformers, peft, lightning, bitsandbytes, datasets and jsonargparse importable;
lit-cats comes from this source tree (no install needed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))  # lit_cats from this checkout
sys.path.insert(0, str(HERE))  # bench_train's model and workload builders

from bench_train import (  # noqa: E402
    FAST_MODEL,
    build_random_phi3,
    environment,
    fit_timed,
    label_tokens,
    make_workload,
    qlora_module,
    workload_datamodule,
)

#: Setups: per-GPU data settings and QLoRAModule overrides, all on the short workload.
SETUPS: dict[str, dict[str, Any]] = {
    "b2": {"what": "qlora.yaml settings, batch 2 per GPU", "batch_size": 2},
    "b16": {"what": "qlora.yaml settings, batch 16 per GPU", "batch_size": 16},
    "fast_pack": {
        "what": "fast.yaml settings: packing 16k tokens per GPU",
        "batch_size": 2,
        "packing": True,
        "model": FAST_MODEL,
        "fast_optimizer": True,
    },
}


# ------------------------------------------------------------------------------- one run
def worker(args: argparse.Namespace) -> None:
    """One fit on ``args.devices`` devices; rank zero writes the result to ``args.out``."""
    from lightning.pytorch.strategies import DDPStrategy

    setup = SETUPS[args.setups]
    model_dir = Path(args.model_dir)
    kwargs: dict[str, Any] = dict(setup.get("model", {}))
    if setup.get("fast_optimizer"):
        kwargs["optimizer"] = lambda params: torch.optim.AdamW(
            params, lr=2e-4, weight_decay=0.0, foreach=True
        )
    module = qlora_module(
        model_dir, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], **kwargs
    )
    vocab = 1024 if args.model == "tiny" else 32064
    data = make_workload("short", vocab, args.examples)  # seeded: the same on every rank
    dm = workload_datamodule(
        model_dir,
        data,
        setup["batch_size"],
        setup.get("packing", False),
        16384,
        args.accelerator == "gpu",
    )
    timer = _Timer(args.warmup, args.steps, args.accelerator == "gpu")
    strategy: Any = "auto"
    if args.devices > 1:  # as configs/ddp.yaml
        strategy = DDPStrategy(find_unused_parameters=False, gradient_as_bucket_view=True)
    trainer = fit_timed(
        module,
        dm,
        timer,
        args.warmup + args.steps,
        args.accelerator,
        devices=args.devices,
        strategy=strategy,
        # lit-cats shards its own loaders; packing requires this off under DDP.
        use_distributed_sampler=False,
    )
    if trainer.is_global_zero:
        Path(args.out).write_text(json.dumps(timer.result))


class _Timer:
    """Times steps ``warmup .. warmup + steps`` on every rank; sums tokens, keeps the max time."""

    def __init__(self, warmup: int, steps: int, cuda: bool) -> None:
        import lightning as L

        self.warmup, self.steps, self.cuda = warmup, steps, cuda
        self.seen, self.t0, self.tokens = 0, 0.0, torch.zeros(())
        self.result: dict[str, Any] = {}
        timer = self

        class Callback(L.Callback):
            def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
                timer.tokens = torch.zeros((), dtype=torch.long, device=pl_module.device)
                if timer.cuda:
                    torch.cuda.reset_peak_memory_stats()

            def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
                if timer.seen == timer.warmup:
                    timer.sync()
                    timer.t0 = time.perf_counter()

            def on_train_batch_end(
                self, trainer: L.Trainer, pl_module: L.LightningModule, out: Any, batch: Any, i: int
            ) -> None:
                if timer.warmup <= timer.seen < timer.warmup + timer.steps:
                    timer.tokens += label_tokens(batch)  # stays on the device
                if timer.seen == timer.warmup + timer.steps - 1:
                    timer.sync()
                    timer.finish(trainer, time.perf_counter() - timer.t0)
                timer.seen += 1

        self.callback = Callback()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def finish(self, trainer: Any, seconds: float) -> None:
        # Every rank gets here at the same step: one all-reduce each for tokens and time.
        tokens = trainer.strategy.reduce(self.tokens, reduce_op="sum")
        slowest = trainer.strategy.reduce(
            torch.tensor(seconds, device=self.tokens.device), reduce_op="max"
        )
        self.result = {"tokens": int(tokens), "seconds": float(slowest), "steps": self.steps}
        if self.cuda:
            self.result["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / 2**30

    def __getattr__(self, name: str) -> Any:  # Lightning wants a Callback: delegate to it
        return getattr(self.__dict__["callback"], name)


# ------------------------------------------------------------------------------- driver
def run_one(args: argparse.Namespace, setup: str, devices: int, model_dir: Path) -> dict[str, Any]:
    """One measurement in a fresh process (Lightning re-runs it once per extra rank)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker"]
        cmd += ["--setups", setup, "--devices", str(devices), "--model_dir", str(model_dir)]
        cmd += ["--model", args.model, "--accelerator", args.accelerator, "--out", str(out)]
        cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
        cmd += ["--examples", str(args.examples)]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        }
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1][:200]}
        result = json.loads(out.read_text())
    result["tok_s"] = result["tokens"] / result["seconds"]
    result["s_step"] = result["seconds"] / result["steps"]
    return result


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: tokens/s per setup and device count, speed-up and efficiency against 1."""
    lines = [
        "| setup | settings | devices | real tok/s (all GPUs) | s/step | peak alloc GiB/GPU "
        "| speed-up | scaling efficiency |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['setup']} | {SETUPS[r['setup']]['what']} | {r['devices']} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error']} |||||")
            continue
        one = next(
            (x for x in rows if x["setup"] == r["setup"] and x["devices"] == 1 and "tok_s" in x),
            None,
        )
        speedup = r["tok_s"] / one["tok_s"] if one else None
        alloc = f"{r['peak_alloc_gib']:.2f}" if "peak_alloc_gib" in r else "-"
        lines.append(
            f"{head} {r['tok_s']:,.0f} | {r['s_step']:.3f} | {alloc} | "
            + (f"{speedup:.2f}x | {speedup / r['devices']:.0%} |" if speedup else "- | - |")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"of {list(SETUPS)}")
    parser.add_argument("--devices", default="1,2", help="device counts, e.g. 1,2 or 1,2,4")
    parser.add_argument("--model", choices=["phi3-mini", "tiny"], default="phi3-mini")
    parser.add_argument("--accelerator", choices=["gpu", "cpu"], default="gpu")
    parser.add_argument("--model_dir", default=str(Path(tempfile.gettempdir()) / "lit-cats-phi3"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--results", default=str(HERE / "RESULTS.md"))
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.devices = int(args.devices)
        worker(args)
        return
    device = "cuda" if args.accelerator == "gpu" else "cpu"
    model_dir = build_random_phi3(Path(args.model_dir), device, args.model == "tiny")
    rows = []
    for setup in args.setups.split(","):
        for devices in (int(d) for d in args.devices.split(",")):
            print(f"{setup} on {devices} device(s) ...", flush=True)
            rows.append(
                {"setup": setup, "devices": devices, **run_one(args, setup, devices, model_dir)}
            )
    body = table(rows)
    print(body)
    if args.no_record:
        return
    env = environment(device)
    gpus = f"{torch.cuda.device_count()} x {env['device']}" if device == "cuda" else env["device"]
    results = Path(args.results)
    if not results.exists():
        results.write_text(
            "# Benchmark results\n\nAppended by the benchmarks/ scripts; newest last.\n"
        )
    with results.open("a") as f:
        f.write(
            f"\n## bench_ddp: {env['date']}\n\n- devices: {gpus}\n- versions: {env['versions']}\n"
            f"- commit: {env['commit']}\n- workload: short (32-256 tokens), {args.warmup} warm-up "
            f"+ {args.steps} timed steps, per-GPU batch fixed (weak scaling)\n\n{body}\n"
        )


if __name__ == "__main__":
    main()
