"""The one door between the QLoRA recipe and the speed kit: :class:`SpeedKit`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from peft import PeftModel, prepare_model_for_kbit_training
from torch import nn

from lit_cats.data.collate import is_packed
from lit_cats.fast.attention import register_varlen_attention
from lit_cats.fast.chunked_loss import chunked_causal_lm_loss
from lit_cats.fast.compile import (
    apply_liger_kernels,
    compile_decoder_layers,
    eager_layers,
    keep_activations,
)
from lit_cats.fast.lora import enable_fast_lora
from lit_cats.fast.settings import SpeedSettings

#: Non-reentrant checkpointing: the reentrant kind can leave LoRA untrained (peft#1142).
_CHECKPOINTING = {"use_reentrant": False}


class SpeedKit:
    """Applies :class:`SpeedSettings` to a model, and runs its steps the way they ask.

    Example::

        kit = SpeedKit(SpeedSettings(fast_lora=True, loss_chunk_size=1024))
        model = kit.build(base, add_lora=lambda base: get_peft_model(base, lora_config))
        kit.prepare_step(model, batch)
        loss = kit.loss(model, batch)

    Args:
        settings: The speed and memory settings.
        load_in_4bit: Whether the base is quantized (some settings need it).
    """

    def __init__(self, settings: SpeedSettings, load_in_4bit: bool = True) -> None:
        settings.check_base(load_in_4bit)
        self.settings = settings
        self.load_in_4bit = load_in_4bit
        self._configured: str | None = None  # the base's attention backend, read in build()

    def build(self, base: nn.Module, add_lora: Callable[[nn.Module], PeftModel]) -> PeftModel:
        """Prepare ``base`` for training, add LoRA with ``add_lora``, then speed up the result.

        The order matters: the fp32 copies and checkpointing go on the base before peft freezes
        it and wraps its layers; the fused LoRA forward patches peft's layers; compilation comes
        last, so the compiled layers trace the LoRA forward chosen before.
        """
        s = self.settings
        # "auto" is resolved by the planner before the model is built; unplanned, it is on.
        checkpointing = s.gradient_checkpointing is not False
        self._configured = base.config._attn_implementation  # packed steps switch away from it
        if s.liger_kernels:
            apply_liger_kernels(base)
        if s.upcast_to_fp32 and self.load_in_4bit:
            base = prepare_model_for_kbit_training(
                base,
                use_gradient_checkpointing=checkpointing,
                gradient_checkpointing_kwargs=_CHECKPOINTING,
            )
        else:
            if s.upcast_to_fp32:
                upcast_outside_linear_layers(base)
            if checkpointing:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=_CHECKPOINTING)
                base.enable_input_require_grads()
        if s.uncheckpointed_layers:
            keep_activations(base, s.uncheckpointed_layers)
        model = add_lora(base)
        model.train()
        if s.fast_lora:
            enable_fast_lora(model)
        if s.compile is True:  # "auto" is resolved by the planner before the model is built
            compile_decoder_layers(model, keep_dequantized_weights=s.keep_dequantized_weights)
        return model

    def for_inference(self, model: nn.Module) -> nn.Module:
        """The settings that apply to generation with a trained adapter: the fused LoRA path."""
        if self.settings.fast_lora:
            enable_fast_lora(model)
        return model

    def loss(self, model: PeftModel, batch: dict[str, Any]) -> torch.Tensor:
        """The mean loss over the batch's label tokens, chunked when ``loss_chunk_size`` says."""
        chunk = self.settings.loss_chunk_size
        if chunk is None:
            return model(**batch).loss
        causal_lm = model.get_base_model()  # LoRA layers stay in place inside it
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        hidden = causal_lm.get_decoder()(**inputs, use_cache=False).last_hidden_state
        head = causal_lm.get_output_embeddings().weight
        return chunked_causal_lm_loss(hidden, head, batch["labels"], chunk)

    def prepare_step(self, model: PeftModel, batch: dict[str, Any]) -> None:
        """Before a training step: packed rows need the varlen attention for the whole step
        (forward, and the backward's recompute); other batches keep the configured backend.

        The backend is switched only when it changes (``set_attn_implementation`` walks every
        module), so a packed run switches once per training phase.
        """
        wanted = register_varlen_attention() if is_packed(batch) else self._configured
        self._use_attention(model, wanted)

    @contextlib.contextmanager
    def evaluating(self, model: nn.Module, batch: dict[str, Any] | None = None) -> Iterator[None]:
        """Around validation and generation: eager layers, and the configured attention (the
        varlen one for a packed validation ``batch``)."""
        packed = batch is not None and is_packed(batch)
        self._use_attention(model, register_varlen_attention() if packed else self._configured)
        with eager_layers():
            yield

    def _use_attention(self, model: nn.Module, name: str | None) -> None:
        causal_lm = model.get_base_model() if isinstance(model, PeftModel) else model
        if name is not None and causal_lm.config._attn_implementation != name:
            causal_lm.set_attn_implementation(name)


def upcast_outside_linear_layers(model: nn.Module) -> None:
    """Cast the norms, embeddings and output head of an unquantized base to fp32.

    What ``prepare_model_for_kbit_training`` does to a 4-bit base's unquantized tensors; on a
    16-bit base that function would upcast every weight, so the same set is chosen here by
    module: everything but the linear layers inside the decoder (the output head included).
    """
    head = model.get_output_embeddings()
    for module in model.modules():
        if isinstance(module, nn.Linear) and module is not head:
            continue
        for param in module.parameters(recurse=False):
            if param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.float()
