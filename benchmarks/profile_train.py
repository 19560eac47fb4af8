"""Where a lit-cats training step spends its time: torch.profiler over a few steps.

A plain loop over lit-cats' own module (its ``SpeedKit.loss``, backward, clipping,
AdamW) on the random-weight Phi-3-mini of ``bench_train.py``, outside Lightning, so the numbers
show the model's kernels and the host's overhead. Prints wall time per step, the GPU's busy
time per step (sum of kernel times), and the top operators by device and by host time.

    python benchmarks/profile_train.py --shape b2        # the original's shape, batch 2
    python benchmarks/profile_train.py --shape pack16k   # a packed 16k-token step
    python benchmarks/profile_train.py --shape long      # 16 packed 1,024-token texts
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_train import FAST_MODEL, build_random_phi3, make_workload, qlora_module


def batches(shape: str, vocab: int, pad_multiple: int = 1) -> list[dict]:
    """Ten batches of the requested shape from the short workload."""
    from lit_cats.data.collate import collate, pack_examples
    from lit_cats.data.sampling import TokenBudgetBatchSampler

    if shape == "long":
        data = make_workload("long", vocab, 200)
    else:
        data = make_workload("short", vocab, 4000)
    examples = [{"input_ids": x, "labels": x} for x in data]
    if shape == "b2":
        return [collate(examples[i : i + 2], 0, pad_multiple) for i in range(0, 20, 2)]
    sampler = TokenBudgetBatchSampler([len(x) for x in data], 16384, seed=1)
    return [pack_examples([examples[i] for i in b]) for b in list(sampler)[:10]]


def main(argv: list[str] | None = None) -> None:
    """Profile steps 4-6 of ten and print the summary."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=["b2", "pack16k", "long"], default="b2")
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/phi3-random"))
    parser.add_argument("--plain", action="store_true", help="qlora.yaml settings, not fast")
    parser.add_argument("--no-gc", action="store_true")
    parser.add_argument("--compile", action="store_true", help="compiled decoder layers")
    parser.add_argument("--liger", action="store_true", help="Liger kernels")
    parser.add_argument("--pad-multiple", type=int, default=1, help="b2: pad widths to this")
    parser.add_argument(
        "--cprofile", action="store_true", help="also the host's Python time per function"
    )
    parser.add_argument("--lora-dropout", type=float, default=0.05, help="the recipe's: 0.05")
    parser.add_argument("--rows", type=int, default=18, help="kernel rows printed")
    parser.add_argument("--trace", type=Path, help="also write the profiled steps' Chrome trace")
    args = parser.parse_args(argv)
    model_dir = build_random_phi3(args.model_dir, "cuda", tiny=False)
    kwargs = {} if args.plain else dict(FAST_MODEL)
    kwargs.update(compile=args.compile, liger_kernels=args.liger)
    module = qlora_module(
        model_dir,
        gradient_checkpointing=not args.no_gc,
        lora_dropout=args.lora_dropout,
        **kwargs,
    )
    module._target_device = lambda: torch.device("cuda")  # type: ignore[method-assign]
    module.configure_model()
    module.cuda()
    params = module.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, foreach=True)

    def step(batch: dict) -> None:
        batch = {
            k: v.cuda(non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
        }
        module.on_train_batch_start(batch, 0)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = module.kit.loss(module.model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        module.on_train_batch_end(None, batch, 0)

    data = [
        {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in b.items()}
        for b in batches(args.shape, 32064, args.pad_multiple)
    ]
    for b in data[:4]:  # compiled layers compile here (static, then dynamic shapes)
        step(b)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for b in data[4:7]:
        step(b)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / 3
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for b in data[7:10]:
            step(b)
        torch.cuda.synchronize()
    if args.trace:  # open in chrome://tracing or ui.perfetto.dev
        prof.export_chrome_trace(str(args.trace))
    events = prof.key_averages()
    # Kernels only (device-side events): an op's row repeats its kernels' time.
    device = torch.autograd.DeviceType.CUDA
    kernel_us = (
        sum(
            e.self_device_time_total
            for e in events
            if e.device_type == device and not e.is_user_annotation
        )
        / 3
    )
    print(
        f"shape {args.shape} ({'plain' if args.plain else 'fast'}, GC {not args.no_gc}, "
        f"compile {args.compile}, liger {args.liger}, LoRA dropout {args.lora_dropout}): "
        f"{wall * 1e3:.0f} ms/step wall, {kernel_us / 1e3:.0f} ms/step of GPU kernels"
    )
    print(
        events.table(
            sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=90
        )
    )
    print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
    if args.cprofile:  # where the host's time goes, by Python function (3 steps)
        import cProfile
        import pstats

        with cProfile.Profile() as host:
            for b in data[4:7]:
                step(b)
            torch.cuda.synchronize()
        stats = pstats.Stats(host).strip_dirs()
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(40)


if __name__ == "__main__":
    main()
