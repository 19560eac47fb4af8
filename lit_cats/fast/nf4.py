"""bitsandbytes' NF4 matmul inside compiled decoder layers: torch ops on small steps, one
custom op with the LoRA update folded into the matmul on large ones.

bitsandbytes runs each 4-bit matmul through Python: its ``gemm_4bit`` custom op dequantizes
the weight (two kernels with double quantization) and calls ``linear``, and every step goes
through the ``Params4bit`` tensor subclass. On an H100 that is ~185 us of host time per call,
384 calls per checkpointed step (forward, recompute, backward): at batch 2 the GPU waits on it
(profile in benchmarks/RESULTS.md). Inside a ``torch.compile``d layer the same arithmetic, as
torch ops, becomes one generated dequantization kernel per matmul, launched from the compiled
code with no Python in between.

The arithmetic is bitsandbytes' own (``dequantize_4bit``): two 4-bit codes per byte, high
nibble first, each looked up in the 16-value NF4 code and scaled by its block's absmax; with
double quantization the absmax values are themselves 8-bit codes, scaled per block of 256 and
offset. On the CPU the result is bit-identical to bitsandbytes' (tests/test_speed.py).

The backward dequantizes again, as bitsandbytes does: only the packed weight is kept for it,
not the 16-bit one (unless :func:`trace_nf4_layers` is told to keep it, on large steps). Weights in
any other layout (FP4, other storage types, CPU-packed) keep bitsandbytes' path.

Only steps of at most :data:`MAX_TOKENS` tokens take this path; larger ones are GPU-bound, where
a hand-written dequantization kernel is the faster one and frees each weight as soon as its
matmul is done: bitsandbytes' on the CPU, on CUDA one Triton kernel that also decodes the
double-quantized absmax on the way (:func:`_dequantize_triton`: 42-54 us per Phi-3-mini weight
on an H100 against bitsandbytes' 86 us for its two kernels and an add; bit-identical). The
torch-op path, measured side by side on an H100 (benchmarks/RESULTS.md), compiled layers: batch
2 of short texts 0.226 -> 0.182 s/step; packed 16k-token steps 18,202 -> 17,884 tokens/s and
4,096-token steps 3.97 -> 4.13 GiB peak, had they taken it too. On those large steps a LoRA
layer's base matmul and its update are one custom op instead (:func:`linear_4bit_lora`): the
small update GEMM writes the output and the base GEMM adds into it in place (beta = 1), which
traced code could not do without first copying that output. When checkpointing reruns a layer
in the backward, that op skips the matmuls whose output the backward never reads
(:func:`mark_layer_output`): +3-6% per checkpointed 16k-token step on an H100.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lit_cats.fast import lora_dropout

#: Largest step, in tokens, whose compiled 4-bit matmuls run as torch ops (see above).
MAX_TOKENS = 2048

_state = threading.local()  # backward runs on autograd's worker thread: the flag is per thread


@contextlib.contextmanager
def recomputing() -> Iterator[None]:
    """Mark a checkpointed layer's second forward, the one the backward runs to rebuild its
    activations (set by :func:`lit_cats.fast.compile.checkpoint_around`)."""
    before = getattr(_state, "recomputing", False)
    _state.recomputing = True
    try:
        yield
    finally:
        _state.recomputing = before


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
    """The weight's tensors in the order every op here takes them: packed codes, absmax, then
    double quantization's absmax scale, absmax code and offset (None without it)."""
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
    packed: torch.Tensor,
    absmax: torch.Tensor,
    absmax_scale: torch.Tensor | None,
    absmax_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    shape: list[int],
    blocksize: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """:func:`_dequantize_bnb`'s result, bit for bit, in one kernel (tests/test_speed.py)."""
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


def _dequantize(*weight: Any) -> torch.Tensor:
    """The large-step dequantization: one Triton kernel on CUDA, else bitsandbytes'."""
    if triton is not None and weight[0].is_cuda:
        return _dequantize_triton(*weight)
    return _dequantize_bnb(*weight)


def _dequantize_bnb(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    absmax_scale: torch.Tensor | None,
    absmax_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    shape: list[int],
    blocksize: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """bitsandbytes' own kernels: the (nested) absmax, then the weight."""
    if absmax_scale is not None:
        absmax = torch.ops.bitsandbytes.dequantize_blockwise(
            absmax, absmax_scale, absmax_code, 256, torch.float32
        )
        absmax = absmax + offset
    return torch.ops.bitsandbytes.dequantize_4bit(packed, absmax, blocksize, "nf4", shape, dtype)


# ------------------------------------------------------------- large steps: LoRA folded in
@torch.library.custom_op("lit_cats::linear_4bit_lora", mutates_args=())
def linear_4bit_lora(
    x: torch.Tensor,
    low_rank: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    absmax_scale: torch.Tensor | None,
    absmax_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    shape: list[int],
    blocksize: int,
    layer_output: bool,
    keep_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x @ W.T + scaling * low_rank @ lora_b.T`` for a 2-D ``x``: the rank-r update GEMM writes
    the output, then the base GEMM over bitsandbytes' dequantized weight adds into it in place
    (beta = 1: the output is read in the big GEMM's epilogue, behind its arithmetic). Adding the
    update after the base GEMM instead (``addmm_`` over its output) reads and writes the whole
    output once more: on an H100, checkpointed 16k-token steps 19,522 -> 19,868 tokens/s with
    this order (benchmarks/RESULTS.md, round 5).

    With ``layer_output`` (see :func:`mark_layer_output`), a run inside :func:`recomputing`
    returns NaNs instead: the checkpoint that reruns the layer keeps only what the backward
    reads, and nothing it reads depends on this output (were that ever wrong, the NaNs would
    reach the gradients and show, rather than stale values). The backward below needs the
    inputs, never the output, so it is unchanged. On a checkpointed 16k-token step of Phi-3-mini
    that skips the 32 ``down_proj`` matmuls, 7% of the step's matmul FLOPs.

    The second output is the dequantized weight with ``keep_weight`` (:func:`trace_nf4_layers`),
    which the backward then uses instead of dequantizing again; else an empty tensor. (A kept
    weight is what the backward reads, so a rerun then computes it: it never skips.)
    """
    if layer_output and not keep_weight and getattr(_state, "recomputing", False):
        return x.new_full((x.shape[0], shape[0]), float("nan")), x.new_empty(0)
    update = low_rank.to(x.dtype) @ (lora_b.t() * scaling).to(x.dtype)
    weight = (packed, absmax, absmax_scale, absmax_code, offset, shape, blocksize)
    return _add_4bit_matmul(update, x, *weight, keep_weight=keep_weight)


def _add_4bit_matmul(
    out: torch.Tensor, x: torch.Tensor, *weight: Any, keep_weight: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``out += x @ W.T`` in place, W (``weight``: :func:`_dequantize_bnb`'s arguments but the
    dtype) dequantized first (:func:`_dequantize`), as bitsandbytes' ``gemm_4bit`` does before
    ``linear``. One GEMM with beta = 1: it reads ``out`` in its epilogue, behind the matmul's
    arithmetic. Returns ``out`` and, with ``keep_weight``, W (else an empty tensor)."""
    dequantized = _dequantize(*weight, x.dtype)
    out.addmm_(x, dequantized.t())
    return out, dequantized if keep_weight else x.new_empty(0)


@linear_4bit_lora.register_fake
def _(
    x,
    low_rank,
    lora_b,
    scaling,
    packed,
    absmax,
    absmax_scale,
    absmax_code,
    offset,
    shape,
    blocksize,
    layer_output,
    keep_weight,
):
    return x.new_empty(x.shape[0], shape[0]), x.new_empty(shape if keep_weight else [0])


def _lora_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    _, low_rank, lora_b, scaling, *quantized, shape, blocksize, _, _ = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(low_rank, lora_b, output[1], *quantized)
    ctx.meta = (scaling, shape, blocksize)


def _lora_backward(
    ctx: Any, grad: torch.Tensor, _grad_weight: torch.Tensor | None
) -> tuple[torch.Tensor | None, ...]:
    low_rank, lora_b, kept, *quantized = ctx.saved_tensors
    scaling, shape, blocksize = ctx.meta
    need_x, need_low, need_b = ctx.needs_input_grad[:3]
    grad_x = grad_low = grad_b = None
    if need_x:
        grad_x = grad @ _backward_weight(kept, quantized, shape, blocksize, grad.dtype)
    if need_low:
        grad_low = _grad_low_rank(grad, lora_b, scaling)
    if need_b:
        grad_b = _grad_lora_b(grad, low_rank, lora_b, scaling)
    return grad_x, grad_low, grad_b, *([None] * 10)


def _backward_weight(
    kept: torch.Tensor,
    quantized: list[torch.Tensor | None],
    shape: list[int],
    blocksize: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The weight the backward multiplies by: the forward's, if it kept it (``kept`` is then
    not empty, a size known when tracing), else dequantized again, as bitsandbytes' own backward
    does."""
    if kept.numel():
        return kept.to(dtype)
    return _dequantize(*quantized, shape, blocksize, dtype)


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
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    p: float,
    seed: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    absmax_scale: torch.Tensor | None,
    absmax_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    shape: list[int],
    blocksize: int,
    layer_output: bool,
    keep_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`linear_4bit_lora` of ``x`` and ``low = dropout_lora_a(x, lora_a, p, seed)``
    (:mod:`lit_cats.fast.lora_dropout`) as one op; returns the output, ``low`` and the kept weight
    (:func:`linear_4bit_lora`'s second output).

    One op so that its backward can sum the two gradients of ``x`` in a GEMM's epilogue: the
    dropout kernel writes the LoRA branch's gradient, then the base GEMM over the dequantized
    weight adds into it in place (beta = 1). As two ops, each wrote its own ``(tokens,
    in_features)`` gradient and autograd added them: a separate kernel (``o_proj``'s input) or an
    extra input read by the next fused kernel (SwiGLU's and RMSNorm's backward). On an H100
    (benchmarks/RESULTS.md, round 7): 10 ms less kernel time per 16k-token step without
    checkpointing (528 -> 518 ms), 20 ms less on checkpointed 1,024-token texts, and 7.77 ->
    7.52 GiB peak on checkpointed 16k-token steps; the beta = 1 epilogue costs nothing measurable.
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
    weight = x.new_empty(shape if keep_weight else [0])
    return x.new_empty(x.shape[0], shape[0]), x.new_empty(x.shape[0], lora_a.shape[0]), weight


@torch.library.custom_op("lit_cats::dropout_linear_4bit_lora_backward", mutates_args=())
def dropout_linear_4bit_lora_backward(
    grad: torch.Tensor,
    grad_low: torch.Tensor | None,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    low: torch.Tensor,
    seed: torch.Tensor,
    kept: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    absmax_scale: torch.Tensor | None,
    absmax_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    scaling: float,
    p: float,
    shape: list[int],
    blocksize: int,
    need_x: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
        quantized = [packed, absmax, absmax_scale, absmax_code, offset]
        grad_x.addmm_(grad, _backward_weight(kept, quantized, shape, blocksize, grad.dtype))
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
    """A 4-bit layer's weight as the large-step ops take it: :func:`_quantized`, shape,
    blocksize, whether it is a layer's output (:func:`mark_layer_output`) and whether its
    dequantized weight is kept for the backward (:func:`trace_nf4_layers`)."""
    state = layer.weight.quant_state
    layer_output = getattr(layer, "_lit_cats_layer_output", False)
    keep_weight = getattr(layer, "_lit_cats_keep_weight", False)
    return *_quantized(layer), list(state.shape), state.blocksize, layer_output, keep_weight


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
    whole ``(tokens, out_features)`` output first (43 ms of a 16k-token step on an H100); as one
    custom op, there is nothing for the compiler to copy.
    """
    if not _fuses(layer, x):
        return None
    compute = x.to(layer.compute_dtype or x.dtype)
    out, _ = linear_4bit_lora(compute, low_rank, lora_b, scaling, *_weight_args(layer))
    return out.to(x.dtype)


def _nf4_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    if not torch.compiler.is_compiling() or not _supported(self) or not small_step(x):
        return self._lit_cats_bnb_forward(x)
    state = self.weight.quant_state
    compute = self.compute_dtype or x.dtype
    bias = None if self.bias is None else self.bias.to(compute)
    out = _NF4Linear.apply(
        x.to(compute), bias, state.code, tuple(state.shape), state.blocksize, *_quantized(self)
    )
    return out.to(x.dtype)


def trace_nf4_layers(module: nn.Module, keep_dequantized: bool = False) -> int:
    """Let compiled code see through every bitsandbytes 4-bit linear layer in ``module``.

    Eager calls keep bitsandbytes' own forward; only code being compiled takes the torch-op
    path. Idempotent; parameters and state dict are unchanged. Returns how many layers.

    With ``keep_dequantized``, large steps keep each layer's dequantized 16-bit weight from the
    forward for the backward, which then does not dequantize it again (:func:`linear_4bit_lora`):
    one of two dequantizations saved per step without checkpointing, for the weight's 16-bit size
    in memory until its backward (7.2 GB for Phi-3-mini's decoder layers).
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    count = 0
    for layer in module.modules():
        if isinstance(layer, Linear4bit):
            if not hasattr(layer, "_lit_cats_bnb_forward"):
                layer._lit_cats_bnb_forward = layer.forward
                layer.forward = types.MethodType(_nf4_forward, layer)
            if keep_dequantized:
                layer._lit_cats_keep_weight = True
            count += 1
    return count
