"""Causal attention over a packed row of short examples, forward and backward in Triton.

A packed step of short texts (tens to a few hundred tokens each, about a hundred examples per
row) spends most of its attention time in FlashAttention-2's varlen backward. Its tiles are
sized for long sequences, it pads the head dimension to 128 in every matmul, and it adds ``dQ``
up in an fp32 buffer of ``(tokens + 128 * examples, heads, 128)`` that is zeroed, added to
atomically and converted in two more passes.

These kernels are sized for short examples instead (measured in ``benchmarks/RESULTS.md``):

- one program per (64-row block, example, head); blocks past an example's end exit at once;
- the head dimension is split into a power of two and a remainder (96 = 64 + 32), so no matmul
  multiplies padding;
- the backward is two kernels and no atomics: one computes ``dQ`` per query block, the other
  ``dK`` and ``dV`` per key block, each recomputing the probabilities from the forward's
  log-sum-exp (one extra matmul per block pair). ``delta = rowsum(dO * O)`` is computed in the
  ``dQ`` kernel, which reads those rows anyway, and stored for the second.

The op returns the output and the log-sum-exp (fp32, ``(tokens, heads)``, natural log) the
backward needs. It runs where Triton runs (CUDA; the tests also run it on the CPU in Triton's
interpreter); :mod:`lit_cats.fast.attention` chooses it for packed rows on the GPUs where it was
measured faster than FlashAttention-2 (compute capability 9).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch: packing uses its per-example SDPA op instead
    triton = None

_LOG2E = 1.4426950408889634

#: Launch settings per kernel, the fastest of a sweep at the short workload's packed rows
#: (``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` over 32-128 rows, 4/8 warps, 1-3 stages).
FORWARD = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3}
GRAD_Q = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
GRAD_KV = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}


def head_split(dim: int) -> tuple[int, int, bool]:
    """The head dimension as a power of two ``D0``, a remainder block ``D1`` (a power of two,
    at least 16, masked where it passes ``dim``) and whether there is a remainder at all."""
    d0 = 1 << (dim.bit_length() - 1)
    return d0, max(16, 1 << (dim - d0 - 1).bit_length()), dim > d0


def applies(q: torch.Tensor) -> bool:
    """Whether the kernels can run on ``q`` (``(tokens, heads, dim)``, contiguous)."""
    return (
        triton is not None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and 16 <= q.shape[-1] <= 128
    )


if triton is not None:

    @triton.jit
    def _load(ptr, rows, valid, stride, D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
              HI: tl.constexpr):  # fmt: skip
        """Rows ``rows`` of a ``(.., D)`` matrix as its first ``D0`` columns and the next ``D1``
        (zero past ``D``; the first part again where there is no remainder)."""
        c0 = tl.arange(0, D0)
        a0 = tl.load(ptr + rows[:, None] * stride + c0[None, :], mask=valid[:, None], other=0.0)
        a1 = a0
        if HI:
            c1 = D0 + tl.arange(0, D1)
            a1 = tl.load(ptr + rows[:, None] * stride + c1[None, :],
                         mask=valid[:, None] & (c1[None, :] < D), other=0.0)  # fmt: skip
        return a0, a1

    @triton.jit
    def _store(ptr, rows, valid, stride, a0, a1, D: tl.constexpr, D0: tl.constexpr,
               D1: tl.constexpr, HI: tl.constexpr):  # fmt: skip
        c0 = tl.arange(0, D0)
        tl.store(ptr + rows[:, None] * stride + c0[None, :], a0.to(ptr.dtype.element_ty),
                 mask=valid[:, None])  # fmt: skip
        if HI:
            c1 = D0 + tl.arange(0, D1)
            tl.store(ptr + rows[:, None] * stride + c1[None, :], a1.to(ptr.dtype.element_ty),
                     mask=valid[:, None] & (c1[None, :] < D))  # fmt: skip

    @triton.jit
    def _dot_t(a0, a1, b0, b1, HI: tl.constexpr):
        """``a @ b.T`` over the split head dimension, in fp32."""
        out = tl.dot(a0, tl.trans(b0))
        if HI:
            out += tl.dot(a1, tl.trans(b1))
        return out

    @triton.jit
    def _example(cu_ptr, H: tl.constexpr, D: tl.constexpr):
        """This program's example: its first token, its length, and the offset of its first
        token's row for this program's head."""
        seq = tl.program_id(1)
        start = tl.load(cu_ptr + seq)
        length = tl.load(cu_ptr + seq + 1) - start
        return start, length, start.to(tl.int64) * (H * D) + tl.program_id(2) * D

    @triton.jit
    def _block(cu_ptr, H: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
        """:func:`_example`'s three values, then this program's block of BLOCK rows of it: the
        first row, the rows and which of them lie inside the example."""
        start, length, base = _example(cu_ptr, H, D)
        first = tl.program_id(0) * BLOCK
        rows = first + tl.arange(0, BLOCK)
        return start, length, base, first, rows, rows < length

    @triton.jit
    def _key_block(k_ptr, v_ptr, base, n0, rows, length, H: tl.constexpr, D: tl.constexpr,
                   D0: tl.constexpr, D1: tl.constexpr, HI: tl.constexpr,
                   BLOCK_N: tl.constexpr):  # fmt: skip
        """The BLOCK_N keys and values from ``n0`` on (split as :func:`_load` splits them) and
        which of their scores with the query ``rows`` count (causal, inside the example)."""
        cols = n0 + tl.arange(0, BLOCK_N)
        k0, k1 = _load(k_ptr + base, cols, cols < length, H * D, D, D0, D1, HI)
        v0, v1 = _load(v_ptr + base, cols, cols < length, H * D, D, D0, D1, HI)
        keep = (cols[None, :] <= rows[:, None]) & (cols[None, :] < length)
        return k0, k1, v0, v1, keep

    @triton.jit
    def _forward_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cu_ptr, qk_scale,
                        H: tl.constexpr, D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                        HI: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr):  # fmt: skip
        """Output and log-sum-exp of BLOCK_M query rows: online softmax over the key blocks up
        to the diagonal (scores in log2 units: ``qk_scale`` is the softmax scale * log2(e))."""
        start, length, base, m0, rows, valid = _block(cu_ptr, H, D, BLOCK_M)
        if m0 >= length:
            return
        q0, q1 = _load(q_ptr + base, rows, valid, H * D, D, D0, D1, HI)
        top = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        total = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc0 = tl.zeros((BLOCK_M, D0), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_M, D1), dtype=tl.float32)
        for n0 in range(0, tl.minimum(m0 + BLOCK_M, length), BLOCK_N):
            k0, k1, v0, v1, keep = _key_block(k_ptr, v_ptr, base, n0, rows, length,
                                              H, D, D0, D1, HI, BLOCK_N)  # fmt: skip
            scores = tl.where(keep, _dot_t(q0, q1, k0, k1, HI) * qk_scale, float("-inf"))
            new_top = tl.maximum(top, tl.max(scores, 1))
            rescale = tl.exp2(top - new_top)
            probs = tl.exp2(scores - new_top[:, None])
            total = total * rescale + tl.sum(probs, 1)
            probs = probs.to(v0.dtype)
            acc0 = acc0 * rescale[:, None] + tl.dot(probs, v0)
            if HI:
                acc1 = acc1 * rescale[:, None] + tl.dot(probs, v1)
            top = new_top
        _store(o_ptr + base, rows, valid, H * D, acc0 / total[:, None], acc1 / total[:, None],
               D, D0, D1, HI)  # fmt: skip
        lse = (top + tl.log2(total)) / 1.4426950408889634
        tl.store(lse_ptr + (start + rows) * H + tl.program_id(2), lse, mask=valid)

    @triton.jit
    def _grad_q_kernel(q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, cu_ptr,
                       qk_scale, scale, H: tl.constexpr, D: tl.constexpr, D0: tl.constexpr,
                       D1: tl.constexpr, HI: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr):  # fmt: skip
        """``dQ`` of BLOCK_M query rows, over the key blocks up to the diagonal; also stores
        these rows' ``delta = rowsum(dO * O)`` for :func:`_grad_kv_kernel`."""
        start, length, base, m0, rows, valid = _block(cu_ptr, H, D, BLOCK_M)
        if m0 >= length:
            return
        q0, q1 = _load(q_ptr + base, rows, valid, H * D, D, D0, D1, HI)
        do0, do1 = _load(do_ptr + base, rows, valid, H * D, D, D0, D1, HI)
        o0, o1 = _load(o_ptr + base, rows, valid, H * D, D, D0, D1, HI)
        delta = tl.sum(o0.to(tl.float32) * do0.to(tl.float32), 1)
        if HI:
            delta += tl.sum(o1.to(tl.float32) * do1.to(tl.float32), 1)
        stat = (start + rows) * H + tl.program_id(2)
        tl.store(delta_ptr + stat, delta, mask=valid)
        lse = tl.load(lse_ptr + stat, mask=valid, other=0.0) * 1.4426950408889634
        dq0 = tl.zeros((BLOCK_M, D0), dtype=tl.float32)
        dq1 = tl.zeros((BLOCK_M, D1), dtype=tl.float32)
        for n0 in range(0, tl.minimum(m0 + BLOCK_M, length), BLOCK_N):
            k0, k1, v0, v1, keep = _key_block(k_ptr, v_ptr, base, n0, rows, length,
                                              H, D, D0, D1, HI, BLOCK_N)  # fmt: skip
            probs = tl.exp2(_dot_t(q0, q1, k0, k1, HI) * qk_scale - lse[:, None])
            probs = tl.where(keep, probs, 0.0)
            d_scores = probs * (_dot_t(do0, do1, v0, v1, HI) - delta[:, None])
            d_scores = d_scores.to(k0.dtype)
            dq0 += tl.dot(d_scores, k0)
            if HI:
                dq1 += tl.dot(d_scores, k1)
        _store(dq_ptr + base, rows, valid, H * D, dq0 * scale, dq1 * scale, D, D0, D1, HI)

    @triton.jit
    def _grad_kv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                        cu_ptr, qk_scale, scale, H: tl.constexpr, D: tl.constexpr,
                        D0: tl.constexpr, D1: tl.constexpr, HI: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
        """``dK`` and ``dV`` of BLOCK_N key rows, over the query blocks from the diagonal on
        (the transposed probabilities, so no transposes of the accumulators)."""
        start, length, base, n0, cols, valid = _block(cu_ptr, H, D, BLOCK_N)
        if n0 >= length:
            return
        k0, k1 = _load(k_ptr + base, cols, valid, H * D, D, D0, D1, HI)
        v0, v1 = _load(v_ptr + base, cols, valid, H * D, D, D0, D1, HI)
        dk0 = tl.zeros((BLOCK_N, D0), dtype=tl.float32)
        dk1 = tl.zeros((BLOCK_N, D1), dtype=tl.float32)
        dv0 = tl.zeros((BLOCK_N, D0), dtype=tl.float32)
        dv1 = tl.zeros((BLOCK_N, D1), dtype=tl.float32)
        for m0 in range((n0 // BLOCK_M) * BLOCK_M, length, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            live = rows < length
            q0, q1 = _load(q_ptr + base, rows, live, H * D, D, D0, D1, HI)
            do0, do1 = _load(do_ptr + base, rows, live, H * D, D, D0, D1, HI)
            stat = (start + rows) * H + tl.program_id(2)
            lse = tl.load(lse_ptr + stat, mask=live, other=0.0) * 1.4426950408889634
            delta = tl.load(delta_ptr + stat, mask=live, other=0.0)
            keep = (rows[None, :] >= cols[:, None]) & live[None, :]
            probs_t = tl.exp2(_dot_t(k0, k1, q0, q1, HI) * qk_scale - lse[None, :])
            probs_t = tl.where(keep, probs_t, 0.0)
            low = probs_t.to(do0.dtype)
            dv0 += tl.dot(low, do0)
            if HI:
                dv1 += tl.dot(low, do1)
            d_scores_t = probs_t * (_dot_t(v0, v1, do0, do1, HI) - delta[None, :])
            d_scores_t = d_scores_t.to(q0.dtype)
            dk0 += tl.dot(d_scores_t, q0)
            if HI:
                dk1 += tl.dot(d_scores_t, q1)
        _store(dk_ptr + base, cols, valid, H * D, dk0 * scale, dk1 * scale, D, D0, D1, HI)
        _store(dv_ptr + base, cols, valid, H * D, dv0, dv1, D, D0, D1, HI)


def _grid(max_len: int, block: int, cu: torch.Tensor, heads: int) -> tuple[int, int, int]:
    return (triton.cdiv(max_len, block), cu.numel() - 1, heads)


@torch.library.custom_op("lit_cats::packed_causal_attention", mutates_args=())
def packed_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention inside each example of a packed row.

    Args:
        q: ``(tokens, heads, dim)``, contiguous; ``k`` and ``v`` alike.
        cu: int32 example boundaries ``(examples + 1,)``, from 0 to ``tokens``.
        max_len: The longest example's length.
        scale: Softmax scale.

    Returns:
        The output ``(tokens, heads, dim)`` and the softmax's log-sum-exp ``(tokens, heads)``.
    """
    tokens, heads, dim = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(tokens, heads, device=q.device, dtype=torch.float32)
    if tokens:
        _forward_kernel[_grid(max_len, FORWARD["BLOCK_M"], cu, heads)](
            q, k, v, out, lse, cu, scale * _LOG2E, heads, dim, *head_split(dim), **FORWARD
        )
    return out, lse


@packed_causal_attention.register_fake
def _(q, k, v, cu, max_len, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:2], dtype=torch.float32)


@torch.library.custom_op("lit_cats::packed_causal_attention_backward", mutates_args=())
def _packed_attention_backward(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu: Tensor,
    max_len: int, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Gradients of :func:`packed_causal_attention`'s output: ``dQ`` first (it stores
    ``delta``), then ``dK`` and ``dV``."""
    tokens, heads, dim = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if tokens:
        delta = torch.empty_like(lse)
        split = head_split(dim)
        _grad_q_kernel[_grid(max_len, GRAD_Q["BLOCK_M"], cu, heads)](
            q, k, v, out, grad, lse, delta, dq, cu, scale * _LOG2E, scale, heads, dim, *split,
            **GRAD_Q,
        )  # fmt: skip
        _grad_kv_kernel[_grid(max_len, GRAD_KV["BLOCK_N"], cu, heads)](
            q, k, v, grad, lse, delta, dk, dv, cu, scale * _LOG2E, scale, heads, dim, *split,
            **GRAD_KV,
        )  # fmt: skip
    return dq, dk, dv


@_packed_attention_backward.register_fake
def _(grad, q, k, v, out, lse, cu, max_len, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, cu, ctx.max_len, ctx.scale = inputs
    ctx.save_for_backward(q, k, v, *output, cu)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx: Any, grad: torch.Tensor, _grad_lse: Any) -> tuple:
    q, k, v, out, lse, cu = ctx.saved_tensors
    dq, dk, dv = _packed_attention_backward(
        grad.contiguous(), q, k, v, out, lse, cu, ctx.max_len, ctx.scale
    )
    return dq, dk, dv, None, None, None


packed_causal_attention.register_autograd(_backward, setup_context=_setup_context)
