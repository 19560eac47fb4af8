"""The training loss as a mean over label tokens: counting them, and weighing ranks by them.

transformers returns each rank's mean over *its* label tokens and DDP averages those means, which
weighs a token on a rank with few label tokens more than one on a busy rank.
:func:`average_tokens_across_ranks` rescales each rank's loss by its share of the step's label
tokens (one tiny all-reduce), as HF Trainer's ``average_tokens_across_devices`` does, so the
gradient is the global per-token mean.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.distributed as dist

from lit_cats.data.formatting import IGNORE_INDEX


def label_token_count(labels: torch.Tensor) -> torch.Tensor:
    """Tokens that carry a loss, on the labels' device (no host sync).

    The model shifts labels left by one, so column 0 never carries a loss.
    """
    return (labels[:, 1:] != IGNORE_INDEX).sum()


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
