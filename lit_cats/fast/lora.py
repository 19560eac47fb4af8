"""A leaner LoRA forward for peft's 4-bit (and plain) linear layers.

peft's ``Linear4bit.forward`` clones the base output ("defensively", for old autograd bugs),
computes ``lora_B(lora_A(dropout(x)))``, scales it, and adds it to the clone: three extra passes
over a ``(tokens, out_features)`` tensor per layer, forward and backward. Here the LoRA update
is accumulated into the base output by the GEMM itself: ``result.addmm_(dropout(x) @ A.T, B.T,
alpha=scaling)``, in place, with no clone and no copy (the 4-bit matmul's autograd node keeps
its inputs, not its output, so the result needs no protection; an out-of-place ``addmm`` would
first copy the whole output).

Inside a ``torch.compile``d layer, where in-place updates of graph intermediates become copies:
on large steps over a 4-bit base, the base matmul and the update are one custom op
(:func:`lit_cats.fast.nf4.linear_4bit_lora`), so there is nothing to copy. Elsewhere (small
steps, other bases) it is the out-of-place ``addmm``, chosen over ``result + scaling * (h @
B.T)`` (which Inductor folds into the next elementwise kernel): as fast, and no update tensor
lives beside the output.

On CUDA, in training, ``lora_A(dropout(x))`` is one op whose dropout mask is drawn inside the
matmul and never stored (:mod:`lit_cats.fast.lora_dropout`): the same dropout in distribution
(the same rate, unbiased, independent per element), a different random stream from torch's.
Inside compiled layers on large steps, that op and the 4-bit one are a single op
(:func:`lit_cats.fast.nf4.dropout_linear_4bit_lora`), so that the backward sums the two
gradients of ``x`` in the base GEMM's epilogue rather than in a separate pass. Compiled steps of
at most :data:`lit_cats.fast.nf4.MAX_TOKENS` tokens keep the compiler's own dropout instead: they
are host-bound, and the op's dispatch costs more there than it saves. Each choice is measured in
benchmarks/RESULTS.md.

Same function, same parameters, same dropout; only rounding differs (the update is added in the
GEMM's fp32 accumulator instead of after a round to bf16). Layers in any other state (adapters
disabled or merged, several active adapters, DoRA or other variants, per-call adapter names)
take peft's own path.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from lit_cats.fast import lora_dropout
from lit_cats.fast.nf4 import fused_dropout_lora_linear, fused_lora_linear, small_step

#: Whether compiled steps of at most :data:`lit_cats.fast.nf4.MAX_TOKENS` tokens take the seeded
#: dropout op too. They are host-bound, and there the op's dispatch (a custom op per LoRA layer,
#: forward and backward) costs more than the compiler's own fused dropout and matmul.
SEEDED_DROPOUT_ON_SMALL_COMPILED_STEPS = False


def _fast_lora_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    active = self.active_adapters
    name = active[0] if len(active) == 1 else None
    if (
        args
        or kwargs
        or name is None
        or self.disable_adapters
        or self.merged
        or name not in self.lora_A
        or name in getattr(self, "lora_variant", {})
    ):
        return self._lit_cats_peft_forward(x, *args, **kwargs)
    lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
    scaling = self.scaling[name]
    x_2d = x.reshape(-1, x.shape[-1])
    low_rank = None
    seeded = _seeded_dropout(self.lora_dropout[name], x_2d, lora_a)
    if seeded is not None:
        x_drop, p, seed = seeded
        fused = fused_dropout_lora_linear(self.base_layer, x_drop, lora_a, lora_b, scaling, p, seed)
        if fused is not None:  # compiled, large step, 4-bit base: the whole layer as one op
            return fused.to(x.dtype).view(*x.shape[:-1], fused.shape[-1])
        low_rank = lora_dropout.dropout_lora_a(x_drop, lora_a, p, seed)
    if low_rank is None:
        h = self.lora_dropout[name](x_2d)
        if not torch.is_autocast_enabled(x.device.type):  # peft: LoRA in its weights' dtype
            h = h.to(lora_a.dtype)
        low_rank = torch.nn.functional.linear(h, lora_a)  # (tokens, r)
    fused = fused_lora_linear(self.base_layer, x_2d, low_rank, lora_b, scaling)
    if fused is not None:  # compiled, large step, 4-bit base: the update added in place
        return fused.view(*x.shape[:-1], fused.shape[-1])
    # 2-D in, so the base output is a fresh matrix (not a view) that addmm_ may update in place.
    result = self.base_layer(x_2d)
    low_rank = low_rank.to(result.dtype)
    b_t = lora_b.t().to(result.dtype)
    if result._base is None and not torch.compiler.is_compiling():
        result.addmm_(low_rank, b_t, alpha=scaling)
    else:
        result = torch.addmm(result, low_rank, b_t, alpha=scaling)
    return result.view(*x.shape[:-1], result.shape[-1])


def _seeded_dropout(
    dropout: nn.Module, x: torch.Tensor, lora_a: torch.Tensor
) -> tuple[torch.Tensor, float, torch.Tensor] | None:
    """For ``lora_A(dropout(x))`` as one op whose mask is drawn from a seed and never stored
    (:mod:`lit_cats.fast.lora_dropout`): ``x`` in the autocast dtype, the rate, and a fresh seed.
    Training with dropout under autocast, on CUDA with Triton; None elsewhere (the caller runs
    peft's dropout and ``lora_A``)."""
    device = x.device.type
    if not (
        isinstance(dropout, nn.Dropout)
        and dropout.training
        and dropout.p > 0
        and torch.is_autocast_enabled(device)
    ):
        return None
    x = x.to(torch.get_autocast_dtype(device))  # what autocast's lora_A would compute in
    if not lora_dropout.applies(x, lora_a):
        return None
    compiled_small = torch.compiler.is_compiling() and small_step(x)
    if compiled_small and not SEEDED_DROPOUT_ON_SMALL_COMPILED_STEPS:
        return None  # host-bound: the compiler's own dropout costs less host time
    seed = torch.randint(1 << 62, (1,), device=x.device)  # torch's RNG: checkpointing replays it
    return x, dropout.p, seed


def enable_fast_lora(model: nn.Module) -> int:
    """Give every peft LoRA linear layer of ``model`` the fused forward; returns how many.

    Idempotent. Layers keep their parameters and state dict; only ``forward`` changes.
    """
    count = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or not hasattr(module, "lora_A"):
            continue
        if not isinstance(module, nn.Module) or not hasattr(module, "base_layer"):
            continue
        if not isinstance(module.base_layer, nn.Linear):  # bnb Linear4bit subclasses nn.Linear
            continue
        if not hasattr(module, "_lit_cats_peft_forward"):
            module._lit_cats_peft_forward = module.forward
            module.forward = types.MethodType(_fast_lora_forward, module)
        count += 1
    return count
