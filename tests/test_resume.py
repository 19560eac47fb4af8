"""Resuming a run (``lit_cats.resume``, ``lit_cats.callbacks.RNGState``): a run killed with
SIGKILL and resumed with ``--ckpt_path last`` logs the uninterrupted run's every step, in the
same run folder; ``last`` is the experiment's own; unreadable files and other settings are
usage errors that say what to do."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_cats.assets import SHIPPED_DATASET
from lit_cats.callbacks.rng_state import collect_rng_states, set_rng_states
from lit_cats.cli import main
from lit_cats.data.datamodule import CatsDataModule
from lit_cats.errors import UsageError
from lit_cats.model import QLoRAModule
from lit_cats.resume import (
    CHANGEABLE,
    continued_version,
    find_last,
    finished_epochs,
    read_checkpoint,
)

EXPERIMENT = Path("logs", "tiny-cats")
RUN = EXPERIMENT / "version_0"
STEPS = 8  # 2 epochs of 4 steps: 28 training rows of 30, batch 8, the last batch short


def _small_dataset(folder: Path) -> Path:
    """30 rows of the shipped cat memes: 4 steps an epoch, so a short run crosses epochs."""
    path = folder / "small.jsonl"
    path.write_text("".join(SHIPPED_DATASET.read_text().splitlines(keepends=True)[:30]))
    return path


def _args(fit_args, data: Path, *extra: str) -> list[str]:
    """A 2-epoch fit of the tiny model that logs every step and checkpoints every 2."""
    return fit_args(
        "--data.dataset", str(data), "--trainer.max_steps", "-1", "--trainer.max_epochs", "2",
        "--trainer.log_every_n_steps", "1", "--checkpoint.every_n_train_steps", "2", *extra,
    )  # fmt: skip


def _start(cwd: Path, args: list[str]) -> subprocess.Popen:
    """``lit-cats`` in a child process, one thread (the same arithmetic in every run)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log = (cwd / f"lit-cats-{time.monotonic_ns()}.log").open("w")
    cmd = [sys.executable, "-m", "lit_cats.cli", *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)


def _run(cwd: Path, args: list[str]) -> tuple[int, str]:
    log = cwd / f"lit-cats-{time.monotonic_ns()}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lit_cats.cli", *args]
    with log.open("w") as out:
        code = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                              timeout=600).returncode  # fmt: skip
    return code, log.read_text()


def _scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fit_args, tiny_path) -> dict[str, Path]:
    """An uninterrupted 2-epoch run, and the same run killed (SIGKILL) after its first
    checkpoint, each in a folder of its own (run side by side, each on one thread)."""
    root = tmp_path_factory.mktemp("resume")
    data = _small_dataset(root)
    full, killed = root / "full", root / "killed"
    full.mkdir()
    killed.mkdir()
    reference = _start(full, _args(fit_args, data))
    child = _start(killed, _args(fit_args, data))
    checkpoints = killed / RUN / "checkpoints"
    deadline = time.monotonic() + 600
    while not (checkpoints / "last.ckpt").exists():
        assert child.poll() is None, "the run to kill ended before writing a checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=60) == -signal.SIGKILL
    assert reference.wait(timeout=600) == 0
    return {"root": root, "data": data, "full": full, "killed": killed}


def test_a_killed_run_resumed_from_last_logs_every_step_of_the_uninterrupted_run(runs, fit_args):
    killed = runs["killed"]
    assert not (killed / RUN / "adapter").exists()  # it really was stopped mid-run
    config = yaml.safe_load((runs["full"] / RUN / "config.yaml").read_text())
    assert config["model"]["lora_dropout"] == 0.05  # the recipe's: dropout draws matter
    resumed = shutil.copytree(killed, runs["root"] / "resumed")
    code, output = _run(resumed, _args(fit_args, runs["data"], "--ckpt_path", "last"))
    assert code == 0, output[-3000:]
    start = int(re.search(r"Resuming \S+ at step (\d+), in its run folder version_0", output)[1])
    assert 0 < start < STEPS
    # One run folder: the resumed run continues the killed one's curve.
    assert sorted(p.name for p in (resumed / EXPERIMENT).glob("version_*")) == ["version_0"]
    assert (resumed / RUN / "adapter" / "adapter_model.safetensors").is_file()
    for tag in ("loss/train", "optim/grad_norm"):
        got, want = dict(_scalars(resumed / RUN, tag)), dict(_scalars(runs["full"] / RUN, tag))
        assert sorted(want) == list(range(STEPS))
        assert len(got) == len(_scalars(resumed / RUN, tag))  # each step once: the killed
        # run's steps after its checkpoint are purged
        # Bit for bit from the resumed step on, through an epoch end and a validation.
        assert {s: v for s, v in got.items() if s >= start} == {
            s: v for s, v in want.items() if s >= start
        }, tag
        # Before it, the killed run's own points. Lightning logs a step after its checkpoint
        # is written, so a kill between the two loses that one step's point (start - 1).
        assert set(range(start - 1)) <= set(got) and all(got[s] == want[s] for s in got)


def _killed_copy(runs, run_dir: Path) -> Path:
    shutil.copytree(runs["killed"] / "logs", run_dir / "logs")
    return run_dir / RUN / "checkpoints"


def _finished_copy(runs, run_dir: Path) -> Path:
    shutil.copytree(runs["full"] / "logs", run_dir / "logs")
    return run_dir / RUN / "checkpoints"


def _usage_error(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_last_is_the_newest_last_ckpt_of_the_experiments_run_folders(
    runs, run_dir, fit_args, capsys
):
    checkpoints = _finished_copy(runs, run_dir)
    experiment = run_dir / EXPERIMENT
    # Newer copies outside the run folders: the Hub rehearsal's (readable, of step 4) and a
    # staging folder's (truncated). Neither is this experiment's last checkpoint.
    rehearsal = experiment / "hub-dry-run" / "last-checkpoint" / "last.ckpt"
    staging = experiment / ".hub-staging" / "step-8" / "last.ckpt"
    staging.parent.mkdir(parents=True)
    shutil.copy(checkpoints / "step=4.ckpt", rehearsal)
    staging.write_bytes((checkpoints / "last.ckpt").read_bytes()[:5000])
    assert find_last(experiment) == experiment / "version_0" / "checkpoints" / "last.ckpt"
    # Through the command: the finished run's own last.ckpt, so nothing is left to train.
    err = _usage_error(capsys, _args(fit_args, runs["data"], "--ckpt_path", "last"))
    assert "'logs/tiny-cats/version_0/checkpoints/last.ckpt' has trained 2 epoch(s)" in err


def test_an_unreadable_last_falls_back_to_the_newest_readable_and_says_so(
    runs, run_dir, fit_args, capsys
):
    checkpoints = _finished_copy(runs, run_dir)
    last = checkpoints / "last.ckpt"
    last.write_bytes(last.read_bytes()[:5000])  # as if killed while writing it
    os.utime(last)  # the newest file
    newest = max(checkpoints.glob("step=*.ckpt"), key=lambda p: p.stat().st_mtime)
    assert newest.name == f"step={STEPS}.ckpt"
    named = rf"{last.relative_to(run_dir)}, is unreadable.*from .*{newest.relative_to(run_dir)}"
    with pytest.warns(UserWarning, match=named):
        err = _usage_error(capsys, _args(fit_args, runs["data"], "--ckpt_path", "last"))
    assert f"'{newest.relative_to(run_dir)}' has trained 2 epoch(s)" in err


def test_last_without_a_run_is_a_usage_error(run_dir, fit_args, capsys):
    err = _usage_error(capsys, fit_args("--trainer.max_steps", "2", "--ckpt_path", "last"))
    assert "no last.ckpt under 'logs/tiny-cats'" in err and "Start without --ckpt_path" in err
    assert not (run_dir / "logs").exists() or not list((run_dir / EXPERIMENT).glob("version_*"))


def test_a_finished_run_has_nothing_left_to_train(runs, run_dir, fit_args, capsys):
    _finished_copy(runs, run_dir)
    adapter = run_dir / RUN / "adapter" / "adapter_model.safetensors"
    written = adapter.stat().st_mtime_ns
    events = sorted((run_dir / RUN).glob("events.*"))
    err = _usage_error(capsys, _args(fit_args, runs["data"], "--ckpt_path", "last"))
    assert "has trained 2 epoch(s), and trainer.max_epochs is 2" in err
    assert "raise --trainer.max_epochs above 2" in err
    assert adapter.stat().st_mtime_ns == written  # no new adapter
    assert sorted((run_dir / RUN).glob("events.*")) == events
    assert [p.name for p in (run_dir / EXPERIMENT).glob("version_*")] == ["version_0"]


def test_changed_settings_that_shape_the_adapter_or_data_are_refused(
    runs, run_dir, fit_args, capsys
):
    _killed_copy(runs, run_dir)
    args = _args(
        fit_args, runs["data"], "--model.r", "8", "--data.max_seq_length", "256",
        "--model.optimizer.init_args.lr", "1e-3", "--ckpt_path", "last",
    )  # fmt: skip
    err = _usage_error(capsys, args)
    assert "model.r: 16 in the checkpoint, 8 now" in err
    assert "data.max_seq_length: 512 in the checkpoint, 256 now" in err
    # The restored optimizer state would silently keep the old rate: refused too.
    assert "model.optimizer.init_args.lr: 0.003 in the checkpoint, 0.001 now" in err
    assert "last.ckpt" in err and "start a new run without --ckpt_path" in err


def test_allowed_changes_are_applied_and_said(runs, run_dir, fit_args, caplog):
    _killed_copy(runs, run_dir)
    args = _args(
        fit_args, runs["data"], "--trainer.max_epochs", "1",
        "--model.speed.gradient_checkpointing", "false", "--ckpt_path", "last",
    )  # fmt: skip
    with caplog.at_level(logging.INFO):  # Lightning's rank-zero log, on the console for users
        main(args)
    out = caplog.text
    assert "Resuming with changed: " in out
    assert "model.speed.gradient_checkpointing true -> false" in out
    assert "trainer.max_epochs 2 -> 1" in out
    config = yaml.safe_load((run_dir / RUN / "config.yaml").read_text())
    assert config["model"]["speed"]["gradient_checkpointing"] is False  # the command line's
    assert _scalars(run_dir / RUN, "loss/train")[-1][0] == 3  # trained to the end of epoch 1


@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty"])
def test_an_unreadable_checkpoint_file_is_a_usage_error(runs, run_dir, fit_args, capsys, kind):
    good = (runs["full"] / RUN / "checkpoints" / "last.ckpt").read_bytes()
    content = {"garbage": b"not a checkpoint", "truncated": good[: len(good) // 2], "empty": b""}
    Path("bad.ckpt").write_bytes(content[kind])
    err = _usage_error(capsys, fit_args("--trainer.max_steps", "2", "--ckpt_path", "bad.ckpt"))
    reason = {"garbage": "not a torch.save archive", "truncated": "truncated", "empty": "empty"}
    assert "'bad.ckpt' is not a readable checkpoint" in err and reason[kind] in err
    assert "Pass another checkpoint" in err and len(err.strip().splitlines()) == 1
    assert "weights_only" not in err and "zip" not in err
    # validate/test/predict read the file before anything else too
    err = _usage_error(capsys, ["validate", *fit_args()[1:], "--ckpt_path", "bad.ckpt"])
    assert "'bad.ckpt' is not a readable checkpoint" in err


def test_a_checkpoint_of_another_model_or_rank_is_a_usage_error(runs, run_dir, fit_args, capsys):
    checkpoint = torch.load(runs["full"] / RUN / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["hyper_parameters"] |= {"model_name_or_path": "microsoft/Phi-3-mini-4k-instruct"}
    checkpoint["hyper_parameters"]["r"] = 32
    torch.save(checkpoint, "other.ckpt")
    err = _usage_error(capsys, fit_args("--trainer.max_steps", "20", "--ckpt_path", "other.ckpt"))
    assert "model.model_name_or_path: microsoft/Phi-3-mini-4k-instruct in the checkpoint, " in err
    assert "model.r: 32 in the checkpoint, 16 now" in err
    assert "size mismatch" not in err


def test_the_settings_allowed_to_change_are_real_and_leave_the_recipe_compared():
    import inspect

    arguments = {
        f"{prefix}.{name}"
        for prefix, cls in (("model", QLoRAModule), ("data", CatsDataModule))
        for name in inspect.signature(cls.__init__).parameters
    }
    assert set(CHANGEABLE) <= arguments  # no stale names
    shaping = {"model.model_name_or_path", "model.load_in_4bit", "model.bnb_4bit_quant_type",
               "model.r", "model.lora_alpha", "model.lora_dropout", "model.target_modules",
               "data.dataset", "data.format", "data.max_seq_length", "data.batch_size",
               "data.seed", "data.tokenizer_name_or_path"}  # fmt: skip
    assert shaping <= arguments and not shaping & set(CHANGEABLE)


def test_a_resume_from_an_older_checkpoint_starts_a_new_run_folder(runs, run_dir):
    checkpoints = _finished_copy(runs, run_dir)
    root = run_dir / EXPERIMENT
    older = checkpoints / "step=4.ckpt"
    newest = checkpoints / "last.ckpt"
    assert continued_version(older, read_checkpoint(older), root) is None  # keeps steps 6, 8
    assert continued_version(newest, read_checkpoint(newest), root) == "version_0"
    outside = run_dir / "elsewhere.ckpt"
    shutil.copy(newest, outside)
    assert continued_version(outside, read_checkpoint(outside), root) is None


def test_read_checkpoint_refuses_a_file_without_lit_cats_contents(run_dir):
    torch.save({"weights": torch.zeros(2)}, "plain.ckpt")
    with pytest.raises(UsageError, match="'plain.ckpt' is not a lit-cats training checkpoint"):
        read_checkpoint("plain.ckpt")


def _without_job_env() -> dict[str, str]:
    """This environment, minus what would make Lightning join an outer SLURM/torchrun job."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "TORCHELASTIC_", "PL_"))
        and k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }


def test_two_processes_resume_each_ranks_generators(tmp_path, configs, fit_args, monkeypatch):
    monkeypatch.setattr(os, "environ", _without_job_env())
    data = _small_dataset(tmp_path)
    ddp = ("--config", str(configs / "ddp.yaml"), "--trainer.accelerator", "cpu")
    ddp += ("--trainer.devices", "2", "--data.batch_size", "4")  # the global batch stays 8
    full = tmp_path / "full"
    full.mkdir()
    code, output = _run(full, _args(fit_args, data, *ddp))
    assert code == 0, output[-3000:]
    checkpoints = full / RUN / "checkpoints"
    states = read_checkpoint(checkpoints / "step=2.ckpt")["callbacks"]["RNGState"]["ranks"]
    assert sorted(states) == [0, 1]  # every rank's generators, keyed by global rank

    # The run as if it had been killed after step 2, resumed on two processes.
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    for later in (resumed / RUN / "checkpoints").glob("*.ckpt"):
        if later.name != "step=2.ckpt":
            later.unlink()
    resume_from = str(RUN / "checkpoints" / "step=2.ckpt")
    code, output = _run(resumed, _args(fit_args, data, *ddp, "--ckpt_path", resume_from))
    assert code == 0, output[-3000:]
    for tag in ("loss/train", "optim/grad_norm"):
        want = _scalars(full / RUN, tag)
        assert [step for step, _ in want] == list(range(STEPS))
        assert _scalars(resumed / RUN, tag) == want, tag


def _draws(device: torch.device) -> list:
    import random

    import numpy as np

    # What training draws from: dropout (torch), lit-cats' fused dropout seeds (torch.randint
    # on the device, lit_cats.fast.lora._seeded_dropout), Python and NumPy.
    seed = torch.randint(1 << 62, (1,), device=device).item()
    return [torch.rand(3).tolist(), seed, random.random(), np.random.rand(2).tolist()]


def test_generator_states_survive_a_weights_only_checkpoint(tmp_path):
    device = torch.device("cpu")
    torch.save({"ranks": {0: collect_rng_states(device)}}, tmp_path / "states.pt")
    first = _draws(device)
    states = torch.load(tmp_path / "states.pt", weights_only=True)["ranks"][0]
    set_rng_states(states, device)
    assert _draws(device) == first


@pytest.mark.gpu
def test_the_cuda_generator_and_fused_dropout_seeds_are_restored():
    device = torch.device("cuda", torch.cuda.current_device())
    states = collect_rng_states(device)
    assert "cuda" in states
    first = _draws(device)
    set_rng_states(states, device)
    assert _draws(device) == first


def test_epochs_count_whether_saved_at_the_last_batch_or_at_the_epoch_end(runs):
    checkpoint = read_checkpoint(runs["full"] / RUN / "checkpoints" / f"step={STEPS}.ckpt")
    assert finished_epochs(checkpoint) == 2  # at the last batch: epoch 2 not yet counted
    loop = checkpoint["loops"]["fit_loop"]
    progress = loop["epoch_progress"]["current"]
    progress["processed"] = progress["ready"]  # as on_train_epoch_end saves it: counted
    assert finished_epochs(checkpoint) == 2
    loop["epoch_loop.batch_progress"]["is_last_batch"] = False  # mid-epoch
    progress["processed"] = progress["ready"] - 1
    assert finished_epochs(checkpoint) == 1
