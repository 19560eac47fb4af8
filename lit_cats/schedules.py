"""Learning-rate schedules with a warm-up expressed as a fraction of training, as HF's Trainer."""

from __future__ import annotations

import functools
import math
from typing import Literal

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

Schedule = Literal["constant", "linear", "cosine"]


def _factor(step: int, warmup: int, total: int, schedule: Schedule, min_lr_ratio: float) -> float:
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


class WarmupLR(LambdaLR):
    """Linear warm-up, then constant, linear decay or cosine decay; stepped every optimizer step.

    ``schedule="constant"`` with ``warmup_ratio=0.03`` (lit-cats' default) is transformers'
    ``constant_with_warmup`` with HF's ``ceil(0.03 * steps)`` warm-up steps. The original script
    asked for ``lr_scheduler_type="constant"`` with ``warmup_ratio=0.03``, but transformers'
    ``constant`` ignores the warm-up, so it trained at the full rate from step 0:
    ``warmup_ratio=0`` reproduces that literally.
    Not ``transformers.get_scheduler``: a function of absolute warm-up steps, no ``class_path``.

    Args:
        optimizer: The wrapped optimizer.
        num_training_steps: Total optimizer steps; filled in by ``QLoRAModule`` from the
            Trainer's estimate, so configs leave it out.
        warmup_ratio: Fraction of ``num_training_steps`` spent warming up (rounded up).
        warmup_steps: Absolute warm-up steps; overrides ``warmup_ratio`` when set.
        schedule: Shape after warm-up.
        min_lr_ratio: Floor of the decaying schedules, as a fraction of the peak LR.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        num_training_steps: int | None = None,
        warmup_ratio: float = 0.03,
        warmup_steps: int | None = None,
        schedule: Schedule = "constant",
        min_lr_ratio: float = 0.0,
    ) -> None:
        if schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"schedule must be constant, linear or cosine, got {schedule!r}.")
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}.")
        if num_training_steps is None:
            raise ValueError(
                "WarmupLR needs num_training_steps; QLoRAModule passes it automatically, "
                "elsewhere pass the number of optimizer steps."
            )
        total = max(1, int(num_training_steps))
        warmup = warmup_steps if warmup_steps is not None else math.ceil(warmup_ratio * total)
        self.warmup_steps, self.num_training_steps = warmup, total
        # A partial (not a lambda) keeps the scheduler's state_dict picklable for checkpoints.
        fn = functools.partial(
            _factor, warmup=warmup, total=total, schedule=schedule, min_lr_ratio=min_lr_ratio
        )
        super().__init__(optimizer, fn)
