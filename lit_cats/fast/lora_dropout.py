"""LoRA's input dropout inside the LoRA-A matmul: the mask is drawn from a seed, never stored.

peft computes ``lora_A(dropout(x))``: a kernel draws one random number per element of ``x``,
writes the dropped copy and a mask, and the backward reads both: a ``(tokens, in_features)``
mask per LoRA layer, drawn twice per checkpointed step (forward and rerun). Here
``dropout(x) @ A.T`` is one op (:func:`dropout_lora_a`): on CUDA a Triton kernel reads ``x``
once, draws the mask as it goes and multiplies by ``A`` in the same pass. Its backward is one
kernel too: it draws the same mask again from the same seed and writes the gradient of ``x``
while it sums the gradient of ``A``. Nothing of size ``(tokens, in_features)`` is stored but
``x`` itself.

The mask is Philox-4x32-10, counter based (Triton's ``randint4x``, the generator behind
``tl.rand``; Random123's known answer is tested). One evaluation serves 8 elements, 16 bits each,
where ``tl.rand`` spends one per element: element ``(n, k)`` of an ``(N, K)`` input takes half
``k % 2`` of word ``k % 8 // 2`` of counter ``(n * K + k) // 8`` (:func:`keep_mask`). An element
is kept when its 16 bits are at least ``round(p * 65536)``, and kept values are scaled by the
exact inverse of the keep probability: unbiased, with ``p`` rounded to a multiple of 1/65536
(0.05 becomes 0.050003). Every draw depends on the seed and the position only, so a checkpointed
layer's rerun and the backward see the very mask the forward used; the seed comes from torch's
generator, whose state checkpointing saves and restores. That generator is the device's CUDA
generator, which training checkpoints save per rank (:class:`lit_cats.callbacks.RNGState`): a
resumed run draws the seeds the interrupted one would have. Inside compiled, checkpointed layers
the rerun does not even draw again: it reuses the forward's outputs, ``(tokens, rank)`` each
(:func:`lit_cats.fast.recompute.checkpoint_contexts`). What it buys is measured in
benchmarks/RESULTS.md.

:func:`keep_mask` computes the same mask with torch ops, bit for bit (tested against the kernels
on a GPU); the op runs on it where there is no Triton (the CPU).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from lit_cats.fast import recompute


def threshold(p: float) -> int:
    """Elements whose 16 random bits fall below this are dropped: ``round(p * 65536)``."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return round(p * 65536)


def keep_scale(p: float) -> float:
    """What kept elements are multiplied by: the inverse of the exact keep probability."""
    return 65536 / (65536 - threshold(p))


# ------------------------------------------------------------------ the reference, in torch ops
_MASK32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57


def _mul32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``a * b`` for uint32 values held in int64 (16-bit limbs, so no
    intermediate overflows int64)."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    b_hi, b_lo = b >> 16, b & 0xFFFF
    middle = a_hi * b_lo + a_lo * b_hi
    low = a_lo * b_lo + ((middle & 0xFFFF) << 16)
    high = (a_hi * b_hi + (middle >> 16) + (low >> 32)) & _MASK32
    return high, low & _MASK32


def philox(seed: int, counter: torch.Tensor) -> list[torch.Tensor]:
    """Philox-4x32-10 of ``(counter, 0, 0, 0)`` under key ``seed``, as Triton's
    ``randint4x(seed, counter)`` computes it for int32 counters: four uint32 blocks (int64)."""
    c0 = counter.to(torch.int64) & _MASK32
    c1, c2, c3 = (torch.zeros_like(c0) for _ in range(3))
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi_b, lo_b = _mul32(_ROUND_B, c2)
        hi_a, lo_a = _mul32(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return [c0, c1, c2, c3]


def keep_mask(seed: int, rows: int, cols: int, p: float, device: Any = None) -> torch.Tensor:
    """The ``(rows, cols)`` boolean mask of kept elements that :func:`dropout_lora_a` applies
    under ``seed`` (``cols`` a multiple of 8)."""
    if cols % 8:
        raise ValueError(f"the input width must be a multiple of 8, got {cols}")
    words = philox(seed, torch.arange(rows * cols // 8, device=device))
    halves = [half for word in words for half in (word & 0xFFFF, word >> 16)]
    bits = torch.stack(halves, dim=-1).reshape(rows, cols)  # column 8 c + 2 word + half
    return bits >= threshold(p)


def _reference(x: torch.Tensor, lora_a: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The forward in torch ops, rounded as the kernel rounds: 16-bit products summed in fp32,
    then the scale."""
    keep = keep_mask(seed, x.shape[0], x.shape[1], p, x.device)
    low = torch.where(keep, x, 0).float() @ lora_a.to(x.dtype).float().t()
    return (low * keep_scale(p)).to(x.dtype)


def _reference_backward(
    grad: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, p: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    keep = keep_mask(seed, x.shape[0], x.shape[1], p, x.device)
    grad_x = (grad.float() @ lora_a.to(x.dtype).float()) * keep_scale(p)
    grad_a = grad.float().t() @ torch.where(keep, x, 0).float()
    return torch.where(keep, grad_x, 0).to(x.dtype), (grad_a * keep_scale(p)).to(lora_a.dtype)


# ------------------------------------------------------------------- the Triton kernels (CUDA)
try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch: the op runs on its torch reference
    triton = None

if triton is not None:

    @triton.jit
    def _keep(seed, rows, col0, K, thresh, BM: tl.constexpr, BK: tl.constexpr):
        """The (BM, BK) keep mask of ``rows`` and columns col0 .. col0 + BK - 1."""
        counters = rows[:, None] * (K // 8) + (col0 // 8 + tl.arange(0, BK // 8))[None, :]
        r0, r1, r2, r3 = tl.randint4x(seed, counters.to(tl.int32))
        # tl.join appends its new axis last: join the word's high bit first and the half last,
        # so that column 8 * counter + 2 * word + half reads its bits, keep_mask's order.
        low = tl.join(tl.join(r0 & 0xFFFF, r2 & 0xFFFF), tl.join(r1 & 0xFFFF, r3 & 0xFFFF))
        high = tl.join(tl.join(r0 >> 16, r2 >> 16), tl.join(r1 >> 16, r3 >> 16))
        return tl.reshape(tl.join(low, high), (BM, BK)) >= thresh

    @triton.jit
    def _forward_kernel(x_ptr, a_ptr, out_ptr, seed_ptr, N, K, R, thresh, scale,
                        BM: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr):  # fmt: skip
        """out[n, :] = scale * sum_k keep(n, k) x[n, k] A[:, k]: one program per BM rows."""
        seed = tl.load(seed_ptr)
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        ranks = tl.arange(0, RP)
        acc = tl.zeros((BM, RP), dtype=tl.float32)
        for col0 in range(0, K, BK):
            cols = col0 + tl.arange(0, BK)
            x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=rows[:, None] < N, other=0)
            x = tl.where(_keep(seed, rows, col0, K, thresh, BM, BK), x, 0)
            a = tl.load(
                a_ptr + ranks[None, :] * K + cols[:, None], mask=ranks[None, :] < R, other=0
            )
            acc = tl.dot(x, a.to(x.dtype), acc)
        out = (acc * scale).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rows[:, None] * R + ranks[None, :], out,
                 mask=(rows[:, None] < N) & (ranks[None, :] < R))  # fmt: skip

    @triton.jit
    def _backward_kernel(g_ptr, x_ptr, a_ptr, gx_ptr, ga_ptr, seed_ptr, N, K, R, thresh, scale,
                         rows_per_split, BM: tl.constexpr, BK: tl.constexpr,
                         RP: tl.constexpr):  # fmt: skip
        """For one block of BK columns and one split of the rows, the mask drawn once per tile:
        gx[n, k] = scale * keep(n, k) * sum_r g[n, r] A[r, k] and
        ga[split, r, k] = sum_n g[n, r] keep(n, k) x[n, k] (scaled by the caller)."""
        seed = tl.load(seed_ptr)
        col0, split = tl.program_id(0) * BK, tl.program_id(1)
        cols, ranks = col0 + tl.arange(0, BK), tl.arange(0, RP)
        a = tl.load(a_ptr + ranks[:, None] * K + cols[None, :], mask=ranks[:, None] < R, other=0)
        acc = tl.zeros((RP, BK), dtype=tl.float32)
        for row0 in range(split * rows_per_split, (split + 1) * rows_per_split, BM):
            rows = row0 + tl.arange(0, BM)
            inside = rows[:, None] < N
            g = tl.load(g_ptr + rows[:, None] * R + ranks[None, :],
                        mask=inside & (ranks[None, :] < R), other=0)  # fmt: skip
            keep = _keep(seed, rows, col0, K, thresh, BM, BK)
            gx = tl.where(keep, tl.dot(g, a.to(g.dtype)) * scale, 0)
            tl.store(gx_ptr + rows[:, None] * K + cols[None, :], gx.to(gx_ptr.dtype.element_ty),
                     mask=inside)  # fmt: skip
            x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=inside, other=0)
            g_t = tl.load(g_ptr + rows[None, :] * R + ranks[:, None],
                          mask=(rows[None, :] < N) & (ranks[:, None] < R), other=0)  # fmt: skip
            acc = tl.dot(g_t, tl.where(keep, x, 0), acc)
        tl.store(ga_ptr + (split * RP + ranks[:, None]) * K + cols[None, :], acc)


# Rows x columns per tile, the fastest of those tried at 16k rows and Phi-3's widths (3072, 8192)
# (measured in benchmarks/RESULTS.md).
_FORWARD_TILE, _BACKWARD_TILE = (32, 128), (64, 64)
_WIDTH_MULTIPLE = 128


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _padded_rank(rank: int) -> int:
    return max(16, 1 << (rank - 1).bit_length())  # tl.dot wants every dimension >= 16


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def applies(x: torch.Tensor, lora_a: torch.Tensor) -> bool:
    """Where the op replaces peft's dropout and ``lora_A`` (:mod:`lit_cats.fast.lora`): where
    its Triton kernels run."""
    return _kernels_run(x, lora_a)


def _kernels_run(x: torch.Tensor, lora_a: torch.Tensor) -> bool:
    """A 2-D 16-bit CUDA input whose width is a multiple of the kernels' 128-column tile, a LoRA
    rank of at most 128, and Triton. Elsewhere the op runs on its torch reference."""
    return (
        x.is_cuda
        and triton is not None
        and x.dim() == 2
        and x.dtype in (torch.bfloat16, torch.float16)
        and x.shape[1] % _WIDTH_MULTIPLE == 0
        and lora_a.shape[0] <= 128
    )


def _triton_forward(
    x: torch.Tensor, lora_a: torch.Tensor, p: float, seed: torch.Tensor
) -> torch.Tensor:
    (n, k), rank = x.shape, lora_a.shape[0]
    out = x.new_empty(n, rank)
    if n:
        bm, bk = _FORWARD_TILE
        _forward_kernel[(_cdiv(n, bm),)](
            x, lora_a.contiguous(), out, seed, n, k, rank, threshold(p), keep_scale(p),
            BM=bm, BK=bk, RP=_padded_rank(rank), num_warps=4,
        )  # fmt: skip
    return out


def _triton_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    p: float,
    seed: torch.Tensor,
    sms: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    (n, k), rank = x.shape, lora_a.shape[0]
    (bm, bk), rp = _BACKWARD_TILE, _padded_rank(rank)
    blocks = k // bk
    sms = sms or _multiprocessors(x.device)
    splits = max(1, min(_cdiv(n, bm), _cdiv(4 * sms, blocks)))  # ~4 programs per SM
    rows_per_split = _cdiv(_cdiv(n, splits), bm) * bm
    splits = max(1, _cdiv(n, rows_per_split))
    grad_x = torch.empty_like(x)
    partial = x.new_empty(splits, rp, k, dtype=torch.float32)
    _backward_kernel[(blocks, splits)](
        grad, x, lora_a.contiguous(), grad_x, partial, seed, n, k, rank, threshold(p),
        keep_scale(p), rows_per_split, BM=bm, BK=bk, RP=rp, num_warps=4,
    )  # fmt: skip
    grad_a = (partial.sum(0)[:rank] * keep_scale(p)).to(lora_a.dtype)
    return grad_x, grad_a


# -------------------------------------------------------------------------------- the ops
@torch.library.custom_op("lit_cats::dropout_lora_a", mutates_args=())
def dropout_lora_a(
    x: torch.Tensor, lora_a: torch.Tensor, p: float, seed: torch.Tensor
) -> torch.Tensor:
    """``dropout(x, p) @ lora_a.T`` for a 2-D ``x``, in ``x``'s dtype, the mask drawn from
    ``seed`` (a 1-element int64 tensor) and never stored (:func:`keep_mask` is that mask)."""
    mode, outputs = recompute.stash() or (None, None)  # inside a checkpointed call: its outputs
    if mode == "reuse" and outputs:
        kept = outputs.popleft()
        if kept.shape == (x.shape[0], lora_a.shape[0]) and kept.device == x.device:
            return kept
        outputs.clear()
    x = x.contiguous()
    if _kernels_run(x, lora_a):
        out = _triton_forward(x, lora_a, p, seed)
    else:
        with torch.autocast(x.device.type, enabled=False):
            out = _reference(x, lora_a, p, int(seed.item()))
    if mode == "keep":  # a copy: compiled code may reuse the output's memory after its last use
        outputs.append(out.clone())
    return out


@dropout_lora_a.register_fake
def _(x, lora_a, p, seed):
    return x.new_empty(x.shape[0], lora_a.shape[0])


@torch.library.custom_op("lit_cats::dropout_lora_a_backward", mutates_args=())
def dropout_lora_a_backward(
    grad: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, p: float, seed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both gradients of :func:`dropout_lora_a`, the mask drawn once: ``keep * scale *
    (grad @ lora_a)`` for ``x`` and ``grad.T @ (keep * scale * x)`` for ``lora_a``."""
    grad, x = grad.contiguous(), x.contiguous()
    if _kernels_run(x, lora_a):
        return _triton_backward(grad, x, lora_a, p, seed)
    with torch.autocast(x.device.type, enabled=False):
        return _reference_backward(grad, x, lora_a, p, int(seed.item()))


@dropout_lora_a_backward.register_fake
def _(grad, x, lora_a, p, seed):
    return torch.empty_like(x), torch.empty_like(lora_a)


def _setup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    x, lora_a, p, seed = inputs
    ctx.save_for_backward(x, lora_a, seed)
    ctx.p = p


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    x, lora_a, seed = ctx.saved_tensors
    grad_x, grad_a = dropout_lora_a_backward(grad.to(x.dtype), x, lora_a, ctx.p, seed)
    need_x, need_a = ctx.needs_input_grad[:2]
    return grad_x if need_x else None, grad_a if need_a else None, None, None


dropout_lora_a.register_autograd(_backward, setup_context=_setup)
