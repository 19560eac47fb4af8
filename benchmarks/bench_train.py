"""Training throughput and memory of lit-cats against the original recipe, side by side.

In one process on one device: build a random-weight Phi-3-mini locally (no download; the cost
does not depend on the weights' values), load it through lit-cats' real 4-bit path, and time
lit-cats' Lightning training step on the reference workloads and the original recipe (TRL
``SFTTrainer`` with the original script's arguments; ``pip install 'lit-cats[bench]'``) on the
same data. Prints a table and appends it, dated, with the GPU, versions and commit, to
``benchmarks/RESULTS.md``. Method (RESULTS.md, "How to read these numbers"): real tokens are
label-carrying tokens, counted between two device synchronisations after the warm-up steps; peak
memory after a reset at the start of training; two utilisation figures, each labelled: HFU
(FLOPs executed, recompute included, against the card's measured peak, :data:`PEAK_FLOPS`) and
standard MFU (model FLOPs without recompute, against the spec peak, :data:`SPEC_PEAK_FLOPS`).

    python benchmarks/bench_train.py                          # GPU: Phi-3-mini, every run
    python benchmarks/bench_train.py --runs trl_b2,fast_pack_gc
    python benchmarks/bench_train.py --model tiny --device cpu   # CI: tiny model, seconds

Each run is a name from :data:`RUNS`; ``--list`` prints them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import gc
import json
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a source checkout without installing

#: Measured dense bf16 matmul rate of the card the first sections ran on, FLOP/s: HFU's peak
#: (RESULTS.md, "How to read these numbers").
PEAK_FLOPS = 790e12
#: FLOPs executed per token of a frozen Phi-3-mini step, keyed by gradient checkpointing: a
#: forward and a backward without weight gradients for the frozen base, plus the forward's rerun
#: when checkpointing. HFU counts these.
GFLOP_PER_TOKEN = {True: 22.4, False: 15.1}
#: Spec dense bf16 peak of an H100/H200 SXM, FLOP/s: standard MFU's peak.
SPEC_PEAK_FLOPS = 989e12
#: Model FLOPs per token, recompute not counted whatever the checkpointing: standard MFU's work.
MODEL_GFLOP_PER_TOKEN = GFLOP_PER_TOKEN[False]
TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
PHI3_MINI = {
    "vocab_size": 32064,
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "original_max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "sliding_window": 2047,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 32000,
    "pad_token_id": 32000,
    "hidden_act": "silu",
}


def _fast_settings() -> tuple[dict[str, Any], int]:
    """configs/fast.yaml's model settings that every fast run shares, and its padding multiple
    for unpacked batches, read from the file.

    Checkpointing, Liger, compile and the optimizer are each run's own (:class:`Run`).
    """
    import yaml

    fast = yaml.safe_load((REPO / "configs" / "fast.yaml").read_text())
    own = ("gradient_checkpointing", "liger_kernels", "compile")
    model = {k: v for k, v in fast["model"]["speed"].items() if k not in own}
    return model, int(fast["data"].get("pad_to_multiple_of", 1))


def qlora_module(model_dir: Path | str, **settings: Any) -> Any:
    """A ``QLoRAModule`` from flat keyword arguments: the speed ones go to ``speed=``."""
    from lit_cats.fast import SpeedSettings
    from lit_cats.model import QLoRAModule

    fields = SpeedSettings.__dataclass_fields__
    speed = {k: settings.pop(k) for k in list(settings) if k in fields}
    return QLoRAModule(str(model_dir), speed=SpeedSettings(**speed), **settings)


#: The fast settings of configs/fast.yaml: model keyword arguments, and the width multiple
#: that unpacked batches are padded to.
FAST_MODEL, FAST_PAD_MULTIPLE = _fast_settings()
#: Batch-2 runs time whole mega-batches of lit-cats' length-grouped order (50 batches, sorted
#: longest first within each): a window inside one would see shorter or longer examples than
#: the workload's mean, and at batch 2 the step time hardly depends on the length.
B2_WARMUP = B2_STEPS = 50


@dataclasses.dataclass
class Run:
    """One measured configuration.

    Args:
        name: Short id (``--runs``).
        what: One-line description for the table.
        workload: ``short`` (lengths 32-256), ``long`` (1,024 tokens) or ``len=N`` (N tokens).
        recipe: ``lit-cats`` or ``trl`` (the original script's SFTTrainer).
        batch_size: Examples per step (unpacked).
        packing: Pack into token-budget rows instead.
        max_tokens: Token budget per packed step.
        pad_to_multiple_of: Unpacked batches are padded to a multiple of this width.
        gradient_checkpointing: Recompute activations in backward.
        model: Extra ``QLoRAModule`` keyword arguments (override the LoRA recipe, e.g.
            ``lora_dropout``).
        fast_optimizer: torch AdamW (foreach) instead of paged AdamW 32-bit.
        steps: Timed steps (after ``warmup``).
        warmup: Untimed steps first.
    """

    name: str
    what: str
    workload: str = "short"
    recipe: str = "lit-cats"
    batch_size: int = 2
    packing: bool = False
    max_tokens: int = 16384
    pad_to_multiple_of: int = 1
    gradient_checkpointing: bool = True
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    fast_optimizer: bool = False
    steps: int = 30
    warmup: int = 8


def _fast(
    name: str,
    what: str,
    workload: str = "short",
    liger: bool = False,
    compile: bool = False,
    uncheckpointed: int = 0,
    keep_weights: bool = False,
    **kw: Any,
) -> Run:
    model = {**FAST_MODEL, "liger_kernels": liger, "compile": compile}
    model["uncheckpointed_layers"] = uncheckpointed
    model["keep_dequantized_weights"] = keep_weights
    if not kw.get("packing"):
        kw.setdefault("pad_to_multiple_of", FAST_PAD_MULTIPLE)
    if kw.get("batch_size", 2) == 2 and not kw.get("packing"):
        kw.update(warmup=B2_WARMUP, steps=B2_STEPS)
    return Run(name, what, workload, model=model, fast_optimizer=True, **kw)


RUNS: dict[str, Run] = {
    r.name: r
    for r in [
        Run(
            "trl_b2",
            "original: TRL SFTTrainer, batch 2, GC, paged AdamW",
            recipe="trl",
            warmup=B2_WARMUP,
            steps=B2_STEPS,
        ),
        Run("orig_b2", "lit-cats, qlora.yaml settings, batch 2", warmup=B2_WARMUP, steps=B2_STEPS),
        _fast("fast_b2", "fast.yaml minus packing, batch 2 (original shape)"),
        _fast(
            "fast_b2_nogc", "fast.yaml minus packing, batch 2, GC off", gradient_checkpointing=False
        ),
        Run("orig_pack_gc", "qlora.yaml + packing 16k, GC on", packing=True),
        _fast("fast_pack_gc", "fast.yaml: packing 16k, GC on", packing=True),
        _fast(
            "fast_pack8k_nogc",
            "fast.yaml, packing 8k, GC off",
            packing=True,
            max_tokens=8192,
            gradient_checkpointing=False,
        ),
        _fast(
            "fast_pack16k_nogc",
            "fast.yaml, packing 16k, GC off",
            packing=True,
            gradient_checkpointing=False,
        ),
        _fast("fast_long_gc", "fast.yaml, 1,024-token sequences, GC on", "long", packing=True),
        _fast(
            "fast_pack_gc_liger",
            "fast.yaml + Liger kernels, packing 16k, GC on",
            packing=True,
            liger=True,
        ),
        _fast(
            "fast_pack8k_nogc_liger",
            "fast.yaml + Liger kernels, packing 8k, GC off",
            packing=True,
            max_tokens=8192,
            gradient_checkpointing=False,
            liger=True,
        ),
        _fast(
            "fast_long_gc_liger",
            "fast.yaml + Liger kernels, 1,024-token sequences, GC on",
            "long",
            packing=True,
            liger=True,
        ),
        _fast(
            "fast_b2_compile",
            "fast.yaml minus packing + compiled layers, batch 2 (original shape)",
            compile=True,
        ),
        _fast(
            "fast_pack_gc_compile",
            "fast.yaml + compiled layers, packing 16k, GC on",
            packing=True,
            compile=True,
        ),
        _fast(
            "fast_pack8k_nogc_compile",
            "fast.yaml + compiled layers, packing 8k, GC off",
            packing=True,
            max_tokens=8192,
            gradient_checkpointing=False,
            compile=True,
        ),
        _fast(
            "fast_pack16k_nogc_compile",
            "fast.yaml + compiled layers, packing 16k, GC off",
            packing=True,
            gradient_checkpointing=False,
            compile=True,
        ),
        _fast(
            "fast_pack16k_nogc_keepw_compile",
            "fast.yaml + compiled layers, packing 16k, GC off, dequantized weights kept",
            packing=True,
            gradient_checkpointing=False,
            compile=True,
            keep_weights=True,
        ),
        _fast(
            "fast_long_gc_compile",
            "fast.yaml + compiled layers, 1,024-token sequences, GC on",
            "long",
            packing=True,
            compile=True,
        ),
        *(
            _fast(
                f"fast_pack_gc_keep{n}_compile",
                f"fast.yaml + compiled layers, packing 16k, GC on but the last {n} layers",
                packing=True,
                compile=True,
                uncheckpointed=n,
            )
            for n in (2, 3)
        ),
        Run(
            "orig_4096",
            "qlora.yaml settings, 1 x 4,096 tokens",
            "len=4096",
            batch_size=1,
            steps=5,
            warmup=3,
        ),
        _fast(
            "fast_4096",
            "fast.yaml, 1 x 4,096 tokens, GC on",
            "len=4096",
            batch_size=1,
            steps=5,
            warmup=3,
        ),
        _fast(
            "fast_4096_compile",
            "fast.yaml + compiled layers, 1 x 4,096 tokens, GC on",
            "len=4096",
            batch_size=1,
            steps=5,
            warmup=3,
            compile=True,
        ),
    ]
}
#: Batch-1 sequence lengths probed for the largest that trains in 8 GiB (fast settings, GC on).
MEMORY_PROBES = (8192, 12288, 16384, 20480, 24576)


# ------------------------------------------------------------------------------- workloads
def make_workload(workload: str, vocab: int, count: int, seed: int = 1) -> list[list[int]]:
    """Random token-id sequences of the reference workloads (RESULTS.md): ids in [2, vocab)."""
    gen = torch.Generator().manual_seed(seed)
    high = min(31998, vocab - 1)
    if workload == "short":
        lengths = torch.randint(32, 257, (count,), generator=gen).tolist()
    elif workload == "long":
        lengths = [1024] * count
    elif workload.startswith("len="):
        lengths = [int(workload[4:])] * count
    else:
        raise ValueError(f"Unknown workload {workload!r}: short, long or len=N.")
    return [torch.randint(2, high, (n,), generator=gen).tolist() for n in lengths]


def label_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Tokens that carry a loss: the count lit-cats logs (``label_token_count``)."""
    from lit_cats.loss import label_token_count

    return label_token_count(batch["labels"])


# ------------------------------------------------------------------------------- the model
def build_random_phi3(folder: Path, device: str, tiny: bool) -> Path:
    """Save a random-weight Phi-3-mini (or the tiny one) with a tokenizer into ``folder``."""
    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

    from lit_cats.tiny import tiny_model_path

    tiny_dir = tiny_model_path()
    if tiny:
        return tiny_dir
    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Phi3ForCausalLM(Phi3Config(**PHI3_MINI))
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(folder)
    # Any tokenizer serves: the data are token ids. The tiny one carries Phi-3's special tokens.
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(folder)
    del model
    _free()
    return folder


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------- lit-cats
def run_lit_cats(run: Run, model_dir: Path, data: list[list[int]], device: str) -> dict[str, Any]:
    """Time lit-cats' own Lightning training step (QLoRAModule + CatsDataModule)."""

    if run.model.get("compile"):  # each compiled run pays (and reports) its own compilation
        import torch._dynamo as dynamo

        dynamo.reset()
    optimizer = None
    if run.fast_optimizer:

        def optimizer(params: Any) -> torch.optim.Optimizer:
            return torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, foreach=True)

    kwargs = {"optimizer": optimizer} if optimizer else {}
    recipe = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": TARGETS}
    module = qlora_module(
        model_dir,
        gradient_checkpointing=run.gradient_checkpointing,
        **{**recipe, **run.model},  # a run's own settings win
        **kwargs,
    )
    dm = workload_datamodule(
        model_dir,
        data,
        run.batch_size,
        run.packing,
        run.max_tokens,
        device == "cuda",
        run.pad_to_multiple_of,
    )
    timer = _LightningTimer(run.warmup, run.steps, device)
    accelerator = "gpu" if device == "cuda" else "cpu"
    trainer = fit_timed(module, dm, timer, run.warmup + run.steps, accelerator)
    result = timer.result()
    del trainer, module, dm
    _free()
    return result


def workload_datamodule(
    model_dir: Path,
    data: list[list[int]],
    batch_size: int,
    packing: bool,
    max_tokens: int,
    pin_memory: bool,
    pad_to_multiple_of: int = 1,
) -> Any:
    """lit-cats' real data module (sampling, packing, collation) over in-memory token ids."""
    import datasets

    from lit_cats.data.datamodule import CatsDataModule
    from lit_cats.recipe import load_tokenizer

    longest = max(len(x) for x in data)
    dm = CatsDataModule(
        "unused",
        str(model_dir),
        max_seq_length=max(longest, 2),
        batch_size=batch_size,
        val_size=0.0,
        packing=packing,
        max_tokens_per_batch=max(max_tokens, longest),
        pin_memory=pin_memory,
        pad_to_multiple_of=pad_to_multiple_of,
        seed=1,
    )
    dm.tokenizer = load_tokenizer(str(model_dir))
    dm.train_dataset = datasets.Dataset.from_dict({"input_ids": data, "labels": data})
    dm.describe_example = lambda index=0: "  (random token ids)"  # type: ignore[method-assign]
    return dm


def fit_timed(
    module: Any, dm: Any, timer: Any, max_steps: int, accelerator: str, **trainer_kw: Any
) -> Any:
    """``Trainer.fit`` for timing: the training recipe's precision and clipping, no logging,
    checkpoints, validation or progress bar, in a throw-away folder. Returns the Trainer."""
    import lightning as L

    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(
            accelerator=accelerator,
            precision="bf16-mixed",
            max_steps=max_steps,
            gradient_clip_val=0.3,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            callbacks=[timer],
            default_root_dir=root,
            **{"devices": 1, **trainer_kw},
        )
        trainer.fit(module, dm)
    return trainer


class _Timer:
    def __init__(self, warmup: int, steps: int, device: str) -> None:
        self.warmup, self.steps, self.device = warmup, steps, device
        self.t0 = self.t1 = 0.0
        self.tokens: torch.Tensor | int = 0

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def start_training(self) -> None:
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.t_start = time.perf_counter()

    def result(self) -> dict[str, Any]:
        seconds = self.t1 - self.t0
        tokens = int(self.tokens)
        out = {"tokens": tokens, "seconds": seconds, "steps": self.steps}
        out["warmup_s"] = self.t0 - getattr(self, "t_start", self.t0)  # compilation included
        if self.device == "cuda":
            out["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / 2**30
            out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        return out


class _LightningTimer(_Timer):
    """Times steps ``warmup .. warmup + steps`` of a Lightning fit, without syncing in between."""

    def __init__(self, warmup: int, steps: int, device: str) -> None:
        super().__init__(warmup, steps, device)
        import lightning as L

        self.seen = 0
        self.callback = type(
            "Cb",
            (L.Callback,),
            {
                "on_train_start": lambda _, t, m: self.start_training(),
                "on_train_batch_start": lambda _, t, m, b, i: self._begin(i),
                "on_train_batch_end": lambda _, t, m, o, b, i: self._end(b, i),
            },
        )()

    def _begin(self, i: int) -> None:
        # Count steps ourselves: batch_idx restarts every epoch, and packed epochs are short.
        if self.seen == self.warmup:
            self.sync()
            self.t0 = time.perf_counter()

    def _end(self, batch: dict[str, torch.Tensor], i: int) -> None:
        if self.warmup <= self.seen < self.warmup + self.steps:
            self.tokens = self.tokens + label_tokens(batch)  # stays on the device
        if self.seen == self.warmup + self.steps - 1:
            self.sync()
            self.t1 = time.perf_counter()
        self.seen += 1

    # Lightning wants a Callback instance: hand it the inner one.
    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["callback"], name)


# ------------------------------------------------------------------------------- TRL
def run_trl(run: Run, model_dir: Path, data: list[list[int]], device: str) -> dict[str, Any]:
    """The original script's recipe: TRL SFTTrainer, its arguments, on the same token ids."""
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from lit_cats.recipe import build_bnb_config

    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        quantization_config=build_bnb_config("nf4", True, "bfloat16"),
        dtype=torch.bfloat16,
        device_map={"": 0 if device == "cuda" else "cpu"},
        attn_implementation="sdpa",
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    timer = _Timer(run.warmup, run.steps, device)
    counts: list[int] = []

    class TimerCallback(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            timer.start_training()

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == run.warmup:
                timer.sync()
                timer.t0 = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == run.warmup + run.steps:
                timer.sync()
                timer.t1 = time.perf_counter()

    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out,
            per_device_train_batch_size=run.batch_size,
            gradient_accumulation_steps=1,
            optim="paged_adamw_32bit",
            learning_rate=2e-4,
            weight_decay=0.0,
            lr_scheduler_type="constant",
            max_grad_norm=0.3,
            bf16=True,
            gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False},
            max_steps=run.warmup + run.steps,
            max_length=max(512, max(len(x) for x in data)),
            logging_steps=10,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=device != "cuda",
            seed=42,
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=datasets.Dataset.from_dict({"input_ids": data}),
            peft_config=LoraConfig(
                r=16,
                lora_alpha=32,
                lora_dropout=0.05,
                target_modules=TARGETS,
                bias="none",
                task_type="CAUSAL_LM",
            ),
            processing_class=tokenizer,
            callbacks=[TimerCallback()],
        )
        collator = trainer.data_collator

        def counting(features: Any) -> Any:
            batch = collator(features)
            counts.append(int(label_tokens(batch)))  # CPU tensors: no device sync
            return batch

        trainer.data_collator = counting
        trainer.train()
    timer.tokens = sum(counts[run.warmup : run.warmup + run.steps])
    result = timer.result()
    del trainer, model
    _free()
    return result


# ------------------------------------------------------------------------------- checks
def check_packed_loss(
    model_dir: Path, device: str, vocab: int, lengths: list[int]
) -> dict[str, float]:
    """Packed (varlen attention) vs padded (SDPA) loss on the same examples, forward only."""
    from lit_cats.data.collate import collate, pack_examples

    module = qlora_module(model_dir, lora_dropout=0.0, **FAST_MODEL)
    module._trainer = None
    if device == "cuda":
        module._target_device = lambda: torch.device("cuda")  # type: ignore[method-assign]
    module.configure_model()
    module.to(device)
    data = make_workload("short", vocab, len(lengths), seed=7)
    examples = [{"input_ids": x[:n], "labels": x[:n]} for x, n in zip(data, lengths, strict=True)]
    batches = {"padded": collate(examples, pad_id=0), "packed": pack_examples(examples)}
    losses = {}
    for name, batch in batches.items():
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        module.on_train_batch_start(batch, 0)
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
            losses[name] = module.kit.loss(module.model, batch).item()
        module.on_train_batch_end(None, batch, 0)
    del module
    _free()
    return losses


def probe_memory(
    model_dir: Path, device: str, vocab: int, budget_gib: float = 8.0
) -> list[dict[str, Any]]:
    """Peak memory of batch-1 steps at growing lengths (fast settings, GC on) until over budget."""
    rows = []
    for n in MEMORY_PROBES:
        run = _fast(f"probe_{n}", f"1 x {n} tokens", f"len={n}", batch_size=1, steps=2, warmup=1)
        try:
            result = run_lit_cats(run, model_dir, make_workload(run.workload, vocab, 3), device)
        except torch.OutOfMemoryError:
            _free()
            rows.append({"tokens_per_seq": n, "oom": True})
            break
        result["tokens_per_seq"] = n
        rows.append(result)
        print(json.dumps(result), flush=True)
        if result["peak_alloc_gib"] > budget_gib:
            break
    return rows


# ------------------------------------------------------------------------------- report
def environment(device: str) -> dict[str, str]:
    """GPU, library versions and commit for the record."""
    import lightning
    import peft
    import transformers

    try:
        import bitsandbytes

        bnb = bitsandbytes.__version__
    except ImportError:
        bnb = "-"
    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = "-"

    def git(*args: str) -> str:
        with contextlib.suppress(Exception):
            return subprocess.run(
                ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
            ).stdout.strip()
        return "?"

    dirty = git("status", "--porcelain", "--untracked-files=no")
    gpu = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": gpu,
        "versions": f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}, bitsandbytes {bnb}, lightning {lightning.__version__}, "
        f"trl {trl_version}",
        "commit": git("rev-parse", "--short", "HEAD") + (" (dirty tree)" if dirty != "" else ""),
    }


def table(rows: list[dict[str, Any]], baseline: str | None) -> str:
    """Markdown table of the measured runs; ratios against ``baseline``'s tokens/s."""
    base = next((r for r in rows if r["run"] == baseline and "tok_s" in r), None)
    lines = [
        "| run | settings | workload | real tok/s | s/step | peak alloc GiB | peak reserved GiB "
        "| HFU | MFU | x original | warm-up s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['run']} | {r['what']} | {r['workload']} | failed: {r['error']} |||||||"
            )
            continue
        same_work = base is not None and base["workload"] == r["workload"]
        ratio = f"{r['tok_s'] / base['tok_s']:.1f}x" if same_work else "-"
        hfu = f"{r['hfu']:.0%}" if r.get("hfu") is not None else "-"
        mfu = f"{r['mfu_standard']:.0%}" if r.get("mfu_standard") is not None else "-"
        alloc = f"{r['peak_alloc_gib']:.2f}" if "peak_alloc_gib" in r else "-"
        reserved = f"{r['peak_reserved_gib']:.2f}" if "peak_reserved_gib" in r else "-"
        lines.append(
            f"| {r['run']} | {r['what']} | {r['workload']} | {r['tok_s']:,.0f} | "
            f"{r['s_step']:.3f} | {alloc} | {reserved} | {hfu} | {mfu} | {ratio} | "
            f"{r.get('warmup_s', 0):.0f} |"
        )
    return "\n".join(lines)


def append_results(
    path: Path, env: dict[str, str], body: str, note: str, section: str = "bench_train"
) -> None:
    """Append one dated ``## <section>: <date>`` part to RESULTS.md (created if missing)."""
    if not path.exists():
        path.write_text(
            "# Benchmark results\n\nAppended by the benchmarks/ scripts; newest last.\n"
        )
    head = (
        f"\n## {section}: {env['date']}\n\n- device: {env['device']}\n"
        f"- versions: {env['versions']}\n- commit: {env['commit']}\n"
    )
    if note:
        head += f"- note: {note}\n"
    with path.open("a") as f:
        f.write(head + "\n" + body + "\n")


def measure(run: Run, model_dir: Path, device: str, vocab: int, scale: float) -> dict[str, Any]:
    """Run one configuration and derive tokens/s, s/step, HFU and standard MFU.

    JSON keys: ``hfu`` and ``mfu_standard``; ``mfu`` is kept, equal to ``hfu``, for readers of
    results written before both were reported (the tables then called HFU "MFU").
    """
    count = {"short": 4000, "long": 1024}.get(run.workload, run.warmup + run.steps + 2)
    data = make_workload(run.workload, vocab, max(int(count * scale), run.warmup + run.steps + 2))
    runner: Callable[..., dict[str, Any]] = run_trl if run.recipe == "trl" else run_lit_cats
    result = runner(run, model_dir, data, device)
    result["tok_s"] = result["tokens"] / result["seconds"]
    result["s_step"] = result["seconds"] / result["steps"]
    gflop = GFLOP_PER_TOKEN[run.gradient_checkpointing]
    on_gpu = device == "cuda"
    result["hfu"] = result["tok_s"] * gflop * 1e9 / PEAK_FLOPS if on_gpu else None
    result["mfu_standard"] = (
        result["tok_s"] * MODEL_GFLOP_PER_TOKEN * 1e9 / SPEC_PEAK_FLOPS if on_gpu else None
    )
    result["mfu"] = result["hfu"]  # the key's old meaning, kept for older readers
    return result


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Parse arguments, run the selected configurations, print and record the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated run names")
    parser.add_argument("--model", choices=["phi3-mini", "tiny"], default="phi3-mini")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "phi3-random"
    )
    parser.add_argument("--steps", type=int, help="timed steps (default per run: 30)")
    parser.add_argument("--warmup", type=int, help="warm-up steps (default per run: 8)")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of each workload")
    parser.add_argument("--memory-probe", action="store_true", help="largest length in 8 GiB")
    parser.add_argument("--check", action="store_true", help="packed vs padded loss first")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    parser.add_argument("--json", type=Path, help="also write every result here (JSON lines)")
    parser.add_argument("--note", default="", help="free text recorded with the table")
    parser.add_argument("--commit", help="commit to record (where the tree has no .git)")
    parser.add_argument("--list", action="store_true", help="print the runs and exit")
    args = parser.parse_args(argv)
    if args.list:
        for run in RUNS.values():
            print(f"{run.name:20s} {run.workload:10s} {run.what}")
        return []
    tiny = args.model == "tiny"
    model_dir = build_random_phi3(args.model_dir, args.device, tiny)
    vocab = 1024 if tiny else 32064
    if tiny:
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    rows: list[dict[str, Any]] = []

    def record(row: dict[str, Any]) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps(row) + "\n")

    if args.check:
        record(
            {
                "run": "check",
                **check_packed_loss(model_dir, args.device, vocab, [200, 37, 129, 256]),
            }
        )
    for name in args.runs.split(","):
        run = dataclasses.replace(RUNS[name])
        run.steps = args.steps or run.steps
        run.warmup = args.warmup if args.warmup is not None else run.warmup
        if run.recipe == "trl" and not _has_trl():
            record({"run": name, "what": run.what, "workload": run.workload, "error": "no trl"})
            continue
        try:
            result = measure(run, model_dir, args.device, vocab, args.scale)
        except Exception as exc:  # one failed run must not lose the others' numbers
            _free()
            record(
                {"run": name, "what": run.what, "workload": run.workload, "error": repr(exc)[:200]}
            )
            continue
        record({"run": name, "what": run.what, "workload": run.workload, **result})
    measured = [r for r in rows if r["run"] != "check"]
    body = table(measured, "trl_b2")
    if args.memory_probe and args.device == "cuda":
        probes = probe_memory(model_dir, args.device, vocab)
        for p in probes:
            record({"run": f"probe_{p['tokens_per_seq']}", **p})
        body += "\n\nBatch-1 memory probe (fast settings, GC on): " + ", ".join(
            f"{p['tokens_per_seq']} tokens: "
            + ("OOM" if p.get("oom") else f"{p['peak_alloc_gib']:.2f} GiB alloc")
            for p in probes
        )
    check = next((r for r in rows if r["run"] == "check"), None)
    if check:
        body += "\n\nPacked (varlen) vs padded (SDPA) loss, same 4 examples, fast settings: "
        body += f"{check['packed']:.5f} vs {check['padded']:.5f}"
    print(body)
    if not args.no_record:
        scale = f"workload scale {args.scale}; " if args.scale != 1 else ""
        note = f"{args.model} model; {scale}{args.note}".strip("; ")
        env = environment(args.device)
        if args.commit:
            env["commit"] = args.commit
        append_results(args.results, env, body, note)
    return rows


def _has_trl() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


if __name__ == "__main__":
    main()
