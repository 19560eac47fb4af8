"""Turning tokenized examples into batches: right-padded rows, or one padding-free packed row."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import DataCollatorWithFlattening

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


#: transformers' padding-free collator, configured for lit-cats' packed attention: the example
#: boundaries as int32 ``cu_seq_lens_q``/``_k``, the longest example as Python-int
#: ``max_length_q``/``_k`` (the attention needs no host sync to learn them), ``position_ids``
#: restarting at 0, and each example's first label ignored (it would be predicted from the
#: previous example's last token).
_FLATTEN = DataCollatorWithFlattening(return_flash_attn_kwargs=True, separator_id=IGNORE_INDEX)


def pack_examples(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate tokenized examples into one padding-free row.

    Args:
        batch: Examples with ``input_ids`` and ``labels`` lists of equal length.

    Returns:
        ``input_ids``, ``labels`` and ``position_ids`` of shape ``(1, total)``; int32
        ``cu_seq_lens_q``/``cu_seq_lens_k`` of shape ``(n + 1,)`` (example boundaries) and the
        longest example's length as ``max_length_q``/``max_length_k`` (Python ints).
    """
    features = [{"input_ids": ex["input_ids"], "labels": ex["labels"]} for ex in batch]
    return _FLATTEN(features, return_tensors="pt")


def is_packed(batch: dict[str, Any]) -> bool:
    """Whether ``batch`` came from :func:`pack_examples`."""
    return "cu_seq_lens_q" in batch
