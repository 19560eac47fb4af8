"""bitsandbytes' NF4 matmul in compiled layers (lit_cats.fast.nf4): the dequantization is
bitsandbytes' bit for bit, and the large-step custom ops (the 4-bit matmul with the LoRA
update, and with LoRA's dropout too) have the gradients of the ops they replace.

Compiled layers round bf16 elementwise work differently from eager: loss within 1e-3, worst LoRA
gradient within 5e-2.
"""

from __future__ import annotations

import pytest
import torch
from conftest import needs_cxx, relative_error

from lit_cats.data.collate import pack_examples
from lit_cats.fast import nf4
from lit_cats.fast.lora_dropout import dropout_lora_a
from lit_cats.fast.nf4 import (
    MAX_TOKENS,
    NF4Weight,
    dequantize_nf4,
    dropout_linear_4bit_lora,
    dropout_linear_4bit_lora_backward,
    linear_4bit_lora,
    trace_nf4_layers,
)
from lit_cats.fast.recompute import recomputing

#: A packed step just above nf4.MAX_TOKENS: the large-step path.
LARGE = [300] * (MAX_TOKENS // 300 + 1)
FAST = {"loss_chunk_size": 512, "fast_lora": True, "upcast_to_fp32": False}


def quantized_weight(nested: bool, device: str, rows: int = 96, cols: int = 200):
    """A bitsandbytes NF4 weight (default 96 x 200: 300 blocks of 64, not a whole number of
    256-block absmax groups) as an :class:`NF4Weight`, and its quant state."""
    from bitsandbytes.functional import quantize_4bit

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(rows, cols, generator=gen).bfloat16().to(device)
    packed, state = quantize_4bit(
        weight, blocksize=64, compress_statistics=nested, quant_type="nf4"
    )
    double = (state.state2.absmax, state.state2.code, state.offset) if nested else (None,) * 3
    return NF4Weight(packed, state.absmax, *double, list(state.shape), state.blocksize), state


@pytest.mark.parametrize("nested", [True, False], ids=["double-quant", "single-quant"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_nf4_dequantization_is_bitsandbytes_bit_for_bit(nested, device):
    from bitsandbytes.functional import dequantize_4bit

    (packed, *quantized, shape, blocksize), state = quantized_weight(nested, device)
    got = dequantize_nf4(packed, *quantized, state.code, shape, blocksize, torch.bfloat16)
    assert torch.equal(got, dequantize_4bit(packed, state))


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


def test_dequantization_kernel_equals_the_reference_in_tritons_interpreter(
    run_in_tritons_interpreter,
):
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

    for rows, cols in ((96, 200), (3072, 8192)):
        weight, state = quantized_weight(nested, "cuda", rows, cols)
        got = weight.dequantize(torch.bfloat16)
        assert torch.equal(got, dequantize_4bit(weight.packed, state))
        assert torch.equal(got, nf4._dequantize_bnb(weight, torch.bfloat16))
    # Registration (schema, fake tensors) as the compiled backward relies on it.
    torch.library.opcheck(nf4._dequantize_triton, (*weight, torch.bfloat16))


def test_compiled_4bit_layer_has_no_bitsandbytes_call_and_the_same_gradients(speed_module):
    """In compiled code the NF4 matmul of a small step is torch ops (no Python dispatch through
    bitsandbytes); large steps and eager calls keep bitsandbytes' own forward."""
    module = speed_module(gradient_checkpointing=False)
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


@pytest.fixture
def lora_op_inputs(speed_module):
    """A tiny model's 4-bit ``qkv_proj`` and arguments of the 4-bit LoRA op over its weight:
    ``(x, low, B, scaling, NF4Weight, layer_output=False, keep_weight=False)``, flattened."""
    lora = speed_module(gradient_checkpointing=False).model.get_base_model()
    base = lora.model.layers[0].self_attn.qkv_proj.base_layer
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, base.in_features, generator=gen).bfloat16().requires_grad_()
    low = torch.randn(7, 8, generator=gen).bfloat16().requires_grad_()
    b = torch.randn(base.out_features, 8, generator=gen).requires_grad_()
    return base, (x, low, b, 2.0, *NF4Weight.of(base), False, False)


@pytest.mark.parametrize("keep_weight", [False, True])
def test_4bit_lora_op_is_bitsandbytes_matmul_plus_the_update(
    monkeypatch, lora_op_inputs, keep_weight
):
    """The custom op of large compiled steps: forward and gradients of x, low-rank input and B
    equal bitsandbytes' matmul plus ``scaling * low @ B.T`` under autograd. With
    ``keep_weight`` it also returns the dequantized weight, and its backward uses that one
    instead of dequantizing again."""
    from bitsandbytes import functional as bnb_functional

    base, args = lora_op_inputs
    args = (*args[:-1], keep_weight)
    x, low, b, scaling = args[:4]
    torch.library.opcheck(linear_4bit_lora, args)  # schema, fake kernel, autograd registration
    got, weight = linear_4bit_lora(*args)
    if keep_weight:
        state = base.weight.quant_state
        assert torch.equal(weight, bnb_functional.dequantize_4bit(base.weight, state).bfloat16())
    else:
        assert weight.numel() == 0
    calls, real = [], NF4Weight.dequantize
    monkeypatch.setattr(NF4Weight, "dequantize", lambda *a: calls.append(1) or real(*a))
    got.float().square().sum().backward()
    assert len(calls) == (0 if keep_weight else 1)
    grads = [t.grad.clone() for t in (x, low, b)]
    for t in (x, low, b):
        t.grad = None
    ref = base(x) + scaling * (low @ b.t().bfloat16())
    ref.float().square().sum().backward()
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)
    for g, t in zip(grads, (x, low, b), strict=True):
        assert relative_error(g, t.grad) < 2e-2


def _check_dropout_lora_op(x, a, b, weight, scaling=2.0) -> None:
    """dropout_linear_4bit_lora against dropout_lora_a followed by linear_4bit_lora."""
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
            assert relative_error(g, t.grad) < 1e-2
    kept = dropout_linear_4bit_lora(*args)[2].detach()
    backward_args = (out.detach(), low.detach(), x.detach(), a.detach(), b.detach(),
                     low.detach(), seed, kept, *weight[:5], scaling, p, *weight[5:7],
                     True)  # fmt: skip
    torch.library.opcheck(dropout_linear_4bit_lora_backward, backward_args)


@pytest.mark.parametrize("keep_weight", [False, True])
def test_dropout_4bit_lora_op_is_the_two_ops_it_replaces(lora_op_inputs, keep_weight):
    """The whole LoRA layer of large compiled steps as one op (nf4.dropout_linear_4bit_lora):
    its output, its low-rank output and the gradients of x, A and B are those of the dropout op
    followed by the 4-bit LoRA op under the same seed, whether or not the low-rank output is
    used downstream, and whether or not the dequantized weight is kept for the backward. Only
    the rounding of x's gradient differs (the two shares are summed in the GEMM's
    accumulator)."""
    _, (x, _, b, _, *weight) = lora_op_inputs
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

    weight, _ = quantized_weight(True, "cuda", rows=384, cols=256)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(3001, 256, device="cuda", generator=gen).bfloat16().requires_grad_()
    a = 0.1 * torch.randn(16, 256, device="cuda", generator=gen)
    b = 0.1 * torch.randn(384, 16, device="cuda", generator=gen)
    assert lora_dropout.applies(x, a)
    weight = [*weight, False, keep_weight]
    _check_dropout_lora_op(x, a.requires_grad_(), b.requires_grad_(), weight)


@pytest.fixture
def count_4bit_matmuls(monkeypatch):
    """``count_4bit_matmuls(fn)``: how many forward 4-bit matmuls of the LoRA op ``fn()`` runs,
    outside and inside a backward pass (checkpointing's rerun)."""

    def count(fn) -> tuple[int, int]:
        real, in_backward = nf4._add_4bit_matmul, []

        def spy(*args, **kwargs):
            in_backward.append(torch._C._current_graph_task_id() != -1)
            return real(*args, **kwargs)

        with monkeypatch.context() as patch:
            patch.setattr(nf4, "_add_4bit_matmul", spy)
            fn()
        return in_backward.count(False), in_backward.count(True)

    return count


def test_4bit_lora_op_of_a_layer_output_is_skipped_only_when_recomputed(
    lora_op_inputs, count_4bit_matmuls
):
    """A layer's last projection (nf4.mark_layer_output) does its matmul in the forward and
    returns NaNs without it inside a checkpointed rerun; other layers always compute, and so
    does a layer output whose dequantized weight is kept for the backward."""
    _, args = lora_op_inputs
    last, skipped = (*args[:-2], True, False), []
    kept = (*args[:-2], True, True)  # a kept weight is read by the backward: never skipped
    with torch.no_grad():
        ref = linear_4bit_lora(*args)[0]
        torch.testing.assert_close(linear_4bit_lora(*last)[0], ref, rtol=0, atol=0)
        with recomputing():
            torch.testing.assert_close(linear_4bit_lora(*args)[0], ref, rtol=0, atol=0)
            calls = count_4bit_matmuls(lambda: skipped.append(linear_4bit_lora(*last)[0]))
            assert count_4bit_matmuls(lambda: linear_4bit_lora(*kept)) == (1, 0)
            torch.testing.assert_close(linear_4bit_lora(*kept)[0], ref, rtol=0, atol=0)
    assert calls == (0, 0) and skipped[0].isnan().all()


@needs_cxx
def test_compiled_large_steps_add_lora_in_place_and_match_eager(
    make_examples, speed_module, loss_and_grads, assert_steps_close, count_4bit_matmuls,
    compile_counters,
):  # fmt: skip
    """A packed step above nf4.MAX_TOKENS: bitsandbytes' matmul with the LoRA update as one op
    (no copy of the output) inside the compiled layers; the same loss and gradients as eager.
    Checkpointing's rerun of each layer skips the MLP's down_proj, whose output the backward
    never reads (it returns NaNs there, so the gradients would show any use): the backward runs
    3 of each layer's 4 matmuls again, not 4."""
    from torch._inductor.utils import run_and_get_code

    eager, compiled = speed_module(**FAST), speed_module(compile=True, **FAST)
    batch = pack_examples(make_examples(LARGE))
    (got, code) = run_and_get_code(loss_and_grads, compiled, batch)
    assert "linear_4bit_lora" in "\n".join(code)
    assert_steps_close(got, loss_and_grads(eager, batch), loss_tol=1e-3, grad_tol=5e-2)
    forward, backward = count_4bit_matmuls(lambda: loss_and_grads(compiled, batch))
    layers = len(compiled.model.get_base_model().model.layers)
    assert forward == 4 * layers  # qkv, o, gate_up, down in every layer
    assert backward == 3 * layers  # recomputed: all but down_proj


@pytest.fixture
def step_without_checkpointing(speed_module, loss_and_grads):
    """``step(keep, batch, device="cpu", lora_dropout=0.0)``: a compiled step without
    checkpointing, ``keep_dequantized_weights=keep``: its loss and gradients, how many weights
    its forward and its backward dequantized (the ops the compiled code runs, as the profiler
    records them), and how many LoRA layers the model has."""
    from torch.profiler import ProfilerActivity, profile

    def step(keep: bool, batch: dict, device: str = "cpu", lora_dropout: float = 0.0):
        module = speed_module(
            device, lora_dropout, compile=True, gradient_checkpointing=False,
            keep_dequantized_weights=keep, **FAST,
        )  # fmt: skip
        loss_and_grads(module, batch)  # compiles first: only the second step is counted
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        module.zero_grad()
        module.on_train_batch_start(batch, 0)
        torch.manual_seed(5)  # the same dropout masks in both settings
        cpu = [ProfilerActivity.CPU]  # the ops as the host calls them
        with profile(activities=cpu) as forward, torch.autocast(device, dtype=torch.bfloat16):
            loss = module.kit.loss(module.model, batch)
        with profile(activities=cpu) as backward:
            loss.backward()
        grads = {n: p.grad.cpu() for n, p in module.named_parameters() if p.requires_grad}
        names = ("bitsandbytes::dequantize_4bit", "lit_cats::dequantize_nf4")
        counts = tuple(sum(e.name in names for e in p.events()) for p in (forward, backward))
        lora_layers = 4 * len(module.model.get_base_model().model.layers)
        return (loss.item(), grads), counts, lora_layers

    return step


@needs_cxx
def test_kept_dequantized_weights_spare_the_backward_its_dequantization(
    make_examples, step_without_checkpointing, assert_steps_close, compile_counters
):
    """model.speed.keep_dequantized_weights: a compiled large step without checkpointing
    dequantizes each 4-bit weight once, in the forward, not again in the backward, with the very
    same loss and gradients."""
    batch = pack_examples(make_examples(LARGE))
    ref, dequantized, layers = step_without_checkpointing(False, batch)
    # the backward: all but the first qkv_proj, whose input (the embeddings) needs no gradient
    assert dequantized == (layers, layers - 1)
    torch._dynamo.reset()
    got, dequantized, _ = step_without_checkpointing(True, batch)
    assert dequantized == (layers, 0)
    assert_steps_close(got, ref, loss_tol=0, grad_tol=0)


@pytest.mark.gpu
def test_kept_dequantized_weights_on_gpu(
    make_examples, step_without_checkpointing, assert_steps_close, compile_counters
):
    """The same on CUDA, where the whole LoRA layer with its dropout is one op and the Triton
    kernel dequantizes: nothing is dequantized in the backward, and the loss and gradients are
    those of the step that dequantizes again."""
    batch = pack_examples(make_examples(LARGE))
    ref, dequantized, layers = step_without_checkpointing(False, batch, "cuda", 0.1)
    assert dequantized == (layers, layers - 1)
    torch._dynamo.reset()
    got, dequantized, _ = step_without_checkpointing(True, batch, "cuda", 0.1)
    assert dequantized == (layers, 0)
    assert_steps_close(got, ref, loss_tol=1e-6, grad_tol=1e-3)


@pytest.mark.gpu
def test_compiled_large_steps_match_peft_on_gpu(
    make_examples, cuda_module, loss_and_grads, assert_steps_close, compile_counters
):
    """Above nf4.MAX_TOKENS on CUDA: flash varlen and the in-place LoRA op inside the graph."""
    batch = pack_examples(make_examples(LARGE))
    ref = loss_and_grads(cuda_module(loss_chunk_size=512), batch)  # peft + bitsandbytes
    compiled = cuda_module(loss_chunk_size=512, fast_lora=True, compile=True)
    assert_steps_close(loss_and_grads(compiled, batch), ref, loss_tol=1e-3, grad_tol=5e-2)
