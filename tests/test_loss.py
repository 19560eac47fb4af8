"""The training loss as a mean over label tokens (``lit_cats.loss``), on one process and many."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_cats import loss as loss_module
from lit_cats.data.formatting import IGNORE_INDEX
from lit_cats.data.sampling import STEP_SHARE_KEY, StepShare, with_step_shares
from lit_cats.loss import StepTokenMean, average_tokens_across_ranks, label_token_count


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


# ----------------------------------------------------------------- gradient accumulation
def _labelled(*label_counts: int) -> list[dict[str, torch.Tensor]]:
    """Batches of one row whose label-token counts are ``label_counts`` (column 0 is masked)."""
    out = []
    for n in label_counts:
        labels = torch.full((1, n + 3), IGNORE_INDEX)
        labels[0, 1 : n + 1] = 7
        out.append({"labels": labels})
    return out


def test_step_shares_count_each_steps_tokens_ahead():
    def shares(batches, *args):
        return [tuple(b[STEP_SHARE_KEY]) for b in with_step_shares(iter(batches), *args)]

    # 7 micro-batches, 3 per step: the epoch's last step holds one.
    got = shares(_labelled(1, 2, 3, 4, 5, 6, 7), 3)
    assert got == [(6, 0, 3), (6, 1, 3), (6, 2, 3), (15, 0, 3), (15, 1, 3), (15, 2, 3), (7, 0, 1)]
    # Resumed after batch 2 of the epoch: the steps stay where Lightning puts them (batch i in
    # step i // 3), and Lightning takes only 5 batches (limit_train_batches): the last step is
    # cut there and never counts tokens it will not train on.
    got = shares(_labelled(3, 4, 5, 6), 3, 2, 5)
    assert got[:3] == [(3, 0, 1), (9, 0, 2), (9, 1, 2)]


def test_accumulated_micro_batches_average_to_the_steps_token_mean():
    # Micro-batches of 1, 2 and 9 label tokens in one step of accumulate_grad_batches=3: the
    # mean of their means is not the mean over the step's 12 tokens.
    per_token = [torch.tensor([5.0]), torch.tensor([1.0, 2.0]), torch.arange(9.0)]
    trainer = SimpleNamespace(world_size=1, accumulate_grad_batches=3)
    weights = [torch.tensor(1.0, requires_grad=True) for _ in per_token]
    weighting, outs, logged = StepTokenMean(), [], []
    for i, (w, tokens) in enumerate(zip(weights, per_token, strict=True)):
        loss = (w * tokens).mean()
        share = StepShare(tokens=12, index=i, size=3)
        out, log = weighting(loss, torch.tensor(len(tokens)), share, trainer)
        outs.append(out / 3)  # what Lightning backpropagates
        logged.append(log)
    global_mean = torch.cat(per_token).mean()
    assert torch.allclose(sum(outs), global_mean)
    assert torch.allclose(logged[-1], global_mean)  # the step's value, as Lightning logs it
    assert torch.allclose(logged[1], torch.tensor(8.0 / 3))  # before: the running mean
    sum(outs).backward()
    for w, tokens in zip(weights, per_token, strict=True):
        assert torch.allclose(w.grad, tokens.sum() / 12)


# Through the CLI: batch 2 x accumulation 4 must train exactly as batch 8. fp32 end to end
# (see tests/test_ddp.py), plain SGD (Adam's first step would hide a gradient's scale), no
# warm-up (its first step has lr 0), dropout off, one seeded shuffle for every batch size.
EXACT_ONE_EPOCH = (
    "--trainer.precision",
    "32-true",
    "--model.bnb_4bit_compute_dtype",
    "float32",
    "--model.lora_dropout",
    "0",
    "--model.optimizer",
    "torch.optim.SGD",
    "--model.optimizer.init_args.lr",
    "0.5",
    "--model.scheduler.init_args.warmup_ratio",
    "0",
    "--data.val_size",
    "0",
    "--data.group_by_length",
    "false",
    "--trainer.max_steps",
    "-1",
    "--trainer.max_epochs",
    "1",
    "--trainer.log_every_n_steps",
    "1",
)


def write_uneven_rows(folder: Path, truncate_to: int | None = None) -> Path:
    """10 chats whose label tokens differ widely (1 to ~150 answer words).

    With ``truncate_to`` every row is cut to that many tokens (all are longer), so packed
    token-budget batches of ``k * truncate_to`` tokens hold exactly ``k`` rows, while the
    answers' share of each row (the label tokens) still ranges from a few tokens to most.
    """
    if truncate_to is None:
        prompts, answers = [3, 5, 2, 8, 4, 6, 3, 2, 7, 5], [1, 150, 2, 90, 1, 60, 4, 120, 1, 30]
    else:
        prompts, answers = [1, 30, 3, 28, 2, 25, 6, 20, 2, 31], [80] * 10
    rows = [
        {"prompt": "cat " * p, "response": "meow purr " * a}
        for p, a in zip(prompts, answers, strict=True)
    ]
    path = folder / "uneven.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def fit_adapter(folder: Path, fit_args, *args: str) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Fit in ``folder``; the saved adapter and the logged per-step training losses."""
    from lit_cats.cli import main

    folder.mkdir()
    old = os.getcwd()
    os.chdir(folder)
    try:
        main(fit_args(*EXACT_ONE_EPOCH, *args))
    finally:
        os.chdir(old)
    run = folder / "logs" / "tiny-cats" / "version_0"
    events = EventAccumulator(str(run))
    events.Reload()
    tag = next(t for t in events.Tags()["scalars"] if "train" in t and "loss" in t)
    losses = [e.value for e in events.Scalars(tag)]
    return load_file(run / "adapter" / "adapter_model.safetensors"), losses


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    diff = sum(((a[k] - b[k]).float() ** 2).sum() for k in a) ** 0.5
    return float(diff / sum((a[k].float() ** 2).sum() for k in a) ** 0.5)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_accumulation_trains_like_the_whole_batch(run_dir, fit_args, packing):
    # 10 rows: batch 8 steps on rows 0-7, then 8-9; batch 2 x 4 takes the same rows in 4
    # micro-batches, then 1 (the epoch's last, shorter step). Packed: budgets of 8 and 2 rows.
    rows = 48
    data = str(write_uneven_rows(run_dir, rows if packing else None))
    common = ("--data.dataset", data)
    if packing:
        common += ("--data.max_seq_length", str(rows), "--data.packing", "true")
        whole = ("--data.max_tokens_per_batch", str(8 * rows))
        micro = ("--data.max_tokens_per_batch", str(2 * rows))
    else:
        whole, micro = ("--data.batch_size", "8"), ("--data.batch_size", "2")
    ref, ref_losses = fit_adapter(run_dir / "whole", fit_args, *common, *whole)
    got, losses = fit_adapter(
        run_dir / "accumulated",
        fit_args,
        *common,
        *micro,
        "--trainer.accumulate_grad_batches",
        "4",
    )
    assert len(ref_losses) == 2  # two optimizer steps each, the second one short
    assert losses == pytest.approx(ref_losses, rel=1e-5)  # the step's per-token mean
    # ~1e-8 here; averaging the micro-batches' means instead is off by 5e-3 (7e-4 packed).
    assert relative_difference(got, ref) < 1e-5
