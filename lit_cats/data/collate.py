"""Turning tokenized examples into batches: right-padded rows, or one padding-free packed row."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lit_cats.data.formatting import IGNORE_INDEX

#: Keys a packed batch carries besides ``input_ids``/``labels``/``position_ids``; transformers
#: forwards them to the attention function (its ``FlashAttentionKwargs``).
PACKED_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def collate(
    batch: list[dict[str, Any]], pad_id: int, pad_to_multiple_of: int = 1
) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded label positions are ignored **by position**, never by id.

    Phi-3's pad id equals its EOS id, so masking ``labels == pad_id`` would also drop every real
    EOS and the model would never learn to stop (huggingface/trl#1623).
    """
    longest = max(len(ex["input_ids"]) for ex in batch)
    width = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ex in enumerate(batch):
        n = len(ex["input_ids"])
        input_ids[row, :n] = torch.as_tensor(ex["input_ids"])
        labels[row, :n] = torch.as_tensor(ex["labels"])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def pack_examples(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate tokenized examples into one padding-free row.

    Args:
        batch: Examples with ``input_ids`` and ``labels`` lists of equal length.

    Returns:
        ``input_ids``, ``labels`` and ``position_ids`` of shape ``(1, total)``; int32
        ``cu_seq_lens_q``/``cu_seq_lens_k`` of shape ``(n + 1,)`` (example boundaries) and the
        longest example's length as ``max_length_q``/``max_length_k`` (Python ints, so the
        attention kernel needs no host sync to learn them).
    """
    lengths = [len(ex["input_ids"]) for ex in batch]
    ids = torch.cat([torch.as_tensor(ex["input_ids"], dtype=torch.long) for ex in batch])
    labels = torch.cat([torch.as_tensor(ex["labels"], dtype=torch.long) for ex in batch])
    starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
    # Example i's first token is predicted from example i-1's last one after the model's shift.
    labels[starts] = IGNORE_INDEX
    position_ids = torch.cat([torch.arange(n) for n in lengths])
    cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    longest = max(lengths)
    return {
        "input_ids": ids.unsqueeze(0),
        "labels": labels.unsqueeze(0),
        "position_ids": position_ids.unsqueeze(0),
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu.clone(),
        "max_length_q": longest,
        "max_length_k": longest,
    }


def is_packed(batch: dict[str, Any]) -> bool:
    """Whether ``batch`` came from :func:`pack_examples`."""
    return "cu_seq_lens_q" in batch
