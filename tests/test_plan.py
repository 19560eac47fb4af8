"""The planner (lit_cats.plan): the memory model's terms against the real model and recorded GPU
peaks, ``lit-cats plan`` through the CLI, and ``fit`` refusing a run that cannot fit."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import CONFIGS, tiny_fit_args

from lit_cats.assets import SHIPPED_DATASET_ID
from lit_cats.cli import main
from lit_cats.plan.memory import GIB, Architecture, TrainingShape, estimate, lora_params
from lit_cats.plan.planner import read_model_config
from lit_cats.tiny import TINY_MODEL_ID

PHI3_MINI = Architecture(3072, 8192, 32, 32, 32, 32064)
#: configs/fast.yaml's model.speed settings.
FAST = {"upcast_to_fp32": False, "loss_chunk_size": 1024, "fast_lora": True}


# ------------------------------------------------------------------------- the memory model
def test_phi3_mini_terms_are_the_architectures():
    """Phi-3-mini: 3.62B linear weights packed two per byte; 25.2M LoRA parameters at r16
    (PERF.md), four times as many at r64; a checkpointed 16-bit step keeps h x 2 bytes per
    token per layer."""
    assert PHI3_MINI.linear_params() == 32 * 3072 * (9216 + 3072 + 16384 + 8192)
    assert lora_params(PHI3_MINI, 16, "all-linear") == 25_165_824
    assert lora_params(PHI3_MINI, 64, "all-linear") == 4 * 25_165_824
    assert lora_params(PHI3_MINI, 16, ("o_proj",)) == 32 * 16 * (3072 + 3072)
    e = estimate(PHI3_MINI, TrainingShape(tokens=16384, **FAST))
    assert e.terms["activations"] == 16384 * 32 * 3072 * 2
    assert e.terms["optimizer"] == 8 * e.lora_params
    packed = PHI3_MINI.linear_params() // 2
    assert packed < e.terms["base"] < packed + 2 * 32064 * 3072 * 2 + 70 * 2**20
    paged = estimate(PHI3_MINI, TrainingShape(tokens=512, optimizer_bytes_per_param=0))
    assert paged.terms["optimizer"] == 0


# Peaks recorded by benchmarks/bench_train.py on an H100 (RESULTS.md, 2026-11-27 03:12 UTC,
# commit 109584b): the model must land within 10% of each.
RECORDED = [
    ("fast_pack_gc_compile", 16384, {"compiled": True}, 7.52),
    ("fast_pack16k_nogc_compile", 16384,
     {"compiled": True, "gradient_checkpointing": False}, 51.62),
    ("fast_pack16k_nogc_keepw_compile", 16384,
     {"compiled": True, "gradient_checkpointing": False, "keep_dequantized_weights": True}, 58.37),
    ("fast_4096_compile", 4096, {"compiled": True}, 3.83),
    ("fast_b2_compile", 512, {"compiled": True}, 2.93),
]  # fmt: skip


@pytest.mark.parametrize(("run", "tokens", "settings", "measured_gib"), RECORDED)
def test_predicted_peaks_match_recorded_gpu_peaks(run, tokens, settings, measured_gib):
    predicted = estimate(PHI3_MINI, TrainingShape(tokens=tokens, **FAST, **settings)).peak / GIB
    assert abs(predicted - measured_gib) <= 0.10 * measured_gib, (run, predicted)


def test_terms_of_the_tiny_model_equal_its_real_parameter_counts(tiny_path, speed_module):
    """Architecture from config.json alone; counted against the built QLoRA module."""
    from transformers import AutoModelForCausalLM

    arch = Architecture.from_config(read_model_config(TINY_MODEL_ID))
    assert arch == Architecture.from_config(json.loads((tiny_path / "config.json").read_text()))
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    linear = sum(
        m.weight.numel()
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name != "lm_head"
    )
    assert linear == arch.linear_params()
    assert sum(p.numel() for p in model.parameters()) == linear + arch.other_params()
    module = speed_module()
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert trainable == lora_params(arch, 16, "all-linear")


def test_checkpointed_activations_equal_what_autograd_keeps(speed_module, make_examples):
    """With checkpointing, what the forward keeps per token is each layer's input and, for the
    loss, the final norm's fp32 input and the head's 16-bit input: measured on the tiny model
    as the bytes of the tensors saved for the backward (parameters excluded), per token."""
    from lit_cats.data.collate import pack_examples

    arch = Architecture.from_config(read_model_config(TINY_MODEL_ID))
    module = speed_module(**FAST | {"loss_chunk_size": 64})
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}

    def kept_bytes(tokens: int) -> int:
        batch = pack_examples(make_examples([tokens // 4] * 4))
        module.on_train_batch_start(batch, 0)
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                seen[storage.data_ptr()] = storage.nbytes()
            return t

        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        with hooks, torch.autocast("cpu", dtype=torch.bfloat16):
            module.kit.loss(module.model, batch)
        return sum(seen.values())

    per_token = (kept_bytes(1024) - kept_bytes(512)) / 512
    shape = TrainingShape(tokens=1024, **FAST)
    predicted = estimate(arch, shape).terms["activations"] / 1024 + 6 * arch.hidden_size
    assert abs(per_token - predicted) <= 0.01 * predicted, (per_token, predicted)


# ------------------------------------------------------------------------------- lit-cats plan
def test_plan_prints_memory_steps_and_time_of_the_tiny_run(run_dir, capsys):
    from lit_cats.data.datamodule import CatsDataModule

    main(["plan", "--config", str(CONFIGS / "qlora.yaml"), "--config", str(CONFIGS / "tiny.yaml")])
    out = capsys.readouterr().out
    assert "lit-cats plan: lit-cats/tiny-phi3 (2 layers, hidden 128" in out
    assert "peak (allocated)" in out and "no GPU to check it against" in out
    assert "time: no calibration for this machine" in out
    dm = CatsDataModule(SHIPPED_DATASET_ID, TINY_MODEL_ID,
                        batch_size=8)  # fmt: skip
    dm.setup("fit")
    assert f"{len(dm.train_dataloader())} steps per epoch, 60 steps in all" in out
    assert not (run_dir / "logs").exists()  # nothing built, nothing written


def test_plan_of_packed_steps_counts_the_packed_loader(run_dir, capsys):
    from lit_cats.data.datamodule import CatsDataModule

    fast = ("--config", str(CONFIGS / "fast.yaml"), "--data.max_tokens_per_batch", "2048")
    main(["plan", *tiny_fit_args()[1:5], *fast])
    out = capsys.readouterr().out
    dm = CatsDataModule(SHIPPED_DATASET_ID, TINY_MODEL_ID,
                        packing=True, max_tokens_per_batch=2048)  # fmt: skip
    dm.setup("fit")
    assert f"{len(dm.train_dataloader())} steps per epoch" in out
    assert "chunked loss (1024 tokens a chunk)" in out


def test_plan_names_its_calibration_source_for_a_known_gpu(run_dir, capsys):
    main(["plan", *tiny_fit_args()[1:5], "--plan.gpu", "NVIDIA H100 80GB HBM3",
          "--plan.device_memory_gb", "80"])  # fmt: skip
    out = capsys.readouterr().out
    assert "fits NVIDIA H100 80GB HBM3 (80.00 GiB, 72.00 GiB usable)" in out
    assert "s per step on H100" in out and "RESULTS.md bench_train" in out


# ------------------------------------------------------------------------------- fit's check
@pytest.fixture
def base_loads(monkeypatch) -> list[str]:
    """Every base model the run loads (lit_cats.model's load_base, spied on)."""
    import lit_cats.model

    calls, real = [], lit_cats.model.load_base
    monkeypatch.setattr(
        lit_cats.model,
        "load_base",
        lambda name, *a, **kw: calls.append(name) or real(name, *a, **kw),
    )
    return calls


def test_fit_refuses_a_run_that_cannot_fit_before_loading_the_model(run_dir, capsys, base_loads):
    with pytest.raises(SystemExit) as exit_info:
        main(tiny_fit_args("--plan.device_memory_gb", "0.01"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: The plan predicts a peak of" in err and "--plan.force true" in err
    assert "Settings that would fit: --data.batch_size" in err
    assert base_loads == [] and not (run_dir / "logs").exists()


def test_fit_forced_past_the_check_trains(run_dir, base_loads):
    main(tiny_fit_args("--plan.device_memory_gb", "0.01", "--plan.force", "true",
                       "--trainer.max_steps", "1", "--samples.enabled", "false"))  # fmt: skip
    assert base_loads == [TINY_MODEL_ID]
    assert (run_dir / "logs/tiny-cats/version_0/adapter/adapter_model.safetensors").is_file()


def test_fit_on_the_cpu_skips_the_check_in_one_line(run_dir, caplog):
    with caplog.at_level(logging.INFO):
        main(tiny_fit_args("--trainer.max_steps", "1", "--samples.enabled", "false"))
    skipped = [r for r in caplog.records if "GPU memory check is skipped" in r.getMessage()]
    assert len(skipped) == 1 and "\n" not in skipped[0].getMessage()


def test_plan_without_reading_the_data_plans_the_worst_case(run_dir, capsys):
    main(["plan", *tiny_fit_args()[1:5], "--plan.dataset_lengths", "false"])
    out = capsys.readouterr().out
    # tiny.yaml: batch 8 of qlora.yaml's 512-token maximum
    assert "largest step, 4,096 tokens (worst case: 512-token examples)" in out
    assert "steps per epoch unknown, 60 steps in all" in out


def test_step_times_come_from_the_table_with_their_source():
    from lit_cats.plan import calibration
    from lit_cats.plan.calibration import Setting

    assert calibration.gpu_kind("NVIDIA H200") == "H200"
    assert calibration.gpu_kind("NVIDIA A100-SXM4-80GB") is None  # never measured: no guess
    assert (
        calibration.step_time(None, Setting("fast", True, True, "large"), 16384, PHI3_MINI) is None
    )
    own = calibration.step_time("H200", Setting("fast", True, True, "large"), 20454, PHI3_MINI)
    assert own.seconds == pytest.approx(1.0) and "H200" in own.source
    borrowed = calibration.step_time(
        "H200", Setting("original", False, True, "large"), 3030, PHI3_MINI
    )
    assert borrowed.seconds == pytest.approx(1.0) and borrowed.source.endswith("(measured on H100)")
    half = Architecture(3072, 8192, 16, 32, 32, 32064)  # half the layers: half the FLOPs per token
    scaled = calibration.step_time("H200", Setting("fast", True, True, "large"), 20454, half)
    assert scaled.seconds == pytest.approx(0.5, rel=0.01) and "scaled x0.5" in scaled.source
    warm = calibration.compile_seconds("H200", "large", warm=True)
    assert warm.seconds == 7.7 and "compile_warm arm" in warm.source
    cold = calibration.compile_seconds("H200", "small", warm=True)  # no warm figure measured
    assert cold.seconds == 45 and "the cold one is used" in cold.source


@pytest.mark.parametrize("warm, compile_s", [(True, "8 s"), (False, "22 s")])
def test_compile_auto_weighs_the_warm_or_the_cold_compile_time(
    run_dir, capsys, monkeypatch, warm, compile_s
):
    # calibration.yaml's H200 figures for large steps: 7.7 s warm, 21.5 s cold.
    from lit_cats.plan import planner

    monkeypatch.setattr(planner, "inductor_cache_is_warm", lambda: warm)
    fast = ("--config", str(CONFIGS / "fast.yaml"), "--data.max_tokens_per_batch", "4096")
    main(["plan", *tiny_fit_args()[1:5], *fast, "--model.speed.compile", "auto",
          "--plan.gpu", "NVIDIA H200", "--plan.device_memory_gb", "140"])  # fmt: skip
    out = capsys.readouterr().out
    assert "compile: auto -> eager" in out and f" {compile_s} of compilation" in out


# ------------------------------------------------------------- gradient_checkpointing: auto
@pytest.fixture
def built_checkpointing(monkeypatch) -> list[object]:
    """The gradient_checkpointing setting each model is built with (SpeedKit.build, spied)."""
    from lit_cats.fast.kit import SpeedKit

    seen, real = [], SpeedKit.build
    monkeypatch.setattr(
        SpeedKit,
        "build",
        lambda self, *a, **kw: (
            seen.append(self.settings.gradient_checkpointing) or real(self, *a, **kw)
        ),
    )
    return seen


def _fast_fit(*extra: str) -> list[str]:
    return tiny_fit_args("--config", str(CONFIGS / "fast.yaml"),
                         "--data.max_tokens_per_batch", "2048", "--trainer.max_steps", "1",
                         "--samples.enabled", "false", *extra)  # fmt: skip


def _peaks() -> tuple[float, float]:
    """The planned peaks (GiB) of _fast_fit's run with checkpointing on and off."""
    from lit_cats.plan.memory import TrainingShape

    arch = Architecture.from_config(read_model_config(TINY_MODEL_ID))
    shape = TrainingShape(tokens=2048, **FAST)
    on = estimate(arch, shape).peak / GIB
    off = estimate(arch, TrainingShape(tokens=2048, gradient_checkpointing=False, **FAST)).peak
    return on, off / GIB


def test_fit_builds_without_checkpointing_when_the_plan_says_it_fits(
    run_dir, caplog, built_checkpointing
):
    with caplog.at_level(logging.INFO):
        main(_fast_fit("--plan.device_memory_gb", "140"))
    lines = [r.getMessage() for r in caplog.records if "lit-cats plan:" in r.getMessage()]
    assert "  gradient_checkpointing: auto -> off: the predicted peak without it, " in lines[0]
    assert "fits the 126.00 GiB usable" in lines[0]
    assert "activations kept" in lines[0] and "not checkpointed" in lines[0]
    assert built_checkpointing == [False]
    assert (run_dir / "logs/tiny-cats/version_0/adapter/adapter_model.safetensors").is_file()


def test_fit_keeps_checkpointing_where_the_run_would_not_fit_without_it(
    run_dir, caplog, built_checkpointing
):
    on, off = _peaks()
    assert off > 1.2 * on  # the tiny run's kept activations outweigh the rest
    between = (on + off) / 2 / 0.9  # a GPU on which only the checkpointed run fits
    with caplog.at_level(logging.INFO):
        main(_fast_fit("--plan.device_memory_gb", f"{between:.4f}"))
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "gradient_checkpointing: auto -> on: the predicted peak without it, " in text
    assert "exceeds the" in text and "does NOT fit" not in text
    assert built_checkpointing == [True]


def test_unplanned_auto_checkpoints(run_dir, caplog, built_checkpointing):
    """On the CPU without --plan.device_memory_gb nothing is planned: checkpointing stays on."""
    with caplog.at_level(logging.INFO):
        main(_fast_fit())
    assert built_checkpointing == [True]
    assert any("gradient_checkpointing: auto -> on: no GPU memory to plan against"
               in r.getMessage() for r in caplog.records)  # fmt: skip
