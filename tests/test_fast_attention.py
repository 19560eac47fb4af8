"""Attention for packed rows (lit_cats.fast.attention, lit_cats.fast.packed_attention): each
example attends only to itself, whichever kernel serves the row.

Packing regroups the same bf16 operations as the padded batch: loss within 2e-4, worst LoRA
gradient within 2e-2.
"""

from __future__ import annotations

import pytest
import torch
from conftest import relative_error

from lit_cats.data.collate import pack_examples
from lit_cats.fast import attention, packed_attention
from lit_cats.fast.attention import (
    _segmented_sdpa,
    segmented_causal_attention,
    varlen_attention_forward,
)


def test_varlen_attention_keeps_examples_apart(make_examples):
    torch.manual_seed(0)
    lengths = [4, 7, 5]
    q, k, v = (torch.randn(1, 2, sum(lengths), 8) for _ in range(3))
    packed = pack_examples(make_examples(lengths))
    out, _ = varlen_attention_forward(
        None, q, k, v, None, cu_seq_lens_q=packed["cu_seq_lens_q"], max_length_q=7
    )
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, sl], k[:, :, sl], v[:, :, sl], is_causal=True
        ).transpose(1, 2)
        torch.testing.assert_close(out[:, sl], ref)
        start += n


def test_varlen_attention_refuses_a_batch_that_is_not_packed():
    q = torch.randn(1, 2, 6, 8)
    with pytest.raises(ValueError, match="only on packed batches"):
        varlen_attention_forward(None, q, q, q, None)


def test_equal_length_packs_attend_as_one_batch(monkeypatch):
    """A row of equal-length examples takes the batched path, with the per-example result."""
    calls = []
    batched = attention._equal_length_attention
    monkeypatch.setattr(
        attention, "_equal_length_attention", lambda *a: calls.append(a[3]) or batched(*a)
    )
    torch.manual_seed(0)
    cu = torch.tensor([0, 6, 12, 18], dtype=torch.int32)
    q, k, v = (torch.randn(1, 2, 18, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out, _ = varlen_attention_forward(None, q, k, v, None, cu_seq_lens_q=cu, max_length_q=6)
    assert calls == [3]
    flat = [t.squeeze(0).transpose(0, 1) for t in (q, k, v)]
    ref = _segmented_sdpa(*flat, cu, 8**-0.5).unsqueeze(0)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    for g, r in zip(
        torch.autograd.grad(out, (q, k, v), grad),
        torch.autograd.grad(ref, (q, k, v), grad),
        strict=True,
    ):
        torch.testing.assert_close(g, r)
    # Unequal lengths keep the per-example path.
    cu = torch.tensor([0, 6, 11, 18], dtype=torch.int32)
    varlen_attention_forward(None, q, k, v, None, cu_seq_lens_q=cu, max_length_q=7)
    assert calls == [3]


@pytest.mark.gpu
def test_equal_length_packs_use_cudnn_and_match_flash_varlen_on_gpu():
    """Hopper: the batched path is cuDNN's fused attention; it matches varlen FlashAttention-2."""
    attention.register_varlen_attention()
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("cuDNN attention is used on Hopper GPUs only")
    torch.manual_seed(0)
    count, length, heads, dim = 4, 1024, 8, 96
    cu = torch.arange(0, (count + 1) * length, length, dtype=torch.int32, device="cuda")
    qkv = [
        torch.randn(count * length, heads, dim, device="cuda", dtype=torch.bfloat16)
        for _ in range(3)
    ]
    assert attention._cudnn_attention_applies(qkv[0])
    grad = torch.randn_like(qkv[0])
    results = []
    for attend in (
        lambda q, k, v: attention._equal_length_attention(q, k, v, count, dim**-0.5),
        lambda q, k, v: attention._flash_varlen(q, k, v, cu, length, dim**-0.5),
    ):
        inputs = [t.clone().requires_grad_() for t in qkv]
        out = attend(*inputs)
        results.append((out, *torch.autograd.grad(out, inputs, grad)))
    for got, ref in zip(*results, strict=True):
        torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)
    # Registration (schema, fake tensors, autograd) as torch.compile relies on it.
    inputs = [t[: 2 * length].clone().requires_grad_() for t in qkv]
    torch.library.opcheck(attention._cudnn_causal_attention, (*inputs, 2, dim**-0.5))


def test_segmented_attention_op_has_sdpa_gradients():
    torch.manual_seed(0)
    cu = torch.tensor([0, 4, 11, 16], dtype=torch.int32)
    q, k, v = (torch.randn(16, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    grad = torch.randn(16, 2, 8, dtype=torch.float64)
    out = segmented_causal_attention(q, k, v, cu, 0.3)
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref_out = _segmented_sdpa(q, k, v, cu, 0.3)  # plain SDPA calls, torch's own backward
    ref = torch.autograd.grad(ref_out, (q, k, v), grad)
    torch.testing.assert_close(out, ref_out)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r)
    # Registration (schema, fake tensor kernel, autograd) as torch.compile relies on it.
    torch.library.opcheck(segmented_causal_attention, (q, k, v, cu, 0.3))


# Examples of 1 token, of a partial block, of several blocks (64-row blocks); head dims with no
# remainder (64), with a 32-wide remainder (96, Phi-3's) and with a masked one (24 = 16 + 8 of 16).
_PACKED_ATTENTION_CHECK = """
import torch
from lit_cats.fast import packed_attention as pa
from lit_cats.fast.attention import _segmented_sdpa
torch.manual_seed(0)
lengths = [1, 70, 5, 130, 64]
cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
for dim in (24, 64, 96):
    for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 2e-2)):
        q, k, v, grad = (torch.randn(sum(lengths), 2, dim).to(dtype) for _ in range(4))
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = pa.packed_causal_attention(*inputs, cu, max(lengths), 0.3)
        grads = torch.autograd.grad(out, inputs, grad)
        exact = [t.double().requires_grad_() for t in (q, k, v)]
        ref = _segmented_sdpa(*exact, cu, 0.3)
        ref_grads = torch.autograd.grad(ref, exact, grad.double())
        ref_lse = torch.cat([
            torch.logsumexp((qs.transpose(0, 1) @ ks.permute(1, 2, 0) * 0.3).masked_fill(
                torch.ones(len(qs), len(qs), dtype=torch.bool).triu(1), float("-inf")), -1).t()
            for qs, ks in zip(exact[0].split(lengths), exact[1].split(lengths))
        ])
        rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
        errors = [rel(out, ref), rel(lse, ref_lse)] + [rel(g, r) for g, r in zip(grads, ref_grads)]
        assert max(errors) < tol, (dim, dtype, errors)
    assert pa.head_split(dim)[2] == (dim != 64)
torch.library.opcheck(pa.packed_causal_attention, (*inputs, cu, max(lengths), 0.3))
print("packed attention ok")
"""


def test_packed_attention_kernels_equal_sdpa_in_tritons_interpreter(run_in_tritons_interpreter):
    """The Triton kernels for packed rows, run on the CPU by Triton's interpreter: output,
    log-sum-exp and the three gradients of per-example causal SDPA (fp64), fp32 and fp16 (the
    interpreter has no bf16); the op's registration as torch.compile relies on it."""
    done = run_in_tritons_interpreter(_PACKED_ATTENTION_CHECK)
    assert done.returncode == 0 and "packed attention ok" in done.stdout, done.stderr[-3000:]


@pytest.mark.gpu
def test_packed_attention_kernels_on_gpu(monkeypatch):
    """Phi-3's shape (32 heads of 96), bf16: the Triton kernels are as close to an fp32
    reference as varlen FlashAttention-2 is, and Hopper GPUs take them for unequal examples."""
    attention.register_varlen_attention()
    torch.manual_seed(0)
    lengths = [*torch.randint(32, 257, (40,)).tolist(), 1, 2, 300]
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32).cuda()
    scale = 96**-0.5
    qkv = [torch.randn(sum(lengths), 32, 96, device="cuda").bfloat16() for _ in range(3)]
    grad = torch.randn_like(qkv[0])
    exact = [t.float().requires_grad_() for t in qkv]
    ref = _segmented_sdpa(*exact, cu, scale)
    ref = (ref, *torch.autograd.grad(ref, exact, grad.float()))
    errors = {}
    for name, attend in (
        ("triton", lambda *t: packed_attention.packed_causal_attention(*t, cu, 300, scale)[0]),
        ("flash", lambda *t: attention._flash_varlen(*t, cu, 300, scale)),
    ):
        inputs = [t.clone().requires_grad_() for t in qkv]
        out = attend(*inputs)
        got = (out, *torch.autograd.grad(out, inputs, grad))
        errors[name] = [relative_error(g.float(), r) for g, r in zip(got, ref, strict=True)]
    assert all(t <= 1.1 * f + 1e-4 for t, f in zip(*errors.values(), strict=True)), errors
    # Registration on CUDA tensors: the last three examples (1, 2 and 300 tokens).
    last = [t[-303:].clone().requires_grad_() for t in qkv]
    torch.library.opcheck(
        packed_attention.packed_causal_attention, (*last, cu[-4:] - cu[-4], 300, scale)
    )
    if torch.cuda.get_device_capability()[0] != 9:
        return
    calls = []
    real = packed_attention.packed_causal_attention
    monkeypatch.setattr(
        packed_attention, "packed_causal_attention", lambda *a: calls.append(1) or real(*a)
    )
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in qkv)
    varlen_attention_forward(None, q, k, v, None, cu_seq_lens_q=cu, max_length_q=300)
    assert calls


def test_packed_loss_and_gradients_equal_the_padded_batch(
    make_examples, padded, speed_module, loss_and_grads, assert_steps_close
):
    examples = make_examples([40, 17, 63, 25])
    module = speed_module()
    ref = loss_and_grads(module, padded(examples))
    packed = loss_and_grads(module, pack_examples(examples))
    assert_steps_close(packed, ref, loss_tol=2e-4, grad_tol=2e-2)
