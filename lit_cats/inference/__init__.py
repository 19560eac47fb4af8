"""Inference: find and load a trained adapter, generate answers, merge, and report them.

``lit-cats predict``, the training samples and ``lit-cats merge`` all go through this package.
"""

from lit_cats.inference.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_DIRNAME,
    LATEST,
    apply_adapter,
    load_for_inference,
    resolve_adapter,
)
from lit_cats.inference.generation import GenerationResult, GenerationSettings, generate
from lit_cats.inference.report import answer_markdown, answer_record, generation_metrics

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_DIRNAME",
    "LATEST",
    "GenerationResult",
    "GenerationSettings",
    "answer_markdown",
    "answer_record",
    "apply_adapter",
    "generate",
    "generation_metrics",
    "load_for_inference",
    "resolve_adapter",
]
