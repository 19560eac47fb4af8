"""The fused LoRA forward (lit_cats.fast.lora, ``model.speed.fast_lora``): peft's LoRA layer
with the update accumulated into the base output by one GEMM.

It rounds differently on purpose (the update is added in the GEMM's fp32 accumulator): loss
within 1e-3, worst LoRA gradient within 5e-2.
"""

from __future__ import annotations

import pytest
import torch

from lit_cats.fast import lora as fast_lora
from lit_cats.fast import lora_dropout
from lit_cats.fast.nf4 import MAX_TOKENS


def test_fast_lora_equals_peft_lora(
    make_examples, padded, speed_module, loss_and_grads, assert_steps_close
):
    batch = padded(make_examples([40, 17, 63, 25]))
    ref = loss_and_grads(speed_module(), batch)
    fast_module = speed_module(fast_lora=True)
    assert sum(hasattr(m, "_lit_cats_peft_forward") for m in fast_module.modules()) == 8
    assert_steps_close(loss_and_grads(fast_module, batch), ref, loss_tol=1e-3, grad_tol=5e-2)


@pytest.fixture
def logits():
    """``logits(module, seed)``: the module's logits of a fixed input, torch seeded first."""
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])

    def run(module, seed: int = 0) -> torch.Tensor:
        torch.manual_seed(seed)
        with torch.no_grad():
            return module.model(input_ids=ids).logits

    return run


def test_fast_lora_applies_peft_dropout_in_training(speed_module, logits):
    """In training mode the fused forward drops LoRA inputs: two calls differ, and with the
    same random state the output is peft's (torch's dropout on the CPU, drawn in peft's
    order)."""
    fast, peft = (speed_module(fast_lora=f, lora_dropout=0.5) for f in (True, False))
    fast.train(), peft.train()
    first, second = logits(fast, seed=0), logits(fast, seed=1)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(first, logits(peft, seed=0), rtol=1e-3, atol=1e-3)
    fast.eval()  # no dropout in evaluation: seeds no longer matter
    torch.testing.assert_close(logits(fast, seed=0), logits(fast, seed=1), rtol=0, atol=0)


def test_fast_lora_leaves_disabled_adapters_to_peft(speed_module, logits):
    """With the adapters disabled the fused forward gives peft's base output, not the LoRA one."""
    fast, peft = (speed_module(fast_lora=f).eval() for f in (True, False))
    with fast.model.disable_adapter(), peft.model.disable_adapter():
        disabled = logits(fast)
        torch.testing.assert_close(disabled, logits(peft), rtol=0, atol=0)
    assert not torch.allclose(disabled, logits(fast))


def test_small_compiled_steps_take_the_compilers_dropout(monkeypatch):
    """Compiled steps of at most MAX_TOKENS tokens are host-bound: there the seeded op gives way
    to the compiler's own dropout and matmul. Large compiled steps and eager steps keep the op;
    the switch brings it back everywhere."""
    monkeypatch.setattr(lora_dropout, "applies", lambda x, a: x.dim() == 2)
    dropout, lora_a = torch.nn.Dropout(0.1).train(), torch.zeros(16, 64)

    def takes_op(tokens: int, compiling: bool) -> bool:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            seeded = fast_lora._seeded_dropout(dropout, torch.ones(tokens, 64), lora_a)
        return seeded is not None

    assert takes_op(MAX_TOKENS, False) and takes_op(MAX_TOKENS + 1, True)
    assert not takes_op(MAX_TOKENS, True)
    monkeypatch.setattr(fast_lora, "SEEDED_DROPOUT_ON_SMALL_COMPILED_STEPS", True)
    assert takes_op(MAX_TOKENS, True)
