"""Chunked linear + cross-entropy: the loss of a causal LM without its full-vocabulary logits.

transformers computes ``lm_head(hidden)`` for every position and upcasts the result to fp32: for
Phi-3 that is 32064 x 4 bytes = 125 KiB per token, plus as much again for its gradient, which
dominates activation memory at long sequences (4 GiB at 16k tokens). Here the output projection
and the cross-entropy run over ``chunk_size`` tokens at a time, and each chunk's gradient with
respect to the hidden states is computed at once (``softmax - one_hot``, as Liger's fused linear
cross-entropy does), so at most one chunk of logits ever exists.

The numbers are transformers' ``ForCausalLMLoss``: logits in the autocast dtype (fp32
accumulation), log-softmax in fp32, labels shifted by one, ``-100`` ignored, mean over the
label-carrying tokens.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lit_cats.data.formatting import IGNORE_INDEX


def _matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear(hidden, weight)`` computes in here (autocast's, if it is on)."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk_size: int,
    ) -> torch.Tensor:
        dtype = _matmul_dtype(hidden, weight)
        w = weight.to(dtype)
        valid = targets != IGNORE_INDEX
        count = valid.sum().clamp(min=1)
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_weight = None
        if weight.requires_grad:
            grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size].to(dtype)
            t = targets[start : start + chunk_size]
            logits = (h @ w.t()).float()
            loss_sum = loss_sum + F.cross_entropy(
                logits, t, ignore_index=IGNORE_INDEX, reduction="sum"
            )
            if grad_hidden is None and grad_weight is None:
                continue
            # d(sum of CE)/d(logits) = softmax - one_hot, zero on ignored rows.
            grad = torch.softmax(logits, dim=-1)
            keep = t != IGNORE_INDEX
            rows = torch.arange(t.shape[0], device=t.device)
            grad[rows, t.clamp(min=0)] -= 1.0
            grad.mul_(keep.unsqueeze(1))
            grad = grad.to(dtype)
            if grad_hidden is not None:
                grad_hidden[start : start + chunk_size] = (grad @ w).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += (grad.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight, count)
        ctx.weight_dtype = weight.dtype
        return loss_sum / count

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight, count = ctx.saved_tensors
        scale = grad_output / count
        gh = grad_hidden * scale.to(grad_hidden.dtype) if grad_hidden is not None else None
        gw = (grad_weight * scale).to(ctx.weight_dtype) if grad_weight is not None else None
        return gh, gw, None, None


def chunked_causal_lm_loss(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Mean next-token cross-entropy of ``hidden_states @ weight.T`` against ``labels``.

    Equal (up to float rounding) to ``ForCausalLMLoss(lm_head(hidden_states), labels)`` with no
    bias, without materialising more than ``chunk_size`` rows of logits.

    Args:
        hidden_states: Final hidden states ``(batch, seq, hidden)``.
        weight: Output projection ``(vocab, hidden)`` (``lm_head.weight``).
        labels: Unshifted labels ``(batch, seq)``; ``-100`` is ignored.
        chunk_size: Tokens per chunk of logits.

    Returns:
        A scalar fp32 loss.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    # Position t predicts labels[t + 1]; the last position of each row predicts nothing.
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets.to(hidden.device), chunk_size)
