"""Random-number state in every checkpoint, so a resumed run draws what the interrupted one would.

Lightning checkpoints the weights, optimizer, scheduler, loop counters and (through
:class:`~lit_cats.data.sampling.ResumableDataLoader`) the data position, but no generator state:
a resumed run draws different dropout masks from the step it resumes at, and its losses drift
from the uninterrupted run's. HF's Trainer saves ``rng_state_{rank}.pth`` with every checkpoint
(``Trainer._save_rng_state`` / ``_load_rng_state``); this callback is the same for Lightning.

What is saved, per global rank: torch's CPU generator, the CUDA generator of the rank's device
(which also seeds lit-cats' fused LoRA dropout, :mod:`lit_cats.fast.lora_dropout`, and
Inductor's random ops), Python's ``random`` and NumPy's global generator. The data order needs
no state of its own: the samplers are seeded by epoch and the loader counts the batches it
served; the loaders draw their workers' base seed from a generator of their own, not torch's
global one (:class:`~lit_cats.data.sampling.ResumableDataLoader`).

When: the state is read as the checkpoint is written, at the end of an optimizer step, and put
back just before the resumed run's first training batch, after everything a fresh process does
first (sanity-check validation, building the loaders). The uninterrupted run draws nothing
between the end of one step and the start of the next (validation runs without dropout and
the samples callback forks the generators), so the resumed run continues with the very numbers
it would have drawn.
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn


def collect_rng_states(device: torch.device | None = None) -> dict[str, Any]:
    """This process's generator states, as plain tensors, ints and tuples (so a checkpoint still
    loads with ``torch.load(weights_only=True)``).

    Args:
        device: The CUDA device whose generator to save; ``None`` or a CPU device: none.
    """
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
    }
    if device is not None and device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict[str, Any], device: torch.device | None = None) -> None:
    """Put back what :func:`collect_rng_states` read (the CUDA state on ``device``)."""
    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    if "cuda" in states and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)


class RNGState(L.Callback):
    """Save every rank's random-number state in each checkpoint; restore it on resume.

    ``lit-cats fit`` adds it; with it, a run killed and resumed with ``--ckpt_path last``
    logs the same per-step loss and gradient norm as the run that was never interrupted (on
    the CPU bit for bit; on a GPU up to the nondeterminism of its kernels).

    Example::

        trainer = L.Trainer(callbacks=[RNGState()])
        trainer.fit(model, ckpt_path="last.ckpt")

    Under data parallelism every rank's state is gathered into the checkpoint (rank zero writes
    it), keyed by global rank; a run resumed on another number of ranks warns and continues
    with the generators as seeded.
    """

    def __init__(self) -> None:
        self._trainer: L.Trainer | None = None
        self._pending: dict[str, Any] | None = None  # loaded, put back at the next batch

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def _device(self) -> torch.device | None:
        return self._trainer.strategy.root_device if self._trainer is not None else None

    def state_dict(self) -> dict[str, Any]:
        """``{"ranks": {global rank: states}}``, read now (while the checkpoint is written)."""
        own = collect_rng_states(self._device())
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1 or not torch.distributed.is_initialized():
            return {"ranks": {trainer.global_rank if trainer else 0: own}}
        # Every rank builds the checkpoint (rank zero writes it), so all ranks are here together.
        gathered: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(gathered, (trainer.global_rank, own))
        return {"ranks": dict(gathered)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep this rank's states, to be put back at the next training batch."""
        ranks = state_dict.get("ranks") or {}
        trainer = self._trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        if len(ranks) != world or rank not in ranks:
            rank_zero_warn(
                f"The checkpoint holds the random-number state of {len(ranks)} rank(s), and this "
                f"run has {world}: the generators are not restored, so dropout draws differ "
                "from the interrupted run's. Resume on as many devices to reproduce it exactly."
            )
            return
        self._pending = ranks[rank]

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Warn when the checkpoint holds no state of this callback (written before it existed)."""
        if self.state_key not in (checkpoint.get("callbacks") or {}):
            rank_zero_warn(
                "The checkpoint holds no random-number state (written by an older lit-cats): "
                "the run resumes, but its dropout draws differ from the interrupted run's."
            )

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is None:
            return
        set_rng_states(self._pending, self._device())
        self._pending = None
