"""bitsandbytes' NF4 matmul inside compiled decoder layers: torch ops on small steps, one
custom op with the LoRA update folded into the matmul on large ones.

bitsandbytes runs each 4-bit matmul through Python: its ``gemm_4bit`` custom op dequantizes
the weight (two kernels with double quantization) and calls ``linear``, and every step goes
through the ``Params4bit`` tensor subclass. That host time is paid three times per checkpointed
step (forward, recompute, backward), and on small steps the GPU waits on it (profile in
benchmarks/RESULTS.md). Inside a ``torch.compile``d layer the same arithmetic, as torch ops,
becomes one generated dequantization kernel per matmul, launched from the compiled code with no
Python in between.

The arithmetic is bitsandbytes' own (``dequantize_4bit``): two 4-bit codes per byte, high
nibble first, each looked up in the 16-value NF4 code and scaled by its block's absmax; with
double quantization the absmax values are themselves 8-bit codes, scaled per block of 256 and
offset. On the CPU the result is bit-identical to bitsandbytes' (tests/test_fast_nf4.py).

The backward dequantizes again, as bitsandbytes does: only the packed weight is kept for it,
not the 16-bit one (unless :func:`trace_nf4_layers` is told to keep it, on large steps). Weights
in any other layout (FP4, other storage types, CPU-packed) keep bitsandbytes' path.

Only steps of at most :data:`MAX_TOKENS` tokens take this path; larger ones are GPU-bound, where
a hand-written dequantization kernel is the faster one and frees each weight as soon as its
matmul is done: bitsandbytes' on the CPU, on CUDA one Triton kernel that also decodes the
double-quantized absmax on the way (:func:`_dequantize_triton`, bit-identical to bitsandbytes'
two kernels and an add). On those large steps a LoRA layer's base matmul and its update are one
custom op instead (:func:`linear_4bit_lora`): the small update GEMM writes the output and the
base GEMM adds into it in place (beta = 1), which traced code could not do without first
copying that output. When checkpointing reruns a layer in the backward, that op skips the
matmuls whose output the backward never reads (:func:`mark_layer_output`). Each choice is
measured in benchmarks/RESULTS.md.

The seven arguments that carry a 4-bit weight (:class:`NF4Weight`) are spelled out in every
custom op's signature, as ``torch.library`` ops need explicit tensor arguments; Python code
passes them as one :class:`NF4Weight`.
"""

from __future__ import annotations

import functools
import types
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from lit_cats.fast import lora_dropout, recompute

#: Largest step, in tokens, whose compiled 4-bit matmuls run as torch ops (see above).
MAX_TOKENS = 2048


class NF4Weight(NamedTuple):
    """A 4-bit weight as the large-step ops take it, in their argument order: packed codes,
    absmax, double quantization's absmax scale, absmax code and offset (None without it), the
    ``(out_features, in_features)`` shape and the block size."""

    packed: Tensor
    absmax: Tensor
    absmax_scale: Tensor | None
    absmax_code: Tensor | None
    offset: Tensor | None
    shape: list[int]
    blocksize: int

    @classmethod
    def of(cls, layer: nn.Module) -> NF4Weight:
        """A bitsandbytes ``Linear4bit`` layer's weight."""
        state = layer.weight.quant_state
        return cls(*_quantized(layer), list(state.shape), state.blocksize)

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        """The large-step dequantization: one Triton kernel on CUDA, else bitsandbytes'."""
        if triton is not None and self.packed.is_cuda:
            return _dequantize_triton(*self, dtype)
        return _dequantize_bnb(self, dtype)


def mark_layer_output(layer: nn.Module) -> None:
    """Declare that ``layer``'s output only flows into its decoder layer's output, through
    additions and dropout, whose backward never reads it (Phi-3's MLP ``down_proj``: ``residual
    + dropout(down_proj(h))``). When checkpointing recomputes the decoder layer, large steps then
    skip this matmul: nothing in the backward needs its result."""
    layer._lit_cats_layer_output = True


def dequantize_nf4(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    absmax_scale: torch.Tensor | None,
    absmax_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    code: torch.Tensor,
    shape: tuple[int, int] | list[int],
    blocksize: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The ``shape`` weight that bitsandbytes packed into ``packed``, in ``dtype``.

    Args:
        packed: uint8 codes, two per byte (high nibble first).
        absmax: Per-block scales: float, or uint8 codes under double quantization.
        absmax_scale: Double quantization's scale per 256 absmax codes (None without it).
        absmax_code: The 256 values of the absmax codes (None without double quantization).
        offset: Added to every dequantized absmax (None without double quantization).
        code: The 16 NF4 values.
        shape: ``(out_features, in_features)``.
        blocksize: Weights per absmax block.
        dtype: Output dtype.
    """
    numel = shape[0] * shape[1]
    flat = packed.reshape(-1)
    codes = torch.stack(((flat >> 4) & 15, flat & 15), dim=-1).reshape(-1)[:numel]
    if absmax_scale is not None:
        group = torch.arange(absmax.numel(), device=absmax.device) // 256
        scale = absmax_code[absmax.long()] * absmax_scale[group] + offset
    else:
        scale = absmax.float()
    block = torch.arange(numel, device=packed.device) // blocksize
    return (code[codes.long()] * scale[block]).reshape(shape).to(dtype)


class _NF4Linear(torch.autograd.Function):
    """``x @ W.T + bias`` with W dequantized in the forward and again in the backward."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        bias: torch.Tensor | None,
        code: torch.Tensor,
        shape: tuple[int, int],
        blocksize: int,
        *quantized: torch.Tensor | None,
    ) -> torch.Tensor:
        ctx.save_for_backward(code, *quantized)
        ctx.meta = (shape, blocksize)
        weight = dequantize_nf4(*quantized, code, shape, blocksize, x.dtype)
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        code, *quantized = ctx.saved_tensors
        weight = dequantize_nf4(*quantized, code, *ctx.meta, grad.dtype)
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return grad @ weight, grad_bias, *([None] * (3 + len(quantized)))


def _quantized(layer: nn.Module) -> tuple[torch.Tensor | None, ...]:
    """The weight's tensors in :class:`NF4Weight`'s order (its first five fields)."""
    state = layer.weight.quant_state
    if not state.nested:
        return layer.weight, state.absmax, None, None, None
    return layer.weight, state.absmax, state.state2.absmax, state.state2.code, state.offset


def small_step(x: torch.Tensor) -> bool:
    """At most MAX_TOKENS tokens (a guard under dynamic shapes: one graph on each side)."""
    return x.numel() // x.shape[-1] <= MAX_TOKENS


def _supported(layer: nn.Module) -> bool:
    weight = getattr(layer, "weight", None)
    state = getattr(weight, "quant_state", None)
    return (
        state is not None
        and state.quant_type == "nf4"
        and weight.dtype == torch.uint8
        and len(state.shape) == 2
        and not getattr(state, "packing_format_for_cpu", False)
        and (not state.nested or state.state2.blocksize == 256)
    )


# ------------------------------------------------- large steps: one dequantization kernel
try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch: bitsandbytes' kernels
    triton = None

if triton is not None:

    @triton.jit
    def _dequantize_kernel(
        packed, absmax, absmax_scale, absmax_code, offset, code, out, numel,
        NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, BYTES: tl.constexpr,
    ):  # fmt: skip
        """``BYTES`` packed bytes -> ``2 * BYTES`` weights; under double quantization each
        block's absmax is decoded on the way (bitsandbytes: two kernels and a torch add)."""
        start = tl.program_id(0).to(tl.int64) * BYTES
        index = start + tl.arange(0, BYTES)
        inside = index * 2 < numel
        byte = tl.load(packed + index, mask=inside, other=0).to(tl.int32)
        block = index * 2 // BLOCKSIZE  # a byte's two weights share their block
        if NESTED:
            quantized = tl.load(absmax + block, mask=inside, other=0).to(tl.int32)
            group = tl.load(absmax_scale + block // 256, mask=inside, other=0.0)
            scale = tl.load(absmax_code + quantized) * group + tl.load(offset)
        else:
            scale = tl.load(absmax + block, mask=inside, other=0.0)
        high = tl.load(code + (byte >> 4)) * scale  # high nibble first
        low = tl.load(code + (byte & 15)) * scale
        where = start * 2 + tl.arange(0, 2 * BYTES)
        values = tl.join(high, low).reshape(2 * BYTES)
        tl.store(out + where, values.to(out.dtype.element_ty), mask=where < numel)


_DEQUANTIZE_BYTES = 1024


@functools.cache
def _nf4_code(device: torch.device) -> torch.Tensor:
    """bitsandbytes' 16 NF4 values, on ``device``."""
    from bitsandbytes.functional import get_4bit_type

    return get_4bit_type("nf4", device=device).float().contiguous()


# A custom op: the backward of linear_4bit_lora is traced with fake tensors when compiled.
@torch.library.custom_op("lit_cats::dequantize_nf4", mutates_args=())
def _dequantize_triton(
    packed: Tensor, absmax: Tensor, absmax_scale: Tensor | None, absmax_code: Tensor | None,
    offset: Tensor | None, shape: list[int], blocksize: int,  # an NF4Weight
    dtype: torch.dtype,
) -> Tensor:  # fmt: skip
    """:func:`_dequantize_bnb`'s result, bit for bit, in one kernel (tests/test_fast_nf4.py)."""
    numel = shape[0] * shape[1]
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    nested = absmax_scale is not None
    grid = (triton.cdiv(numel, 2 * _DEQUANTIZE_BYTES),)
    _dequantize_kernel[grid](
        packed, absmax,
        absmax_scale if nested else absmax, absmax_code if nested else absmax,
        offset if nested else absmax,
        _nf4_code(packed.device), out, numel,
        NESTED=nested, BLOCKSIZE=blocksize, BYTES=_DEQUANTIZE_BYTES, num_warps=4,
        enable_fp_fusion=False,  # a * b + c rounded twice, as bitsandbytes and torch do
    )  # fmt: skip
    return out


@_dequantize_triton.register_fake
def _(packed, absmax, absmax_scale, absmax_code, offset, shape, blocksize, dtype):
    return packed.new_empty(shape, dtype=dtype)


def _dequantize_bnb(weight: NF4Weight, dtype: torch.dtype) -> Tensor:
    """bitsandbytes' own kernels: the (nested) absmax, then the weight."""
    absmax = weight.absmax
    if weight.absmax_scale is not None:
        absmax = torch.ops.bitsandbytes.dequantize_blockwise(
            absmax, weight.absmax_scale, weight.absmax_code, 256, torch.float32
        )
        absmax = absmax + weight.offset
    return torch.ops.bitsandbytes.dequantize_4bit(
        weight.packed, absmax, weight.blocksize, "nf4", weight.shape, dtype
    )


# ------------------------------------------------------------- large steps: LoRA folded in
@torch.library.custom_op("lit_cats::linear_4bit_lora", mutates_args=())
def linear_4bit_lora(
    x: Tensor, low_rank: Tensor, lora_b: Tensor, scaling: float,
    packed: Tensor, absmax: Tensor, absmax_scale: Tensor | None, absmax_code: Tensor | None,
    offset: Tensor | None, shape: list[int], blocksize: int,  # an NF4Weight
    layer_output: bool, keep_weight: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``x @ W.T + scaling * low_rank @ lora_b.T`` for a 2-D ``x``: the rank-r update GEMM writes
    the output, then the base GEMM over bitsandbytes' dequantized weight adds into it in place
    (beta = 1: the output is read in the big GEMM's epilogue, behind its arithmetic). Adding the
    update after the base GEMM instead (``addmm_`` over its output) would read and write the
    whole output once more (the two orders are measured in benchmarks/RESULTS.md).

    With ``layer_output`` (see :func:`mark_layer_output`), a run inside a checkpointed layer's
    rerun (:func:`lit_cats.fast.recompute.is_recomputing`) returns NaNs instead: the checkpoint
    that reruns the layer keeps only what the backward reads, and nothing it reads depends on
    this output (were that ever wrong, the NaNs would reach the gradients and show, rather than
    stale values). The backward below needs the
    inputs, never the output, so it is unchanged. On Phi-3 that skips every layer's ``down_proj``
    matmul in the rerun.

    The second output is the dequantized weight with ``keep_weight`` (:func:`trace_nf4_layers`),
    which the backward then uses instead of dequantizing again; else an empty tensor. (A kept
    weight is what the backward reads, so a rerun then computes it: it never skips.)
    """
    if layer_output and not keep_weight and recompute.is_recomputing():
        return x.new_full((x.shape[0], shape[0]), float("nan")), x.new_empty(0)
    update = low_rank.to(x.dtype) @ (lora_b.t() * scaling).to(x.dtype)
    weight = NF4Weight(packed, absmax, absmax_scale, absmax_code, offset, shape, blocksize)
    return _add_4bit_matmul(update, x, weight, keep_weight=keep_weight)


def _add_4bit_matmul(
    out: Tensor, x: Tensor, weight: NF4Weight, keep_weight: bool = False
) -> tuple[Tensor, Tensor]:
    """``out += x @ W.T`` in place, W dequantized first (:meth:`NF4Weight.dequantize`), as
    bitsandbytes' ``gemm_4bit`` does before ``linear``. One GEMM with beta = 1: it reads ``out``
    in its epilogue, behind the matmul's arithmetic. Returns ``out`` and, with ``keep_weight``,
    W (else an empty tensor)."""
    dequantized = weight.dequantize(x.dtype)
    out.addmm_(x, dequantized.t())
    return out, dequantized if keep_weight else x.new_empty(0)


def _fake_lora_outputs(x: Tensor, shape: list[int], keep_weight: bool) -> tuple[Tensor, Tensor]:
    """The fake output and kept weight of the 4-bit LoRA ops (their shared fake kernel)."""
    return x.new_empty(x.shape[0], shape[0]), x.new_empty(shape if keep_weight else [0])


@linear_4bit_lora.register_fake
def _(x, low_rank, lora_b, scaling, packed, absmax, absmax_scale, absmax_code, offset, shape,
      blocksize, layer_output, keep_weight):  # fmt: skip
    return _fake_lora_outputs(x, shape, keep_weight)


def _lora_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    _, low_rank, lora_b, scaling, *quantized, shape, blocksize, _, _ = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(low_rank, lora_b, output[1], *quantized)
    ctx.meta = (scaling, shape, blocksize)


def _saved_weight(quantized: list[Tensor | None], shape: list[int], blocksize: int) -> NF4Weight:
    """The weight a setup context saved: its tensors (``ctx.saved_tensors``) and its meta."""
    return NF4Weight(*quantized, shape, blocksize)


def _lora_backward(
    ctx: Any, grad: torch.Tensor, _grad_weight: torch.Tensor | None
) -> tuple[torch.Tensor | None, ...]:
    low_rank, lora_b, kept, *quantized = ctx.saved_tensors
    scaling, shape, blocksize = ctx.meta
    need_x, need_low, need_b = ctx.needs_input_grad[:3]
    grad_x = grad_low = grad_b = None
    if need_x:
        grad_x = grad @ _backward_weight(
            kept, _saved_weight(quantized, shape, blocksize), grad.dtype
        )
    if need_low:
        grad_low = _grad_low_rank(grad, lora_b, scaling)
    if need_b:
        grad_b = _grad_lora_b(grad, low_rank, lora_b, scaling)
    return grad_x, grad_low, grad_b, *([None] * 10)


def _backward_weight(kept: Tensor, weight: NF4Weight, dtype: torch.dtype) -> Tensor:
    """The weight the backward multiplies by: the forward's, if it kept it (``kept`` is then
    not empty, a size known when tracing), else dequantized again, as bitsandbytes' own backward
    does."""
    if kept.numel():
        return kept.to(dtype)
    return weight.dequantize(dtype)


def _grad_low_rank(grad: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The gradient of the update's ``(tokens, r)`` input, given that of its output."""
    return (grad @ lora_b.to(grad.dtype)) * scaling


def _grad_lora_b(
    grad: torch.Tensor, low_rank: torch.Tensor, lora_b: torch.Tensor, scaling: float
) -> torch.Tensor:
    """The gradient of LoRA's B, given that of the update's output."""
    return ((grad.t() @ low_rank.to(grad.dtype)) * scaling).to(lora_b.dtype)


linear_4bit_lora.register_autograd(_lora_backward, setup_context=_lora_setup)


# ------------------------------------------ large steps: LoRA dropout and LoRA-A folded in too
@torch.library.custom_op("lit_cats::dropout_linear_4bit_lora", mutates_args=())
def dropout_linear_4bit_lora(
    x: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float, p: float, seed: Tensor,
    packed: Tensor, absmax: Tensor, absmax_scale: Tensor | None, absmax_code: Tensor | None,
    offset: Tensor | None, shape: list[int], blocksize: int,  # an NF4Weight
    layer_output: bool, keep_weight: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """:func:`linear_4bit_lora` of ``x`` and ``low = dropout_lora_a(x, lora_a, p, seed)``
    (:mod:`lit_cats.fast.lora_dropout`) as one op; returns the output, ``low`` and the kept weight
    (:func:`linear_4bit_lora`'s second output).

    One op so that its backward can sum the two gradients of ``x`` in a GEMM's epilogue: the
    dropout kernel writes the LoRA branch's gradient, then the base GEMM over the dequantized
    weight adds into it in place (beta = 1). As two ops, each wrote its own ``(tokens,
    in_features)`` gradient and autograd added them: a separate kernel (``o_proj``'s input) or an
    extra input read by the next fused kernel (SwiGLU's and RMSNorm's backward). Less kernel time
    and a lower peak, measured in benchmarks/RESULTS.md.
    """
    low = lora_dropout.dropout_lora_a(x, lora_a, p, seed)
    out, weight = linear_4bit_lora(
        x, low, lora_b, scaling, packed, absmax, absmax_scale, absmax_code, offset, shape,
        blocksize, layer_output, keep_weight,
    )  # fmt: skip
    return out, low, weight


@dropout_linear_4bit_lora.register_fake
def _(x, lora_a, lora_b, scaling, p, seed, packed, absmax, absmax_scale, absmax_code, offset,
      shape, blocksize, layer_output, keep_weight):  # fmt: skip
    out, weight = _fake_lora_outputs(x, shape, keep_weight)
    return out, x.new_empty(x.shape[0], lora_a.shape[0]), weight


@torch.library.custom_op("lit_cats::dropout_linear_4bit_lora_backward", mutates_args=())
def dropout_linear_4bit_lora_backward(
    grad: Tensor, grad_low: Tensor | None, x: Tensor, lora_a: Tensor, lora_b: Tensor, low: Tensor,
    seed: Tensor, kept: Tensor,
    packed: Tensor, absmax: Tensor, absmax_scale: Tensor | None, absmax_code: Tensor | None,
    offset: Tensor | None,  # an NF4Weight's tensors
    scaling: float, p: float, shape: list[int], blocksize: int, need_x: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """The gradients of ``x``, ``lora_a`` and ``lora_b`` of :func:`dropout_linear_4bit_lora`
    (``grad_low``: that of its second output, None where nothing used it; ``kept``: its third).
    Without ``need_x`` the base GEMM is skipped and the first result is only the LoRA branch's
    share."""
    low_grad = _grad_low_rank(grad, lora_b, scaling)
    if grad_low is not None:
        low_grad = low_grad + grad_low
    grad_b = _grad_lora_b(grad, low, lora_b, scaling)
    grad_x, grad_a = lora_dropout.dropout_lora_a_backward(low_grad.to(x.dtype), x, lora_a, p, seed)
    if need_x:  # the base GEMM adds its gradient into the LoRA branch's (beta = 1)
        weight = NF4Weight(packed, absmax, absmax_scale, absmax_code, offset, shape, blocksize)
        grad_x.addmm_(grad, _backward_weight(kept, weight, grad.dtype))
    return grad_x, grad_a, grad_b


@dropout_linear_4bit_lora_backward.register_fake
def _(grad, grad_low, x, lora_a, lora_b, low, seed, kept, packed, absmax, absmax_scale,
      absmax_code, offset, scaling, p, shape, blocksize, need_x):  # fmt: skip
    return torch.empty_like(x), torch.empty_like(lora_a), torch.empty_like(lora_b)


def _dropout_lora_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, lora_a, lora_b, scaling, p, seed, *weight, shape, blocksize, _, _ = inputs
    ctx.mark_non_differentiable(output[2])
    ctx.save_for_backward(x, lora_a, lora_b, output[1], seed, output[2], *weight)
    ctx.meta = (scaling, p, shape, blocksize)


def _dropout_lora_backward(
    ctx: Any, grad: torch.Tensor, grad_low: torch.Tensor | None, _grad_weight: torch.Tensor | None
) -> tuple[torch.Tensor | None, ...]:
    x, lora_a, lora_b, low, seed, kept, *weight = ctx.saved_tensors
    need_x = ctx.needs_input_grad[0]
    grad_x, grad_a, grad_b = dropout_linear_4bit_lora_backward(
        grad, grad_low, x, lora_a, lora_b, low, seed, kept, *weight, *ctx.meta, need_x
    )
    return grad_x if need_x else None, grad_a, grad_b, *([None] * 12)


dropout_linear_4bit_lora.register_autograd(
    _dropout_lora_backward, setup_context=_dropout_lora_setup
)


def _weight_args(layer: nn.Module) -> tuple:
    """A 4-bit layer's weight as the large-step ops take it: its :class:`NF4Weight`, whether it
    is a layer's output (:func:`mark_layer_output`) and whether its dequantized weight is kept
    for the backward (:func:`trace_nf4_layers`)."""
    layer_output = getattr(layer, "_lit_cats_layer_output", False)
    keep_weight = getattr(layer, "_lit_cats_keep_weight", False)
    return *NF4Weight.of(layer), layer_output, keep_weight


def _fuses(layer: nn.Module, x: torch.Tensor) -> bool:
    """Compiled code, a large 2-D step, a supported 4-bit base without bias."""
    return (
        torch.compiler.is_compiling()
        and x.dim() == 2
        and not small_step(x)
        and getattr(layer, "bias", None) is None
        and hasattr(layer, "_lit_cats_bnb_forward")
        and _supported(layer)
    )


def fused_dropout_lora_linear(
    layer: nn.Module,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    p: float,
    seed: torch.Tensor,
) -> torch.Tensor | None:
    """In compiled code, a large step's whole LoRA layer, dropout included, as one op
    (:func:`dropout_linear_4bit_lora`), in ``x``'s dtype; None where it does not apply (then
    :func:`fused_lora_linear` may)."""
    if not _fuses(layer, x) or x.dtype != (layer.compute_dtype or x.dtype):
        return None
    out, _, _ = dropout_linear_4bit_lora(x, lora_a, lora_b, scaling, p, seed, *_weight_args(layer))
    return out


def fused_lora_linear(
    layer: nn.Module, x: torch.Tensor, low_rank: torch.Tensor, lora_b: torch.Tensor, scaling: float
) -> torch.Tensor | None:
    """In compiled code, a large step's 4-bit base matmul with the LoRA update folded in
    (:func:`linear_4bit_lora`); None where that does not apply (the caller adds it itself).

    Traced, an in-place update of the base output would be functionalized into a copy of the
    whole ``(tokens, out_features)`` output first; as one custom op, there is nothing for the
    compiler to copy.
    """
    if not _fuses(layer, x):
        return None
    compute = x.to(layer.compute_dtype or x.dtype)
    out, _ = linear_4bit_lora(compute, low_rank, lora_b, scaling, *_weight_args(layer))
    return out.to(x.dtype)


def _nf4_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    if not torch.compiler.is_compiling() or not _supported(self):
        return self._lit_cats_bnb_forward(x)
    compute = self.compute_dtype or x.dtype
    bias = None if self.bias is None else self.bias.to(compute)
    if getattr(self, "_lit_cats_decode", False) and not torch.is_grad_enabled():
        # A compiled decode step (mark_decode_layers): bitsandbytes' dequantization bit for
        # bit (one kernel on CUDA), then its matmul, with the rest of the step compiled around.
        weight = NF4Weight.of(self).dequantize(compute)
        return nn.functional.linear(x.to(compute), weight, bias).to(x.dtype)
    if not small_step(x):
        return self._lit_cats_bnb_forward(x)
    state = self.weight.quant_state
    out = _NF4Linear.apply(
        x.to(compute), bias, state.code, tuple(state.shape), state.blocksize, *_quantized(self)
    )
    return out.to(x.dtype)


def _linear4bit_layers(module: nn.Module) -> list[nn.Module]:
    """Every bitsandbytes 4-bit linear layer in ``module`` (none without bitsandbytes)."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return []
    return [layer for layer in module.modules() if isinstance(layer, Linear4bit)]


def has_nf4_layers(module: nn.Module) -> bool:
    """Whether ``module`` holds bitsandbytes 4-bit linear layers (a 4-bit base)."""
    return bool(_linear4bit_layers(module))


def trace_nf4_layers(module: nn.Module, keep_dequantized: bool = False) -> int:
    """Let compiled code see through every bitsandbytes 4-bit linear layer in ``module``.

    Eager calls keep bitsandbytes' own forward; only code being compiled takes the torch-op
    path. Idempotent; parameters and state dict are unchanged. Returns how many layers.

    With ``keep_dequantized``, large steps keep each layer's dequantized 16-bit weight from the
    forward for the backward, which then does not dequantize it again (:func:`linear_4bit_lora`):
    one of two dequantizations saved per step without checkpointing, for the weight's 16-bit size
    in memory until its backward (all the decoder layers' 16-bit weights at the peak).
    """
    layers = _linear4bit_layers(module)
    for layer in layers:
        if not hasattr(layer, "_lit_cats_bnb_forward"):
            layer._lit_cats_bnb_forward = layer.forward
            layer.forward = types.MethodType(_nf4_forward, layer)
        if keep_dequantized:
            layer._lit_cats_keep_weight = True
    return len(layers)


def mark_decode_layers(module: nn.Module) -> int:
    """Let a compiled decode step (:mod:`lit_cats.inference.engine`) run every bitsandbytes
    4-bit linear layer in ``module`` as :meth:`NF4Weight.dequantize` + ``linear``: bitsandbytes'
    own arithmetic (its dequantization is bit-identical, one Triton kernel on CUDA instead of
    two, and the same matmul), as one opaque op the compiler schedules around, with the norms,
    rotary embedding, residual adds and LoRA updates of the step fused by the compiler.

    Only compiled code without autograd takes this path; eager calls and training keep theirs.
    Returns how many layers (0 without bitsandbytes).
    """
    count = trace_nf4_layers(module)
    for layer in module.modules():
        if hasattr(layer, "_lit_cats_bnb_forward"):
            layer._lit_cats_decode = True
    return count
