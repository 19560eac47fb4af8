"""The LightningModule of ``predict`` (and ``validate``): a trained adapter answering."""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from lit_cats.data.prompts import Prompt
from lit_cats.inference.adapters import LATEST, apply_adapter, resolve_adapter
from lit_cats.inference.generation import GenerationSettings, generate
from lit_cats.inference.report import answer_record
from lit_cats.locations import experiment_dir
from lit_cats.model import QLoRAModule


class AdapterModule(QLoRAModule):
    """The training recipe's model, loaded with a trained adapter instead of a new one.

    ``lit-cats predict`` and ``validate`` use this class; ``fit`` uses
    :class:`~lit_cats.model.QLoRAModule`. It takes the same settings as training (so the
    training configs stack under ``configs/predict.yaml``) and two of its own.

    Args:
        adapter: Trained adapter to load: ``"latest"`` (the newest ``adapter/`` of this
            experiment's runs), an adapter or run folder, or a Hub id. ``None``: the base alone
            (e.g. a merged model) in ``predict``; in ``validate``, the training model,
            whose adapter a ``--ckpt_path`` checkpoint restores.
        generation: How ``predict`` generates answers.
        **kwargs: The training settings (:class:`~lit_cats.model.QLoRAModule`).
    """

    def __init__(
        self,
        *args: Any,
        adapter: str | None = None,
        generation: GenerationSettings | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        # A dict when hparams come from a saved config.
        if isinstance(generation, dict):
            generation = GenerationSettings(**generation)
        self.generation = generation or GenerationSettings()
        self.hparams.generation = asdict(self.generation)
        self.adapter_path: str | None = None  # the adapter that was loaded, resolved

    def configure_model(self) -> None:
        """The base with the trained adapter (predict, or given an adapter); else training's."""
        if self.model is not None:
            return
        stage = self._trainer.state.fn if self._trainer is not None else None
        if stage != "predict" and self.hparams.adapter is None:
            super().configure_model()
            return
        self.model = self._load_with_adapter()

    def _load_with_adapter(self) -> torch.nn.Module:
        """The base as trained (no fp32 upcasts, no checkpointing), with the adapter if any."""
        hp = self.hparams
        base = self._load_base()
        if hp.adapter is None:
            rank_zero_info(f"Using {hp.model_name_or_path} without an adapter.")
            return base
        root = experiment_dir(self._trainer)
        self.adapter_path = resolve_adapter(hp.adapter, root)
        newest = f" (the newest under {root})" if hp.adapter == LATEST else ""
        rank_zero_info(f"Using the adapter {self.adapter_path}{newest}")
        model = apply_adapter(base, self.adapter_path, hp.bnb_4bit_compute_dtype)
        return self.kit.for_inference(model)

    def predict_step(self, batch: list[Prompt], batch_idx: int) -> list[dict[str, Any]]:
        """Answer a batch of prompts; records for ``lit_cats.callbacks.PredictionWriter``."""
        settings = replace(self.generation, progress=True)  # a line every few seconds
        if settings.seed is not None:  # each batch its own seed, all reproducible
            settings = replace(settings, seed=settings.seed + batch_idx)
        tokenizer = self.get_tokenizer()
        # All of the batch at once unless generation.batch_size says fewer (then the other
        # prompts refill the slots of finished answers).
        results = generate(self.model, tokenizer, batch, settings, batch_size=len(batch))
        return [answer_record(result) for result in results]
