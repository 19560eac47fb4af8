"""Batching: a seeded length-grouped order, a resumable DataLoader, and position-based padding."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from lit_cats.formatting import IGNORE_INDEX


class LengthGroupedSampler(Sampler[int]):
    """A seeded shuffle that, optionally, sorts by length within mega-batches of 50 batches.

    With ``group=True`` it is transformers' ``group_by_length``: batches hold examples of similar
    length, so less compute goes to padding, while the order stays random across mega-batches.
    The order depends only on ``seed`` and the epoch (Lightning calls :meth:`set_epoch`), so a
    resumed run sees the same order as the interrupted one. Under data parallelism
    ``batch_size`` is the step's global batch (per device x ranks) and every rank builds the same
    order, so N ranks train on the batches one process with N times the batch would.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0, group: bool = True):
        self.lengths = lengths
        self.megabatch = 50 * batch_size
        self.seed = seed
        self.group = group
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=gen).tolist()
        if not self.group:
            yield from order
            return
        for i in range(0, len(order), self.megabatch):
            yield from sorted(order[i : i + self.megabatch], key=lambda j: -self.lengths[j])


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning checkpoints mid-epoch, so a resumed run skips what it saw.

    Lightning stores ``state_dict()`` in each checkpoint and calls ``load_state_dict`` on
    resume (so does :meth:`CatsDataModule.load_state_dict`, where Lightning does not); the next
    pass then skips the batches already served in that epoch instead of training on the
    epoch's first batches twice and never on its last ones. Under DDP every rank serves the
    same number of batches, so rank zero's count is every rank's.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._served = 0
        self._skip = 0

    def __iter__(self) -> Iterator[Any]:
        skip, self._skip = self._skip, 0
        if skip >= len(self):  # the saved epoch was complete: this pass is a new epoch
            skip = 0
        iterator = super().__iter__()
        for _ in range(skip):
            next(iterator)
        self._served = skip
        for batch in iterator:
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"batches_served": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = state["batches_served"]


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
