"""Writes ``predict``'s answers as JSONL and a Markdown report, with generation metrics."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from lit_cats.data.prompts import prompt_text
from lit_cats.inference.metrics import CAT_WORDS, EXISTENTIAL_WORDS, compute_generation_metrics


class PredictionWriter(BasePredictionWriter):
    """Save every answer of ``lit-cats predict`` and report how the answers look.

    Writes ``<name>.jsonl`` (one object per prompt: ``prompt``, ``response``, ``num_tokens``,
    ``stopped``), ``<name>.md`` (a readable prompt/answer report) and ``<name>.metrics.json``
    into the run folder (or ``output_dir``), and prints where they are. Under several processes
    each rank writes its own files (``<name>.rank<N>.*``); the metrics cover all ranks.

    Example (``lit-cats`` exposes it as the top-level ``predictions:`` section)::

        predictions:
          output_dir: null      # the predict run's folder, logs/<name>/version_N
          name: predictions

    Args:
        output_dir: Folder for the files; ``None`` uses the predict run's log folder.
        name: Stem of the file names.
        markdown: Also write the Markdown report.
        cat_words: Vocabulary of the ``cat_vocab_share`` metric.
        existential_words: Vocabulary of the ``existential_share`` metric.
    """

    def __init__(
        self,
        output_dir: str | None = None,
        name: str = "predictions",
        markdown: bool = True,
        cat_words: list[str] | None = None,
        existential_words: list[str] | None = None,
    ) -> None:
        super().__init__(write_interval="epoch")
        if not name or "/" in name:
            raise ValueError(f"name must be a plain file stem, got {name!r}.")
        self.output_dir, self.name, self.markdown = output_dir, name, markdown
        self.cat_words = list(cat_words or CAT_WORDS)
        self.existential_words = list(existential_words or EXISTENTIAL_WORDS)
        self.written: list[Path] = []

    def write_on_epoch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any],
    ) -> None:
        # log_dir is a broadcast: every rank must read it.
        folder = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)
        records = [record for batch in _flatten_batches(predictions) for record in batch]
        # Every rank computes: the metrics are reduced over all ranks' answers.
        metrics = compute_generation_metrics(
            records, self.cat_words, self.existential_words, pl_module.device
        )
        stem = self.name + (f".rank{trainer.global_rank}" if trainer.world_size > 1 else "")
        folder.mkdir(parents=True, exist_ok=True)
        self.written = [write_jsonl(folder / f"{stem}.jsonl", records)]
        if self.markdown:
            header = describe_run(pl_module, metrics)
            self.written.append(write_markdown(folder / f"{stem}.md", records, header))
        metrics_path = folder / f"{stem}.metrics.json"
        metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
        self.written.append(metrics_path)
        rank_zero_info(
            f"Answered {len(records)} prompts: {format_metrics(metrics)}\n"
            + "\n".join(f"  wrote {path}" for path in self.written)
        )


def _flatten_batches(predictions: Sequence[Any]) -> list[list[dict[str, Any]]]:
    """Lightning nests predictions per dataloader when there are several."""
    nested = bool(predictions) and bool(predictions[0]) and isinstance(predictions[0][0], list)
    return [batch for loader in predictions for batch in loader] if nested else list(predictions)


def format_metrics(metrics: dict[str, float]) -> str:
    """One line: ``stopped_share 0.88, mean_length 143.2, ...``."""
    return ", ".join(f"{name} {value:g}" for name, value in metrics.items())


def describe_run(pl_module: L.LightningModule, metrics: dict[str, float]) -> list[str]:
    """Markdown bullet lines saying what produced the answers."""
    hp = getattr(pl_module, "hparams", {})
    lines = []
    if "model_name_or_path" in hp:
        quant = "4-bit" if hp.get("load_in_4bit") else hp.get("bnb_4bit_compute_dtype", "")
        lines.append(f"- model: `{hp['model_name_or_path']}` ({quant})")
    lines.append(f"- adapter: `{getattr(pl_module, 'adapter_path', None) or 'none'}`")
    if getattr(pl_module, "generation", None) is not None:
        lines.append(f"- generation: `{pl_module.generation}`")
    lines.append(f"- metrics: {format_metrics(metrics)}")
    return lines


def write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> Path:
    """One JSON object per line, in prompt order."""
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def write_markdown(path: Path, records: Sequence[dict[str, Any]], header: list[str]) -> Path:
    """The original script's report: each prompt with its answer."""
    parts = ["# lit-cats predictions", "", *header, ""]
    for i, record in enumerate(records, 1):
        ending = "stopped by itself" if record["stopped"] else "hit the token limit"
        parts += [
            f"## {i}. {prompt_text(record['prompt'])}",
            "",
            record["response"] or "*(empty answer)*",
            "",
            f"<sub>{record['num_tokens']} tokens, {ending}</sub>",
            "",
        ]
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
