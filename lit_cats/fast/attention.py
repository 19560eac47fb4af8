"""Padding-free packing: many short examples in one row, each attending only to itself.

At batch 2 of ~150 tokens the GPU idles: every step pays the full NF4 dequantization of the base
and thousands of kernel launches for a few hundred tokens. Packing concatenates the examples of a
step into one row of up to ``max_tokens`` tokens, with no padding at all:

- ``position_ids`` restart at 0 for every example, so rotary embeddings see each example exactly
  as they would alone;
- attention stays inside each example, over the cumulative sequence lengths ``cu_seq_lens``:
  on Hopper GPUs with Triton kernels sized for short examples
  (:mod:`lit_cats.fast.packed_attention`), on other GPUs with variable-length FlashAttention-2
  (``torch.nn.attention.varlen``), elsewhere with one causal SDPA call per example (tests, CPU: a
  custom op, so ``torch.compile``d layers keep it whole).
  A row whose examples all have the same length (fixed-length chunks of a long text) is one
  batch of equal sequences: one batched causal attention call, through cuDNN on Hopper GPUs.
  Each GPU choice was measured faster than FlashAttention-2 there (``benchmarks/RESULTS.md``);
- the first token of every example carries no label, so no example learns to predict the next
  example's first token, and the mean loss equals the unpacked batch's loss over the same tokens.

The attention function is registered with transformers as :data:`VARLEN_ATTENTION` and used only
for packed training batches (:meth:`lit_cats.fast.SpeedKit.prepare_step` switches to it for each
packed step, gradient checkpointing's recompute included); everything else keeps the configured
backend. It needs no attention mask, so transformers builds none (no ``T x T`` mask, no host sync).
"""

from __future__ import annotations

import inspect
import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface

from lit_cats.fast import packed_attention

#: Name under which the packed attention is registered in transformers' ``AttentionInterface``.
VARLEN_ATTENTION = "lit_cats_varlen"

#: What ``varlen_attn`` accepts in this torch version (``causal``: its causality keyword;
#: ``has_scale``: whether it takes ``scale``), read once at registration (``inspect`` cannot run
#: inside a ``torch.compile``d layer).
_VARLEN_SIGNATURE: dict[str, Any] = {}


def _varlen_signature() -> dict[str, Any]:
    if not _VARLEN_SIGNATURE:
        from torch.nn.attention.varlen import varlen_attn

        params = inspect.signature(varlen_attn).parameters
        # torch >= 2.12 spells causality as a window.
        causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
        _VARLEN_SIGNATURE.update(causal=causal, has_scale="scale" in params)
    return _VARLEN_SIGNATURE


def _flash_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu: torch.Tensor,
    max_len: int,
    scale: float,
) -> torch.Tensor:
    """Causal variable-length FlashAttention over ``(total, heads, dim)`` tensors (CUDA)."""
    from torch.nn.attention.varlen import varlen_attn

    signature = _varlen_signature()
    kwargs = dict(signature["causal"])
    if signature["has_scale"]:
        kwargs["scale"] = scale
    elif abs(scale - q.shape[-1] ** -0.5) > 1e-12:
        raise ValueError("This torch's varlen_attn has no scale argument; upgrade torch.")
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kwargs)


def _segmented_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float
) -> torch.Tensor:
    """The same computation as one causal SDPA call per example (reference and CPU path)."""
    bounds = cu.tolist()
    outs = []
    for start, end in itertools.pairwise(bounds):
        # (len, heads, dim) -> (1, heads, len, dim)
        qs, ks, vs = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
        outs.append(out.squeeze(0).transpose(0, 1))
    return torch.cat(outs)


# The per-example loop reads the boundaries on the host, which torch.compile cannot trace; as a
# custom op it is one opaque node in a compiled layer's graph (as the CUDA varlen kernel is).
@torch.library.custom_op("lit_cats::segmented_causal_attention", mutates_args=())
def segmented_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal attention inside each example of a packed ``(total, heads, dim)`` row."""
    return _segmented_sdpa(q, k, v, cu, scale)


@segmented_causal_attention.register_fake
def _(q, k, v, cu, scale):
    return torch.empty_like(q)


def _fake_gradients(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The fake kernel of every attention backward op here: gradients shaped as q, k and v."""
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@torch.library.custom_op("lit_cats::segmented_causal_attention_backward", mutates_args=())
def _segmented_attention_backward(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, cu: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`segmented_causal_attention`, recomputed per example (fp32 at least).

    Written out (autograd does not run inside a custom op): ``P = softmax(q k^T s)``,
    ``dV = P^T dO``, ``dS = P * (dO v^T - rowsum(dO * O))``, ``dQ = dS k s``, ``dK = dS^T q s``.
    """
    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
    work = torch.promote_types(q.dtype, torch.float32)
    for start, end in itertools.pairwise(cu.tolist()):
        # (len, heads, dim) -> (heads, len, dim), in fp32 at least
        qs, ks, vs, gs = (t[start:end].transpose(0, 1).to(work) for t in (q, k, v, grad))
        n = end - start
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        scores = (qs @ ks.transpose(1, 2) * scale).masked_fill(~causal, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out = probs @ vs
        d_scores = probs * (gs @ vs.transpose(1, 2) - (gs * out).sum(-1, keepdim=True))
        dq[start:end] = (d_scores @ ks * scale).transpose(0, 1).to(dq.dtype)
        dk[start:end] = (d_scores.transpose(1, 2) @ qs * scale).transpose(0, 1).to(dk.dtype)
        dv[start:end] = (probs.transpose(1, 2) @ gs).transpose(0, 1).to(dv.dtype)
    return dq, dk, dv


@_segmented_attention_backward.register_fake
def _(grad, q, k, v, cu, scale):
    return _fake_gradients(q, k, v)


def _setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    q, k, v, cu, scale = inputs
    ctx.save_for_backward(q, k, v, cu)
    ctx.scale = scale


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    q, k, v, cu = ctx.saved_tensors
    dq, dk, dv = _segmented_attention_backward(grad.contiguous(), q, k, v, cu, ctx.scale)
    return dq, dk, dv, None, None


segmented_causal_attention.register_autograd(_backward, setup_context=_setup_context)


#: CUDA device index -> whether cuDNN's fused attention is used there (Hopper, cuDNN present),
#: read once at registration (device queries cannot run inside a ``torch.compile``d layer).
_CUDNN_DEVICES: dict[int, bool] = {}

#: CUDA device index -> whether :mod:`lit_cats.fast.packed_attention`'s Triton kernels serve packed
#: rows of unequal examples there (Hopper: measured faster than FlashAttention-2 there;
#: elsewhere unmeasured), read once at registration.
_TRITON_DEVICES: dict[int, bool] = {}


def _packed_kernels_apply(q: torch.Tensor) -> bool:
    return packed_attention.applies(q) and _TRITON_DEVICES.get(q.device.index, False)


def _cudnn_attention_applies(q: torch.Tensor) -> bool:
    """Whether cuDNN's fused attention serves batched causal attention of ``q``'s kind here.

    Hopper only: measured faster than FlashAttention-2 there; elsewhere unmeasured.
    """
    return (
        q.is_cuda
        and _CUDNN_DEVICES.get(q.device.index, False)
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] % 8 == 0
        and q.shape[-1] <= 128
    )


def _batched(t: torch.Tensor, count: int) -> torch.Tensor:
    """``(count * length, heads, dim)`` -> ``(count, heads, length, dim)``, a view."""
    return t.unflatten(0, (count, -1)).transpose(1, 2)


def _unbatched(t: torch.Tensor) -> torch.Tensor:
    """``(count, heads, length, dim)`` -> ``(count * length, heads, dim)``."""
    return t.transpose(1, 2).flatten(0, 1)


# cuDNN's attention as one opaque op on the same contiguous (total, heads, dim) tensors as the
# varlen kernel: inside a compiled layer, Inductor then feeds it exactly as it feeds varlen
# FlashAttention (with aten's SDPA op in the graph it wrote q, k and v in three extra kernels).
@torch.library.custom_op("lit_cats::cudnn_causal_attention", mutates_args=())
def _cudnn_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, count: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of ``count`` equal-length examples; returns the output and the
    softmax's log-sum-exp (``(count, heads, length, 1)``, fp32) for the backward."""
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        _batched(q, count),
        _batched(k, count),
        _batched(v, count),
        None,
        True,
        0.0,
        True,
        False,
        scale=scale,
    )[:2]
    return _unbatched(out).contiguous(), lse


@_cudnn_causal_attention.register_fake
def _(q, k, v, count, scale):
    lse = q.new_empty((count, q.shape[1], q.shape[0] // count, 1), dtype=torch.float32)
    return torch.empty_like(q), lse


@torch.library.custom_op("lit_cats::cudnn_causal_attention_backward", mutates_args=())
def _cudnn_causal_attention_backward(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, count: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Gradients of :func:`_cudnn_causal_attention` (cuDNN's fused backward)."""
    length = q.shape[0] // count
    unused = torch.zeros((), dtype=torch.int64, device=q.device)  # dropout's seed and offset
    grads = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        *(_batched(t, count) for t in (grad, q, k, v, out)),
        lse,
        unused,
        unused,
        None,
        None,
        None,
        length,
        length,
        0.0,
        True,
        scale=scale,
    )
    return tuple(_unbatched(g).contiguous() for g in grads)  # type: ignore[return-value]


@_cudnn_causal_attention_backward.register_fake
def _(grad, q, k, v, out, lse, count, scale):
    return _fake_gradients(q, k, v)


def _cudnn_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, ctx.count, ctx.scale = inputs
    ctx.save_for_backward(q, k, v, *output)


def _cudnn_backward(ctx: Any, grad: torch.Tensor, _grad_lse: Any) -> tuple:
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _cudnn_causal_attention_backward(
        grad.contiguous(), q, k, v, out, lse, ctx.count, ctx.scale
    )
    return dq, dk, dv, None, None


_cudnn_causal_attention.register_autograd(_cudnn_backward, setup_context=_cudnn_setup_context)


def _equal_length_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, count: int, scale: float
) -> torch.Tensor:
    """Causal attention over ``count`` examples of equal length, packed as
    ``(count * length, heads, dim)``: one batched call, cuDNN's on CUDA (the caller sends CUDA
    rows here only where :func:`_cudnn_attention_applies`), else SDPA."""
    if q.is_cuda:
        return _cudnn_causal_attention(q, k, v, count, scale)[0]
    qb, kb, vb = (_batched(t, count) for t in (q, k, v))
    return _unbatched(F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale))


def varlen_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function for packed rows (see the module docstring).

    Args:
        module: The attention module (unused; part of transformers' interface).
        query: ``(1, heads, total, dim)``.
        key: ``(1, kv_heads, total, dim)``.
        value: ``(1, kv_heads, total, dim)``.
        attention_mask: Must be None: packed rows are described by ``cu_seq_lens_q``.
        dropout: Attention dropout; must be 0 (Phi-3 uses none).
        scaling: Softmax scale (default ``dim ** -0.5``).
        sliding_window: Phi-3's window; every packed example must fit inside it.
        **kwargs: ``cu_seq_lens_q`` and ``max_length_q`` from :func:`pack_examples`.

    Returns:
        The attention output ``(1, total, heads, dim)`` and no weights.

    Raises:
        ValueError: Without packing information, with a mask, with dropout, or when an example
            is longer than the sliding window.
    """
    cu, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is None or max_len is None or attention_mask is not None or query.shape[0] != 1:
        raise ValueError(
            f"The {VARLEN_ATTENTION!r} attention runs only on packed batches (one row, "
            "cu_seq_lens_q/max_length_q given, no attention mask); use 'sdpa' otherwise."
        )
    if dropout:
        raise ValueError(f"{VARLEN_ATTENTION!r} attention has no dropout; got {dropout}.")
    if sliding_window is not None and max_len > sliding_window:
        raise ValueError(
            f"A packed example of {max_len} tokens exceeds the model's sliding window "
            f"({sliding_window}); lower max_seq_length or train without packing."
        )
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: repeat the key/value heads
        key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    # (1, heads, total, dim) -> (total, heads, dim)
    q, k, v = (t.squeeze(0).transpose(0, 1).contiguous() for t in (query, key, value))
    count = cu.shape[0] - 1
    if q.shape[0] == count * max_len and (not q.is_cuda or _cudnn_attention_applies(q)):
        # Every example has the longest one's length: a batch of equal sequences.
        out = _equal_length_attention(q, k, v, count, scale)
    elif _packed_kernels_apply(q):
        out = packed_attention.packed_causal_attention(q, k, v, cu, int(max_len), scale)[0]
    elif q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        out = _flash_varlen(q, k, v, cu, int(max_len), scale)
    else:
        out = segmented_causal_attention(q, k, v, cu, scale)
    return out.unsqueeze(0), None


def register_varlen_attention() -> str:
    """Register :func:`varlen_attention_forward` with transformers (idempotent); return its name.

    Registered for attention only, not for mask creation: transformers then builds no mask at
    all for it, which is what packed rows need.
    """
    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    if torch.cuda.is_available():
        _varlen_signature()
        for index in range(torch.cuda.device_count()):
            hopper = torch.cuda.get_device_capability(index)[0] == 9
            _CUDNN_DEVICES.setdefault(index, torch.backends.cudnn.is_available() and hopper)
            _TRITON_DEVICES.setdefault(index, packed_attention.triton is not None and hopper)
    return VARLEN_ATTENTION
