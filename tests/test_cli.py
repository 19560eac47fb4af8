"""The ``lit-cats`` command as a user runs it, and the shipped configs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import CONFIGS, tiny_fit_args
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_cats.cli import main
from lit_cats.tiny import tiny_model_path

ALL_CONFIGS = sorted(CONFIGS.glob("*.yaml"))


def _resolved(capsys, *configs: Path) -> dict:
    args = ["fit"]
    for config in configs:
        args += ["--config", str(config)]
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--print_config"])
    assert exit_.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=lambda p: p.name)
def test_every_config_parses(capsys, config):
    # Override files are parsed on top of the complete one, as users stack them.
    configs = [CONFIGS / "qlora.yaml"] + ([config] if config.name != "qlora.yaml" else [])
    resolved = _resolved(capsys, *configs)
    assert resolved["model"]["model_name_or_path"]


def test_qlora_yaml_carries_the_original_hyperparameters(capsys):
    cfg = _resolved(capsys, CONFIGS / "qlora.yaml")
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
    assert model["gradient_checkpointing"] is True
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
    checkpoint = next(
        c for c in trainer["callbacks"] if c["class_path"].endswith("ModelCheckpoint")
    )
    assert checkpoint["init_args"]["every_n_train_steps"] == 50
    assert cfg["hub"]["repo_id"] == "phi-3-mini-4k-instruct-existential-cats-v1"
    assert cfg["hub"]["strategy"] == "checkpoint"  # the original's hub_strategy
    logger = trainer["logger"]
    assert logger["class_path"].endswith("TensorBoardLogger")
    assert logger["init_args"]["save_dir"] == "logs"


def _scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_console_script_fit_writes_logs_adapter_and_config(run_dir):
    script = Path(sys.executable).with_name("lit-cats")
    args = tiny_fit_args("--trainer.max_steps", "10", "--trainer.log_every_n_steps", "2")
    proc = subprocess.run([str(script), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = run_dir / "logs" / "tiny-cats" / "version_0"
    assert {"config.yaml", "adapter", "checkpoints"} <= {p.name for p in run.iterdir()}
    assert (run / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    assert (run / "checkpoints" / "last.ckpt").exists()
    tags = EventAccumulator(str(run)).Reload().Tags()["scalars"]
    for tag in ("train_loss", "grad_norm", "train_tokens_per_s", "lr-PagedAdamW32bit"):
        assert tag in tags
    # The start report names the trained modules and shows the label mask.
    assert "LoRA modules: {'down_proj': 2, 'gate_up_proj': 2, 'o_proj': 2, 'qkv_proj': 2}" in (
        proc.stderr + proc.stdout
    )


def test_ckpt_path_last_resumes_the_newest_run(run_dir):
    main(tiny_fit_args("--trainer.max_steps", "4", "--trainer.log_every_n_steps", "1"))
    main(
        tiny_fit_args(
            "--trainer.max_steps", "8", "--trainer.log_every_n_steps", "1", "--ckpt_path", "last"
        )
    )
    resumed = _scalars(run_dir / "logs" / "tiny-cats" / "version_1", "train_loss")
    assert [step for step, _ in resumed] == [4, 5, 6, 7]  # continues, does not restart at 0


def test_ckpt_path_last_without_a_run_says_so(run_dir):
    with pytest.raises(FileNotFoundError, match="no last.ckpt under 'logs/tiny-cats'"):
        main(tiny_fit_args("--trainer.max_steps", "2", "--ckpt_path", "last"))


def test_unknown_lora_target_from_the_cli_lists_real_modules(run_dir):
    with pytest.raises(ValueError, match=r"\['q_proj'\] match no linear layer.*'qkv_proj'"):
        main(tiny_fit_args("--trainer.max_steps", "1", "--model.target_modules", "[q_proj]"))


def test_tiny_command_prints_the_model_folder(capsys):
    main(["tiny"])
    assert capsys.readouterr().out.strip() == str(tiny_model_path())


def test_tiny_default_rehearses_the_hub_push_offline(run_dir):
    main(tiny_fit_args("--trainer.max_steps", "3"))
    pushed = run_dir / "logs" / "tiny-cats" / "hub-dry-run"
    adapter = run_dir / "logs" / "tiny-cats" / "version_0" / "adapter"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json"):
        assert (pushed / name).read_bytes() == (adapter / name).read_bytes()
    assert "base_model:" in (pushed / "README.md").read_text()


def test_hub_push_can_be_switched_off(run_dir):
    main(tiny_fit_args("--trainer.max_steps", "2", "--hub.enabled", "false"))
    assert not (run_dir / "logs" / "tiny-cats" / "hub-dry-run").exists()
    assert (run_dir / "logs" / "tiny-cats" / "version_0" / "adapter").is_dir()


def test_push_command_pushes_an_existing_run(run_dir):
    main(tiny_fit_args("--trainer.max_steps", "2", "--hub.enabled", "false"))
    run = run_dir / "logs" / "tiny-cats" / "version_0"
    main(["push", str(run), "--repo_id", "cat/void", "--dry_run_dir", "out"])
    assert (run_dir / "out" / "adapter_model.safetensors").read_bytes() == (
        run / "adapter" / "adapter_model.safetensors"
    ).read_bytes()


def test_output_dir_gets_a_copy_of_the_adapter(run_dir):
    main(tiny_fit_args("--trainer.max_steps", "2", "--model.output_dir", "final-adapter"))
    run_adapter = run_dir / "logs" / "tiny-cats" / "version_0" / "adapter"
    copy = run_dir / "final-adapter"
    assert (copy / "adapter_model.safetensors").read_bytes() == (
        run_adapter / "adapter_model.safetensors"
    ).read_bytes()


def test_help_names_the_helper_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("lit-cats merge", "lit-cats push", "lit-cats tiny"):
        assert command in " ".join(out.split()).replace("lit- cats", "lit-cats")
