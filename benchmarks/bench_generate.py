"""Generation speed: the original's one-prompt-at-a-time 4-bit loop vs ``lit-cats predict``.

In one process on one GPU: build a random-weight Phi-3-mini locally (``bench_train.py``'s config;
speed does not depend on the weights' values) and a random LoRA adapter (r 16 on all four linear
kinds), then time the original's eight prompts x 250 new tokens three ways:

1. ``original``: 4-bit base + peft adapter (fp32, as loaded by default), ``model.generate`` on
   one prompt at a time, sampling at temperature 0.7 / top-p 0.9, as the original script did;
2. ``batched_4bit``: lit-cats' ``load_for_inference`` + ``generate``: the eight prompts in one
   left-padded batch, same base, same adapter, same sampling;
3. ``merged_bf16``: ``lit-cats merge`` (adapter folded into the bf16 base, checked), then the
   same batched ``generate`` on the merged model.

Every answer is forced to its full length (``min_new_tokens`` = ``max_new_tokens``) so all arms
generate the same number of tokens. Each arm is warmed up (a short generation) first; times are
between device synchronisations. Prints a table and appends it, dated, with the GPU, versions
and commit, to ``benchmarks/RESULTS.md``. The tokenizer is lit-cats' tiny one (Phi-3's special
tokens and chat template), so no download is needed; prompts encode to a similar length.

    python benchmarks/bench_generate.py                 # GPU; most of the time is the loop
    python benchmarks/bench_generate.py --fast-lora     # also batched 4-bit with fused LoRA
    python benchmarks/bench_generate.py --tiny          # CPU smoke test: tiny model, seconds
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) TRITON_CACHE_DIR=$(mktemp -d) \
        python benchmarks/bench_generate.py --first-run # a never-compiled machine's first runs
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from peft import PeftModel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a source checkout without installing
sys.path.insert(0, str(REPO / "benchmarks"))  # the shared random Phi-3-mini definition

from bench_train import PHI3_MINI, TARGETS, append_results, environment  # noqa: E402

from lit_cats.inference import decode  # noqa: E402
from lit_cats.inference import engine as decode_engine  # noqa: E402
from lit_cats.inference.adapters import load_for_inference  # noqa: E402
from lit_cats.inference.generation import GenerationSettings, generate  # noqa: E402
from lit_cats.inference.merge import merge_adapter  # noqa: E402
from lit_cats.recipe import load_base  # noqa: E402

#: The issue's reference rate of the original loop, tokens/s, recorded with each section.
ORIGINAL_TOKENS_PER_S = 19.8


def original_prompts() -> list[str]:
    """The eight prompts of ``configs/predict.yaml``."""
    config = yaml.safe_load((REPO / "configs" / "predict.yaml").read_text())
    return list(config["data"]["prompts"])


# ------------------------------------------------------------------------------ the models
def build_models(folder: Path, device: str, tiny: bool) -> tuple[Path, Path]:
    """Save a random Phi-3-mini (or the tiny model) and a random r-16 adapter; their folders."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Phi3Config, Phi3ForCausalLM

    from lit_cats.tiny import PHI3_STOP_TOKENS, tiny_model_path

    tiny_dir = tiny_model_path()
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    if tiny:
        base_dir, model = tiny_dir, AutoModelForCausalLM.from_pretrained(tiny_dir)
    else:
        base_dir = folder / "base"
        torch.manual_seed(0)
        with torch.device(device), _default_dtype(torch.bfloat16):
            model = Phi3ForCausalLM(Phi3Config(**PHI3_MINI))
        # Stop ids of the tokenizer in use, as Phi-3's generation config lists its three.
        model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(
            list(PHI3_STOP_TOKENS)
        )
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS)
    peft_model = get_peft_model(model, lora)
    torch.manual_seed(1)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # trained adapters are not zero; small, so nothing overflows
            torch.nn.init.normal_(param, std=0.02)
    adapter_dir = folder / "adapter"
    peft_model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    del model, peft_model
    _free()
    return base_dir, adapter_dir


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------ the arms
def original_loop(model: Any, tokenizer: Any, prompts: list[str], tokens: int) -> int:
    """The original script: one prompt at a time through ``model.generate``; tokens made."""
    made = 0
    for prompt in prompts:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        out = model.generate(
            **inputs,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            temperature=0.7,
            top_p=0.9,
            do_sample=True,
            pad_token_id=tokenizer.pad_token_id,
        )
        made += out.shape[1] - inputs["input_ids"].shape[1]
    return made


def lit_cats_batched(
    model: Any, tokenizer: Any, prompts: list[str], tokens: int, decode: str = "plain"
) -> int:
    """``lit-cats predict``'s path: every prompt in one batch; tokens made."""
    settings = GenerationSettings(
        max_new_tokens=tokens, min_new_tokens=tokens, seed=0, decode=decode
    )
    results = generate(model, tokenizer, prompts, settings, batch_size=len(prompts))
    return sum(r.num_tokens for r in results)


def _peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def _reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def time_arm(
    name: str,
    run: Callable[[Any, Any, list[str], int], int],
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    tokens: int,
    device: str,
) -> dict[str, Any]:
    """A plain arm: warm up (2 prompts, 4 tokens), then time it between synchronisations."""
    _reset_peak(device)
    run(model, tokenizer, prompts[:2], 4)
    _sync(device)
    start = time.perf_counter()
    made = run(model, tokenizer, prompts, tokens)
    _sync(device)
    seconds = time.perf_counter() - start
    row = {"arm": name, "prompts": len(prompts), "tokens": made, "seconds": seconds}
    row["peak_gib"] = _peak_gib(device)
    print(f"  {name}: {made} tokens in {seconds:.2f} s ({made / seconds:,.1f} tok/s)", flush=True)
    return row


def time_fast_arm(
    name: str, model: Any, tokenizer: Any, prompts: list[str], tokens: int, device: str, mode: str
) -> dict[str, Any]:
    """A fast-loop arm: the first run from a cold decoder (capture, compilation when asked,
    everything a user waits for), then a second, steady run of the same shapes.

    Reports the steady run's time to first token (prefill + first sample, from the decoder),
    its decode rate (tokens after the first over the time after it), the first run's compile
    (warm-up + ``torch.compile`` + graph capture) seconds and end-to-end seconds, the peak GPU
    memory, and the replay time of one graphed step alone (50 replays between CUDA events): the
    GPU's share of a step, the rest of a step being the host's sampling and bookkeeping.
    """
    decode.release(model)
    if name.endswith("_warm_cache"):  # as a new process: torch.compile's in-memory state gone,
        torch._dynamo.reset()  # inductor's on-disk caches (written by the cold arm) kept
        decode_engine._compiled_decode_layer.cache_clear()
    _reset_peak(device)
    start = time.perf_counter()
    lit_cats_batched(model, tokenizer, prompts, tokens, mode)
    _sync(device)
    first_run = time.perf_counter() - start
    engine = decode.decoder_of(model)
    compile_s = engine.compile_seconds
    start = time.perf_counter()
    made = lit_cats_batched(model, tokenizer, prompts, tokens, mode)
    _sync(device)
    seconds = time.perf_counter() - start
    ttft = engine.last_ttft
    decode_rate = (made - len(prompts)) / max(seconds - ttft, 1e-9)
    row = {
        "arm": name,
        "prompts": len(prompts),
        "tokens": made,
        "seconds": seconds,
        "ttft": ttft,
        "decode_tok_s": decode_rate,
        "compile_s": compile_s,
        "first_run_s": first_run,
        "peak_gib": _peak_gib(device),
        "step_ms": _graph_step_ms(engine),
        "path": engine.describe,
    }
    print(
        f"  {name}: {made} tokens in {seconds:.2f} s ({made / seconds:,.1f} tok/s); TTFT "
        f"{ttft * 1e3:.1f} ms, decode {decode_rate:,.0f} tok/s, compile {compile_s:.1f} s, "
        f"first run {first_run:.2f} s, graph step {row['step_ms'] or 0:.2f} ms "
        f"({engine.describe})",
        flush=True,
    )
    decode.release(model)
    return row


def _graph_step_ms(engine: Any) -> float | None:
    if engine.graph is None:
        return None
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(50):
        engine.graph.replay()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / 50


def guarded(rows: list[dict[str, Any]], name: str, *args: Any) -> None:
    """:func:`time_fast_arm` of one arm; an arm that fails is recorded as failed and the others
    still run (one call on a GPU must not lose every measurement to one broken arm)."""
    try:
        rows.append(time_fast_arm(name, *args))
    except Exception as error:
        print(f"  {name}: FAILED {type(error).__name__}: {error}", flush=True)
        rows.append({"arm": name, "failed": f"{type(error).__name__}: {str(error)[:120]}"})
    _free()


def many_prompts(prompts: list[str], count: int) -> list[str]:
    """``count`` prompts: the eight, numbered, round and round (an evaluation set)."""
    return [f"{prompts[i % len(prompts)]} (#{i})" for i in range(count)]


def load_merged(folder: Path, base: str, adapter_dir: Path, device: str) -> Any:
    """``lit-cats merge`` of the adapter into the base (checked), loaded in 16 bits."""
    report = merge_adapter(str(adapter_dir), str(folder / "merged"), base, device=device)
    print(f"  merge check: |loss diff| {report.loss_diff:.2e}", flush=True)
    return load_for_inference(str(report.output_dir), load_in_4bit=False, device=device)


def run_first_runs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``--first-run``: what a user's first ``predict`` costs on a machine that has compiled
    nothing (run it first on a fresh machine, with empty ``TORCHINDUCTOR_CACHE_DIR`` and
    ``TRITON_CACHE_DIR``), against today's path, merged bf16 first, then the 4-bit base with
    the fused LoRA: ``auto`` on the cold cache, ``compile`` forced (a cold compile: the auto arm
    compiled nothing unless it chose to), ``auto`` again from the warm cache (as a new process),
    the evaluation set. Each fast arm's path and ``auto``'s reason are listed under the table.
    """
    from transformers import AutoTokenizer

    from lit_cats.fast.lora import enable_fast_lora

    device = "cpu" if args.tiny else "cuda"  # --tiny: a CPU smoke test of the arms
    auto = "compile" if args.tiny else "auto"  # on the CPU, auto would take the plain path
    prompts, tokens = original_prompts(), args.max_new_tokens
    many = many_prompts(prompts, args.many)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="lit-cats-bench-") as tmp:
        base_dir, adapter_dir = build_models(Path(tmp), device, args.tiny)
        tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
        model = load_merged(Path(tmp), str(base_dir), adapter_dir, device)
        rows.append(
            time_arm("merged_bf16", lit_cats_batched, model, tokenizer, prompts, tokens, device)
        )
        for name, arm_prompts, mode in [
            ("auto_merged_bf16_cold_cache", prompts, auto),
            ("compile_merged_bf16_cold_cache", prompts, "compile"),
            ("auto_merged_bf16_warm_cache", prompts, auto),
            (f"auto_merged_bf16_x{args.many}_warm_cache", many, auto),
        ]:
            guarded(rows, name, model, tokenizer, arm_prompts, tokens, device, mode)
        del model
        _free()
        model = load_for_inference(str(base_dir), str(adapter_dir), device=device)
        enable_fast_lora(model)
        arm = (model, tokenizer, prompts, tokens, device)
        rows.append(time_arm("batched_4bit_fast_lora", lit_cats_batched, *arm))
        guarded(rows, "auto_4bit_fast_lora_warm_cache", *arm, auto)
        del model
        _free()
    return rows


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    from transformers import AutoTokenizer

    device = "cpu" if args.tiny else "cuda"
    fast = "fast"  # the fast loop: CUDA graphs on a GPU, eager on the CPU
    auto = "compile" if args.tiny else "auto"  # on the CPU, auto would take the plain path
    prompts, tokens = original_prompts(), args.max_new_tokens
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="lit-cats-bench-") as tmp:
        base_dir, adapter_dir = build_models(Path(tmp), device, args.tiny)
        tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
        base = str(base_dir)

        # As the original: peft's defaults (adapter upcast to fp32), no lit-cats code.
        model = PeftModel.from_pretrained(load_base(base, device=device), str(adapter_dir))
        loop = prompts[: args.loop_prompts]
        rows.append(time_arm("original", original_loop, model, tokenizer, loop, tokens, device))
        del model
        _free()

        model = load_for_inference(base, str(adapter_dir), device=device)
        rows.append(
            time_arm("batched_4bit", lit_cats_batched, model, tokenizer, prompts, tokens, device)
        )
        # The fast loop on the 4-bit model: graphed, bitsandbytes' own NF4 layers.
        guarded(rows, "fast_4bit", model, tokenizer, prompts, tokens, device, fast)
        if args.fast_lora:
            from lit_cats.fast.lora import enable_fast_lora

            enable_fast_lora(model)
            rows.append(
                time_arm(
                    "batched_4bit_fast_lora",
                    lit_cats_batched,
                    model,
                    tokenizer,
                    prompts,
                    tokens,
                    device,
                )
            )
            # The fast loop with the fused LoRA (predict's default): graphed, and compiled
            # (bitsandbytes' dequantization as one kernel, the rest of the step fused). On a
            # fresh machine the first compiled arm is the cold compile of the whole process.
            arms = [("fast_4bit_fast_lora", fast)]
            if args.compile:
                arms += [("compile_4bit_fast_lora", "compile"),
                         ("compile_4bit_fast_lora_warm_cache", "compile")]  # fmt: skip
            for name, mode in arms:
                guarded(rows, name, model, tokenizer, prompts, tokens, device, mode)
        del model
        _free()

        model = load_merged(Path(tmp), base, adapter_dir, device)
        rows.append(
            time_arm("merged_bf16", lit_cats_batched, model, tokenizer, prompts, tokens, device)
        )
        many = many_prompts(prompts, args.many)
        arms = [("fast_merged_bf16", prompts, fast), (f"fast_merged_bf16_x{args.many}", many, fast)]
        if args.compile:
            # auto = the compiled step for a 16-bit model on CUDA. Twice at 8 prompts: a cold
            # compile, then one that finds inductor's caches warm (what a second run of
            # lit-cats pays; the process's own compile state is reset in between).
            arms += [
                ("auto_merged_bf16", prompts, auto),
                ("auto_merged_bf16_warm_cache", prompts, auto),
                (f"auto_merged_bf16_x{args.many}", many, auto),
            ]
        for name, arm_prompts, mode in arms:
            guarded(rows, name, model, tokenizer, arm_prompts, tokens, device, mode)
        del model
        _free()
    return rows


# ------------------------------------------------------------------------------ the record
def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table; speed-ups against the ``original`` arm measured in the same run.

    Fast arms add: TTFT (steady run), decode tok/s (after the first token), compile s
    (warm-up + compilation + capture, first run), first run s (end to end, compile
    included), one graphed step's GPU time alone; every arm its peak GPU memory.
    """
    original = [r for r in rows if r["arm"] == "original" and "failed" not in r]
    base = original[0]["tokens"] / original[0]["seconds"] if original else None
    lines = [
        "| arm | prompts | tokens | seconds | generated tok/s | x original (same run) | TTFT ms "
        "| decode tok/s | compile s | first run s | graph step ms | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def num(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['arm']} | failed: {r['failed']} |" + " |" * 10)
            continue
        rate = r["tokens"] / r["seconds"]
        ttft = r.get("ttft")
        lines.append(
            f"| {r['arm']} | {r['prompts']} | {r['tokens']} | {r['seconds']:.2f} | "
            f"{rate:,.1f} | {'-' if base is None else f'{rate / base:.1f}x'} | "
            f"{num(ttft and ttft * 1e3, '.1f')} | "
            f"{num(r.get('decode_tok_s'), ',.0f')} | {num(r.get('compile_s'), '.1f')} | "
            f"{num(r.get('first_run_s'), '.2f')} | {num(r.get('step_ms'), '.2f')} | "
            f"{num(r.get('peak_gib'), '.1f')} |"
        )
    paths = [f"- {r['arm']}: {r['path']}" for r in rows if r.get("path")]
    return "\n".join(lines + (["", *paths] if paths else []))


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU (smoke test)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="250 (tiny: 8)")
    parser.add_argument("--loop-prompts", type=int, default=8, help="prompts the loop times")
    parser.add_argument("--fast-lora", action="store_true", help="also time fused LoRA")
    parser.add_argument("--many", type=int, default=256, help="prompts of the large arm")
    parser.add_argument(
        "--compile", action="store_true", help="also time the fast loop with torch.compile"
    )
    parser.add_argument(
        "--first-run",
        action="store_true",
        help="only the first-run arms (merged, then 4-bit), for a never-compiled machine",
    )
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    parser.add_argument("--note", default="", help="free text for the record")
    args = parser.parse_args(argv)
    args.max_new_tokens = args.max_new_tokens or (8 if args.tiny else 250)
    if not args.tiny and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU; use --tiny for the CPU smoke test")
    rows = run_first_runs(args) if args.first_run else run_all(args)
    body = table(rows)
    print(body)
    note = (
        f"8 prompts (and {args.many} in the _x{args.many} arms) x {args.max_new_tokens} new "
        "tokens (forced), sampling T 0.7 / top-p 0.9 / top-k 50; "
        f"the original measured {ORIGINAL_TOKENS_PER_S} tok/s on one H100 (issue)"
        + (f"; {args.note}" if args.note else "")
    )
    env = environment("cpu" if args.tiny else "cuda")
    append_results(args.results, env, body, note, section="bench_generate")
    print(f"appended to {args.results}")
    return rows


if __name__ == "__main__":
    main()
