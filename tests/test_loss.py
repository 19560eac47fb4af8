"""The training loss as a mean over label tokens (``lit_cats.loss``), on one process and many."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from lit_cats import loss as loss_module
from lit_cats.data.formatting import IGNORE_INDEX
from lit_cats.loss import average_tokens_across_ranks, label_token_count


def test_label_tokens_skip_masked_labels_and_the_first_column():
    labels = torch.tensor(
        [
            [7, 8, IGNORE_INDEX, 9],  # column 0 is never predicted (labels shift left by one)
            [IGNORE_INDEX, IGNORE_INDEX, 5, 6],
        ]
    )
    assert label_token_count(labels).item() == 4


def test_single_process_loss_is_untouched():
    loss = torch.tensor(2.5, requires_grad=True)
    out, logged = average_tokens_across_ranks(loss, torch.tensor(7), SimpleNamespace(world_size=1))
    assert out is loss and logged.item() == 2.5


def test_rank_losses_average_to_the_global_token_mean(monkeypatch):
    # Two ranks with 3 and 9 label tokens: their means (2 and 4) average to 3, but the mean over
    # all 12 tokens is 3.5. DDP averages the two returned losses' gradients.
    per_token = [torch.tensor([1.0, 2.0, 3.0]), torch.arange(9, dtype=torch.float32)]
    totals = torch.tensor([sum(t.sum() for t in per_token), 12.0])

    def all_reduce(tensor, op=None):
        tensor.copy_(totals)  # what summing both ranks' (loss sum, token count) gives

    monkeypatch.setattr(loss_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(loss_module.dist, "all_reduce", all_reduce)
    weights = [torch.tensor(1.0, requires_grad=True) for _ in per_token]
    trainer = SimpleNamespace(world_size=2)
    outs = []
    for w, tokens in zip(weights, per_token, strict=True):
        loss = (w * tokens).mean()  # each rank's mean over its own tokens, as transformers gives
        outs.append(average_tokens_across_ranks(loss, torch.tensor(len(tokens)), trainer))
    global_mean = torch.cat(per_token).mean()
    assert torch.allclose((outs[0][0] + outs[1][0]) / 2, global_mean)  # DDP's average
    assert torch.allclose(outs[0][1], global_mean) and torch.allclose(outs[1][1], global_mean)
    # The gradient reaching each rank's weights is its tokens' share of the global mean.
    ((outs[0][0] + outs[1][0]) / 2).backward()
    assert torch.allclose(weights[0].grad, per_token[0].sum() / 12)
    assert torch.allclose(weights[1].grad, per_token[1].sum() / 12)
