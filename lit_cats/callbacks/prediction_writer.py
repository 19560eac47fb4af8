"""Writes ``predict``'s answers as JSONL and a Markdown report, with generation metrics."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from lit_cats.inference.metrics import CAT_WORDS, EXISTENTIAL_WORDS
from lit_cats.inference.report import describe_run, format_metrics, generation_metrics, write_report


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
        metrics = generation_metrics(
            records, self.cat_words, self.existential_words, pl_module.device
        )
        stem = self.name + (f".rank{trainer.global_rank}" if trainer.world_size > 1 else "")
        header = _describe(pl_module, metrics) if self.markdown else None
        self.written = write_report(folder, stem, records, metrics, header)
        rank_zero_info(
            f"Answered {len(records)} prompts: {format_metrics(metrics)}\n"
            + "\n".join(f"  wrote {path}" for path in self.written)
        )


def _flatten_batches(predictions: Sequence[Any]) -> list[list[dict[str, Any]]]:
    """Lightning nests predictions per dataloader when there are several."""
    nested = bool(predictions) and bool(predictions[0]) and isinstance(predictions[0][0], list)
    return [batch for loader in predictions for batch in loader] if nested else list(predictions)


def _describe(pl_module: L.LightningModule, metrics: dict[str, float]) -> list[str]:
    """The report's header, from what the module says about itself."""
    hp = getattr(pl_module, "hparams", {})
    quantization = "4-bit" if hp.get("load_in_4bit") else hp.get("bnb_4bit_compute_dtype", "")
    return describe_run(
        hp.get("model_name_or_path"),
        quantization,
        getattr(pl_module, "adapter_path", None),
        getattr(pl_module, "generation", None),
        metrics,
    )
