"""Generates answers to a few fixed prompts during training and logs them to TensorBoard."""

from __future__ import annotations

import contextlib
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn

from lit_cats.data.prompts import Prompt, check_prompt
from lit_cats.inference.decode import release
from lit_cats.inference.generation import GenerationSettings, generate
from lit_cats.inference.metrics import CAT_WORDS, EXISTENTIAL_WORDS
from lit_cats.inference.report import answer_markdown, answer_record, generation_metrics

#: Asked at every validation unless the config says otherwise.
DEFAULT_PROMPTS = (
    "Why do you knock things off the table?",
    "What is the meaning of the red dot?",
    "How do you feel about Mondays?",
    "What happens when the food bowl is half empty?",
)


class GenerationSamples(L.Callback):
    """Log answers to fixed prompts at each validation and at the end of training.

    Answers go to TensorBoard's Text tab (``samples/<i>``, at the global step) and their
    generation metrics (``samples/stopped_share``, ``samples/distinct_2``, ...) to its scalars,
    so a run shows when the model learns the style and whether it learns to stop. Generation
    runs on rank zero only, batched, with a fixed seed so steps are comparable; with the
    defaults it costs about ``max_new_tokens`` forward passes per validation. On CUDA it takes
    lit-cats' fast decode loop (static KV cache, CUDA graph under training's autocast), freed after
    each sampling (:mod:`lit_cats.inference.decode`).

    Example (``lit-cats`` exposes it as the top-level ``samples:`` section)::

        samples:
          prompts: ["Why do you knock things off the table?"]
          max_new_tokens: 96

    Args:
        prompts: Prompts to answer (user messages or chats).
        max_new_tokens: Longest answer, in tokens.
        do_sample: Sample like ``predict`` (True) or decode greedily.
        seed: Sampling seed, the same at every validation.
        system_prompt: A system message before each prompt.
        raw: Prompts are plain text, without the chat template.
        cat_words: Vocabulary of ``samples/cat_vocab_share``.
        existential_words: Vocabulary of ``samples/existential_share``.
        decode: The decode loop (:attr:`GenerationSettings.decode`): ``auto`` takes lit-cats'
            fast loop on CUDA.
        enabled: ``False`` turns sampling off (``--samples.enabled false``).
    """

    def __init__(
        self,
        prompts: list[Prompt] | None = None,
        max_new_tokens: int = 96,
        do_sample: bool = True,
        seed: int = 0,
        system_prompt: str | None = None,
        raw: bool = False,
        cat_words: list[str] | None = None,
        existential_words: list[str] | None = None,
        decode: str = "auto",
        enabled: bool = True,
    ) -> None:
        self.prompts: list[Prompt] = list(prompts or DEFAULT_PROMPTS)
        for i, prompt in enumerate(self.prompts):
            check_prompt(prompt, f"samples prompt {i}")
        self.settings = GenerationSettings(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            seed=seed,
            system_prompt=system_prompt,
            raw=raw,
            decode=decode,
        )
        self.cat_words = list(cat_words or CAT_WORDS)
        self.existential_words = list(existential_words or EXISTENTIAL_WORDS)
        self.enabled = enabled
        self._last_step: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.enabled or stage not in ("fit", "validate"):
            return
        has_tokenizer = callable(getattr(pl_module, "get_tokenizer", None))
        if not (hasattr(pl_module, "model") and has_tokenizer):
            raise TypeError(
                "GenerationSamples needs a LightningModule with a `model` and get_tokenizer() "
                f"(such as lit_cats.model.QLoRAModule), got {type(pl_module).__name__}."
            )

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._sample(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sample(trainer, pl_module)

    def _sample(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if not self.enabled or not trainer.is_global_zero or step == self._last_step:
            return
        self._last_step = step
        model, tokenizer = pl_module.model, pl_module.get_tokenizer()
        # The precision plugin's autocast (the training model keeps fp32 norms and adapters),
        # and the module's evaluation setting (e.g. compiled training layers run eagerly).
        evaluation = getattr(pl_module, "evaluation", contextlib.nullcontext)
        with trainer.precision_plugin.forward_context(), evaluation():
            results = generate(
                model, tokenizer, self.prompts, self.settings, batch_size=len(self.prompts)
            )
        release(model)  # the fast loop's KV cache: training needs the memory back
        records = [answer_record(result) for result in results]
        # Rank zero alone: a cross-process reduction would wait for the other ranks forever.
        metrics = generation_metrics(records, self.cat_words, self.existential_words, sync=False)
        log_samples(trainer, records, {f"samples/{k}": v for k, v in metrics.items()}, step)


def log_samples(
    trainer: L.Trainer, records: list[dict[str, Any]], metrics: dict[str, float], step: int
) -> None:
    """Answers as TensorBoard text (one tag per prompt) and their metrics as scalars."""
    wrote_text = False
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
        experiment: Any = getattr(logger, "experiment", None)
        if callable(getattr(experiment, "add_text", None)):
            for i, record in enumerate(records):
                text = answer_markdown(record, i + 1)
                experiment.add_text(f"samples/{i}", text, global_step=step)
            wrote_text = True
        logger.save()
    if not wrote_text and trainer.loggers:
        rank_zero_warn("GenerationSamples: no logger takes text (use TensorBoardLogger).")
