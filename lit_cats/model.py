"""The LightningModule: a 4-bit base model with trainable LoRA adapters (QLoRA)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from torchmetrics import MeanMetric
from transformers import PreTrainedTokenizerBase

from lit_cats.distributed import average_tokens_across_ranks
from lit_cats.formatting import label_token_count
from lit_cats.generation import GenerationSettings, generate
from lit_cats.inference import ADAPTER_DIRNAME, LATEST, apply_adapter, load_base, resolve_adapter
from lit_cats.kernels import (
    apply_liger_kernels,
    compile_decoder_layers,
    eager_layers,
    keep_activations,
)
from lit_cats.loading import experiment_dir, load_tokenizer
from lit_cats.lora_fast import enable_fast_lora
from lit_cats.losses import chunked_causal_lm_loss
from lit_cats.nf4 import MAX_TOKENS
from lit_cats.packing import is_packed, register_varlen_attention
from lit_cats.prompts import Prompt
from lit_cats.quant import (
    build_lora_config,
    keep_cpu_4bit_weights_trainable,
    parse_dtype,
    resolve_target_modules,
)
from lit_cats.schedules import WarmupLR


def default_optimizer(params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The original's ``paged_adamw_32bit`` at lr 2e-4 without weight decay (HF's defaults)."""
    import bitsandbytes as bnb  # imported lazily: only needed when this optimizer is used

    return bnb.optim.PagedAdamW32bit(params, lr=2e-4, weight_decay=0.0)


def default_scheduler(optimizer: torch.optim.Optimizer, num_training_steps: int) -> WarmupLR:
    """The original's constant learning rate after a 3% linear warm-up."""
    return WarmupLR(optimizer, num_training_steps, warmup_ratio=0.03, schedule="constant")


def _check_keep_dequantized_weights(load_in_4bit: bool, checkpointing: bool, compile: bool) -> None:
    if not load_in_4bit:
        raise ValueError(
            "model.keep_dequantized_weights keeps 4-bit weights' 16-bit copies, but "
            "model.load_in_4bit is false: set keep_dequantized_weights to false."
        )
    if checkpointing:
        raise ValueError(
            "model.keep_dequantized_weights is for training without checkpointing (whose rerun "
            "dequantizes again anyway): set model.gradient_checkpointing false, or "
            "keep_dequantized_weights false."
        )
    if not compile:
        raise ValueError(
            "model.keep_dequantized_weights applies to compiled layers (their 4-bit matmuls on "
            f"steps of more than {MAX_TOKENS:,} tokens): set model.compile true, or "
            "keep_dequantized_weights false."
        )


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
        gradient_checkpointing: Recompute activations in backward (non-reentrant) to save memory.
        uncheckpointed_layers: With checkpointing, the last this many decoder layers keep their
            activations instead (``lit_cats.kernels.keep_activations``): spare GPU memory spent
            on speed: per layer, about 1.1 GiB for Phi-3-mini at 16k tokens, for up to ~0.8%.
        keep_dequantized_weights: Without checkpointing, in compiled layers on steps of more
            than 2,048 tokens: keep each 4-bit weight's 16-bit copy from the forward for the
            backward instead of dequantizing it again (``lit_cats.nf4.trace_nf4_layers``). Spare
            GPU memory spent on speed: 7.2 GB more for Phi-3-mini.
        attn_implementation: transformers attention backend (``"sdpa"``, ``"eager"``, ...).
        trust_remote_code: Run modelling code from the Hub repo. Off: transformers has Phi-3.
        optimizer: Optimizer factory over the trainable parameters (default: paged AdamW 32-bit).
        scheduler: LR scheduler factory; given ``num_training_steps`` when it accepts it.
        output_dir: Extra folder to save the final adapter to (it always goes to the run folder).
        loss_chunk_size: Compute the training loss ``lit_cats.losses`` way: the output
            projection and cross-entropy over this many tokens at a time, so full-vocabulary
            logits are never materialised. ``None``: transformers' loss on full logits.
        fast_lora: Fused LoRA forward on the adapted layers (``lit_cats.lora_fast``): the
            update is one ``addmm`` instead of peft's clone + matmuls + scale + add.
        upcast_to_fp32: Keep ``prepare_model_for_kbit_training``'s fp32 copies of the norms,
            embeddings and output head (the original recipe). False keeps them in
            ``bnb_4bit_compute_dtype``: half the activation bytes of the residual stream.
        liger_kernels: Fused Triton kernels for RMSNorm, SwiGLU and rotary embeddings
            (``lit_cats.kernels``; CUDA and the ``liger-kernel`` package needed).
        compile: ``torch.compile`` each decoder layer for training (``lit_cats.kernels``):
            the elementwise work between the matmuls fused, far fewer kernel launches. The
            first steps pay about a minute of compilation. Validation and generation run the
            layers eagerly (``lit_cats.kernels.eager_layers``).
        adapter: Trained adapter to load instead of training a new one, for ``predict`` (and
            ``validate``/``test``): ``"latest"`` (the newest ``adapter/`` of this experiment's
            runs), an adapter or run folder, or a Hub id. ``None`` predicts with the base alone
            (e.g. a merged model). Not allowed with ``fit``.
        generation: How ``predict`` generates answers (``lit_cats.generation``).
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
        gradient_checkpointing: bool = True,
        uncheckpointed_layers: int = 0,
        keep_dequantized_weights: bool = False,
        attn_implementation: str | None = "sdpa",
        trust_remote_code: bool = False,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable | None = default_scheduler,
        output_dir: str | None = None,
        loss_chunk_size: int | None = None,
        fast_lora: bool = False,
        upcast_to_fp32: bool = True,
        liger_kernels: bool = False,
        compile: bool = False,
        adapter: str | None = None,
        generation: GenerationSettings | None = None,
    ) -> None:
        super().__init__()
        if loss_chunk_size is not None and loss_chunk_size < 1:
            raise ValueError(f"loss_chunk_size must be >= 1 or null, got {loss_chunk_size}.")
        if uncheckpointed_layers < 0:
            raise ValueError(
                f"model.uncheckpointed_layers must be >= 0, got {uncheckpointed_layers}."
            )
        if uncheckpointed_layers and not gradient_checkpointing:
            raise ValueError(
                f"model.uncheckpointed_layers is {uncheckpointed_layers}, but "
                "model.gradient_checkpointing is false, so every layer keeps its activations "
                "already: set uncheckpointed_layers to 0, or turn checkpointing on."
            )
        if keep_dequantized_weights:
            _check_keep_dequantized_weights(load_in_4bit, gradient_checkpointing, compile)
        if compile and liger_kernels:
            raise ValueError(
                "model.compile and model.liger_kernels are alternatives: compiling fuses the same "
                "norm, SwiGLU and rotary work, and torch.compile cannot trace Liger's kernels. "
                "Set one of them to false (compile is the faster on an H100: "
                "benchmarks/RESULTS.md)."
            )
        parse_dtype(bnb_4bit_compute_dtype)  # validate now, not minutes later in configure_model
        build_lora_config(["_"], r, lora_alpha, lora_dropout)  # same: fail at construction
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.model: PeftModel | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.lora_targets: list[str] = []
        self.adapter_path: str | None = None  # the adapter predict loaded, resolved
        # A dict when hparams come from a saved config (LightningCLI, checkpoints).
        self.generation = (
            GenerationSettings(**generation)
            if isinstance(generation, dict)
            else generation or GenerationSettings()
        )
        self.val_loss = MeanMetric()
        # Checkpoints hold only trainable tensors; loading them must not demand the base's.
        self.strict_loading = False

    # ----------------------------------------------------------------------------- building
    def configure_model(self) -> None:
        """Load the (4-bit) base on this process's device, prepare it, and add LoRA. Idempotent."""
        if self.model is not None:
            return
        if self._loads_trained_adapter():
            self.model = self._load_for_inference()
            return
        hp = self.hparams
        base = self._load_base()
        keep_cpu_4bit_weights_trainable(base)
        if hp.liger_kernels:
            apply_liger_kernels(base)
        # from_pretrained returns eval mode and Lightning does not flip it; in eval mode
        # transformers skips gradient checkpointing (Lightning-AI/pytorch-lightning#20105).
        base.train()
        ckpt_kwargs = {"use_reentrant": False}  # reentrant can leave LoRA untrained (peft#1142)
        if hp.load_in_4bit and hp.upcast_to_fp32:
            base = prepare_model_for_kbit_training(
                base,
                use_gradient_checkpointing=hp.gradient_checkpointing,
                gradient_checkpointing_kwargs=ckpt_kwargs,
            )
        elif hp.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
            base.enable_input_require_grads()
        if hp.get("uncheckpointed_layers", 0):  # hparams saved before the setting lack it
            keep_activations(base, hp.uncheckpointed_layers)
        self.lora_targets = resolve_target_modules(base, hp.target_modules)
        lora = build_lora_config(self.lora_targets, hp.r, hp.lora_alpha, hp.lora_dropout)
        self.model = get_peft_model(base, lora)
        self.model.train()
        if hp.fast_lora:
            enable_fast_lora(self.model)
        if hp.compile:  # last: the compiled layers trace the LoRA forward chosen above
            keep = hp.get("keep_dequantized_weights", False)  # older hparams lack it
            compile_decoder_layers(self.model, keep_dequantized_weights=keep)

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

    # ----------------------------------------------------------------------------- inference
    def _loads_trained_adapter(self) -> bool:
        """``predict`` (and ``validate``/``test`` given an adapter) loads; ``fit`` trains."""
        stage = self._trainer.state.fn if self._trainer is not None else None
        if stage == "fit" and self.hparams.adapter is not None:
            raise ValueError(
                f"model.adapter={self.hparams.adapter!r} is for predict/validate/test; fit trains "
                "a new adapter. Drop --model.adapter (or the predict config), or resume a run "
                "with --ckpt_path."
            )
        return stage == "predict" or self.hparams.adapter is not None

    def _load_for_inference(self) -> torch.nn.Module:
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
        if hp.fast_lora:
            enable_fast_lora(model)
        return model

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
        loss = self._training_loss(batch)
        # Under DDP: weigh each rank by its label tokens, as one process on the whole batch would.
        tokens = label_token_count(batch["labels"])
        loss, step_loss = average_tokens_across_ranks(loss, tokens, self.trainer)
        self.log("train_loss", step_loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def _training_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        if self.hparams.loss_chunk_size is None:
            return self.model(**batch).loss
        causal_lm = self.model.get_base_model()  # LoRA layers stay in place inside it
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        hidden = causal_lm.get_decoder()(**inputs, use_cache=False).last_hidden_state
        head = causal_lm.get_output_embeddings().weight
        return chunked_causal_lm_loss(hidden, head, batch["labels"], self.hparams.loss_chunk_size)

    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int) -> None:
        # Packed rows need the varlen attention for the whole step: forward, and the recompute
        # of gradient checkpointing in backward. Other batches keep the configured backend.
        if is_packed(batch):
            config = self.model.get_base_model().config
            self._attn_to_restore = config._attn_implementation
            config._attn_implementation = register_varlen_attention()

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Any], batch_idx: int) -> None:
        restore = getattr(self, "_attn_to_restore", None)
        if restore is not None:
            self.model.get_base_model().config._attn_implementation = restore
            self._attn_to_restore = None

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        with eager_layers():  # compiled layers are for training steps (lit_cats.kernels)
            loss = self.model(**batch).loss
        # Weight by label tokens so the epoch value is the mean per-token loss, not per-batch.
        self.val_loss.update(loss, weight=label_token_count(batch["labels"]))

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()  # reduced across ranks by torchmetrics
        self.val_loss.reset()
        self.log("val_loss", loss, prog_bar=True, sync_dist=False)
        self.log("val_ppl", torch.exp(loss), sync_dist=False)

    def predict_step(self, batch: list[Prompt], batch_idx: int) -> list[dict[str, Any]]:
        """Answer a batch of prompts; records for ``lit_cats.callbacks.PredictionWriter``."""
        settings = self.generation
        if settings.seed is not None:  # each batch its own seed, all reproducible
            settings = replace(settings, seed=settings.seed + batch_idx)
        tokenizer = self.get_tokenizer()
        results = generate(self.model, tokenizer, batch, settings, batch_size=len(batch))
        return [asdict(result) for result in results]

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for p in self.trainable_parameters() if p.grad is not None]
        if grads:  # pre-clipping norm, as HF's Trainer logs it; stays on device (no host sync)
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            self.log("grad_norm", norm, on_step=True, on_epoch=False)

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
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
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
            f"  effective batch size: {self._effective_batch_size()}",
        ]
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "describe_example"):
            lines += ["  first training example:", datamodule.describe_example(0)]
        return "\n".join(lines)

    def _effective_batch_size(self) -> str:
        trainer = self.trainer
        per_device = getattr(getattr(trainer, "datamodule", None), "hparams", {}).get("batch_size")
        if per_device is None:
            return "unknown (no datamodule batch_size)"
        factors = {
            "per device": per_device,
            "devices": trainer.num_devices,
            "nodes": trainer.num_nodes,
            "accumulation": trainer.accumulate_grad_batches,
        }
        total = math.prod(factors.values())
        return f"{total} = " + " x ".join(f"{v} {k}" for k, v in factors.items())
