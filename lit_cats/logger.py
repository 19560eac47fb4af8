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
    (:data:`CUSTOM_SCALARS_LAYOUT`) is written once, with the first metrics.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._layout_written = False

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        metrics = {k: v for k, v in metrics.items() if k != "epoch"}
        if not self._layout_written:
            self.experiment.add_custom_scalars(CUSTOM_SCALARS_LAYOUT)
            self._layout_written = True
        if metrics:
            super().log_metrics(metrics, step)
