"""Callbacks for lit-cats runs, one per file."""

from lit_cats.callbacks.failed_run import FailedRunFolder
from lit_cats.callbacks.hub_push import HubPushCallback
from lit_cats.callbacks.prediction_writer import PredictionWriter
from lit_cats.callbacks.progress import RunProgress, RunSummary
from lit_cats.callbacks.rng_state import RNGState
from lit_cats.callbacks.samples import GenerationSamples
from lit_cats.callbacks.throughput import TokenThroughput

__all__ = [
    "FailedRunFolder",
    "GenerationSamples",
    "HubPushCallback",
    "PredictionWriter",
    "RNGState",
    "RunProgress",
    "RunSummary",
    "TokenThroughput",
]
