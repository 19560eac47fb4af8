"""The chunked loss (lit_cats.fast.chunked_loss): cross-entropy over the output head without
full-vocabulary logits, alone and as the model's training loss (``model.speed.loss_chunk_size``).

Chunking regroups the same bf16 operations: loss within 1e-4, worst LoRA gradient within 2e-2.
"""

from __future__ import annotations

import torch

from lit_cats.data.formatting import IGNORE_INDEX
from lit_cats.fast.chunked_loss import chunked_causal_lm_loss


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


def test_chunked_loss_in_the_model_equals_transformers_loss(
    make_examples, padded, speed_module, loss_and_grads, assert_steps_close
):
    batch = padded(make_examples([40, 17, 63, 25]))
    ref = loss_and_grads(speed_module(), batch)
    chunked = loss_and_grads(speed_module(loss_chunk_size=16), batch)
    assert_steps_close(chunked, ref, loss_tol=1e-4, grad_tol=2e-2)
