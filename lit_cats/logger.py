"""The TensorBoard logger of lit-cats runs: no ``epoch`` chart, and loss curves on one chart."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

#: TensorBoard's Custom Scalars tab: training and validation loss drawn on one chart.
CUSTOM_SCALARS_LAYOUT = {
    "loss": {
        "train and validation": ["Multiline", ["loss/train", "loss/val"]],
        "validation perplexity": ["Multiline", ["loss/val_ppl"]],
    },
    "optim": {"learning rate and gradient norm": ["Multiline", ["optim/lr", "optim/grad_norm"]]},
}


class CatsTensorBoardLogger(TensorBoardLogger):
    """Lightning's TensorBoardLogger without the ``epoch`` scalar, with a custom-scalars layout.

    Lightning adds ``epoch`` to every metric it logs, so TensorBoard's Time Series page opens on
    an ``epoch`` chart; the step axis already says how far a run got. The layout
    (:data:`CUSTOM_SCALARS_LAYOUT`) is written once, with the first metrics. A resumed run
    writes into the interrupted run's folder (:meth:`resume`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._layout_written = False

    def resume(self, version: int | str, step: int) -> None:
        """Write into run folder ``version`` and continue its curves at ``step``.

        Events the interrupted run logged at ``step`` or later (those after its checkpoint) are
        dropped by TensorBoard: the writer opens with ``purge_step``, which records a restart
        there, so the folder shows one continuous run. Call before anything is logged.

        Args:
            version: The run folder, ``version_N`` (or ``N``), under ``save_dir/name``.
            step: The first step the resumed run logs (the checkpoint's ``global_step``).

        Raises:
            RuntimeError: If this logger has written already (it would miss the purge).
        """
        if self._experiment is not None:
            raise RuntimeError("CatsTensorBoardLogger.resume must come before anything is logged.")
        # Lightning's logger keeps both privately: no public setter exists for either, and its
        # __init__ (``version=``, SummaryWriter ``**kwargs``) has run by the time a checkpoint
        # names the folder.
        self._version = version
        self._kwargs["purge_step"] = step

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        metrics = {k: v for k, v in metrics.items() if k != "epoch"}
        if not self._layout_written:
            self.experiment.add_custom_scalars(CUSTOM_SCALARS_LAYOUT)
            self._layout_written = True
        if metrics:
            super().log_metrics(metrics, step)
