"""Warm-up schedules, checked against transformers' own schedulers (not lit-cats against itself).

The original script asked transformers for ``lr_scheduler_type="constant"`` with
``warmup_ratio=0.03``; ``get_scheduler("constant", ...)`` ignores the warm-up, so it trained at
the full rate from step 0. lit-cats keeps the 3% warm-up (``constant_with_warmup``) as the
original's evident intent; ``warmup_ratio: 0`` reproduces the original literally.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from transformers import TrainingArguments, get_scheduler

from lit_cats.cli import main
from lit_cats.schedules import WarmupLR

REPO = Path(__file__).resolve().parents[1]


def _run(make_scheduler, steps: int) -> list[float]:
    """The learning rate of each of ``steps`` optimizer steps, for a peak rate of 1."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def _lrs(steps: int, **kwargs) -> list[float]:
    return _run(lambda opt: WarmupLR(opt, num_training_steps=steps, **kwargs), steps)


def _hf(name: str, steps: int, warmup: int) -> list[float]:
    return _run(
        lambda opt: get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=steps),
        steps,
    )


def _hf_warmup_steps(ratio: float, steps: int) -> int:
    """How many warm-up steps HF's Trainer derives from a fractional warm-up."""
    args = TrainingArguments(output_dir="unused", warmup_steps=ratio, report_to=[])
    return args.get_warmup_steps(steps)


@pytest.mark.parametrize("steps", [10, 100, 101, 1000])
def test_hf_constant_ignores_the_warmup_the_original_asked_for(steps):
    warmup = _hf_warmup_steps(0.03, steps)
    assert warmup >= 1
    assert _hf("constant", steps, warmup) == [1.0] * steps  # full rate from step 0


@pytest.mark.parametrize("steps", [10, 100, 101, 1000])
def test_no_warmup_reproduces_the_originals_schedule(steps):
    original = _hf("constant", steps, _hf_warmup_steps(0.03, steps))
    assert _lrs(steps, warmup_ratio=0.0) == original


@pytest.mark.parametrize("steps", [10, 100, 101, 1000])
def test_three_percent_warmup_is_hf_constant_with_warmup(steps):
    warmup = _hf_warmup_steps(0.03, steps)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert WarmupLR(opt, steps, warmup_ratio=0.03).warmup_steps == warmup == math.ceil(0.03 * steps)
    assert _lrs(steps, warmup_ratio=0.03) == pytest.approx(
        _hf("constant_with_warmup", steps, warmup), abs=1e-12
    )
    assert _lrs(steps, warmup_ratio=0.03)[0] == 0.0


def test_the_readmes_setting_reproduces_the_original(capsys):
    """The README's 'How lit-cats differs' section names the override, and it does what it says."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## How lit-cats differs from the original, and why", 1)[1]
    section = section.split("\n## ", 1)[0]
    flag = re.search(r"`(--model\.scheduler\.init_args\.warmup_ratio) ([\d.]+)`", section)
    assert flag, "the section names no setting that reproduces the original's schedule"
    config = ["--config", str(REPO / "configs" / "qlora.yaml")]
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *config, flag.group(1), flag.group(2), "--print_config"])
    assert exit_.value.code in (0, None)
    scheduler = yaml.safe_load(capsys.readouterr().out)["model"]["scheduler"]
    assert scheduler["class_path"] == "lit_cats.schedules.WarmupLR"
    init = {k: v for k, v in scheduler["init_args"].items() if k != "num_training_steps"}
    lit_cats = _run(lambda opt: WarmupLR(opt, num_training_steps=200, **init), 200)
    assert lit_cats == _hf("constant", 200, _hf_warmup_steps(0.03, 200))


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
