"""Reporting generated answers: the record, its Markdown, the files, and the generation metrics.

``lit-cats predict`` (:class:`~lit_cats.callbacks.PredictionWriter`) and the training samples
(:class:`~lit_cats.callbacks.GenerationSamples`) both report through here, so an answer looks
the same in ``predictions.md`` and in TensorBoard's Text tab, and both compute the same metrics.

A record is one answer as a plain dict (``prompt``, ``response``, ``num_tokens``, ``stopped``:
the fields of :class:`~lit_cats.inference.generation.GenerationResult`), the shape of every line
of ``predictions.jsonl``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from lit_cats.data.prompts import prompt_text
from lit_cats.inference.generation import GenerationResult
from lit_cats.inference.metrics import CAT_WORDS, EXISTENTIAL_WORDS, compute_generation_metrics

#: The keys of a record, in file order.
RECORD_KEYS = tuple(field.name for field in fields(GenerationResult))

Record = Mapping[str, Any]


def answer_record(result: GenerationResult) -> dict[str, Any]:
    """One answer as the plain dict the files hold (and Lightning gathers across ranks)."""
    return asdict(result)


def answer_markdown(record: Record, number: int) -> str:
    """One prompt and its answer as Markdown: a heading, the answer, how it ended.

    Only Markdown that TensorBoard's Text tab renders (it escapes most HTML), so the same text
    serves ``predictions.md`` and the training samples.
    """
    ending = "stopped by itself" if record["stopped"] else "hit the token limit"
    return (
        f"## {number}. {prompt_text(record['prompt'])}\n\n"
        f"{record['response'] or '*(empty answer)*'}\n\n"
        f"*{record['num_tokens']} tokens, {ending}*\n"
    )


def answers_markdown(records: Sequence[Record], header: Sequence[str] = ()) -> str:
    """The report of ``predict``: a title, ``header`` lines, then every answer in order."""
    title = "\n".join(["# lit-cats predictions", "", *header, ""]) + "\n"
    return title + "\n".join(answer_markdown(r, i) for i, r in enumerate(records, 1))


def generation_metrics(
    records: Sequence[Record],
    cat_words: Sequence[str] = CAT_WORDS,
    existential_words: Sequence[str] = EXISTENTIAL_WORDS,
    device: torch.device | str = "cpu",
    sync: bool = True,
) -> dict[str, float]:
    """The generation metrics of the records (see :func:`compute_generation_metrics`).

    ``sync`` reduces across processes, so every rank must call it; pass ``False`` when one
    rank computes alone (it would wait for the others forever).
    """
    return compute_generation_metrics(records, cat_words, existential_words, device, sync)


def format_metrics(metrics: Mapping[str, float]) -> str:
    """One line: ``stopped_share 0.5, mean_length 12, ...``."""
    return ", ".join(f"{name} {value:g}" for name, value in metrics.items())


def describe_run(
    model: str | None,
    quantization: str,
    adapter: str | None,
    generation: object,
    metrics: Mapping[str, float],
) -> list[str]:
    """Markdown bullet lines saying what produced the answers (the report's header)."""
    lines = [f"- model: `{model}` ({quantization})"] if model else []
    lines.append(f"- adapter: `{adapter or 'none'}`")
    if generation is not None:
        lines.append(f"- generation: `{generation}`")
    lines.append(f"- metrics: {format_metrics(metrics)}")
    return lines


def write_jsonl(path: Path, records: Sequence[Record]) -> Path:
    """One JSON object per line, in prompt order, non-ASCII text kept readable.

    Plain ``json``, not ``datasets.Dataset.to_json``: that would need every record's ``prompt``
    to have one type, and a file of strings and chats is valid input here.
    """
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def write_report(
    folder: Path,
    stem: str,
    records: Sequence[Record],
    metrics: Mapping[str, float],
    header: Sequence[str] | None,
) -> list[Path]:
    """Write ``<stem>.jsonl``, ``<stem>.md`` (unless ``header`` is None) and
    ``<stem>.metrics.json`` into ``folder``; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written = [write_jsonl(folder / f"{stem}.jsonl", records)]
    if header is not None:
        markdown = folder / f"{stem}.md"
        markdown.write_text(answers_markdown(records, header), encoding="utf-8")
        written.append(markdown)
    metrics_path = folder / f"{stem}.metrics.json"
    metrics_path.write_text(json.dumps(dict(metrics), indent=2) + "\n")
    written.append(metrics_path)
    return written
