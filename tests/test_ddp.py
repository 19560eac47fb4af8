"""Data-parallel training: sharding the data by rank, and 2-process DDP runs on the CPU."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_cats.cli import main
from lit_cats.data import CatsDataModule
from lit_cats.data.sampling import (
    LengthGroupedSampler,
    data_parallel_size,
    shard_eval_sampler,
    shard_train_sampler,
)
from lit_cats.tiny import TINY_MODEL_ID


def _rank(rank: int, world: int = 2) -> SimpleNamespace:
    """Just enough of a Trainer for the data path: which rank of how many, on one node."""
    return SimpleNamespace(
        distributed_sampler_kwargs={"num_replicas": world, "rank": rank},
        world_size=world,
        num_devices=world,
        num_nodes=1,
        accumulate_grad_batches=1,
    )


def _batches(loader) -> list[list[int]]:
    return [b["input_ids"].tolist() for b in loader]


# ------------------------------------------------------------------------------- sharding
def test_single_process_is_not_sharded():
    sampler = LengthGroupedSampler([3, 1, 2], batch_size=1)
    assert shard_train_sampler(sampler, None) is sampler
    assert shard_eval_sampler([1, 2, 3], None) is None
    single = SimpleNamespace(distributed_sampler_kwargs=None)
    assert data_parallel_size(single) == 1 and shard_train_sampler(sampler, single) is sampler


def test_train_shards_interleave_the_global_order_without_reshuffling():
    lengths = list(torch.randint(1, 200, (101,), generator=torch.Generator().manual_seed(0)))
    lengths = [int(n) for n in lengths]
    order = LengthGroupedSampler(lengths, batch_size=8, seed=3)
    shards = [
        shard_train_sampler(LengthGroupedSampler(lengths, 8, seed=3), _rank(r)) for r in (0, 1)
    ]
    for epoch in (0, 1):
        order.set_epoch(epoch)
        for shard in shards:
            shard.set_epoch(epoch)  # what Lightning calls; it must reach the inner sampler
        expected = list(order)
        got = [list(shard) for shard in shards]
        # Rank r takes positions r, r + 2, ...: each step's 2 x 4 examples are the single
        # process's batch of 8 for that step, in the single process's (length-grouped) order.
        padded = expected + expected[: len(expected) % 2]  # the last step is padded evenly
        assert got[0] == padded[0::2] and got[1] == padded[1::2]
    order.set_epoch(0)
    assert list(order) != expected  # set_epoch really changed the order each shard followed


def test_eval_shards_hold_every_example_exactly_once():
    dataset = list(range(19))  # odd: Lightning's default sampler would repeat one example
    shards = [list(shard_eval_sampler(dataset, _rank(r))) for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == dataset
    with pytest.raises(ValueError, match="fewer than the 2 ranks"):
        shard_eval_sampler([0], _rank(0))


def test_datamodule_ranks_together_see_the_single_process_batches(tiny_path):
    def datamodule(batch_size: int, trainer) -> CatsDataModule:
        dm = CatsDataModule("lit-cats/cat-memes", TINY_MODEL_ID, batch_size=batch_size)
        dm.trainer = trainer
        dm.setup("fit")
        return dm

    single = _batches(datamodule(8, None).train_dataloader())
    ranks = [_batches(datamodule(4, _rank(r)).train_dataloader()) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for step, batch in enumerate(single[:-1]):  # the last step is padded to equal shards
        rows = [row for r in ranks for row in r[step]]
        pad_id = 1024  # strip right padding: widths differ between the layouts
        strip = sorted(tuple(t for t in row if t != pad_id) for row in rows)
        assert strip == sorted(tuple(t for t in row if t != pad_id) for row in batch)
    # Validation: each example on one rank only, none repeated.
    val_single = datamodule(8, None).val_dataloader()
    val_ranks = [datamodule(4, _rank(r)).val_dataloader() for r in (0, 1)]
    n_single = sum(len(b["input_ids"]) for b in val_single)
    assert sum(len(b["input_ids"]) for v in val_ranks for b in v) == n_single


# ------------------------------------------------------------------------------- real DDP runs
# fp32 end to end, so one process and two agree to ~1e-6; a wrong loss weighting or batch
# split shows as ~1e-2 (bf16 rounding alone is ~5e-3, which would hide it).
_EXACT = (
    "--trainer.precision",
    "32-true",
    "--model.bnb_4bit_compute_dtype",
    "float32",
    "--model.lora_dropout",
    "0",  # dropout masks would differ between 1 x 8 and 2 x 4 rows
    "--trainer.log_every_n_steps",
    "1",
    "--trainer.val_check_interval",
    "4",
)

_CHECKPOINT_EVERY_2 = "checkpoint:\n  every_n_train_steps: 2\n"


def _lit_cats_ddp(cwd: Path, fit_args, *args: str) -> str:
    """Run the console script with 2 CPU processes (Lightning starts the second one)."""
    env = {
        k: v
        for k, v in os.environ.items()
        # A test run inside a SLURM job or torchrun must not make Lightning join that job.
        if not k.startswith(("SLURM_", "TORCHELASTIC_", "PL_"))
        and k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    script = Path(sys.executable).with_name("lit-cats")
    cmd = [str(script), *fit_args(*args)]
    cmd += ["--trainer.accelerator", "cpu", "--trainer.devices", "2"]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def _relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    diff = sum(((a[k] - b[k]).float() ** 2).sum() for k in a) ** 0.5
    return float(diff / sum((a[k].float() ** 2).sum() for k in a) ** 0.5)


def _scalars(run: Path, tag: str) -> list[float]:
    events = EventAccumulator(str(run))
    events.Reload()
    return [e.value for e in events.Scalars(tag)]


def test_two_processes_train_like_one_with_the_same_global_batch(run_dir, configs, fit_args):
    # One process, batch 8, 4 steps.
    main(fit_args(*_EXACT, "--trainer.max_steps", "4", "--data.batch_size", "8"))
    single = run_dir / "logs" / "tiny-cats" / "version_0"

    # Two processes, batch 4 each.
    ddp = run_dir / "ddp"
    ddp.mkdir()
    (ddp / "every2.yaml").write_text(_CHECKPOINT_EVERY_2)
    common = (*_EXACT, "--config", str(configs / "ddp.yaml"), "--config", "every2.yaml")
    out = _lit_cats_ddp(
        ddp, fit_args, *common, "--trainer.max_steps", "4", "--data.batch_size", "4"
    )
    runs = ddp / "logs" / "tiny-cats"
    run = runs / "version_0"

    # The effective batch is reported, once (rank zero).
    assert out.count("effective batch size: 8 = 4 per device x 2 devices x 1 nodes") == 1

    # The same adapter as one process (fp32: only summation order differs)...
    lora_b = {k: v for k, v in _adapter(single).items() if "lora_B" in k}  # B starts at 0
    ddp_b = {k: v for k, v in _adapter(run).items() if "lora_B" in k}
    assert _relative_difference(ddp_b, lora_b) < 1e-4
    # ...the same per-step losses (the logged loss is the global token mean) and validation.
    assert _scalars(run, "loss/train") == pytest.approx(_scalars(single, "loss/train"), rel=1e-5)
    assert _scalars(run, "loss/val") == pytest.approx(_scalars(single, "loss/val"), rel=1e-5)

    # Exactly one set of outputs: one version folder, one event file, one adapter.
    assert sorted(p.name for p in runs.iterdir()) == ["hub-dry-run", "version_0"]
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    checkpoints = {p.name for p in (run / "checkpoints").iterdir()}
    assert checkpoints == {"step=2.ckpt", "step=4.ckpt", "last.ckpt"}
    assert (run / "config.yaml").is_file() and (run / "adapter").is_dir()
    # The Hub push (dry run) holds the final adapter.
    pushed = runs / "hub-dry-run" / "adapter_model.safetensors"
    assert pushed.read_bytes() == (run / "adapter" / "adapter_model.safetensors").read_bytes()
    # Throughput counts both ranks' tokens.
    assert _scalars(run, "speed/tokens_per_s")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_under_torchrun_write_one_run(run_dir, configs, fit_args):
    """Two single-process "nodes" on this machine, started by torchrun as on a cluster."""
    torchrun = Path(sys.executable).with_name("torchrun")
    port = str(_free_port())
    procs = []
    for node_rank in (0, 1):
        cmd = [
            str(torchrun),
            "--nnodes=2",
            "--nproc_per_node=1",
            f"--node_rank={node_rank}",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            "-m",
            "lit_cats.cli",
            *fit_args("--trainer.max_steps", "2", "--data.batch_size", "4"),
            "--config",
            str(configs / "ddp.yaml"),
            "--trainer.accelerator",
            "cpu",
            "--trainer.devices",
            "1",
            "--trainer.num_nodes",
            "2",
        ]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "effective batch size: 8 = 4 per device x 1 devices x 2 nodes" in outputs[0]
    runs = run_dir / "logs" / "tiny-cats"
    assert sorted(p.name for p in runs.iterdir()) == ["hub-dry-run", "version_0"]
    assert (runs / "version_0" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_two_processes_train_with_compiled_layers_and_packing(run_dir, configs, fit_args):
    """fast.yaml + ddp.yaml + compiled layers: packed batches sharded by rank, layers compiled."""
    args = ("--config", str(configs / "fast.yaml"), "--config", str(configs / "ddp.yaml"))
    args += ("--model.speed.compile", "true", "--data.max_tokens_per_batch", "2048")
    out = _lit_cats_ddp(
        run_dir, fit_args, *args, "--trainer.max_steps", "3", "--trainer.log_every_n_steps", "1"
    )
    assert "recompile_limit" not in out and "Graph break" not in out
    run = run_dir / "logs" / "tiny-cats" / "version_0"
    assert _adapter(run) and _scalars(run, "loss/train")


def test_two_processes_accumulating_train_like_one_with_the_whole_batch(run_dir, configs, fit_args):
    """2 ranks x batch 2 x accumulation 2 == 1 process x batch 8, rows of very uneven lengths:
    each micro-batch weighs by its share of the step's label tokens on both ranks together."""
    from test_loss import EXACT_ONE_EPOCH, fit_adapter, relative_difference, write_uneven_rows

    data = ("--data.dataset", str(write_uneven_rows(run_dir)))  # 10 rows: steps of 8, then 2
    ref, ref_losses = fit_adapter(run_dir / "whole", fit_args, *data, "--data.batch_size", "8")
    ddp = run_dir / "ddp"
    ddp.mkdir()
    args = (*EXACT_ONE_EPOCH, *data, "--config", str(configs / "ddp.yaml"))
    args += ("--data.batch_size", "2", "--trainer.accumulate_grad_batches", "2")
    _lit_cats_ddp(ddp, fit_args, *args)
    run = ddp / "logs" / "tiny-cats" / "version_0"
    assert relative_difference(_adapter(run), ref) < 1e-5  # the last step: 1 micro-batch each
    events = EventAccumulator(str(run))
    events.Reload()
    tag = next(t for t in events.Tags()["scalars"] if "train" in t and "loss" in t)
    assert [e.value for e in events.Scalars(tag)] == pytest.approx(ref_losses, rel=1e-5)
