"""The training loss as a mean over label tokens: counting them, and weighing ranks by them.

transformers returns each rank's mean over *its* label tokens and DDP averages those means, which
weighs a token on a rank with few label tokens more than one on a busy rank.
:func:`average_tokens_across_ranks` rescales each rank's loss by its share of the step's label
tokens (one tiny all-reduce), as HF Trainer's ``average_tokens_across_devices`` does, so the
gradient is the global per-token mean.

Under gradient accumulation Lightning divides each micro-batch's loss by
``accumulate_grad_batches``, so a step's loss is the mean of its micro-batches' means: a short
micro-batch weighs as much as a long one. :class:`StepTokenMean` weighs each micro-batch by its
share of the label tokens of the whole step (micro-batches and ranks together), which the
training loader counts ahead (``lit_cats.data.sampling.with_step_shares``), as HF Trainer does
with ``num_items_in_batch``.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.distributed as dist

from lit_cats.data.formatting import IGNORE_INDEX
from lit_cats.data.sampling import StepShare


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


class StepTokenMean:
    """Make an accumulated optimizer step's loss the mean over all its label tokens.

    Micro-batch ``i`` of a step holds ``n_i`` of the step's ``n`` label tokens (``n`` summed
    over the step's micro-batches on every rank) and has a mean loss ``m_i``. Lightning divides
    each returned loss by ``A = accumulate_grad_batches`` (even in an epoch's last, shorter
    step) and DDP averages over the ``N`` ranks, so returning ``m_i * n_i * A * N / n`` makes
    the step's gradient that of ``sum_i(m_i * n_i) / n``: what one process computes on all the
    step's examples at once. One all-reduce of the step's token count per step under DDP (and one
    of the loss sum, for the log, at the step's last micro-batch), queued on the device stream:
    no host sync. Keeps state between the micro-batches of a step.
    """

    def __init__(self) -> None:
        self._total: torch.Tensor | float | None = None  # the step's label tokens, all ranks
        self._loss_sum: torch.Tensor | None = None  # sum of m_i * n_i so far, this rank
        self._tokens: torch.Tensor | None = None  # sum of n_i so far, this rank

    def __call__(
        self, loss: torch.Tensor, num_tokens: torch.Tensor, share: StepShare, trainer: L.Trainer
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Weigh one micro-batch.

        Args:
            loss: This micro-batch's mean loss over its label tokens (a scalar with grad).
            num_tokens: Its label-token count (:func:`label_token_count`).
            share: Its :class:`~lit_cats.data.sampling.StepShare` (the step's tokens on this
                rank, its position in the step).
            trainer: The running Trainer (accumulation and world size).

        Returns:
            The loss to backpropagate and, detached, the value to log: at the step's last
            micro-batch the step's global per-token mean; before it, this rank's running mean
            over the step so far (Lightning logs and shows the last value of a step).
        """
        distributed = trainer.world_size > 1 and dist.is_initialized()
        count = num_tokens.to(torch.float32)
        weighted = loss.detach().float() * count
        if share.index == 0 or self._total is None:  # a new step (or one resumed midway)
            if distributed:  # filled on the device (a fill kernel, no blocking host copy)
                total = loss.new_full((), float(share.tokens), dtype=torch.float32)
                dist.all_reduce(total, op=dist.ReduceOp.SUM)
                self._total = total.clamp_min(1.0)
            else:  # a Python number: nothing to copy to the device
                self._total = float(max(share.tokens, 1))
            self._loss_sum, self._tokens = weighted, count
        else:
            self._loss_sum, self._tokens = self._loss_sum + weighted, self._tokens + count
        scale = trainer.accumulate_grad_batches * (trainer.world_size if distributed else 1)
        out = loss * (count * scale / self._total)
        if share.index < share.size - 1:
            return out, self._loss_sum / self._tokens.clamp_min(1.0)
        loss_sum = self._loss_sum
        if distributed:
            loss_sum = loss_sum.clone()
            dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
        step_mean = loss_sum / self._total
        self._total = self._loss_sum = self._tokens = None
        return out, step_mean
