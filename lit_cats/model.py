"""The LightningModule: a 4-bit base model with trainable LoRA adapters (QLoRA)."""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from peft import PeftModel, get_peft_model
from torchmetrics import MeanMetric
from transformers import PreTrainedTokenizerBase

from lit_cats.data.collate import is_packed
from lit_cats.data.sampling import STEP_SHARE_KEY
from lit_cats.errors import InvalidSetting, TrainingDiverged
from lit_cats.fast import SpeedKit, SpeedSettings
from lit_cats.inference.adapters import ADAPTER_DIRNAME
from lit_cats.loss import StepTokenMean, average_tokens_across_ranks, label_token_count
from lit_cats.recipe import (
    build_lora_config,
    keep_cpu_4bit_weights_trainable,
    load_base,
    load_tokenizer,
    parse_dtype,
    resolve_target_modules,
)
from lit_cats.schedules import WarmupLR


def default_optimizer(params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The original's ``paged_adamw_32bit`` at lr 2e-4 without weight decay (HF's defaults)."""
    import bitsandbytes as bnb  # imported lazily: only needed when this optimizer is used

    return bnb.optim.PagedAdamW32bit(params, lr=2e-4, weight_decay=0.0)


def default_scheduler(optimizer: torch.optim.Optimizer, num_training_steps: int) -> WarmupLR:
    """A constant learning rate after a 3% linear warm-up (transformers' ``constant_with_warmup``).

    The original asked for this (``warmup_ratio=0.03``) but named transformers' ``constant``
    schedule, which ignores warm-up: it trained at the full rate from step 0. The warm-up is
    kept as its evident intent; ``--model.scheduler.init_args.warmup_ratio 0`` (with the
    ``WarmupLR`` scheduler of ``configs/qlora.yaml``) reproduces the original literally.
    """
    return WarmupLR(optimizer, num_training_steps, warmup_ratio=0.03, schedule="constant")


def check_optimization(
    optimizer_factory: OptimizerCallable,
    scheduler_factory: LRSchedulerCallable | None,
    total_steps: int | None,
) -> None:
    """Build the optimizer and scheduler on a one-number probe and refuse what cannot train.

    Cheap (no model), so a zero or negative learning rate or a warm-up longer than the run is
    reported before the base model loads, not after.

    Raises:
        InvalidSetting: For a learning rate <= 0, settings the optimizer or scheduler refuses,
            or a warm-up longer than ``total_steps``.
    """
    probe = torch.nn.Parameter(torch.zeros(1))
    try:  # torch's optimizers check their own arguments ("Invalid learning rate: -1.0")
        optimizer = optimizer_factory([probe])
    except ValueError as exc:
        raise InvalidSetting(
            f"The optimizer refuses its settings ({exc}). Fix --model.optimizer.init_args.*."
        ) from exc
    lrs = [float(group["lr"]) for group in optimizer.param_groups]
    if not all(lr > 0 for lr in lrs):  # not > 0 also catches NaN
        raise InvalidSetting(
            f"The learning rate is {lrs[0]:g}; it must be greater than 0 (nothing would train). "
            "Set --model.optimizer.init_args.lr (the recipe's is 2e-4)."
        )
    if scheduler_factory is None or total_steps is None:
        return
    try:
        try:  # as configure_optimizers calls it
            scheduler = scheduler_factory(optimizer, num_training_steps=total_steps)
        except TypeError as exc:
            if "num_training_steps" not in str(exc):
                raise
            scheduler = scheduler_factory(optimizer)
    except ValueError as exc:
        raise InvalidSetting(
            f"The learning-rate schedule refuses its settings ({exc}). Fix "
            "--model.scheduler.init_args.*."
        ) from exc
    warmup = getattr(scheduler, "warmup_steps", None)
    if isinstance(warmup, int) and warmup > total_steps:
        raise InvalidSetting(
            f"The warm-up lasts {warmup} optimizer steps but the run has {total_steps}: the "
            "learning rate would never reach its peak. Lower "
            "--model.scheduler.init_args.warmup_steps (or use warmup_ratio), or train longer "
            "(--trainer.max_steps, --trainer.max_epochs)."
        )


class DivergenceGuard:
    """Watches the training loss and gradient norm for NaN or inf without a host sync per step.

    :meth:`note` keeps, on the device, the first step at which each went non-finite;
    :meth:`check` (one sync) raises :class:`TrainingDiverged` once that happened. The module
    checks every ``log_every_n_steps``, before writing a checkpoint and before saving the
    adapter, so a diverged run stops with an error and never saves, pushes or cards its
    weights. The gradient norm is noted before clipping and the optimizer step.
    """

    def __init__(self) -> None:
        self._first_bad: dict[str, torch.Tensor] = {}
        self.checked_step = -1  # the step of the last check

    def note(self, what: str, value: torch.Tensor, step: int) -> None:
        """Remember ``step`` if ``value`` is NaN or infinite and ``what`` was fine until now."""
        bad_step = torch.where(torch.isfinite(value.detach()), _NEVER, step)
        first = self._first_bad.get(what)
        self._first_bad[what] = bad_step if first is None else torch.minimum(first, bad_step)

    def check(self, step: int) -> None:
        """Raise if anything noted went non-finite (one host sync)."""
        self.checked_step = step
        bad = {what: int(first) for what, first in self._first_bad.items() if int(first) < _NEVER}
        if not bad:
            return
        what, first = min(bad.items(), key=lambda item: item[1])
        raise TrainingDiverged(
            f"Training diverged: the {what} became NaN or infinite at step {first + 1} (checked "
            f"at step {step}), so its weights are no longer usable. Nothing from that step on was "
            "saved, pushed or carded; checkpoints written before it are intact. Lower the "
            "learning rate (--model.optimizer.init_args.lr), keep gradient clipping on "
            "(--trainer.gradient_clip_val), and check the data for broken rows."
        )


#: "Not yet": larger than any step number.
_NEVER = 2**62


class QLoRAModule(L.LightningModule):
    """QLoRA fine-tuning of a causal LM: frozen NF4 base, trainable LoRA adapters.

    The model is built in :meth:`configure_model`, once, on the device the Trainer chose.
    Checkpoints hold only the adapter weights (plus optimizer and loop state), never the base.

    Args:
        model_name_or_path: Hub id, local folder, or ``"lit-cats/tiny-phi3"`` (offline tiny).
        load_in_4bit: Quantize the base with bitsandbytes (QLoRA). False trains LoRA on a
            ``bnb_4bit_compute_dtype`` base.
        bnb_4bit_quant_type: ``"nf4"`` or ``"fp4"``.
        bnb_4bit_use_double_quant: Quantize the quantization scales too.
        bnb_4bit_compute_dtype: dtype of the dequantized weights in matmuls.
        r: LoRA rank.
        lora_alpha: LoRA scaling numerator (the update is scaled by ``lora_alpha / r``).
        lora_dropout: Dropout on the LoRA input.
        target_modules: Linear layer names to adapt, or ``"all-linear"``. Every name must exist.
        attn_implementation: transformers attention backend (``"sdpa"``, ``"eager"``, ...).
        trust_remote_code: Run modelling code from the Hub repo. Off: transformers has Phi-3.
        optimizer: Optimizer factory over the trainable parameters (default: paged AdamW 32-bit).
        scheduler: LR scheduler factory; given ``num_training_steps`` when it accepts it.
        output_dir: Extra folder to save the final adapter to (it always goes to the run folder).
        speed: Speed and memory settings: checkpointing, fp32 copies, chunked loss, fused LoRA,
            compilation (:class:`lit_cats.fast.SpeedSettings`).
    """

    def __init__(
        self,
        model_name_or_path: str = "microsoft/Phi-3-mini-4k-instruct",
        load_in_4bit: bool = True,
        bnb_4bit_quant_type: str = "nf4",
        bnb_4bit_use_double_quant: bool = True,
        bnb_4bit_compute_dtype: str = "bfloat16",
        r: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.05,
        target_modules: str | list[str] = "all-linear",
        attn_implementation: str | None = "sdpa",
        trust_remote_code: bool = False,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable | None = default_scheduler,
        output_dir: str | None = None,
        speed: SpeedSettings | None = None,
    ) -> None:
        super().__init__()
        # A dict when hparams come from a saved config or checkpoint.
        speed = SpeedSettings(**speed) if isinstance(speed, dict) else speed or SpeedSettings()
        self.kit = SpeedKit(speed, load_in_4bit)
        parse_dtype(bnb_4bit_compute_dtype)  # validate now, not minutes later in configure_model
        build_lora_config(["_"], r, lora_alpha, lora_dropout)  # same: fail at construction
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.hparams.speed = asdict(speed)  # plain data in checkpoints (weights_only loading)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.model: PeftModel | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.lora_targets: list[str] = []
        self.val_loss = MeanMetric()
        self.step_token_mean = StepTokenMean()  # weighs accumulated micro-batches by tokens
        # Checkpoints hold only trainable tensors; loading them must not demand the base's.
        self.strict_loading = False
        self.divergence = DivergenceGuard()

    def setup(self, stage: str) -> None:
        """Check what can be checked before the base model loads (``configure_model`` comes
        next): the learning rate, and the warm-up against the run's length."""
        if stage == "fit":
            check_optimization(
                self.optimizer_factory, self.scheduler_factory, self._planned_steps()
            )

    def _planned_steps(self) -> int | None:
        """Optimizer steps of the whole run, as far as known without building a data loader
        (building one here would come before a resumed run restores the loader's position)."""
        trainer = self.trainer
        limits = [trainer.max_steps] if trainer.max_steps > 0 else []
        batches = getattr(trainer.datamodule, "batches_per_epoch", lambda: None)()
        epochs = trainer.max_epochs
        if batches and epochs is not None and epochs > 0 and trainer.limit_train_batches == 1.0:
            limits.append(math.ceil(batches / trainer.accumulate_grad_batches) * epochs)
        return min(limits, default=None)

    # ----------------------------------------------------------------------------- building
    def configure_model(self) -> None:
        """Load the (4-bit) base on this process's device, prepare it, and add LoRA. Idempotent."""
        if self.model is not None:
            return
        base = self._load_base()
        keep_cpu_4bit_weights_trainable(base)
        # from_pretrained returns eval mode and Lightning does not flip it; in eval mode
        # transformers skips gradient checkpointing (Lightning-AI/pytorch-lightning#20105).
        base.train()
        self.model = self.kit.build(base, add_lora=self._add_lora)

    def _add_lora(self, base: torch.nn.Module) -> PeftModel:
        hp = self.hparams
        self.lora_targets = resolve_target_modules(base, hp.target_modules)
        return get_peft_model(
            base, build_lora_config(self.lora_targets, hp.r, hp.lora_alpha, hp.lora_dropout)
        )

    def _load_base(self) -> torch.nn.Module:
        hp = self.hparams
        return load_base(
            hp.model_name_or_path,
            hp.load_in_4bit,
            hp.bnb_4bit_compute_dtype,
            hp.bnb_4bit_quant_type,
            hp.bnb_4bit_use_double_quant,
            device=self._target_device(),
            attn_implementation=hp.attn_implementation,
            trust_remote_code=hp.trust_remote_code,
        )

    def _target_device(self) -> torch.device:
        trainer = self._trainer
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        """The base model's tokenizer, loaded on first use."""
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(
                self.hparams.model_name_or_path, self.hparams.trust_remote_code
            )
        return self.tokenizer

    # ----------------------------------------------------------------------------- steps
    def forward(self, **batch: torch.Tensor) -> Any:
        return self.model(**batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        share = batch.pop(STEP_SHARE_KEY, None)  # only under gradient accumulation
        loss = self.kit.loss(self.model, batch)
        # Under DDP: weigh each rank by its label tokens, as one process on the whole batch would.
        tokens = label_token_count(batch["labels"])
        if share is None:
            loss, step_loss = average_tokens_across_ranks(loss, tokens, self.trainer)
        else:  # and each micro-batch by its share of the optimizer step's tokens
            loss, step_loss = self.step_token_mean(loss, tokens, share, self.trainer)
        self.log("loss/train", step_loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        self.divergence.note("loss", step_loss, self.trainer.global_step)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # One host sync per log interval, not per step, and once per step: under accumulation
        # this hook also runs after each micro-batch of the next step.
        if self._trainer is None:  # called by hand (benchmarks), not by a Trainer
            return
        step, every = self.trainer.global_step, self.trainer.log_every_n_steps
        if step and every and step % every == 0 and step != self.divergence.checked_step:
            self.divergence.check(step)

    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.kit.prepare_step(self.model, batch)  # e.g. the attention packed rows need

    def evaluation(self, batch: dict[str, Any] | None = None) -> contextlib.AbstractContextManager:
        """Around validation and generation during training (the samples callback)."""
        return self.kit.evaluating(self.model, batch)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        with self.evaluation(batch):  # compiled layers are for training steps
            # A packed row (data.packing) takes the training loss (chunked when configured:
            # no full-vocabulary logits for thousands of tokens); a padded batch, the model's.
            loss = (
                self.kit.loss(self.model, batch) if is_packed(batch) else self.model(**batch).loss
            )
        # Weight by label tokens so the epoch value is the mean per-token loss, not per-batch.
        self.val_loss.update(loss, weight=label_token_count(batch["labels"]))

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()  # reduced across ranks by torchmetrics
        self.val_loss.reset()
        self.log("loss/val", loss, prog_bar=True, sync_dist=False)
        self.log("loss/val_ppl", torch.exp(loss), sync_dist=False)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for p in self.trainable_parameters() if p.grad is not None]
        if grads:  # pre-clipping norm, as HF's Trainer logs it; stays on device (no host sync)
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            self.log("optim/grad_norm", norm, on_step=True, on_epoch=False)
            self.divergence.note("gradient norm", norm, self.trainer.global_step)

    # ----------------------------------------------------------------------------- optim
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.trainable_parameters())
        if self.scheduler_factory is None:
            return optimizer
        steps = int(self.trainer.estimated_stepping_batches)
        try:  # warm-up/decay schedules need the run length; plain torch schedulers do not
            scheduler = self.scheduler_factory(optimizer, num_training_steps=steps)
        except TypeError as exc:
            if "num_training_steps" not in str(exc):
                raise
            scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            # LearningRateMonitor logs it as this tag (not lr-<OptimizerClass>)
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "optim/lr"},
        }

    # ----------------------------------------------------------------------------- state
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Only the trainable (LoRA) tensors: the frozen 4-bit base is never checkpointed.

        A full state dict would be ~2.8 GB for Phi-3 and could not be loaded back anyway
        (bitsandbytes#1946). The base is rebuilt from ``model_name_or_path`` instead.
        """
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse to checkpoint weights a NaN or infinite step has reached (before the file is
        written: Lightning calls this hook first)."""
        self.divergence.check(self.trainer.global_step)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint whose tensors are not exactly this model's adapters."""
        expected = {n for n, p in self.named_parameters() if p.requires_grad}
        found = set(checkpoint["state_dict"])
        if expected and found != expected:
            missing, extra = sorted(expected - found)[:3], sorted(found - expected)[:3]
            raise InvalidSetting(
                "The checkpoint's adapter tensors do not match this model's (missing e.g. "
                f"{missing}, unexpected e.g. {extra}). Resume with the same model, r and "
                "target_modules as the run that wrote it, or start a new run without ckpt_path."
            )

    def save_adapter(self, path: str | Path) -> Path:
        """Save the adapter in PEFT format with the tokenizer (``PeftModel.from_pretrained``)."""
        path = Path(path)
        # Embeddings are never adapted (targets are linear layers) nor resized, so peft's
        # "auto" check, which fetches the base's config.json from the Hub, is not needed.
        self.model.save_pretrained(path, save_embedding_layers=False)
        self.get_tokenizer().save_pretrained(path)
        return path

    # ----------------------------------------------------------------------------- reporting
    def on_fit_start(self) -> None:
        if self.trainer.is_global_zero:
            rank_zero_info(self._start_report())

    def on_train_end(self) -> None:
        """Save the final adapter into the run folder (and ``output_dir``), on rank zero."""
        # log_dir is a broadcast: every rank must read it, or rank zero waits forever.
        run_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        self.divergence.check(self.trainer.global_step)  # never save a diverged adapter
        if not self.trainer.is_global_zero:
            return
        folders = [run_dir / ADAPTER_DIRNAME]
        if self.hparams.output_dir:
            folders.append(Path(self.hparams.output_dir))
        for folder in folders:
            rank_zero_info(f"Saved the LoRA adapter to {self.save_adapter(folder)}")

    def _start_report(self) -> str:
        trainable, total = self.model.get_nb_trainable_parameters()
        counts = Counter(
            name.rsplit(".", 1)[-1]
            for name, module in self.model.named_modules()
            if hasattr(module, "lora_A") and name.rsplit(".", 1)[-1] in self.lora_targets
        )
        tok = self.get_tokenizer()
        gen_eos = self.model.generation_config.eos_token_id
        hp = self.hparams
        quant = f"4-bit {hp.bnb_4bit_quant_type}" if hp.load_in_4bit else "not quantized"
        lines = [
            "lit-cats run",
            f"  model: {hp.model_name_or_path} ({quant})",
            f"  trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)",
            f"  LoRA modules: {dict(sorted(counts.items()))}",
            f"  pad id {tok.pad_token_id} ({tok.pad_token!r}), eos id {tok.eos_token_id} "
            f"({tok.eos_token!r}), generation stops on {gen_eos}",
        ]
        return "\n".join(lines)
