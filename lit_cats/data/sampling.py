"""Which examples form each step, on each rank: seeded, length-grouped or token-budgeted, resumable.

- :class:`LengthGroupedSampler`: a seeded shuffle, sorted by length within mega-batches.
- :class:`TokenBudgetBatchSampler`: whole examples up to a token budget per step (packing).
- :class:`ResumableDataLoader`: skips, on resume, the batches an interrupted epoch already served,
  and, under gradient accumulation, tells each micro-batch its optimizer step's label tokens
  (:func:`with_step_shares`).
- :func:`shard_train_sampler` / :func:`shard_eval_sampler`: each rank's share under data
  parallelism. Lightning wraps a custom sampler in ``DistributedSamplerWrapper(shuffle=True)``,
  which would shuffle the length-grouped order again; rank ``r`` takes positions
  ``r, r + N, r + 2N, ...`` instead, so the ``N`` per-rank batches of one step are exactly the
  single-process batch of that step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from itertools import islice
from typing import Any, NamedTuple

import lightning as L
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Sampler


class LengthGroupedSampler(Sampler[int]):
    """A seeded shuffle that, optionally, sorts by length within mega-batches of 50 batches.

    With ``group=True`` it is transformers' ``group_by_length``: batches hold examples of similar
    length, so less compute goes to padding, while the order stays random across mega-batches.
    The order depends only on ``seed`` and the epoch (Lightning calls :meth:`set_epoch`), so a
    resumed run sees the same order as the interrupted one. Under data parallelism
    ``batch_size`` is the step's global batch (per device x ranks) and every rank builds the same
    order, so N ranks train on the batches one process with N times the batch would.
    Not transformers' ``LengthGroupedSampler``: it has no seed or ``set_epoch`` (resume reorders).
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
    same number of batches, so rank zero's count is every rank's. Not torchdata's
    ``StatefulDataLoader``, which does the same and skips without collating: a new dependency
    for what these thirty lines do.

    Each pass draws its worker processes' base seed from the loader's own generator (seeded
    from torch's initial seed), not from torch's global one as a plain DataLoader does: a draw
    there at every epoch start and validation would shift every later dropout mask by when those
    happen, which a resumed run cannot replay (:class:`lit_cats.callbacks.RNGState`).
    """

    def __init__(self, *args: Any, trainer: L.Trainer | None = None, **kwargs: Any) -> None:
        if kwargs.get("generator") is None:
            kwargs["generator"] = torch.Generator().manual_seed(torch.initial_seed())
        super().__init__(*args, **kwargs)
        self._served = 0
        self._skip = 0
        # The training loader's Trainer: under gradient accumulation, each micro-batch carries
        # its optimizer step's label tokens (with_step_shares). None: batches as collated.
        self._trainer = trainer

    def __iter__(self) -> Iterator[Any]:
        skip, self._skip = self._skip, 0
        if skip >= len(self):  # the saved epoch was complete: this pass is a new epoch
            skip = 0
        iterator = super().__iter__()
        for _ in range(skip):
            next(iterator)
        self._served = skip
        trainer = self._trainer
        if trainer is not None and trainer.accumulate_grad_batches > 1:
            iterator = with_step_shares(
                iterator, trainer.accumulate_grad_batches, skip, trainer.num_training_batches
            )
        for batch in iterator:  # counts micro-batches served, as without accumulation
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"batches_served": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = state["batches_served"]


#: The batch key of a micro-batch's :class:`StepShare`; the model removes it before the forward.
STEP_SHARE_KEY = "step_share"


class StepShare(NamedTuple):
    """A micro-batch's place in its optimizer step under gradient accumulation.

    Plain ints: Lightning leaves them on the host, and nothing waits for the device to read them.
    """

    tokens: int  #: label tokens of the whole step's micro-batches on this rank
    index: int  #: this micro-batch's position in the step, from 0
    size: int  #: micro-batches in the step (fewer than accumulate_grad_batches at an epoch's end)


def with_step_shares(
    batches: Iterator[dict[str, Any]], accumulate: int, start: int = 0, end: float = math.inf
) -> Iterator[dict[str, Any]]:
    """Read each optimizer step's micro-batches ahead and attach a :class:`StepShare` to each.

    HF Trainer's ``get_batch_samples``: the step's label-token count must be known before its
    first backward, so the step's loss can be the mean over all its tokens rather than the mean
    of its micro-batches' means. Steps follow Lightning's: batch ``i`` of the epoch belongs to
    step ``i // accumulate``, and Lightning steps at the epoch's last batch
    (``trainer.num_training_batches``, ``end``), so the last step may hold fewer micro-batches.

    Args:
        batches: The collated micro-batches, from batch ``start`` of the epoch on.
        accumulate: ``trainer.accumulate_grad_batches``.
        start: Index in the epoch of the first batch (batches skipped on resume).
        end: Batches Lightning takes from the epoch (``trainer.num_training_batches``).
    """
    from lit_cats.loss import label_token_count  # lit_cats.loss imports lit_cats.data

    index = start
    while True:
        stop = (index // accumulate + 1) * accumulate
        if index < end:
            stop = min(stop, int(end)) if math.isfinite(end) else stop
        window = list(islice(batches, stop - index))
        if not window:
            return
        tokens = int(sum(int(label_token_count(batch["labels"])) for batch in window))
        for position, batch in enumerate(window):
            batch[STEP_SHARE_KEY] = StepShare(tokens, position, len(window))
            yield batch
        index += len(window)


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Batches of whole examples holding at most ``max_tokens`` tokens together.

    A token budget per step instead of a fixed example count: every step does about the same
    work whatever the lengths. The order is a seeded shuffle per epoch (Lightning calls
    :meth:`set_epoch`), filled greedily, so a resumed run sees the same batches. Under data
    parallelism each rank takes every ``num_replicas``-th batch (and all ranks the same count).

    Args:
        lengths: Token count of every example.
        max_tokens: Token budget of one batch; must hold the longest example.
        seed: Seed of the shuffle.
        shuffle: Shuffle the examples (off: dataset order).
        num_replicas: Data-parallel world size.
        rank: This process's rank.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        max_tokens: int,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        longest = max(lengths, default=0)
        if max_tokens < longest:
            raise ValueError(
                f"max_tokens_per_batch={max_tokens} cannot hold the longest example "
                f"({longest} tokens); raise it to at least max_seq_length."
            )
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas}).")
        self.lengths = list(lengths)
        self.max_tokens = max_tokens
        self.seed = seed
        self.shuffle = shuffle
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(self.lengths), generator=gen).tolist()
        else:
            order = list(range(len(self.lengths)))
        batches, current, used = [], [], 0
        for i in order:
            if current and used + self.lengths[i] > self.max_tokens:
                batches.append(current)
                current, used = [], 0
            current.append(i)
            used += self.lengths[i]
        if current:
            batches.append(current)
        per_rank = len(batches) // self.num_replicas if self.num_replicas > 1 else len(batches)
        return batches[self.rank :: self.num_replicas][:per_rank]

    def __len__(self) -> int:
        return len(self._batches())

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._batches()


def data_parallel_size(trainer: L.Trainer | None) -> int:
    """How many ranks split each batch (1 without a Trainer or without data parallelism)."""
    kwargs = _sampler_kwargs(trainer)
    return int(kwargs["num_replicas"]) if kwargs else 1


def shard_train_sampler(sampler: Sampler[int], trainer: L.Trainer | None) -> Sampler[int]:
    """This rank's share of ``sampler``'s order, taken round-robin and never reshuffled.

    Returned unchanged on a single process. The result is a ``DistributedSampler``, so
    Lightning neither wraps it again nor rebuilds the DataLoader, and it forwards ``set_epoch``
    to ``sampler`` (whose order is seeded by epoch). When the dataset does not divide evenly,
    the last step is padded with the epoch's first examples so every rank runs the same number
    of steps (DDP needs that; a rank with one batch fewer would hang the others).

    Args:
        sampler: The global order, the same on every rank (seeded, not rank-dependent).
        trainer: The Trainer the DataLoader is built for, or ``None``.
    """
    kwargs = _sampler_kwargs(trainer)
    if not kwargs or kwargs["num_replicas"] == 1:
        return sampler
    return DistributedSamplerWrapper(sampler, shuffle=False, drop_last=False, **kwargs)


def shard_eval_sampler(dataset: Dataset[Any], trainer: L.Trainer | None) -> Sampler[int] | None:
    """This rank's share of an evaluation set, each example on exactly one rank.

    Lightning's default pads the shards with repeated examples, which would count them twice in
    the validation loss. Shards may then differ by one example; that is safe in evaluation,
    where DDP synchronizes only in the first forward of the loop and every rank runs at least
    one batch (Lightning uses the same sampler for ``predict``). ``None`` on a single process.

    Args:
        dataset: The evaluation dataset (sized).
        trainer: The Trainer the DataLoader is built for, or ``None``.
    """
    kwargs = _sampler_kwargs(trainer)
    if not kwargs or kwargs["num_replicas"] == 1:
        return None
    if len(dataset) < kwargs["num_replicas"]:  # type: ignore[arg-type]
        raise ValueError(
            f"The validation set has {len(dataset)} examples, fewer than the "  # type: ignore[arg-type]
            f"{kwargs['num_replicas']} ranks: some rank would have none. Raise data.val_size, "
            "or set it to 0 to train without validation."
        )
    return UnrepeatedDistributedSampler(dataset, shuffle=False, **kwargs)


def _sampler_kwargs(trainer: L.Trainer | None) -> dict[str, int] | None:
    """``{"num_replicas", "rank"}`` of a data-parallel strategy, else ``None``."""
    if trainer is None:
        return None
    kwargs = trainer.distributed_sampler_kwargs
    if not kwargs:
        return None
    return {"num_replicas": int(kwargs["num_replicas"]), "rank": int(kwargs["rank"])}


def uses_distributed_sampler(trainer: L.Trainer) -> bool:
    """Whether Lightning will swap its own ``DistributedSampler`` into the DataLoaders.

    The Trainer keeps the ``use_distributed_sampler`` argument only on a private attribute
    (no public accessor as of Lightning 2.6); this helper is the one place that reads it.
    """
    return bool(trainer._accelerator_connector.use_distributed_sampler)
