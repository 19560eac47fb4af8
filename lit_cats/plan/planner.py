"""A run's plan from its configuration: memory, steps, time, and whether compiling pays.

Reads the model's ``config.json`` (never its weights) and the dataset's token lengths (tokenized
once, through the data module's own cache, which ``fit`` then reuses), and turns the settings into
a :class:`~lit_cats.plan.memory.TrainingShape` for the memory model and a calibrated step time.
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lit_cats.errors import UsageError
from lit_cats.fast.compile import compile_pays, inductor_cache_is_warm
from lit_cats.plan import calibration
from lit_cats.plan.memory import GIB, Architecture, MemoryEstimate, TrainingShape, estimate

#: Share of the GPU's memory a run may plan to allocate: the rest is left for the CUDA context
#: (~0.5 GiB, outside PyTorch's count) and the caching allocator's fragmentation.
USABLE_SHARE = 0.9


@dataclass
class PlanSettings:
    """How ``lit-cats plan`` and the plan ``fit`` prints at start are made (``plan:``).

    Args:
        force: Train even when the plan predicts the run will not fit the GPU's memory.
        device_memory_gb: Plan against this much GPU memory (GiB) instead of the detected
            GPU's; also checks a run on a machine without a GPU.
        gpu: GPU name to take step times from (e.g. ``"H100"``), instead of the detected one.
        dataset_lengths: Tokenize the dataset (cached, and reused by ``fit``) for its real
            lengths; false plans the worst case: every example ``max_seq_length`` tokens long.
    """

    force: bool = False
    device_memory_gb: float | None = None
    gpu: str | None = None
    dataset_lengths: bool = True


@dataclass
class DataShape:
    """Tokens per step and steps of a run, from the dataset's lengths or the settings.

    Args:
        rows: Training examples (``None``: not read).
        largest_step: Tokens of the largest training step (what the peak is planned for).
        mean_step: Tokens of an average micro-batch on one rank (what the time is planned for).
        steps_per_epoch: Optimizer steps per epoch (``None``: not known).
        source: Where the lengths come from.
    """

    rows: int | None
    largest_step: int
    mean_step: float
    steps_per_epoch: int | None
    source: str


@dataclass
class Plan:
    """A run's predicted memory, steps and time, with the lines that print it."""

    model: str
    arch: Architecture
    shape: TrainingShape
    memory: MemoryEstimate
    data: DataShape
    total_steps: int | None
    gpu_name: str | None
    gpu_kind: str | None
    device_memory: int | None
    step: calibration.StepTime | None
    compile_choice: tuple[bool, str] | None = None
    checkpointing_choice: tuple[bool, str] | None = None
    liger_kernels: bool = False
    alternatives: list[tuple[str, int]] = field(default_factory=list)

    @property
    def fits(self) -> bool | None:
        """Whether the predicted peak fits the device (None: no device to check)."""
        if self.device_memory is None:
            return None
        return self.memory.peak <= USABLE_SHARE * self.device_memory

    def lines(self) -> list[str]:
        m, a = self.memory, self.arch
        checkpointing = "checkpointed" if self.shape.gradient_checkpointing else "not checkpointed"
        rows = [
            ("4-bit base" if self.shape.load_in_4bit else "16-bit base", m.terms["base"], ""),
            (f"LoRA r={self.shape.r}", m.terms["lora"], f"{m.lora_params:,} parameters, fp32"),
            ("gradients", m.terms["gradients"], ""),
            ("optimizer state", m.terms["optimizer"], self._optimizer_note()),
            ("dequantized weights", m.terms["dequantized weights"], ""),
            ("activations kept", m.terms["activations"], checkpointing),
            ("loss", m.terms["loss"], self._loss_name()),
            ("one layer's backward", m.terms["layer backward"], ""),
        ]
        out = [
            f"lit-cats plan: {self.model} ({a.num_hidden_layers} layers, hidden {a.hidden_size}, "
            f"intermediate {a.intermediate_size}, vocab {a.vocab_size})",
            f"  memory of the largest step, {self.data.largest_step:,} tokens "
            f"({self.data.source}):",
            *(f"    {name:22s}{size(b):>12s}  {note}".rstrip() for name, b, note in rows),
            f"    {'peak (allocated)':22s}{size(m.peak):>12s}  {self._device_line()}",
            "  " + self._steps_line(),
            "  " + self._time_line(),
        ]
        if self.checkpointing_choice is not None:
            out.append("  " + choice_line("gradient_checkpointing", *self.checkpointing_choice))
        if self.compile_choice is not None:
            out.append("  " + choice_line("compile", *self.compile_choice))
        return out

    def _optimizer_note(self) -> str:
        if self.shape.optimizer_bytes_per_param == 0:
            return "paged: in CUDA unified memory, outside PyTorch's count"
        return "two fp32 moments per parameter"

    def _loss_name(self) -> str:
        chunk = self.shape.loss_chunk_size
        return f"chunked loss ({chunk} tokens a chunk)" if chunk else "full logits + loss"

    def _device_line(self) -> str:
        if self.device_memory is None:
            return "no GPU to check it against"
        usable = size(USABLE_SHARE * self.device_memory)
        name = self.gpu_name or "the GPU"
        verdict = "fits" if self.fits else "does NOT fit"
        return f"{verdict} {name} ({size(self.device_memory)}, {usable} usable)"

    def _steps_line(self) -> str:
        per_epoch = self.data.steps_per_epoch
        rows = f"{self.data.rows:,} training examples, " if self.data.rows is not None else ""
        epoch = (
            f"{per_epoch:,} steps per epoch" if per_epoch is not None else "steps per epoch unknown"
        )
        total = f"{self.total_steps:,} steps in all" if self.total_steps else "total unknown"
        return f"steps: {rows}{epoch}, {total}"

    def _time_line(self) -> str:
        if self.step is None:
            where = self.gpu_name or "this machine"
            return f"time: no calibration for {where} and these settings"
        line = f"time: {self.step.seconds:.3g} s per step on {self.gpu_kind}"
        if self.total_steps:
            minutes = self.total_steps * self.step.seconds / 60
            line += f", training {minutes:.1f} min (load, compile, validation not included)"
        return line + f" [{self.step.source}]"


#: How each ``auto`` speed setting names its two outcomes (chosen, not chosen).
_OUTCOMES = {"compile": ("compiled layers", "eager"), "gradient_checkpointing": ("on", "off")}


def choice_line(setting: str, chosen: bool, why: str) -> str:
    """The line saying what ``setting: auto`` became and why."""
    return f"{setting}: auto -> {_OUTCOMES[setting][0 if chosen else 1]}: {why}"


def size(n_bytes: float) -> str:
    """Bytes as GiB, or MiB below one GiB."""
    return f"{n_bytes / GIB:.2f} GiB" if n_bytes >= GIB else f"{n_bytes / 2**20:.1f} MiB"


# ------------------------------------------------------------------------------- inputs
def read_model_config(name_or_path: str) -> dict[str, Any]:
    """The model's ``config.json``: a local folder, the tiny model, or a Hub id's file.

    Raises:
        UsageError: When there is none to read (no such folder, or the Hub not reachable).
    """
    from lit_cats.recipe import resolve_pretrained

    resolved = resolve_pretrained(name_or_path)
    local = Path(resolved) / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(resolved, "config.json")).read_text())
    except Exception as exc:  # offline, unknown repo, gated: all say the same to the user
        raise UsageError(
            f"Cannot read config.json of {name_or_path!r} to plan the run ({type(exc).__name__}). "
            "Pass a local model folder as --model.model_name_or_path, or go online."
        ) from exc


def shape_of(model: dict[str, Any], tokens: int) -> TrainingShape:
    """The :class:`TrainingShape` of ``model:`` settings (a parsed config's dict) and a step."""
    speed = model.get("speed") or {}
    optimizer = str((model.get("optimizer") or {}).get("class_path", "Paged"))
    targets = model.get("target_modules", "all-linear")
    return TrainingShape(
        tokens=tokens,
        r=int(model.get("r", 16)),
        target_modules=targets if isinstance(targets, str) else tuple(targets),
        lora_dropout=float(model.get("lora_dropout", 0.05)),
        load_in_4bit=bool(model.get("load_in_4bit", True)),
        double_quant=bool(model.get("bnb_4bit_use_double_quant", True)),
        gradient_checkpointing=speed.get("gradient_checkpointing", True) is not False,
        uncheckpointed_layers=int(speed.get("uncheckpointed_layers", 0)),
        upcast_to_fp32=bool(speed.get("upcast_to_fp32", True)),
        loss_chunk_size=speed.get("loss_chunk_size"),
        compiled=speed.get("compile") is True,
        fast_lora=bool(speed.get("fast_lora", False)),
        keep_dequantized_weights=bool(speed.get("keep_dequantized_weights", False)),
        # bitsandbytes' paged optimizers keep their state in CUDA unified memory, outside
        # PyTorch's allocator (and the plan's count); others keep two fp32 moments on the GPU.
        optimizer_bytes_per_param=0 if "Paged" in optimizer else 8,
    )


def data_shape(data: dict[str, Any], ranks: int, accumulate: int, read: bool) -> DataShape:
    """Steps and tokens per step, from the tokenized training split (or the worst case)."""
    batch, max_len = int(data["batch_size"]), int(data["max_seq_length"])
    packing, budget = bool(data.get("packing")), int(data.get("max_tokens_per_batch", 16384))
    worst = (
        budget if packing else batch * _round_up(max_len, int(data.get("pad_to_multiple_of", 1)))
    )
    if not read:
        return DataShape(None, worst, worst, None, f"worst case: {max_len}-token examples")
    lengths = _train_lengths(data)
    if packing:
        from lit_cats.data.sampling import TokenBudgetBatchSampler

        sampler = TokenBudgetBatchSampler(
            lengths, budget, seed=int(data.get("seed", 42)), num_replicas=ranks, rank=0
        )
        batches = list(sampler)
        largest = max(sum(lengths[i] for i in b) for b in batches)
        micro = len(batches)
    else:  # each rank takes ceil(n / ranks) examples (the last step padded), in batches
        width = _round_up(max(lengths), int(data.get("pad_to_multiple_of", 1)))
        largest = min(batch, len(lengths)) * width
        micro = math.ceil(math.ceil(len(lengths) / ranks) / batch)
    mean = sum(lengths) / ranks / max(micro, 1)
    steps = max(1, math.ceil(micro / accumulate))
    return DataShape(len(lengths), largest, mean, steps, "the dataset's tokenized lengths")


def _train_lengths(data: dict[str, Any]) -> list[int]:
    """Token counts of the training split, tokenized by the data module itself (cached)."""
    from lit_cats.data.datamodule import CatsDataModule

    accepted = set(inspect.signature(CatsDataModule.__init__).parameters) - {"self"}
    dm = CatsDataModule(**{k: v for k, v in data.items() if k in accepted})
    dm.setup("validate")  # the same load, tokenization and split as fit, without its report
    return [len(ids) for ids in dm.train_dataset["input_ids"]]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // max(multiple, 1)) * max(multiple, 1)


def total_steps(trainer: dict[str, Any], per_epoch: int | None) -> int | None:
    """Optimizer steps of the run: ``max_steps`` or epochs x steps per epoch, the fewer."""
    max_steps = trainer.get("max_steps")
    max_steps = None if max_steps in (None, -1) else int(max_steps)
    epochs = trainer.get("max_epochs")
    by_epochs = per_epoch * int(epochs) if per_epoch and epochs not in (None, -1) else None
    candidates = [s for s in (max_steps, by_epochs) if s is not None]
    return min(candidates) if candidates else None


# ------------------------------------------------------------------------------- the plan
def make_plan(
    config: dict[str, Any],
    settings: PlanSettings,
    gpu_name: str | None,
    device_memory: int | None,
    ranks: int = 1,
) -> Plan:
    """The plan of a parsed ``fit`` config (``Namespace.as_dict()``).

    Args:
        config: The parsed configuration (``model``, ``data``, ``trainer``).
        settings: The ``plan:`` section.
        gpu_name: The GPU's name (``torch.cuda.get_device_name``) or None.
        device_memory: The GPU's memory in bytes, or None (no check).
        ranks: Data-parallel processes sharing each epoch.
    """
    model, data, trainer = config["model"], config["data"], config.get("trainer") or {}
    arch = Architecture.from_config(read_model_config(model["model_name_or_path"]))
    accumulate = int(trainer.get("accumulate_grad_batches") or 1)
    shape_data = data_shape(data, ranks, accumulate, settings.dataset_lengths)
    shape = shape_of(model, shape_data.largest_step)
    steps = total_steps(trainer, shape_data.steps_per_epoch)
    gpu_name = settings.gpu or gpu_name
    kind = calibration.gpu_kind(gpu_name)
    if settings.device_memory_gb is not None:
        device_memory = int(settings.device_memory_gb * GIB)
    plan = Plan(
        model=model["model_name_or_path"],
        arch=arch,
        shape=shape,
        memory=estimate(arch, shape),
        data=shape_data,
        total_steps=steps,
        gpu_name=gpu_name,
        gpu_kind=kind,
        device_memory=device_memory,
        step=None,
    )
    speed = model.get("speed") or {}
    if speed.get("gradient_checkpointing") == "auto":
        plan.checkpointing_choice = choose_checkpointing(plan)
        plan.shape = replace(plan.shape, gradient_checkpointing=plan.checkpointing_choice[0])
        plan.memory = estimate(arch, plan.shape)
    compiled = speed.get("compile") is True
    plan.liger_kernels = bool(speed.get("liger_kernels"))
    if speed.get("compile") == "auto":
        plan.compile_choice = choose_compile(plan, accumulate)
        compiled = plan.compile_choice[0]
        plan.shape = replace(plan.shape, compiled=compiled)
        plan.memory = estimate(arch, plan.shape)
    plan.step = _optimizer_step(plan, compiled, accumulate)
    if plan.fits is False:
        plan.alternatives = alternatives(plan, data)
    return plan


def _optimizer_step(plan: Plan, compiled: bool, accumulate: int) -> calibration.StepTime | None:
    setting = calibration.Setting.of(
        plan.shape.fast_lora, compiled, plan.shape.gradient_checkpointing, plan.data.mean_step
    )
    micro = calibration.step_time(plan.gpu_kind, setting, plan.data.mean_step, plan.arch)
    if micro is None or accumulate == 1:
        return micro
    return calibration.StepTime(micro.seconds * accumulate, micro.source)


def choose_checkpointing(plan: Plan) -> tuple[bool, str]:
    """``gradient_checkpointing: auto``: off (kept activations, no recompute: the faster step)
    when the plan predicts the run fits the GPU without it, else on."""
    if plan.device_memory is None:
        return True, "no GPU memory to check the run without it against"
    limit = USABLE_SHARE * plan.device_memory
    without = estimate(plan.arch, replace(plan.shape, gradient_checkpointing=False)).peak
    fits = without <= limit
    return not fits, (
        f"the predicted peak without it, {size(without)}, "
        f"{'fits' if fits else 'exceeds'} the {size(limit)} usable"
    )


def choose_compile(plan: Plan, accumulate: int) -> tuple[bool, str]:
    """``compile: auto``: compile only when the planned steps' saving exceeds the compile time."""
    if plan.liger_kernels:
        return False, "liger_kernels is on, the alternative to compiling"
    if plan.gpu_kind is None:
        return False, f"no calibration for {plan.gpu_name or 'this machine (no GPU)'}"
    eager = _optimizer_step(plan, False, accumulate)
    compiled = _optimizer_step(plan, True, accumulate)
    if eager is None or compiled is None or not plan.total_steps:
        return False, f"no measured eager and compiled step times on {plan.gpu_kind} here"
    step = "small" if plan.data.mean_step <= 2048 else "large"
    warm = inductor_cache_is_warm()
    cost = calibration.compile_seconds(plan.gpu_kind, step, warm)
    if cost is None:
        return False, f"no measured compile time on {plan.gpu_kind}"
    return compile_pays(plan.total_steps, eager.seconds, compiled.seconds, cost.seconds)


def alternatives(plan: Plan, data: dict[str, Any]) -> list[tuple[str, int]]:
    """Settings that would fit the device, each with its predicted peak (bytes)."""
    assert plan.device_memory is not None
    limit, shape, out = USABLE_SHARE * plan.device_memory, plan.shape, []
    tries = []
    if not shape.gradient_checkpointing:
        tries.append(
            ("--model.speed.gradient_checkpointing true", {"gradient_checkpointing": True})
        )
    if shape.uncheckpointed_layers:
        tries.append(("--model.speed.uncheckpointed_layers 0", {"uncheckpointed_layers": 0}))
    if shape.keep_dequantized_weights:
        tries.append(("--model.speed.keep_dequantized_weights false",
                      {"keep_dequantized_weights": False}))  # fmt: skip
    if shape.loss_chunk_size is None:
        tries.append(("--model.speed.loss_chunk_size 1024", {"loss_chunk_size": 1024}))
    for flag, change in tries:
        peak = estimate(plan.arch, replace(shape, **change)).peak
        if peak <= limit:
            out.append((flag, peak))
    tokens = shape.tokens
    while tokens > 256:
        tokens //= 2
        peak = estimate(plan.arch, replace(shape, tokens=tokens)).peak
        if peak <= limit:
            if data.get("packing"):
                flag = f"--data.max_tokens_per_batch {tokens}"
            else:
                flag = (
                    f"--data.batch_size {max(1, int(data['batch_size']) * tokens // shape.tokens)}"
                )
            out.append((flag, peak))
            break
    return out


def refusal(plan: Plan) -> str:
    """The message of a run predicted not to fit, with the settings that would."""
    assert plan.device_memory is not None
    fixes = "; ".join(f"{flag} (peak {size(peak)})" for flag, peak in plan.alternatives)
    return (
        f"The plan predicts a peak of {size(plan.memory.peak)} of GPU memory, more than "
        f"the {size(USABLE_SHARE * plan.device_memory)} usable of "
        f"{plan.gpu_name or 'the GPU'} ({size(plan.device_memory)}). "
        + (f"Settings that would fit: {fixes}. " if fixes else "No single setting fits; ")
        + "To try anyway: --plan.force true."
    )
