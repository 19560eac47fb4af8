"""Data parallelism helpers: shard batches across ranks and average the loss over tokens.

Under Lightning's ``ddp`` strategy every rank holds a full 4-bit copy of the base and its own
LoRA replica; DDP all-reduces (averages) the LoRA gradients after each backward. Two things
must then be arranged so that ``N`` processes with batch ``B`` train exactly like one process
with batch ``N * B``:

* **Which examples each rank sees.** Lightning wraps a custom sampler in
  ``DistributedSamplerWrapper(shuffle=True)`` for training, which shuffles our
  length-grouped order *again* and so breaks the grouping by length. We shard the order
  ourselves, without a second shuffle: rank ``r`` takes positions ``r, r + N, r + 2N, ...``, so
  the ``N`` per-rank batches of one step are exactly the single-process batch of that step.
* **How the loss is averaged.** transformers returns each rank's mean over *its* label tokens
  and DDP averages those means, which weighs a token on a rank with few label tokens more than
  one on a busy rank. :func:`average_tokens_across_ranks` rescales each rank's loss by its share
  of the step's label tokens (one tiny all-reduce), as HF Trainer's
  ``average_tokens_across_devices`` does, so the gradient is the global per-token mean.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import Dataset, Sampler


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


def average_tokens_across_ranks(
    loss: torch.Tensor, num_tokens: torch.Tensor, trainer: L.Trainer
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale this rank's mean loss so DDP's gradient average is the global per-token mean.

    Rank ``r`` holds ``n_r`` label tokens of the step's ``n = sum(n_r)`` and a mean loss
    ``m_r``. DDP averages gradients over the ``N`` ranks, so backpropagating
    ``m_r * n_r * N / n`` gives the gradient of ``sum_r(m_r * n_r) / n``, the mean over every
    label token of the step, exactly what one process computes on the whole batch. One
    all-reduce of two numbers per step; a single process is left untouched.

    Args:
        loss: This rank's mean loss over its label tokens (a scalar with grad).
        num_tokens: This rank's label-token count (:func:`label_token_count`).
        trainer: The running Trainer (for its world size).

    Returns:
        The loss to backpropagate and, detached, the step's global per-token mean to log.
    """
    world_size = trainer.world_size
    if world_size == 1 or not dist.is_initialized():
        return loss, loss.detach()
    count = num_tokens.to(torch.float32)
    stats = torch.stack([loss.detach().float() * count, count])
    # Loss and token sums in one collective, queued on the device stream: no host sync. Not
    # trainer.strategy.reduce, which puts a (blocking) barrier before every reduction.
    dist.all_reduce(stats, op=dist.ReduceOp.SUM)
    total = stats[1].clamp_min(1.0)
    return loss * (count * world_size / total), stats[0] / total


def _sampler_kwargs(trainer: L.Trainer | None) -> dict[str, int] | None:
    """``{"num_replicas", "rank"}`` of a data-parallel strategy, else ``None``."""
    if trainer is None:
        return None
    kwargs = trainer.distributed_sampler_kwargs
    if not kwargs:
        return None
    return {"num_replicas": int(kwargs["num_replicas"]), "rank": int(kwargs["rank"])}
