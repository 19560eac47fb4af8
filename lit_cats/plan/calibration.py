"""Expected step times from the measured table in ``calibration.yaml`` (per GPU and setting).

A step time is only ever read from a measurement (the table names each one's source in
``benchmarks/RESULTS.md``), scaled to other models by their size; a GPU or setting that was
never measured gets ``None`` and the plan says so, instead of a guess.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from lit_cats.plan.memory import LARGE_STEP_TOKENS, Architecture

TABLE = Path(__file__).with_name("calibration.yaml")


@dataclass(frozen=True)
class Setting:
    """What a measured step time depends on.

    Args:
        recipe: ``"original"`` (peft's LoRA forward, fp32 copies) or ``"fast"`` (fused LoRA).
        compiled: Compiled decoder layers.
        gradient_checkpointing: Recompute in the backward.
        step: ``"small"`` (at most 2,048 tokens: host-bound) or ``"large"``.
    """

    recipe: str
    compiled: bool
    gradient_checkpointing: bool
    step: str

    @classmethod
    def of(cls, fast_lora: bool, compiled: bool, checkpointing: bool, tokens: float) -> Setting:
        step = "small" if tokens <= LARGE_STEP_TOKENS else "large"
        return cls("fast" if fast_lora else "original", compiled, checkpointing, step)


@dataclass(frozen=True)
class StepTime:
    """An expected step time and where it comes from.

    Args:
        seconds: Seconds per optimizer step.
        source: The measurement it is read from (and how it was scaled).
    """

    seconds: float
    source: str


@cache
def load_table(path: Path = TABLE) -> dict[str, Any]:
    """The calibration table (``calibration.yaml``)."""
    return yaml.safe_load(path.read_text())


def gpu_kind(device_name: str | None, table: dict[str, Any] | None = None) -> str | None:
    """The table's name for a GPU (``torch.cuda.get_device_name()``), or None if not listed."""
    if not device_name:
        return None
    table = table or load_table()
    for kind, entry in table["gpus"].items():
        if entry["match"].lower() in device_name.lower():
            return kind
    return None


def _rows(kind: str, table: dict[str, Any]) -> list[dict[str, Any]]:
    """A GPU's rows, its own first, then those of the card it is ``like``."""
    entry = table["gpus"][kind]
    rows = list(entry.get("steps", []))
    if entry.get("like"):
        rows += [{**r, "source": f"{r['source']} (measured on {entry['like']})"}
                 for r in _rows(entry["like"], table)]  # fmt: skip
    return rows


def step_time(
    kind: str | None,
    setting: Setting,
    tokens: float,
    arch: Architecture,
    table: dict[str, Any] | None = None,
) -> StepTime | None:
    """Expected seconds per step of ``tokens`` tokens on GPU ``kind``, or None if not measured.

    Large steps take ``tokens / tokens_per_second``, scaled by the model's linear weights against
    the reference model's (FLOPs per token); small steps take the measured seconds per step,
    scaled by the layer count (the host launches each layer's kernels).
    """
    if kind is None:
        return None
    table = table or load_table()
    wanted = (setting.recipe, setting.compiled, setting.gradient_checkpointing, setting.step)
    for row in _rows(kind, table):
        key = (row["recipe"], row["compiled"], row["gradient_checkpointing"], row["step"])
        if key != wanted:
            continue
        ref = table["reference_model"]
        if setting.step == "large":
            scale = arch.linear_params() / ref["linear_params"]
            seconds = tokens / row["tokens_per_second"] * scale
        else:
            scale = arch.num_hidden_layers / ref["num_hidden_layers"]
            seconds = row["seconds_per_step"] * scale
        scaled = "" if abs(scale - 1) < 1e-3 else f", scaled x{scale:.3g} to this model"
        return StepTime(seconds, row["source"] + scaled)
    return None


def compile_seconds(
    kind: str | None, step: str, warm: bool, table: dict[str, Any] | None = None
) -> StepTime | None:
    """Expected seconds of compiling the decoder layers, cold or from a warm cache; a warm
    figure that was never measured falls back to the cold one (said in the source)."""
    if kind is None:
        return None
    table = table or load_table()
    entry = table["gpus"][kind]
    while "compile_seconds" not in entry and entry.get("like"):
        entry = table["gpus"][entry["like"]]
    figures = entry.get("compile_seconds")
    if not figures:
        return None
    if warm and figures["warm"].get(step) is not None:
        return StepTime(figures["warm"][step], figures["warm"]["source"])
    cold = figures["cold"]
    note = " (warm cache: no warm figure measured, the cold one is used)" if warm else ""
    return StepTime(cold[step], cold["source"] + note)


@dataclass(frozen=True)
class DecodeFigures:
    """Measured decode costs on one GPU kind, for one weight format (``decode: auto``).

    Args:
        graphed_ms: One batch-8 step of the reference model, graphed with eager kernels.
        compiled_ms: The same step compiled (and graphed).
        compile_cold_s: Seconds compiling adds to a first run on a machine that compiled nothing.
        compile_warm_s: The same from Inductor's on-disk caches (an earlier run's).
        source: The measurements (``benchmarks/RESULTS.md``).
    """

    graphed_ms: float
    compiled_ms: float
    compile_cold_s: float
    compile_warm_s: float
    source: str


def decode_figures(
    kind: str | None, weights: str, arch: Architecture, table: dict[str, Any] | None = None
) -> DecodeFigures | None:
    """Decode step times and compile seconds on GPU ``kind`` for ``weights`` (``"bf16"``, a
    16-bit model, or ``"nf4"``, a 4-bit base), the step times scaled to ``arch`` by its linear
    weights (which a step reads once), or None where never measured there. Not
    inherited from a card it is ``like``: decode steps are paced by memory bandwidth, which
    cards of the same compute do not share (H100 3.35 TB/s, H200 4.8 TB/s)."""
    if kind is None:
        return None
    table = table or load_table()
    row = table["gpus"][kind].get("decode", {}).get(weights)
    if row is None:
        return None
    scale = arch.linear_params() / table["reference_model"]["linear_params"]
    figures = DecodeFigures(**row)
    return replace(
        figures, graphed_ms=figures.graphed_ms * scale, compiled_ms=figures.compiled_ms * scale
    )
