"""Every speed feature computes the same loss and gradients as the plain path (tiny model, CPU).

Tolerances (relative; measured values in brackets): the tiny model runs the real 4-bit path
under bf16 autocast, as training does, with non-zero LoRA B so every gradient is exercised.
Packing and the chunked loss regroup the same bf16 operations: loss <= 2e-4 (2e-5, 0), worst
LoRA gradient <= 2e-2 (5e-3, 9e-3). The fused LoRA path and dropping the fp32 upcasts round
differently on purpose: loss <= 1e-3 (8e-5, 2e-4), gradients <= 5e-2 (2.3e-2, 2.7e-2). So do
compiled layers (Inductor fuses bf16 elementwise work): the same bounds (4.8e-5, 2.4e-2).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import CONFIGS, tiny_fit_args

from lit_cats.data.collate import pack_examples
from lit_cats.data.formatting import IGNORE_INDEX
from lit_cats.data.sampling import TokenBudgetBatchSampler
from lit_cats.fast.attention import VARLEN_ATTENTION, varlen_attention_forward
from lit_cats.fast.chunked_loss import chunked_causal_lm_loss
from lit_cats.fast.compile import has_cxx_compiler
from lit_cats.model import QLoRAModule
from lit_cats.tiny import TINY_MODEL_ID, tiny_model_path

#: torch.compile's CPU code is C++: without a compiler, model.compile refuses with the fix, and
#: the tests that compile on the CPU cannot run.
needs_cxx = pytest.mark.skipif(
    not has_cxx_compiler(), reason="torch.compile on the CPU needs a C++ compiler"
)


def _examples(lengths: list[int], seed: int = 0) -> list[dict[str, list[int]]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(5, 300, (n,), generator=gen).tolist()
        labels = list(ids)
        labels[: n // 3] = [IGNORE_INDEX] * (n // 3)  # a masked prompt, as chat data has
        out.append({"input_ids": ids, "labels": labels})
    return out


def _padded(examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    from lit_cats.data.collate import collate

    return collate(examples, pad_id=0)


def _module(device: str = "cpu", **kwargs) -> QLoRAModule:
    module = QLoRAModule(TINY_MODEL_ID, **{"lora_dropout": 0.0, **kwargs})
    if device == "cuda":
        import lightning as L

        module.trainer = L.Trainer(accelerator="gpu", devices=1, logger=False)  # loads on cuda:0
    tiny_model_path()  # built (seeding torch) before the seed below, never in between
    torch.manual_seed(0)  # the same LoRA A initialisation in every module compared
    module.configure_model()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero B, so gradients reach A and every path is exercised
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen).to(p.device) * 0.05)
    return module


def _loss_and_grads(module: QLoRAModule, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    device = next(module.parameters()).device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    module.zero_grad()
    module.on_train_batch_start(batch, 0)
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = module._training_loss(batch)
        loss.backward()
    finally:
        module.on_train_batch_end(None, batch, 0)
    grads = {
        n: p.grad.float().cpu().clone() for n, p in module.named_parameters() if p.requires_grad
    }
    return loss.item(), grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _assert_close(got, ref, loss_tol: float, grad_tol: float) -> None:
    (loss, grads), (ref_loss, ref_grads) = got, ref
    assert abs(loss - ref_loss) <= loss_tol * abs(ref_loss), (loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    worst = max(_rel(grads[k], ref_grads[k]) for k in grads)
    assert worst <= grad_tol, worst
    assert all(g.abs().sum() > 0 for g in grads.values())


# ------------------------------------------------------------------------------------ packing
def test_pack_examples_restarts_positions_and_masks_each_first_label():
    packed = pack_examples(_examples([3, 5, 2]))
    assert packed["input_ids"].shape == (1, 10)
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0, 1]]
    assert packed["cu_seq_lens_q"].tolist() == [0, 3, 8, 10]
    assert packed["cu_seq_lens_q"].dtype == torch.int32
    assert packed["max_length_q"] == 5
    labels = packed["labels"][0]
    assert labels[0] == labels[3] == labels[8] == IGNORE_INDEX


def test_token_budget_batches_cover_every_example_once_within_budget():
    lengths = torch.randint(32, 257, (500,), generator=torch.Generator().manual_seed(1)).tolist()
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=2048, seed=3)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 2048 for b in batches)
    assert len(sampler) == len(batches)
    # Full: on average a batch leaves less than one example's worth of room.
    assert sum(lengths) / len(batches) > 2048 - 257
    assert list(sampler) == batches  # deterministic for an epoch
    sampler.set_epoch(1)
    assert list(sampler) != batches
    shards = [
        list(TokenBudgetBatchSampler(lengths, 2048, 3, num_replicas=2, rank=r)) for r in (0, 1)
    ]
    assert len(shards[0]) == len(shards[1]) and not {i for b in shards[0] for i in b} & {
        i for b in shards[1] for i in b
    }
    with pytest.raises(ValueError, match="longest example"):
        TokenBudgetBatchSampler([10, 300], max_tokens=256)


def test_varlen_attention_keeps_examples_apart():
    torch.manual_seed(0)
    lengths = [4, 7, 5]
    q, k, v = (torch.randn(1, 2, sum(lengths), 8) for _ in range(3))
    packed = pack_examples(_examples(lengths))
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
    with pytest.raises(ValueError, match="only on packed batches"):
        varlen_attention_forward(None, q, k, v, None)


def test_equal_length_packs_attend_as_one_batch(monkeypatch):
    """A row of equal-length examples takes the batched path, with the per-example result."""
    from lit_cats.fast import attention as packing

    calls = []
    batched = packing._equal_length_attention
    monkeypatch.setattr(
        packing, "_equal_length_attention", lambda *a: calls.append(a[3]) or batched(*a)
    )
    torch.manual_seed(0)
    cu = torch.tensor([0, 6, 12, 18], dtype=torch.int32)
    q, k, v = (torch.randn(1, 2, 18, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out, _ = varlen_attention_forward(None, q, k, v, None, cu_seq_lens_q=cu, max_length_q=6)
    assert calls == [3]
    flat = [t.squeeze(0).transpose(0, 1) for t in (q, k, v)]
    ref = packing._segmented_sdpa(*flat, cu, 8**-0.5).unsqueeze(0)
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
    from lit_cats.fast import attention as packing

    packing.register_varlen_attention()
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("cuDNN attention is used on Hopper GPUs only")
    torch.manual_seed(0)
    count, length, heads, dim = 4, 1024, 8, 96
    cu = torch.arange(0, (count + 1) * length, length, dtype=torch.int32, device="cuda")
    qkv = [
        torch.randn(count * length, heads, dim, device="cuda", dtype=torch.bfloat16)
        for _ in range(3)
    ]
    assert packing._cudnn_attention_applies(qkv[0])
    grad = torch.randn_like(qkv[0])
    results = []
    for attend in (
        lambda q, k, v: packing._equal_length_attention(q, k, v, count, dim**-0.5),
        lambda q, k, v: packing._flash_varlen(q, k, v, cu, length, dim**-0.5),
    ):
        inputs = [t.clone().requires_grad_() for t in qkv]
        out = attend(*inputs)
        results.append((out, *torch.autograd.grad(out, inputs, grad)))
    for got, ref in zip(*results, strict=True):
        torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)
    # Registration (schema, fake tensors, autograd) as torch.compile relies on it.
    inputs = [t[: 2 * length].clone().requires_grad_() for t in qkv]
    torch.library.opcheck(packing._cudnn_causal_attention, (*inputs, 2, dim**-0.5))


def test_segmented_attention_op_has_sdpa_gradients():
    from lit_cats.fast.attention import _segmented_sdpa, segmented_causal_attention

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


def test_packed_attention_kernels_equal_sdpa_in_tritons_interpreter():
    """The Triton kernels for packed rows, run on the CPU by Triton's interpreter: output,
    log-sum-exp and the three gradients of per-example causal SDPA (fp64), fp32 and fp16 (the
    interpreter has no bf16); the op's registration as torch.compile relies on it."""
    done = run_in_tritons_interpreter(_PACKED_ATTENTION_CHECK)
    assert done.returncode == 0 and "packed attention ok" in done.stdout, done.stderr[-3000:]


@pytest.mark.gpu
def test_packed_attention_kernels_on_gpu(monkeypatch):
    """Phi-3's shape (32 heads of 96), bf16: the Triton kernels are as close to an fp32
    reference as varlen FlashAttention-2 is, and Hopper GPUs take them for unequal examples."""
    from lit_cats.fast import packed_attention, packing

    packing.register_varlen_attention()
    torch.manual_seed(0)
    lengths = [*torch.randint(32, 257, (40,)).tolist(), 1, 2, 300]
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32).cuda()
    scale = 96**-0.5
    qkv = [torch.randn(sum(lengths), 32, 96, device="cuda").bfloat16() for _ in range(3)]
    grad = torch.randn_like(qkv[0])
    exact = [t.float().requires_grad_() for t in qkv]
    ref = packing._segmented_sdpa(*exact, cu, scale)
    ref = (ref, *torch.autograd.grad(ref, exact, grad.float()))
    errors = {}
    for name, attend in (
        ("triton", lambda *t: packed_attention.packed_causal_attention(*t, cu, 300, scale)[0]),
        ("flash", lambda *t: packing._flash_varlen(*t, cu, 300, scale)),
    ):
        inputs = [t.clone().requires_grad_() for t in qkv]
        out = attend(*inputs)
        got = (out, *torch.autograd.grad(out, inputs, grad))
        errors[name] = [_rel(g.float(), r) for g, r in zip(got, ref, strict=True)]
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


def test_packed_loss_and_gradients_equal_the_padded_batch():
    examples = _examples([40, 17, 63, 25])
    module = _module()
    ref = _loss_and_grads(module, _padded(examples))
    packed = _loss_and_grads(module, pack_examples(examples))
    _assert_close(packed, ref, loss_tol=2e-4, grad_tol=2e-2)
    config = module.model.get_base_model().config
    assert config._attn_implementation == "sdpa"  # restored after the packed step


# ------------------------------------------------------------------------------- chunked loss
def test_chunked_loss_equals_full_logits_cross_entropy():
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :3] = IGNORE_INDEX
    logits = hidden @ weight.t()
    ref = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )
    ref.backward()
    ref_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    loss = chunked_causal_lm_loss(hidden, weight, labels, chunk_size=4)
    (2 * loss).backward()  # the upstream gradient is applied
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(hidden.grad, 2 * ref_grads[0])
    torch.testing.assert_close(weight.grad, 2 * ref_grads[1])


def test_chunked_loss_in_the_model_equals_transformers_loss():
    batch = _padded(_examples([40, 17, 63, 25]))
    ref = _loss_and_grads(_module(), batch)
    chunked = _loss_and_grads(_module(loss_chunk_size=16), batch)
    _assert_close(chunked, ref, loss_tol=1e-4, grad_tol=2e-2)


# ---------------------------------------------------------------------------------- fast LoRA
def test_fast_lora_equals_peft_lora():
    batch = _padded(_examples([40, 17, 63, 25]))
    ref = _loss_and_grads(_module(), batch)
    fast_module = _module(fast_lora=True)
    assert sum(hasattr(m, "_lit_cats_peft_forward") for m in fast_module.modules()) == 8
    _assert_close(_loss_and_grads(fast_module, batch), ref, loss_tol=1e-3, grad_tol=5e-2)


def test_fast_lora_keeps_dropout_and_disabled_adapters():
    module = _module(fast_lora=True)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    module.eval()
    with torch.no_grad():
        with_lora = module.model(input_ids=ids).logits
        with module.model.disable_adapter():
            without = module.model(input_ids=ids).logits
    assert not torch.equal(with_lora, without)


def test_no_fp32_upcast_stays_close():
    batch = _padded(_examples([40, 17, 63, 25]))
    ref = _loss_and_grads(_module(), batch)
    lean = _module(upcast_to_fp32=False)
    norm = lean.model.get_base_model().model.norm.weight
    assert norm.dtype == torch.bfloat16
    _assert_close(_loss_and_grads(lean, batch), ref, loss_tol=1e-3, grad_tol=5e-2)


def test_all_features_together_equal_the_plain_path():
    examples = _examples([40, 17, 63, 25])
    ref = _loss_and_grads(_module(), _padded(examples))
    fast = _module(loss_chunk_size=16, fast_lora=True, upcast_to_fp32=False)
    _assert_close(_loss_and_grads(fast, pack_examples(examples)), ref, 1e-3, 5e-2)


# ------------------------------------------------------------------------------------- config
def test_fast_config_trains_the_tiny_model_on_cpu(run_dir):
    from lit_cats.cli import main  # here, so the GPU tests run where the CLI's Hub extras are not

    main(
        tiny_fit_args(
            "--config",
            str(CONFIGS / "fast.yaml"),
            "--trainer.accelerator",
            "cpu",
            "--trainer.max_steps",
            "3",
            "--data.max_tokens_per_batch",
            "2048",
        )
    )
    adapter = run_dir / "logs" / "tiny-cats" / "version_0" / "adapter"
    assert (adapter / "adapter_model.safetensors").exists()


@needs_cxx
def test_compiled_fit_from_the_cli_resumes_and_saves_a_plain_adapter(run_dir):
    """``--model.compile true`` end to end: fit, checkpoint, resume, and a loadable adapter."""
    import torch._dynamo
    from safetensors.torch import load_file

    from lit_cats.cli import main

    torch._dynamo.reset()
    args = ("--config", str(CONFIGS / "fast.yaml"), "--model.compile", "true")
    args += ("--data.max_tokens_per_batch", "2048", "--trainer.val_check_interval", "1")
    graphs, breaks = _compiled_graphs_and_breaks()
    main(tiny_fit_args(*args, "--trainer.max_steps", "2"))  # validates and samples twice
    new_graphs, new_breaks = _compiled_graphs_and_breaks()
    assert new_breaks == breaks  # the layers compiled whole...
    # ...once, for the training step: validation and sampled generations ran them eagerly
    # (decoding alone would compile a graph per KV-cache state, past Dynamo's limit).
    assert new_graphs == graphs + 1
    main(tiny_fit_args(*args, "--trainer.max_steps", "4", "--ckpt_path", "last"))
    assert _compiled_graphs_and_breaks()[1] == breaks
    runs = run_dir / "logs" / "tiny-cats"
    ckpt = torch.load(runs / "version_1" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4  # resumed at 2, not restarted
    assert all("lora_" in key and "_orig_mod" not in key for key in ckpt["state_dict"])
    weights = load_file(runs / "version_1" / "adapter" / "adapter_model.safetensors")
    assert weights and all("_orig_mod" not in key for key in weights)
    torch._dynamo.reset()


def test_varlen_name_is_stable():
    assert VARLEN_ATTENTION == "lit_cats_varlen"


# ------------------------------------------------------------------------------ liger (GPU)
def test_liger_kernels_refuse_a_machine_without_them():
    module = QLoRAModule(TINY_MODEL_ID, liger_kernels=True)
    # Without the package: ImportError naming it; with it but no GPU: ValueError naming CUDA.
    with pytest.raises((ImportError, ValueError), match="liger"):
        module.configure_model()


def _cuda_module(**kwargs) -> QLoRAModule:
    return _module("cuda", **{"upcast_to_fp32": False, **kwargs})


@pytest.mark.gpu
def test_liger_kernels_equal_the_plain_path_on_gpu(monkeypatch):
    from transformers.models.phi3 import modeling_phi3

    # Liger rebinds Phi-3's rotary function for the process; give it back after this test.
    monkeypatch.setattr(modeling_phi3, "apply_rotary_pos_emb", modeling_phi3.apply_rotary_pos_emb)
    batch = _padded(_examples([40, 17, 63, 25]))
    ref = _loss_and_grads(_cuda_module(), batch)
    got = _loss_and_grads(_cuda_module(liger_kernels=True), batch)
    _assert_close(got, ref, loss_tol=1e-3, grad_tol=5e-2)


# ------------------------------------------------------------------------------ torch.compile
def _compiled_graphs_and_breaks() -> tuple[int, dict[str, int]]:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], dict(counters["graph_break"])


def test_compile_and_liger_are_alternatives():
    with pytest.raises(ValueError, match="alternatives"):
        QLoRAModule(TINY_MODEL_ID, compile=True, liger_kernels=True)


def test_compile_on_a_cpu_without_a_cxx_compiler_names_the_fix(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="C\\+\\+ compiler"):
        QLoRAModule(TINY_MODEL_ID, compile=True).configure_model()


def test_compile_refuses_a_process_where_liger_rope_is_installed(monkeypatch):
    from transformers.models.phi3 import modeling_phi3

    def liger_rotary_pos_emb(*args):  # stands in for Liger's (CUDA-only) kernel
        raise AssertionError("not called")

    liger_rotary_pos_emb.__module__ = "liger_kernel.ops.rope"
    monkeypatch.setattr(modeling_phi3, "apply_rotary_pos_emb", liger_rotary_pos_emb)
    with pytest.raises(ValueError, match="fresh process"):
        QLoRAModule(TINY_MODEL_ID, compile=True).configure_model()


@needs_cxx
def test_compiled_layers_equal_eager_layers():
    """Packed (block-causal attention inside the graph) and padded batches, GC on."""
    import torch._dynamo

    torch._dynamo.reset()
    examples = _examples([40, 17, 63, 25])
    settings = {"loss_chunk_size": 16, "fast_lora": True, "upcast_to_fp32": False}
    eager = _module(**settings)
    compiled = _module(compile=True, **settings)
    layers = compiled.model.get_base_model().model.layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints unchanged
    for batch in (pack_examples(examples), _padded(examples)):
        graphs, breaks = _compiled_graphs_and_breaks()
        got = _loss_and_grads(compiled, batch)
        new_graphs, new_breaks = _compiled_graphs_and_breaks()
        assert new_graphs > graphs and new_breaks == breaks  # the layers ran compiled, whole
        # Inductor fuses bf16 elementwise work differently from eager: rounding, not maths.
        _assert_close(got, _loss_and_grads(eager, batch), loss_tol=1e-3, grad_tol=5e-2)
    torch._dynamo.reset()


@needs_cxx
def test_compiled_layers_are_checkpointed_around_their_compiled_call(monkeypatch):
    """Checkpointing goes around each compiled layer's call, whichever way transformers wraps
    it (torch 2.11's Inductor cannot compile the checkpoint inside), and no activation inside
    a layer is kept for the backward."""
    import torch._dynamo

    import lit_cats.fast.compile as kernels

    compiling = []
    real_checkpoint = kernels.checkpoint

    def spy(*args, **kwargs):
        compiling.append(torch.compiler.is_compiling())
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(kernels, "checkpoint", spy)
    torch._dynamo.reset()
    module = _module(compile=True, loss_chunk_size=16, fast_lora=True, upcast_to_fp32=False)
    base = module.model.get_base_model()
    assert not any(layer.gradient_checkpointing for layer in base.model.layers)
    batch = pack_examples(_examples([40, 17, 63]))
    _loss_and_grads(module, batch)  # compiles
    assert len(compiling) == len(base.model.layers) and not any(compiling)
    saved: list[torch.Size] = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.shape) or t, lambda t: t
    ):
        _loss_and_grads(module, batch)
    # Per token, only hidden-size (or narrower) tensors: layer inputs, rotary tables, the
    # final norm; none of the wider q/k/v, gate/up or intermediate activations.
    tokens, hidden = batch["input_ids"].shape[1], base.config.hidden_size
    per_token = [shape for shape in saved if tokens in shape]
    assert per_token and all(shape[-1] <= hidden for shape in per_token)
    torch._dynamo.reset()


@pytest.mark.gpu
def test_compiled_layers_equal_eager_layers_on_gpu():
    """Packed batches: the flash varlen kernel inside the compiled graph; padded: SDPA.

    Against peft's LoRA forward and bitsandbytes' matmul: the fused LoRA update in place
    (eager) and as ``addmm`` with the NF4 matmul as torch ops (compiled)."""
    import torch._dynamo

    torch._dynamo.reset()
    examples = _examples([40, 17, 63, 25])
    peft_lora = _cuda_module(loss_chunk_size=16)  # peft's own LoRA forward, eager
    fast, compiled = (
        _cuda_module(loss_chunk_size=16, fast_lora=True, compile=c) for c in (False, True)
    )
    for batch in (pack_examples(examples), _padded(examples)):
        ref = _loss_and_grads(peft_lora, batch)
        _assert_close(_loss_and_grads(fast, batch), ref, loss_tol=1e-3, grad_tol=5e-2)
        graphs, breaks = _compiled_graphs_and_breaks()
        got = _loss_and_grads(compiled, batch)
        new_graphs, new_breaks = _compiled_graphs_and_breaks()
        assert new_graphs > graphs and new_breaks == breaks
        _assert_close(got, ref, loss_tol=1e-3, grad_tol=5e-2)
    torch._dynamo.reset()


def _quantized_weight(nested: bool, device: str, rows: int = 96, cols: int = 200) -> tuple:
    """A bitsandbytes NF4 weight (default 96 x 200: 300 blocks of 64, not a whole number of
    256-block absmax groups) as the large-step op's arguments, and its quant state."""
    from bitsandbytes.functional import quantize_4bit

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(rows, cols, generator=gen).bfloat16().to(device)
    packed, state = quantize_4bit(
        weight, blocksize=64, compress_statistics=nested, quant_type="nf4"
    )
    double = (state.state2.absmax, state.state2.code, state.offset) if nested else (None,) * 3
    return (packed, state.absmax, *double, list(state.shape), state.blocksize), state


@pytest.mark.parametrize("nested", [True, False], ids=["double-quant", "single-quant"])
def test_nf4_dequantization_is_bitsandbytes_bit_for_bit(nested, device="cpu"):
    from bitsandbytes.functional import dequantize_4bit

    from lit_cats.fast.nf4 import dequantize_nf4

    (packed, *quantized, shape, blocksize), state = _quantized_weight(nested, device)
    got = dequantize_nf4(packed, *quantized, state.code, shape, blocksize, torch.bfloat16)
    assert torch.equal(got, dequantize_4bit(packed, state))


@pytest.mark.gpu
def test_nf4_dequantization_is_bitsandbytes_cuda_kernel_bit_for_bit():
    test_nf4_dequantization_is_bitsandbytes_bit_for_bit(nested=True, device="cuda")


def run_in_tritons_interpreter(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python whose Triton kernels run on the CPU (``TRITON_INTERPRET``
    must be set before Triton is imported, hence the subprocess); skips without Triton."""
    pytest.importorskip("triton", reason="Triton is not installed (it comes with CUDA torch)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


_DEQUANTIZE_CHECK = """
import torch
from bitsandbytes.functional import quantize_4bit
from lit_cats.fast import nf4
for nested in (True, False):
    weight = torch.randn(96, 200, generator=torch.Generator().manual_seed(1)).bfloat16()
    packed, state = quantize_4bit(
        weight, blocksize=64, compress_statistics=nested, quant_type="nf4"
    )
    double = (state.state2.absmax, state.state2.code, state.offset) if nested else (None,) * 3
    weight = (packed, state.absmax, *double, list(state.shape), state.blocksize)
    for dtype in (torch.float32, torch.float16):
        ref = nf4.dequantize_nf4(*weight[:5], state.code, *weight[5:], dtype)
        assert torch.equal(nf4._dequantize_triton(*weight, dtype), ref), (nested, dtype)
print("dequantization ok")
"""


def test_dequantization_kernel_equals_the_reference_in_tritons_interpreter():
    """The large steps' Triton dequantization, run on the CPU by Triton's interpreter, gives
    the torch reference's weights (bitsandbytes' own, bit for bit) with and without double
    quantization (fp32 and fp16: the interpreter rounds bf16 its own way)."""
    done = run_in_tritons_interpreter(_DEQUANTIZE_CHECK)
    assert done.returncode == 0 and "dequantization ok" in done.stdout, done.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("nested", [True, False], ids=["double-quant", "single-quant"])
def test_dequantization_kernel_is_bitsandbytes_bit_for_bit_on_gpu(nested):
    """On CUDA, large steps dequantize with one Triton kernel: bitsandbytes' bf16 weights."""
    from bitsandbytes.functional import dequantize_4bit

    from lit_cats.fast import nf4

    for rows, cols in ((96, 200), (3072, 8192)):
        weight, state = _quantized_weight(nested, "cuda", rows, cols)
        got = nf4._dequantize(*weight, torch.bfloat16)
        assert torch.equal(got, dequantize_4bit(weight[0], state))
        assert torch.equal(got, nf4._dequantize_bnb(*weight, torch.bfloat16))
    # Registration (schema, fake tensors) as the compiled backward relies on it.
    torch.library.opcheck(nf4._dequantize_triton, (*weight, torch.bfloat16))


def test_compiled_4bit_layer_has_no_bitsandbytes_call_and_the_same_gradients():
    """In compiled code the NF4 matmul of a small step is torch ops (no Python dispatch through
    bitsandbytes); large steps and eager calls keep bitsandbytes' own forward."""
    from lit_cats.fast.nf4 import MAX_TOKENS, trace_nf4_layers

    module = _module(gradient_checkpointing=False)
    layer = module.model.get_base_model().model.layers[0].mlp.down_proj.base_layer
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(2))

    def compiled_graph(fn, x: torch.Tensor = x) -> tuple[str, torch.Tensor, torch.Tensor]:
        codes = []

        def record(gm, example_inputs):  # the graph Dynamo captured, subgraphs included
            codes.extend(m.code for m in gm.modules() if isinstance(m, torch.fx.GraphModule))
            return gm.forward

        torch._dynamo.reset()
        xi = x.clone().requires_grad_()
        out = torch.compile(fn, backend=record, fullgraph=True)(xi)
        out.float().square().sum().backward()
        torch._dynamo.reset()
        return "\n".join(codes), out, xi.grad

    bnb_code, ref_out, ref_grad = compiled_graph(layer)  # bitsandbytes' forward, traced
    assert "ops.bitsandbytes" in bnb_code  # the check can see a bitsandbytes op
    assert trace_nf4_layers(layer) == 1 and trace_nf4_layers(layer) == 1  # idempotent
    code, out, grad = compiled_graph(layer)
    assert "ops.bitsandbytes" not in code
    torch.testing.assert_close(out, ref_out, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-2, atol=1e-2)
    large = torch.randn(1, MAX_TOKENS + 1, layer.in_features)
    assert "ops.bitsandbytes" in compiled_graph(layer, large)[0]
    eager = layer(x)  # outside compiled code: bitsandbytes' own path, unchanged
    torch.testing.assert_close(eager, layer._lit_cats_bnb_forward(x), rtol=0, atol=0)


def _lora_op_inputs():
    module = _module(gradient_checkpointing=False)
    lora = module.model.get_base_model().model.layers[0].self_attn.qkv_proj
    base, state = lora.base_layer, lora.base_layer.weight.quant_state
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, base.in_features, generator=gen).bfloat16().requires_grad_()
    low = torch.randn(7, 8, generator=gen).bfloat16().requires_grad_()
    b = torch.randn(base.out_features, 8, generator=gen).requires_grad_()
    inner = state.state2
    args = (x, low, b, 2.0, base.weight, state.absmax, inner.absmax, inner.code, state.offset,
            list(state.shape), state.blocksize, False, False)  # fmt: skip
    return base, args


@pytest.mark.parametrize("keep_weight", [False, True])
def test_4bit_lora_op_is_bitsandbytes_matmul_plus_the_update(monkeypatch, keep_weight):
    """The custom op of large compiled steps: forward and gradients of x, low-rank input and B
    equal bitsandbytes' matmul plus ``scaling * low @ B.T`` under autograd. With
    ``keep_weight`` it also returns the dequantized weight, and its backward uses that one
    instead of dequantizing again."""
    from bitsandbytes import functional as bnb_functional

    from lit_cats.fast import nf4
    from lit_cats.fast.nf4 import linear_4bit_lora

    base, args = _lora_op_inputs()
    args = (*args[:-1], keep_weight)
    x, low, b, scaling = args[:4]
    torch.library.opcheck(linear_4bit_lora, args)  # schema, fake kernel, autograd registration
    got, weight = linear_4bit_lora(*args)
    if keep_weight:
        state = base.weight.quant_state
        assert torch.equal(weight, bnb_functional.dequantize_4bit(base.weight, state).bfloat16())
    else:
        assert weight.numel() == 0
    calls, real = [], nf4._dequantize
    monkeypatch.setattr(nf4, "_dequantize", lambda *a: calls.append(1) or real(*a))
    got.float().square().sum().backward()
    assert len(calls) == (0 if keep_weight else 1)
    grads = [t.grad.clone() for t in (x, low, b)]
    for t in (x, low, b):
        t.grad = None
    ref = base(x) + scaling * (low @ b.t().bfloat16())
    ref.float().square().sum().backward()
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)
    for g, t in zip(grads, (x, low, b), strict=True):
        assert _rel(g, t.grad) < 2e-2


@pytest.mark.parametrize("keep_weight", [False, True])
def test_dropout_4bit_lora_op_is_the_two_ops_it_replaces(keep_weight):
    """The whole LoRA layer of large compiled steps as one op (nf4.dropout_linear_4bit_lora):
    its output, its low-rank output and the gradients of x, A and B are those of the dropout op
    followed by the 4-bit LoRA op under the same seed, whether or not the low-rank output is
    used downstream, and whether or not the dequantized weight is kept for the backward. Only
    the rounding of x's gradient differs (the two shares are summed in the GEMM's
    accumulator)."""
    _, (x, _, b, _, *weight) = _lora_op_inputs()
    weight[-1] = keep_weight
    # A and B small enough that the base and the LoRA branch have gradients of x of one size
    a = 0.1 * torch.randn(8, x.shape[1], generator=torch.Generator().manual_seed(4))
    _check_dropout_lora_op(x, a.requires_grad_(), (0.1 * b).detach().requires_grad_(), weight)


@pytest.mark.gpu
@pytest.mark.parametrize("keep_weight", [False, True])
def test_dropout_4bit_lora_op_is_the_two_ops_it_replaces_on_gpu(keep_weight):
    """The same on CUDA, where the dropout runs as Triton kernels and the base weight is
    dequantized by the Triton kernel (3,001 rows: a partial last tile)."""
    from lit_cats.fast import lora_dropout

    (*quantized, shape, blocksize), _ = _quantized_weight(True, "cuda", rows=384, cols=256)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(3001, 256, device="cuda", generator=gen).bfloat16().requires_grad_()
    a = 0.1 * torch.randn(16, 256, device="cuda", generator=gen)
    b = 0.1 * torch.randn(384, 16, device="cuda", generator=gen)
    assert lora_dropout.applies(x, a)
    weight = [*quantized, shape, blocksize, False, keep_weight]
    _check_dropout_lora_op(x, a.requires_grad_(), b.requires_grad_(), weight)


def _check_dropout_lora_op(x, a, b, weight, scaling=2.0) -> None:
    from lit_cats.fast.lora_dropout import dropout_lora_a
    from lit_cats.fast.nf4 import (
        dropout_linear_4bit_lora,
        dropout_linear_4bit_lora_backward,
        linear_4bit_lora,
    )

    p, seed = 0.3, torch.tensor([2**40 + 5], device=x.device)
    args = (x, a, b, scaling, p, seed, *weight)
    torch.library.opcheck(dropout_linear_4bit_lora, args)  # schema, fake, autograd registration
    for use_low in (False, True):
        for t in (x, a, b):
            t.grad = None
        out, low, _ = dropout_linear_4bit_lora(*args)
        (out.float().square().sum() + use_low * low.float().sum()).backward()
        grads = [t.grad.clone() for t in (x, a, b)]
        for t in (x, a, b):
            t.grad = None
        low_ref = dropout_lora_a(x, a, p, seed)
        ref, _ = linear_4bit_lora(x, low_ref, b, scaling, *weight)
        (ref.float().square().sum() + use_low * low_ref.float().sum()).backward()
        assert torch.equal(out, ref) and torch.equal(low, low_ref)
        for g, t in zip(grads, (x, a, b), strict=True):
            assert _rel(g, t.grad) < 1e-2
    kept = dropout_linear_4bit_lora(*args)[2].detach()
    backward_args = (out.detach(), low.detach(), x.detach(), a.detach(), b.detach(),
                     low.detach(), seed, kept, *weight[:5], scaling, p, *weight[5:7],
                     True)  # fmt: skip
    torch.library.opcheck(dropout_linear_4bit_lora_backward, backward_args)


def test_4bit_lora_op_of_a_layer_output_is_skipped_only_when_recomputed():
    """A layer's last projection (nf4.mark_layer_output) does its matmul in the forward and
    returns NaNs without it inside nf4.recomputing(); other layers always compute, and so does
    a layer output whose dequantized weight is kept for the backward."""
    from lit_cats.fast.nf4 import linear_4bit_lora, recomputing

    _, args = _lora_op_inputs()
    last, skipped = (*args[:-2], True, False), []
    kept = (*args[:-2], True, True)  # a kept weight is read by the backward: never skipped
    with torch.no_grad():
        ref = linear_4bit_lora(*args)[0]
        torch.testing.assert_close(linear_4bit_lora(*last)[0], ref, rtol=0, atol=0)
        with recomputing():
            torch.testing.assert_close(linear_4bit_lora(*args)[0], ref, rtol=0, atol=0)
            calls = _count_4bit_matmuls(lambda: skipped.append(linear_4bit_lora(*last)[0]))
            assert _count_4bit_matmuls(lambda: linear_4bit_lora(*kept)) == (1, 0)
            torch.testing.assert_close(linear_4bit_lora(*kept)[0], ref, rtol=0, atol=0)
    assert calls == (0, 0) and skipped[0].isnan().all()


def _count_4bit_matmuls(fn) -> tuple[int, int]:
    """How many forward 4-bit matmuls of the LoRA op ``fn()`` runs: outside and inside a
    backward pass (checkpointing's rerun)."""
    from lit_cats.fast import nf4

    real, in_backward = nf4._add_4bit_matmul, []

    def spy(*args, **kwargs):
        in_backward.append(torch._C._current_graph_task_id() != -1)
        return real(*args, **kwargs)

    nf4._add_4bit_matmul = spy
    try:
        fn()
    finally:
        nf4._add_4bit_matmul = real
    return in_backward.count(False), in_backward.count(True)


@needs_cxx
def test_compiled_large_steps_add_lora_in_place_and_match_eager():
    """A packed step above nf4.MAX_TOKENS: bitsandbytes' matmul with the LoRA update as one op
    (no copy of the output) inside the compiled layers; the same loss and gradients as eager.
    Checkpointing's rerun of each layer skips the MLP's down_proj, whose output the backward
    never reads (it returns NaNs there, so the gradients would show any use): the backward runs
    3 of each layer's 4 matmuls again, not 4."""
    import torch._dynamo
    from torch._inductor.utils import run_and_get_code

    from lit_cats.fast.nf4 import MAX_TOKENS

    torch._dynamo.reset()
    settings = {"loss_chunk_size": 512, "fast_lora": True, "upcast_to_fp32": False}
    eager, compiled = _module(**settings), _module(compile=True, **settings)
    examples = _examples([300] * (MAX_TOKENS // 300 + 1))
    batch = pack_examples(examples)
    (got, code) = run_and_get_code(_loss_and_grads, compiled, batch)
    assert "linear_4bit_lora" in "\n".join(code)
    _assert_close(got, _loss_and_grads(eager, batch), loss_tol=1e-3, grad_tol=5e-2)
    forward, backward = _count_4bit_matmuls(lambda: _loss_and_grads(compiled, batch))
    layers = len(compiled.model.get_base_model().model.layers)
    assert forward == 4 * layers  # qkv, o, gate_up, down in every layer
    assert backward == 3 * layers  # recomputed: all but down_proj
    torch._dynamo.reset()


def _no_gc_step(
    keep: bool, batch: dict, device: str = "cpu", lora_dropout: float = 0.0
) -> tuple[tuple, tuple[int, int], int]:
    """A compiled step without checkpointing: its loss and gradients, how many weights its
    forward and its backward dequantized (the ops the compiled code runs, as the profiler
    records them), and how many LoRA layers the model has."""
    from torch.profiler import ProfilerActivity, profile

    settings = {"loss_chunk_size": 512, "fast_lora": True, "upcast_to_fp32": False}
    module = _module(
        device,
        compile=True,
        gradient_checkpointing=False,
        keep_dequantized_weights=keep,
        lora_dropout=lora_dropout,
        **settings,
    )
    _loss_and_grads(module, batch)  # compiles first: only the second step is counted
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    module.zero_grad()
    module.on_train_batch_start(batch, 0)
    torch.manual_seed(5)  # the same dropout masks in both settings
    try:
        cpu = [ProfilerActivity.CPU]  # the ops as the host calls them
        with profile(activities=cpu) as forward, torch.autocast(device, dtype=torch.bfloat16):
            loss = module._training_loss(batch)
        with profile(activities=cpu) as backward:
            loss.backward()
    finally:
        module.on_train_batch_end(None, batch, 0)
    grads = {n: p.grad.cpu() for n, p in module.named_parameters() if p.requires_grad}
    counts = tuple(
        sum(e.name in ("bitsandbytes::dequantize_4bit", "lit_cats::dequantize_nf4")
            for e in prof.events())
        for prof in (forward, backward)
    )  # fmt: skip
    lora_layers = 4 * len(module.model.get_base_model().model.layers)  # qkv, o, gate_up, down
    return (loss.item(), grads), counts, lora_layers


@needs_cxx
def test_kept_dequantized_weights_spare_the_backward_its_dequantization():
    """model.keep_dequantized_weights: a compiled large step without checkpointing dequantizes
    each 4-bit weight once, in the forward, not again in the backward, with the very same loss
    and gradients."""
    import torch._dynamo

    from lit_cats.fast.nf4 import MAX_TOKENS

    torch._dynamo.reset()
    batch = pack_examples(_examples([300] * (MAX_TOKENS // 300 + 1)))
    ref, dequantized, layers = _no_gc_step(False, batch)
    # the backward: all but the first qkv_proj, whose input (the embeddings) needs no gradient
    assert dequantized == (layers, layers - 1)
    torch._dynamo.reset()
    got, dequantized, _ = _no_gc_step(True, batch)
    assert dequantized == (layers, 0)
    _assert_close(got, ref, loss_tol=0, grad_tol=0)
    torch._dynamo.reset()


@pytest.mark.gpu
def test_kept_dequantized_weights_on_gpu():
    """The same on CUDA, where the whole LoRA layer with its dropout is one op and the Triton
    kernel dequantizes: nothing is dequantized in the backward, and the loss and gradients are
    those of the step that dequantizes again."""
    import torch._dynamo

    from lit_cats.fast.nf4 import MAX_TOKENS

    torch._dynamo.reset()
    batch = pack_examples(_examples([300] * (MAX_TOKENS // 300 + 1)))
    ref, dequantized, layers = _no_gc_step(False, batch, "cuda", lora_dropout=0.1)
    assert dequantized == (layers, layers - 1)
    torch._dynamo.reset()
    got, dequantized, _ = _no_gc_step(True, batch, "cuda", lora_dropout=0.1)
    assert dequantized == (layers, 0)
    _assert_close(got, ref, loss_tol=1e-6, grad_tol=1e-3)
    torch._dynamo.reset()


def test_keep_dequantized_weights_refuses_what_it_cannot_mean():
    keep = {"keep_dequantized_weights": True, "compile": True, "gradient_checkpointing": False}
    with pytest.raises(ValueError, match="load_in_4bit is false"):
        QLoRAModule(TINY_MODEL_ID, **{**keep, "load_in_4bit": False})
    with pytest.raises(ValueError, match="set model.gradient_checkpointing false"):
        QLoRAModule(TINY_MODEL_ID, **{**keep, "gradient_checkpointing": True})
    with pytest.raises(ValueError, match="set model.compile true"):
        QLoRAModule(TINY_MODEL_ID, **{**keep, "compile": False})
    QLoRAModule(TINY_MODEL_ID, **keep)  # all three right: accepted


@pytest.mark.gpu
def test_compiled_large_steps_match_peft_on_gpu():
    """Above nf4.MAX_TOKENS on CUDA: flash varlen and the in-place LoRA op inside the graph."""
    import torch._dynamo

    from lit_cats.fast.nf4 import MAX_TOKENS

    torch._dynamo.reset()
    batch = pack_examples(_examples([300] * (MAX_TOKENS // 300 + 1)))
    ref = _loss_and_grads(_cuda_module(loss_chunk_size=512), batch)  # peft + bitsandbytes
    compiled = _cuda_module(loss_chunk_size=512, fast_lora=True, compile=True)
    _assert_close(_loss_and_grads(compiled, batch), ref, loss_tol=1e-3, grad_tol=5e-2)
    torch._dynamo.reset()


# ------------------------------------------------------------ checkpointing all but the last N
def _checkpointed_step(keep: int, batch: dict) -> tuple[tuple, list[bool], list[int], int]:
    """A step with the last ``keep`` layers uncheckpointed: its loss and gradients, each layer's
    checkpointing flag, how often each layer's forward ran, and the bytes saved for backward."""
    module = _module(fast_lora=True, upcast_to_fp32=False, uncheckpointed_layers=keep)
    layers = module.model.get_base_model().model.layers
    calls = [0] * len(layers)

    def count(i: int) -> None:
        calls[i] += 1

    for i, layer in enumerate(layers):  # inside the layer's forward, which the rerun repeats
        layer.self_attn.register_forward_pre_hook(lambda *_, i=i: count(i))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t
    ):
        result = _loss_and_grads(module, batch)
    return result, [layer.gradient_checkpointing for layer in layers], calls, sum(saved)


def test_uncheckpointed_layers_keep_activations_with_the_same_loss_and_gradients():
    """The last N layers run once and keep their activations; the rest are checkpointed (run
    twice). Loss and gradients are those of full checkpointing, and more is saved."""
    batch = pack_examples(_examples([40, 17, 63]))
    ref, flags, calls, ref_saved = _checkpointed_step(0, batch)
    assert all(flags) and calls == [2] * len(calls)  # forward and the backward's rerun
    got, flags, calls, saved = _checkpointed_step(1, batch)
    assert flags == [True] * (len(flags) - 1) + [False]
    assert calls == [2] * (len(calls) - 1) + [1]
    assert saved > ref_saved
    _assert_close(got, ref, loss_tol=1e-6, grad_tol=1e-5)


def test_uncheckpointed_layers_refuse_what_they_cannot_mean():
    with pytest.raises(ValueError, match="uncheckpointed_layers must be >= 0"):
        QLoRAModule(TINY_MODEL_ID, uncheckpointed_layers=-1)
    with pytest.raises(ValueError, match="gradient_checkpointing is false"):
        QLoRAModule(TINY_MODEL_ID, uncheckpointed_layers=1, gradient_checkpointing=False)
    module = QLoRAModule(TINY_MODEL_ID, uncheckpointed_layers=99)
    with pytest.raises(ValueError, match=r"has \d+ decoder layers: set it to at most \d+"):
        module.configure_model()
    from lit_cats.fast.compile import keep_activations

    with pytest.raises(ValueError, match="found none in Linear; set it to 0"):
        keep_activations(torch.nn.Linear(2, 2), 1)


@needs_cxx
def test_uncheckpointed_layers_in_compiled_layers(monkeypatch):
    """Compiled, checkpointing goes around each compiled call but the last N layers'."""
    import torch._dynamo

    import lit_cats.fast.compile as kernels

    calls = []
    real_checkpoint = kernels.checkpoint
    monkeypatch.setattr(
        kernels, "checkpoint", lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k)
    )
    torch._dynamo.reset()
    settings = {"loss_chunk_size": 16, "fast_lora": True, "upcast_to_fp32": False}
    module = _module(compile=True, uncheckpointed_layers=1, **settings)
    batch = pack_examples(_examples([40, 17, 63]))
    got = _loss_and_grads(module, batch)
    assert len(calls) == len(module.model.get_base_model().model.layers) - 1
    _assert_close(got, _loss_and_grads(_module(**settings), batch), loss_tol=1e-3, grad_tol=5e-2)
    torch._dynamo.reset()
