"""LoRA dropout inside the LoRA-A matmul (lit_cats.fast.lora_dropout): the counter-based mask,
the op's gradients, and the op in the model (checkpointing's rerun must draw the same mask)."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import needs_cxx

from lit_cats.data.collate import pack_examples
from lit_cats.fast import lora_dropout
from lit_cats.fast.lora_dropout import dropout_lora_a, keep_mask, keep_scale, philox, threshold
from lit_cats.fast.nf4 import MAX_TOKENS


def test_philox_is_random123s_philox4x32_10():
    """Known-answer vector of Random123 (kat_vectors: philox4x32 10, counter 0, key 0), the
    generator Triton's randint4x implements."""
    words = philox(0, torch.zeros(1, dtype=torch.int64))
    assert [hex(int(w)) for w in words] == ["0x6627e8d5", "0xe169c58d", "0xbc57ac4c", "0x9b00dbd8"]


def test_keep_mask_is_a_function_of_seed_and_position_with_the_asked_rate():
    p = 0.05
    mask = keep_mask(12345, 256, 1024, p)
    assert torch.equal(mask, keep_mask(12345, 256, 1024, p))
    assert not torch.equal(mask, keep_mask(12346, 256, 1024, p))
    # a row is the same bits whatever the rows around it: position decides, not the shape
    assert torch.equal(keep_mask(12345, 3, 1024, p), mask[:3])
    dropped = 1 - mask.float().mean().item()
    sigma = (p * (1 - p) / mask.numel()) ** 0.5
    assert abs(dropped - p) < 5 * sigma, dropped
    # kept elements are scaled by the exact inverse of the keep probability: unbiased
    assert threshold(p) == 3277 and keep_scale(p) * (65536 - 3277) == 65536
    assert keep_mask(1, 4, 128, 0.0).all()


def test_bad_probability_and_width_are_refused():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        threshold(1.0)
    with pytest.raises(ValueError, match="multiple of 8"):
        keep_mask(0, 2, 12, 0.1)


def _op_inputs(rows: int = 37, width: int = 256, rank: int = 8):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, width, generator=gen).bfloat16().requires_grad_()
    a = torch.randn(rank, width, generator=gen).requires_grad_()
    return x, a, torch.tensor([987654321987], dtype=torch.int64)


def test_op_is_masked_scaled_x_times_a_with_its_gradients():
    """Forward, grad of x and grad of A equal autograd through ``(x * keep * scale) @ A.T``."""
    x, a, seed = _op_inputs()
    p = 0.3
    torch.library.opcheck(dropout_lora_a, (x, a, p, seed))
    got = dropout_lora_a(x, a, p, seed)
    got.float().square().sum().backward()
    got_grads = x.grad.clone(), a.grad.clone()
    x.grad = a.grad = None
    keep = keep_mask(int(seed), *x.shape, p)
    ref = (x.float() * keep * keep_scale(p)) @ a.bfloat16().float().t()
    ref.bfloat16().float().square().sum().backward()
    torch.testing.assert_close(got.float(), ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got_grads[0].float(), x.grad.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got_grads[1], a.grad, rtol=2e-2, atol=2e-2)
    assert (got_grads[0][~keep] == 0).all() and (got_grads[0][keep] != 0).all()


def _without_and_with_checkpointing(build, loss_and_grads, batch: dict, seed: int):
    """The step's loss and gradients without and with checkpointing, torch seeded alike before
    each (the same dropout masks), and the checkpointed module."""
    results = []
    for checkpointing in (False, True):
        module = build(gradient_checkpointing=checkpointing)
        torch.manual_seed(seed)
        results.append(loss_and_grads(module, batch))
    return results, module


@pytest.fixture
def fused_on_cpu(monkeypatch) -> list[int]:
    """The fused op taken on the CPU too (its torch reference); the list its calls append to."""
    calls = []
    real = lora_dropout.dropout_lora_a

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(lora_dropout, "applies", lambda x, a: x.dim() == 2)
    monkeypatch.setattr(lora_dropout, "dropout_lora_a", counted)
    return calls


def test_fused_dropout_in_the_model_replays_its_mask_under_checkpointing(
    fused_on_cpu, make_examples, speed_module, loss_and_grads, assert_steps_close
):
    """With dropout 0.1 and the fused op, a checkpointed step has the loss and gradients of the
    same step without checkpointing: the rerun draws the very mask the forward drew."""
    batch = pack_examples(make_examples([40, 70, 30]))
    build = functools.partial(speed_module, lora_dropout=0.1, fast_lora=True)
    results, module = _without_and_with_checkpointing(build, loss_and_grads, batch, seed=7)
    assert_steps_close(results[1], results[0], loss_tol=1e-6, grad_tol=1e-5)
    layers = len(module.model.get_base_model().model.layers)
    assert len(fused_on_cpu) == 4 * layers * 3  # 4 LoRA layers; no GC, then GC's forward, rerun
    torch.manual_seed(8)  # another seed, another mask
    assert loss_and_grads(module, batch)[0] != results[1][0]
    zero = speed_module(fast_lora=True)
    assert loss_and_grads(zero, batch)[0] != results[1][0]  # the dropout does drop


@pytest.fixture
def eager_rng_in_compiled_code():
    """Compiled code draws random numbers as eager code does (Inductor's fallback_random;
    config.patch, as monkeypatch would delete the key on undo)."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch(fallback_random=True):
        yield


@needs_cxx
@pytest.mark.usefixtures("eager_rng_in_compiled_code", "fused_on_cpu", "compile_counters")
def test_fused_dropout_compiled_equals_eager(
    monkeypatch, make_examples, speed_module, loss_and_grads, assert_steps_close
):
    """In compiled layers (on a large packed step, checkpointed) the op is in the graph and
    the seed comes from torch's generator: the same loss and gradients as eager."""
    from torch._inductor.utils import run_and_get_code

    settings = {"loss_chunk_size": 512, "fast_lora": True, "upcast_to_fp32": False}
    settings |= {"lora_dropout": 0.1, "gradient_checkpointing": True}
    batch = pack_examples(make_examples([300] * (MAX_TOKENS // 300 + 1)))
    eager, compiled = speed_module(**settings), speed_module(compile=True, **settings)
    torch.manual_seed(3)
    ref = loss_and_grads(eager, batch)
    torch.manual_seed(3)
    got, code = run_and_get_code(loss_and_grads, compiled, batch)
    assert_steps_close(got, ref, loss_tol=1e-3, grad_tol=5e-2)
    code = "\n".join(code)
    # the whole LoRA layer is one op (nf4.dropout_linear_4bit_lora), the dropout inside it
    assert "dropout_linear_4bit_lora.default" in code
    assert "dropout_linear_4bit_lora_backward.default" in code
    assert "native_dropout" not in code and "bernoulli" not in code
    # Checkpointing's rerun reuses what the forward computed: no second draw of any mask.
    torch.manual_seed(3)
    forward, rerun = _count_computed(monkeypatch, lambda: loss_and_grads(compiled, batch))
    assert (forward, rerun) == (4 * len(compiled.model.get_base_model().model.layers), 0)
    torch.manual_seed(3)
    assert_steps_close(loss_and_grads(compiled, batch), ref, loss_tol=1e-3, grad_tol=5e-2)


@needs_cxx
@pytest.mark.usefixtures("compile_counters")
def test_small_compiled_steps_replay_the_compilers_dropout_under_checkpointing(
    fused_on_cpu, make_examples, speed_module, loss_and_grads, assert_steps_close
):
    """On a small compiled step (where the seeded op gives way), the compiler's own dropout:
    a checkpointed step has the loss and gradients of the same step without checkpointing (the
    rerun draws the forward's mask), the dropout does drop, and the op is never called (it
    would apply here: only the small-step rule skips it)."""
    settings = {"loss_chunk_size": 64, "fast_lora": True, "upcast_to_fp32": False}
    settings |= {"compile": True}
    batch = pack_examples(make_examples([40, 70, 30]))
    build = functools.partial(speed_module, lora_dropout=0.1, **settings)
    results, module = _without_and_with_checkpointing(build, loss_and_grads, batch, seed=11)
    assert_steps_close(results[1], results[0], loss_tol=1e-3, grad_tol=5e-2)
    assert not fused_on_cpu
    torch.manual_seed(12)  # another mask moves the loss past that tolerance
    assert abs(loss_and_grads(module, batch)[0] - results[1][0]) > 1e-3 * abs(results[1][0])
    no_dropout = loss_and_grads(speed_module(**settings), batch)
    assert abs(no_dropout[0] - results[0][0]) > 1e-4


def _count_computed(monkeypatch, fn) -> tuple[int, int]:
    """How many op outputs ``fn()`` computes: outside and inside a backward pass (the rerun)."""
    real, in_backward = lora_dropout._reference, []

    def spy(*args):
        in_backward.append(torch._C._current_graph_task_id() != -1)
        return real(*args)

    with monkeypatch.context() as patch:
        patch.setattr(lora_dropout, "_reference", spy)
        fn()
    return in_backward.count(False), in_backward.count(True)


_KERNEL_CHECK = """
import torch
from lit_cats.fast import lora_dropout as L
torch.manual_seed(0)
for rows, width, rank in [(70, 256, 8), (130, 384, 16)]:
    x, a = torch.randn(rows, width).half(), torch.randn(rank, width)
    g, seed, p = torch.randn(rows, rank).half(), torch.tensor([2**40 + 17]), 0.3
    got = L._triton_forward(x, a, p, seed)
    grads = L._triton_backward(g, x, a, p, seed, sms=2)
    ref, ref_grads = L._reference(x, a, p, int(seed)), L._reference_backward(g, x, a, p, int(seed))
    keep = L.keep_mask(int(seed), rows, width, p)
    assert torch.equal(grads[0] != 0, keep), "the kernels' mask is not keep_mask"
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-2)
    torch.testing.assert_close(grads[0], ref_grads[0], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(grads[1], ref_grads[1], rtol=1e-4, atol=1e-4)
print("kernels ok")
"""


def test_triton_kernels_equal_the_reference_in_tritons_interpreter(run_in_tritons_interpreter):
    """The kernels themselves, run on the CPU by Triton's interpreter (fp16: the interpreter
    has no bf16): the same mask as keep_mask, bit for bit, and the reference's numbers."""
    done = run_in_tritons_interpreter(_KERNEL_CHECK)
    assert done.returncode == 0 and "kernels ok" in done.stdout, done.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("width,rank", [(3072, 16), (8192, 16), (256, 8)])
def test_triton_kernels_equal_the_reference_on_gpu(width, rank):
    """The Triton kernels draw keep_mask's mask bit for bit and compute the op's forward and
    both gradients as the torch reference does (fp32 sums of bf16 products)."""
    assert lora_dropout.triton is not None
    p, rows = 0.05, 3001  # a partial last tile
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, width, device="cuda", generator=gen).bfloat16()
    a = torch.randn(rank, width, device="cuda", generator=gen) * 0.02
    g = torch.randn(rows, rank, device="cuda", generator=gen).bfloat16()
    seed = torch.tensor([2**40 + 17], device="cuda")
    assert lora_dropout.applies(x, a)
    ref = lora_dropout._reference(x, a, p, int(seed))
    ref_grads = lora_dropout._reference_backward(g, x, a, p, int(seed))
    got = lora_dropout._triton_forward(x, a, p, seed)
    got_grads = lora_dropout._triton_backward(g, x, a, p, seed)
    keep = keep_mask(int(seed), rows, width, p, "cuda")
    assert torch.equal(got_grads[0] != 0, keep & (ref_grads[0] != 0))
    torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got_grads[0], ref_grads[0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got_grads[1], ref_grads[1], rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.usefixtures("compile_counters")
@pytest.mark.parametrize(("compiled", "small"), [(False, False), (True, False), (True, True)])
def test_fused_dropout_in_the_model_on_gpu(
    monkeypatch, make_examples, cuda_module, loss_and_grads, assert_steps_close, compiled, small
):
    """On CUDA the model's LoRA layers take the Triton op, eager or compiled on a large packed
    step; a compiled step under MAX_TOKENS takes the compiler's dropout instead, never the op.
    Either way a checkpointed step has the loss and gradients of the same step without
    checkpointing, and differs from a step without dropout."""
    calls = []
    real = lora_dropout.dropout_lora_a
    monkeypatch.setattr(lora_dropout, "dropout_lora_a", lambda *a: calls.append(1) or real(*a))
    lengths = [300, 200, 400] if small else [300] * (MAX_TOKENS // 300 + 1)
    batch = pack_examples(make_examples(lengths))
    settings = {"fast_lora": True, "compile": compiled, "loss_chunk_size": 512}
    build = functools.partial(cuda_module, lora_dropout=0.1, **settings)
    results, _ = _without_and_with_checkpointing(build, loss_and_grads, batch, seed=5)
    assert_steps_close(results[1], results[0], loss_tol=1e-3, grad_tol=2e-2)
    # eager: every call; compiled large: traced into the graph; compiled small: never
    assert bool(calls) != small
    no_dropout = loss_and_grads(cuda_module(lora_dropout=0.0, **settings), batch)
    assert no_dropout[0] != results[0][0]
