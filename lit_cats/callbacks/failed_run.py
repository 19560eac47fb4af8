"""Removes the run folder of a command that failed before it produced anything of value."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, Trainer

from lit_cats.hub import read_tensorboard_scalars

#: Files every run writes when it starts; a folder of only these (and TensorBoard files without
#: a single scalar) holds nothing of value.
_BOOKKEEPING_FILES = ("config.yaml", "hparams.yaml")


class FailedRunFolder(Callback):
    """Notes the run folder of a ``fit``/``validate``/``test``/``predict`` that fails, so that
    ``lit_cats.cli.main`` removes it when it holds nothing of value (rank zero only).

    Lightning creates ``version_N`` (TensorBoard's file, ``config.yaml``) before the data is
    even loaded, so without this every failed command leaves an empty run behind. Nothing of
    value means: no checkpoint, no adapter, no predictions, no logged scalar (not one training
    step logged), only :data:`_BOOKKEEPING_FILES` and TensorBoard files without scalars. A
    folder that existed before this command (a resumed run's) holds its checkpoints, so it is
    kept; anything unexpected in a folder keeps it too.
    """

    def __init__(self) -> None:
        self.run_dir: Path | None = None

    def on_exception(self, trainer: Trainer, pl_module: Any, exception: BaseException) -> None:
        log_dir = getattr(trainer.logger, "log_dir", None)  # no broadcast: this rank may be alone
        if trainer.is_global_zero and log_dir:
            self.run_dir = Path(log_dir)

    def remove_if_worthless(self) -> None:
        """Remove the failed run's folder (and the folders above it that are then empty)."""
        run_dir = self.run_dir
        if run_dir is None or not run_dir.is_dir() or not worthless_run_folder(run_dir):
            return
        shutil.rmtree(run_dir, ignore_errors=True)
        with contextlib.suppress(OSError):  # each only when empty: other runs live there too
            run_dir.parent.rmdir()  # the experiment's folder
            run_dir.parent.parent.rmdir()  # the logger's save_dir


def worthless_run_folder(run_dir: Path) -> bool:
    """Whether a run folder holds only what every run writes at its start (see
    :class:`FailedRunFolder`)."""
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    if any(
        p.parent != run_dir
        or not (p.name in _BOOKKEEPING_FILES or p.name.startswith("events.out.tfevents."))
        for p in files
    ):
        return False
    if any(p.name.startswith("events.out.tfevents.") for p in files):
        return not read_tensorboard_scalars(run_dir)[0]
    return True
