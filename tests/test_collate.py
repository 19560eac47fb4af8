"""Padding-free packing of examples into one row (lit_cats.data.collate.pack_examples)."""

from __future__ import annotations

import torch

from lit_cats.data.collate import pack_examples
from lit_cats.data.formatting import IGNORE_INDEX


def test_pack_examples_restarts_positions_and_masks_each_first_label(make_examples):
    packed = pack_examples(make_examples([3, 5, 2]))
    assert packed["input_ids"].shape == (1, 10)
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0, 1]]
    assert packed["cu_seq_lens_q"].tolist() == [0, 3, 8, 10]
    assert packed["cu_seq_lens_q"].dtype == torch.int32
    assert packed["max_length_q"] == 5
    labels = packed["labels"][0]
    assert labels[0] == labels[3] == labels[8] == IGNORE_INDEX
