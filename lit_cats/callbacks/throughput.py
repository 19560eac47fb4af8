"""Logs trained tokens per second without a host sync on every step."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch

from lit_cats.loss import label_token_count


class TokenThroughput(L.Callback):
    """Log ``speed/tokens_per_s``: tokens that carry a label (no padding, no masked prompt).

    Under data parallelism the count is summed over every rank: the job's throughput.

    Token counts accumulate on the device and are read back only every ``log_every_n_steps``
    optimizer steps, so the training step never waits for the host.

    Example::

        trainer = L.Trainer(callbacks=[TokenThroughput()])

    Args:
        log_every_n_steps: Steps between readings; ``None`` uses the Trainer's setting.
    """

    def __init__(self, log_every_n_steps: int | None = None) -> None:
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be >= 1, got {log_every_n_steps}.")
        self.log_every_n_steps = log_every_n_steps
        self._tokens: torch.Tensor | None = None
        self._start = 0.0
        self._last_step = -1

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._tokens, self._start = None, time.perf_counter()

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: dict[str, torch.Tensor],
        batch_idx: int,
    ) -> None:
        count = label_token_count(batch["labels"])
        self._tokens = count if self._tokens is None else self._tokens + count
        every = self.log_every_n_steps or trainer.log_every_n_steps
        step = trainer.global_step
        if step == self._last_step or step % every != 0:
            return
        self._last_step = step
        elapsed = time.perf_counter() - self._start
        # Every rank reaches this step together: sum their tokens, so the value is the whole
        # job's throughput under DDP. The one host sync per logging interval.
        tokens = trainer.strategy.reduce(self._tokens, reduce_op="sum").item()
        pl_module.log("speed/tokens_per_s", tokens / max(elapsed, 1e-9), on_step=True)
        self._tokens, self._start = None, time.perf_counter()
