"""Padding-free packing of examples into one row (lit_cats.data.collate.pack_examples)."""

from __future__ import annotations

import torch

from lit_cats.data.collate import collate, pack_examples
from lit_cats.data.formatting import IGNORE_INDEX, tokenize_text


def test_pack_examples_restarts_positions_and_masks_each_first_label(make_examples):
    packed = pack_examples(make_examples([3, 5, 2]))
    assert packed["input_ids"].shape == (1, 10)
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0, 1]]
    assert packed["cu_seq_lens_q"].tolist() == [0, 3, 8, 10]
    assert packed["cu_seq_lens_q"].dtype == torch.int32
    assert packed["max_length_q"] == 5
    labels = packed["labels"][0]
    assert labels[0] == labels[3] == labels[8] == IGNORE_INDEX


def test_collate_masks_padding_by_position_and_keeps_eos(tokenizer):
    # Phi-3's pad id is its EOS id: a mask by id would also erase the final EOS label.
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    short = tokenize_text(tokenizer, "Nap.", 512)
    long = tokenize_text(tokenizer, "The red dot is futile, and so is the laser.", 512)
    batch = collate([short, long], tokenizer.pad_token_id)
    n = len(short["input_ids"])
    assert batch["labels"][0, n - 1] == tokenizer.eos_token_id
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][0, n:] == tokenizer.pad_token_id).all()
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (batch["labels"].shape[1] - n)
    assert batch["labels"][1, -1] == tokenizer.eos_token_id


def test_collate_pads_to_a_multiple(tokenizer):
    batch = collate([tokenize_text(tokenizer, "Nap.", 512)], tokenizer.pad_token_id, 8)
    assert batch["input_ids"].shape[1] % 8 == 0
