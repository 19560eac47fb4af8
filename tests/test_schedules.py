"""Warm-up schedules match transformers' definitions."""

from __future__ import annotations

import math

import pytest
import torch

from lit_cats.schedules import WarmupLR


def _lrs(steps: int, **kwargs) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupLR(opt, num_training_steps=steps, **kwargs)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_constant_with_three_percent_warmup():
    lrs = _lrs(100, warmup_ratio=0.03)  # ceil(3) warm-up steps, as HF's get_warmup_steps
    assert lrs[:4] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])
    assert set(lrs[3:]) == {1.0}


def test_cosine_decays_to_the_floor():
    lrs = _lrs(101, warmup_steps=0, schedule="cosine", min_lr_ratio=0.1)
    assert lrs[0] == 1.0
    assert lrs[50] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 50 / 101)))
    assert lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 100 / 101)))


def test_bad_arguments_are_named():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="num_training_steps"):
        WarmupLR(opt)
    with pytest.raises(ValueError, match="'step'"):
        WarmupLR(opt, 10, schedule="step")


def test_state_dict_round_trips():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupLR(opt, 10)
    for _ in range(3):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = WarmupLR(opt2, 10)
    sched2.load_state_dict(state)
    assert sched2.last_epoch == 3
