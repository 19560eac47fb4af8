"""The LightningModule: a 4-bit base model with trainable LoRA adapters (QLoRA)."""

from __future__ import annotations

import contextlib
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

from lit_cats.data.sampling import STEP_SHARE_KEY
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
        return loss

    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.kit.prepare_step(self.model, batch)  # e.g. the attention packed rows need

    def evaluation(self) -> contextlib.AbstractContextManager:
        """Around validation and generation during training (the samples callback)."""
        return self.kit.evaluating(self.model)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        with self.evaluation():  # compiled layers are for training steps
            loss = self.model(**batch).loss
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

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint whose tensors are not exactly this model's adapters."""
        expected = {n for n, p in self.named_parameters() if p.requires_grad}
        found = set(checkpoint["state_dict"])
        if expected and found != expected:
            missing, extra = sorted(expected - found)[:3], sorted(found - expected)[:3]
            raise ValueError(
                "The checkpoint's adapter tensors do not match this model's (missing e.g. "
                f"{missing}, unexpected e.g. {extra}). Resume with the same model, r and "
                "target_modules as the run that wrote it, or start a new run without ckpt_path."
            )

    def save_adapter(self, path: str | Path) -> Path:
        """Save the adapter in PEFT format with the tokenizer (``PeftModel.from_pretrained``)."""
        path = Path(path)
        self.model.save_pretrained(path)
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
