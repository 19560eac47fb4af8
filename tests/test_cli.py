"""The ``lit-cats`` command (``lit_cats.cli``) as a user runs it, and the shipped configs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_cats.cli import main
from lit_cats.tiny import tiny_model_path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RUN = Path("logs", "tiny-cats", "version_0")  # where the first tiny fit in a folder writes


def _resolved(capsys, subcommand: str, *configs: Path) -> dict:
    args = [subcommand]
    for config in configs:
        args += ["--config", str(config)]
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--print_config"])
    assert exit_.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_parses(capsys, config):
    # Override files are parsed on top of the complete one, as users stack them.
    configs = [CONFIGS / "qlora.yaml"] + ([config] if config.name != "qlora.yaml" else [])
    subcommand = "predict" if config.name == "predict.yaml" else "fit"
    resolved = _resolved(capsys, subcommand, *configs)
    assert resolved["model"]["model_name_or_path"]


def test_qlora_yaml_carries_the_original_hyperparameters(capsys):
    cfg = _resolved(capsys, "fit", CONFIGS / "qlora.yaml")
    model, data, trainer = cfg["model"], cfg["data"], cfg["trainer"]
    assert model["model_name_or_path"] == "microsoft/Phi-3-mini-4k-instruct"
    assert data["dataset"] == "leonvanbokhorst/existential-cat-memes-v1"
    assert data["text_column"] == "text"
    assert (model["r"], model["lora_alpha"], model["lora_dropout"]) == (16, 32, 0.05)
    assert model["load_in_4bit"] and model["bnb_4bit_use_double_quant"]
    assert (model["bnb_4bit_quant_type"], model["bnb_4bit_compute_dtype"]) == ("nf4", "bfloat16")
    assert model["trust_remote_code"] is False
    # The intent of the original's 7 names, spelled as Phi-3's real (fused) modules.
    assert sorted(model["target_modules"]) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    assert model["speed"]["gradient_checkpointing"] is True
    assert model["optimizer"]["class_path"] == "bitsandbytes.optim.PagedAdamW32bit"
    assert model["optimizer"]["init_args"]["lr"] == 2e-4
    assert model["optimizer"]["init_args"]["weight_decay"] == 0.0
    sched = model["scheduler"]["init_args"]
    assert model["scheduler"]["class_path"] == "lit_cats.schedules.WarmupLR"
    assert (sched["schedule"], sched["warmup_ratio"]) == ("constant", 0.03)
    assert (trainer["max_epochs"], data["batch_size"], trainer["accumulate_grad_batches"]) == (
        3,
        2,
        1,
    )
    assert trainer["precision"] == "bf16-mixed"
    assert trainer["gradient_clip_val"] == 0.3
    assert data["max_seq_length"] == 512
    assert trainer["log_every_n_steps"] == 10
    assert not [c for c in trainer["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    checkpoint = cfg["checkpoint"]  # its own section, not an entry of trainer.callbacks
    assert (checkpoint["every_n_train_steps"], checkpoint["save_top_k"]) == (50, -1)
    assert checkpoint["save_last"] is True
    assert cfg["hub"]["repo_id"] == "phi-3-mini-4k-instruct-existential-cats-v1"
    assert cfg["hub"]["strategy"] == "checkpoint"  # the original's hub_strategy
    logger = trainer["logger"]
    assert logger["class_path"].endswith("TensorBoardLogger")
    assert logger["init_args"]["save_dir"] == "logs"


def _scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, fit_args) -> Path:
    """The folder of one 2-step tiny fit (hub dry run on, the adapter copied to final-adapter)."""
    cwd = tmp_path_factory.mktemp("tiny-run")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        main(fit_args("--trainer.max_steps", "2", "--model.output_dir", "final-adapter"))
    return cwd


def test_console_script_fit_writes_logs_adapter_and_config(run_dir, fit_args):
    script = Path(sys.executable).with_name("lit-cats")
    args = fit_args("--trainer.max_steps", "10", "--trainer.log_every_n_steps", "2")
    proc = subprocess.run([str(script), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = run_dir / RUN
    assert {"config.yaml", "adapter", "checkpoints"} <= {p.name for p in run.iterdir()}
    assert (run / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    assert (run / "checkpoints" / "last.ckpt").exists()
    tags = EventAccumulator(str(run)).Reload().Tags()["scalars"]
    for tag in ("loss/train", "optim/grad_norm", "speed/tokens_per_s", "optim/lr"):
        assert tag in tags
    # The start report names the trained modules, the effective batch and the first example.
    output = proc.stderr + proc.stdout
    assert "LoRA modules: {'down_proj': 2, 'gate_up_proj': 2, 'o_proj': 2, 'qkv_proj': 2}" in output
    assert "effective batch size: 8 = 8 per device x 1 devices x 1 nodes x 1 accumulation" in output
    assert "first training example:" in output


def test_ckpt_path_last_resumes_the_newest_run(tiny_run, run_dir, fit_args):
    shutil.copytree(tiny_run / "logs", run_dir / "logs")
    older = run_dir / "logs" / "tiny-cats" / "version_9" / "checkpoints" / "last.ckpt"
    older.parent.mkdir(parents=True)
    older.write_bytes(b"not a checkpoint")  # the highest version, but written long ago
    os.utime(older, ns=(0, 0))
    main(
        fit_args(
            "--trainer.max_steps", "4", "--trainer.log_every_n_steps", "1", "--ckpt_path", "last"
        )
    )
    # Continues version_0 in its own folder (tests/test_resume.py: the curve), not at step 0.
    assert [step for step, _ in _scalars(run_dir / RUN, "loss/train")] == [2, 3]
    assert not (run_dir / "logs" / "tiny-cats" / "version_10").exists()


def test_checkpoint_from_before_model_speed_resumes_with_the_commands_settings(
    tiny_run, run_dir, fit_args
):
    ckpt = torch.load(tiny_run / RUN / "checkpoints" / "last.ckpt", weights_only=False)
    hparams = ckpt["hyper_parameters"]
    speed = hparams.pop("speed")
    speed["gradient_checkpointing"] = False  # not the config's, which decides (a speed knob)
    hparams.update(speed, adapter=None, generation=None)  # the flat keys of lit-cats 0.1
    torch.save(ckpt, run_dir / "old.ckpt")
    main(
        fit_args(
            "--trainer.max_steps",
            "4",
            "--trainer.log_every_n_steps",
            "1",
            "--ckpt_path",
            "old.ckpt",
        )
    )
    assert [step for step, _ in _scalars(run_dir / RUN, "loss/train")] == [2, 3]
    config = yaml.safe_load((run_dir / RUN / "config.yaml").read_text())
    assert config["model"]["speed"]["gradient_checkpointing"] is True


@pytest.mark.parametrize("where", ["command line", "config file"])
def test_old_speed_keys_are_refused_with_the_new_name(run_dir, fit_args, where, capsys):
    if where == "command line":
        args = fit_args("--model.fast_lora", "true")
        rename = "--model.fast_lora -> --model.speed.fast_lora"
    else:
        (run_dir / "old.yaml").write_text("model:\n  fast_lora: true\n")
        args = fit_args("--config", "old.yaml")
        rename = "old.yaml: model.fast_lora -> model.speed.fast_lora"
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    message = capsys.readouterr().err
    assert "moved under model.speed" in message and rename in message
    assert "Traceback" not in message
    assert not (run_dir / "logs").exists()


def test_fit_refuses_an_adapter_to_load(run_dir, fit_args, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(fit_args("--model.adapter", "latest"))
    assert exit_.value.code == 2
    message = capsys.readouterr().err
    assert "--model.adapter" in message and "fit trains a new adapter" in message
    assert not (run_dir / "logs").exists()


def test_validate_scores_a_training_checkpoint(tiny_run, run_dir, capsys):
    checkpoint = tiny_run / RUN / "checkpoints" / "last.ckpt"
    args = [
        "validate",
        "--config",
        str(CONFIGS / "qlora.yaml"),
        "--config",
        str(CONFIGS / "tiny.yaml"),
    ]
    main([*args, "--trainer.enable_progress_bar", "false", "--ckpt_path", str(checkpoint)])
    assert "loss/val" in capsys.readouterr().out


def test_tiny_command_prints_the_model_folder(capsys):
    main(["tiny"])
    assert capsys.readouterr().out.strip() == str(tiny_model_path())


def test_tiny_default_rehearses_the_hub_push_offline(tiny_run):
    pushed = tiny_run / "logs" / "tiny-cats" / "hub-dry-run"
    adapter = tiny_run / RUN / "adapter"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json"):
        assert (pushed / name).read_bytes() == (adapter / name).read_bytes()
    assert "base_model:" in (pushed / "README.md").read_text()


def test_hub_push_can_be_switched_off(run_dir, fit_args):
    main(fit_args("--trainer.max_steps", "1", "--hub.enabled", "false"))
    assert not (run_dir / "logs" / "tiny-cats" / "hub-dry-run").exists()
    assert (run_dir / RUN / "adapter").is_dir()


def test_push_command_pushes_an_existing_run(tiny_run, run_dir):
    run = tiny_run / RUN
    main(["push", str(run), "--repo_id", "cat/void", "--dry_run_dir", "out"])
    assert (run_dir / "out" / "adapter_model.safetensors").read_bytes() == (
        run / "adapter" / "adapter_model.safetensors"
    ).read_bytes()


def test_output_dir_gets_a_copy_of_the_adapter(tiny_run):
    copy = tiny_run / "final-adapter"
    assert (copy / "adapter_model.safetensors").read_bytes() == (
        tiny_run / RUN / "adapter" / "adapter_model.safetensors"
    ).read_bytes()


COMMANDS = [
    "fit",
    "validate",
    "predict",
    "merge",
    "push",
    "tiny",
    "export",
    "chat",
    "serve",
    "plan",
]


def _help(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--help"])
    assert exit_.value.code in (0, None)
    return capsys.readouterr().out


def test_help_lists_every_command_on_one_line_each(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    out = _help(capsys)
    assert (
        " ".join(out.split("...")[0].split())
        == f"usage: lit-cats [-c CONFIG] {{{','.join(COMMANDS)}}}"
    )
    listed = out.split("Available subcommands:")[1].strip().splitlines()
    assert listed[0].strip() == "(required)"
    assert [line.split()[0] for line in listed[1:]] == COMMANDS  # no wrapped continuation lines
    assert all(len(line.split()) > 3 for line in listed[1:])  # each with its help


@pytest.mark.parametrize("command", ["merge", "push", "tiny", "export", "chat", "serve", "plan"])
def test_helper_command_help_names_the_command(capsys, command):
    assert _help(capsys, command).startswith(f"usage: lit-cats {command} ")


def _checkpoint_callbacks(checkpoint: Path) -> list[str]:
    """The ModelCheckpoint callbacks whose state a checkpoint holds (one per active callback)."""
    states = torch.load(checkpoint, weights_only=False)["callbacks"]
    return [key for key in states if key.startswith("ModelCheckpoint")]


def test_checkpoint_frequency_is_one_setting(run_dir, fit_args):
    main(fit_args("--trainer.max_steps", "4", "--checkpoint.every_n_train_steps", "2"))
    checkpoints = run_dir / RUN / "checkpoints"
    assert {p.name for p in checkpoints.iterdir()} == {"step=2.ckpt", "step=4.ckpt", "last.ckpt"}
    (only,) = _checkpoint_callbacks(checkpoints / "last.ckpt")
    assert "'every_n_train_steps': 2" in only


def test_a_checkpoint_callback_in_trainer_callbacks_replaces_the_section(run_dir, fit_args):
    (run_dir / "old.yaml").write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {every_n_train_steps: 3, save_last: true}\n"
    )
    with pytest.warns(UserWarning, match="the `checkpoint:` section is not used"):
        main(fit_args("--config", "old.yaml", "--trainer.max_steps", "3"))
    (only,) = _checkpoint_callbacks(run_dir / RUN / "checkpoints" / "last.ckpt")
    assert "'every_n_train_steps': 3" in only


def test_checkpointing_can_be_switched_off(run_dir, fit_args):
    main(fit_args("--trainer.max_steps", "1", "--trainer.enable_checkpointing", "false"))
    assert (run_dir / RUN / "adapter").is_dir()
    assert not (run_dir / RUN / "checkpoints").exists()


def test_test_says_there_is_no_test_split_and_what_to_run(run_dir, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "test",
                "--config",
                str(CONFIGS / "qlora.yaml"),
                "--config",
                str(CONFIGS / "tiny.yaml"),
            ]
        )
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "no test command" in err and "lit-cats validate" in err and "Traceback" not in err
    assert not (run_dir / "logs").exists()
