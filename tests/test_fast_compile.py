"""Regional compilation, Liger and partial checkpointing (lit_cats.fast.compile): compiled
layers give eager layers' loss and gradients, with checkpointing around each compiled call.

Inductor fuses bf16 elementwise work differently from eager (rounding, not maths): loss within
1e-3, worst LoRA gradient within 5e-2.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import CONFIGS, needs_cxx, tiny_fit_args

import lit_cats.fast.compile as fast_compile
from lit_cats.data.collate import pack_examples
from lit_cats.fast import SpeedSettings
from lit_cats.fast.compile import keep_activations
from lit_cats.model import QLoRAModule
from lit_cats.tiny import TINY_MODEL_ID

FAST = {"loss_chunk_size": 16, "fast_lora": True, "upcast_to_fp32": False}


def _unbuilt(**speed) -> QLoRAModule:
    return QLoRAModule(TINY_MODEL_ID, speed=SpeedSettings(**speed))


@pytest.fixture
def checkpoint_calls(monkeypatch) -> list[bool]:
    """Each call of compile.py's checkpoint: whether it was made inside compiled code."""
    calls, real = [], fast_compile.checkpoint

    def spy(*args, **kwargs):
        calls.append(torch.compiler.is_compiling())
        return real(*args, **kwargs)

    monkeypatch.setattr(fast_compile, "checkpoint", spy)
    return calls


# ------------------------------------------------------------------------------------ Liger
def test_liger_kernels_refuse_a_machine_without_them():
    # Without the package: ImportError naming it; with it but no GPU: ValueError naming CUDA.
    with pytest.raises((ImportError, ValueError), match="liger"):
        _unbuilt(liger_kernels=True).configure_model()


@pytest.mark.gpu
def test_liger_kernels_equal_the_plain_path_on_gpu(
    monkeypatch, make_examples, padded, cuda_module, loss_and_grads, assert_steps_close
):
    pytest.importorskip("liger_kernel", reason="optional: pip install 'lit-cats[liger]'")
    from transformers.models.phi3 import modeling_phi3

    # Liger rebinds Phi-3's rotary function for the process; give it back after this test.
    monkeypatch.setattr(modeling_phi3, "apply_rotary_pos_emb", modeling_phi3.apply_rotary_pos_emb)
    batch = padded(make_examples([40, 17, 63, 25]))
    ref = loss_and_grads(cuda_module(), batch)
    got = loss_and_grads(cuda_module(liger_kernels=True), batch)
    assert_steps_close(got, ref, loss_tol=1e-3, grad_tol=5e-2)


# ---------------------------------------------------------------------------- torch.compile
def test_compile_on_a_cpu_without_a_cxx_compiler_names_the_fix(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="C\\+\\+ compiler"):
        _unbuilt(compile=True).configure_model()


def test_compile_refuses_a_process_where_liger_rope_is_installed(monkeypatch):
    from transformers.models.phi3 import modeling_phi3

    def liger_rotary_pos_emb(*args):  # stands in for Liger's (CUDA-only) kernel
        raise AssertionError("not called")

    liger_rotary_pos_emb.__module__ = "liger_kernel.ops.rope"
    monkeypatch.setattr(modeling_phi3, "apply_rotary_pos_emb", liger_rotary_pos_emb)
    with pytest.raises(ValueError, match="fresh process"):
        _unbuilt(compile=True).configure_model()


@needs_cxx
def test_compiled_layers_equal_eager_layers(
    make_examples, padded, speed_module, loss_and_grads, assert_steps_close, compile_counters
):
    """Packed (block-causal attention inside the graph) and padded batches, GC on."""
    examples = make_examples([40, 17, 63, 25])
    eager, compiled = speed_module(**FAST), speed_module(compile=True, **FAST)
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints unchanged
    for batch in (pack_examples(examples), padded(examples)):
        graphs, breaks = compile_counters()
        got = loss_and_grads(compiled, batch)
        new_graphs, new_breaks = compile_counters()
        assert new_graphs > graphs and new_breaks == breaks  # the layers ran compiled, whole
        assert_steps_close(got, loss_and_grads(eager, batch), loss_tol=1e-3, grad_tol=5e-2)


@needs_cxx
@pytest.mark.usefixtures("compile_counters")
def test_compiled_layers_are_checkpointed_around_their_compiled_call(
    checkpoint_calls, make_examples, speed_module, loss_and_grads
):
    """Checkpointing goes around each compiled layer's call, whichever way transformers wraps
    it (some torch versions' Inductor cannot compile the checkpoint inside), and no activation
    inside a layer is kept for the backward."""
    module = speed_module(compile=True, **FAST)
    base = module.model.get_base_model()
    assert not any(layer.gradient_checkpointing for layer in base.model.layers)
    batch = pack_examples(make_examples([40, 17, 63]))
    loss_and_grads(module, batch)  # compiles
    assert len(checkpoint_calls) == len(base.model.layers) and not any(checkpoint_calls)
    saved: list[torch.Size] = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.shape) or t, lambda t: t
    ):
        loss_and_grads(module, batch)
    # Per token, only hidden-size (or narrower) tensors: layer inputs, rotary tables, the
    # final norm; none of the wider q/k/v, gate/up or intermediate activations.
    tokens, hidden = batch["input_ids"].shape[1], base.config.hidden_size
    per_token = [shape for shape in saved if tokens in shape]
    assert per_token and all(shape[-1] <= hidden for shape in per_token)


@pytest.mark.gpu
def test_compiled_layers_equal_eager_layers_on_gpu(
    make_examples, padded, cuda_module, loss_and_grads, assert_steps_close, compile_counters
):
    """Packed batches: the flash varlen kernel inside the compiled graph; padded: SDPA.

    Against peft's LoRA forward and bitsandbytes' matmul: the fused LoRA update in place
    (eager) and as ``addmm`` with the NF4 matmul as torch ops (compiled)."""
    examples = make_examples([40, 17, 63, 25])
    peft_lora = cuda_module(loss_chunk_size=16)  # peft's own LoRA forward, eager
    fast, compiled = (
        cuda_module(loss_chunk_size=16, fast_lora=True, compile=c) for c in (False, True)
    )
    for batch in (pack_examples(examples), padded(examples)):
        ref = loss_and_grads(peft_lora, batch)
        assert_steps_close(loss_and_grads(fast, batch), ref, loss_tol=1e-3, grad_tol=5e-2)
        graphs, breaks = compile_counters()
        got = loss_and_grads(compiled, batch)
        new_graphs, new_breaks = compile_counters()
        assert new_graphs > graphs and new_breaks == breaks
        assert_steps_close(got, ref, loss_tol=1e-3, grad_tol=5e-2)


@needs_cxx
def test_compiled_fit_from_the_cli_resumes_and_saves_a_plain_adapter(run_dir, compile_counters):
    """``--model.speed.compile true`` end to end: fit, checkpoint, resume, a loadable adapter."""
    from safetensors.torch import load_file

    from lit_cats.cli import main

    args = ("--config", str(CONFIGS / "fast.yaml"), "--model.speed.compile", "true")
    args += ("--data.max_tokens_per_batch", "2048", "--trainer.val_check_interval", "1")
    graphs, breaks = compile_counters()
    main(tiny_fit_args(*args, "--trainer.max_steps", "2"))  # validates and samples twice
    new_graphs, new_breaks = compile_counters()
    assert new_breaks == breaks  # the layers compiled whole...
    # ...once, for the training step: validation and sampled generations ran them eagerly
    # (decoding alone would compile a graph per KV-cache state, past Dynamo's limit).
    assert new_graphs == graphs + 1
    main(tiny_fit_args(*args, "--trainer.max_steps", "4", "--ckpt_path", "last"))
    assert compile_counters()[1] == breaks
    runs = run_dir / "logs" / "tiny-cats"
    ckpt = torch.load(runs / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4  # resumed at 2, not restarted
    assert all("lora_" in key and "_orig_mod" not in key for key in ckpt["state_dict"])
    weights = load_file(runs / "version_0" / "adapter" / "adapter_model.safetensors")
    assert weights and all("_orig_mod" not in key for key in weights)


# ------------------------------------------------------------ checkpointing all but the last N
@pytest.fixture
def checkpointed_step(speed_module, loss_and_grads):
    """``step(keep, batch)``: a step with the last ``keep`` layers uncheckpointed: its loss and
    gradients, each layer's checkpointing flag, how often each layer's forward ran, and the
    bytes saved for the backward."""

    def step(keep: int, batch: dict):
        module = speed_module(fast_lora=True, upcast_to_fp32=False, uncheckpointed_layers=keep)
        layers = module.model.get_base_model().model.layers
        calls = [0] * len(layers)
        for i, layer in enumerate(layers):  # inside the layer's forward, which the rerun repeats
            layer.self_attn.register_forward_pre_hook(
                lambda *_, i=i: calls.__setitem__(i, calls[i] + 1)
            )
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t
        ):
            result = loss_and_grads(module, batch)
        return result, [layer.gradient_checkpointing for layer in layers], calls, sum(saved)

    return step


def test_uncheckpointed_layers_keep_activations_with_the_same_loss_and_gradients(
    make_examples, checkpointed_step, assert_steps_close
):
    """The last N layers run once and keep their activations; the rest are checkpointed (run
    twice). Loss and gradients are those of full checkpointing, and more is saved."""
    batch = pack_examples(make_examples([40, 17, 63]))
    ref, flags, calls, ref_saved = checkpointed_step(0, batch)
    assert all(flags) and calls == [2] * len(calls)  # forward and the backward's rerun
    got, flags, calls, saved = checkpointed_step(1, batch)
    assert flags == [True] * (len(flags) - 1) + [False]
    assert calls == [2] * (len(calls) - 1) + [1]
    assert saved > ref_saved
    assert_steps_close(got, ref, loss_tol=1e-6, grad_tol=1e-5)


def test_uncheckpointed_layers_refuse_more_layers_than_the_model_has():
    with pytest.raises(ValueError, match=r"has \d+ decoder layers: set it to at most \d+"):
        _unbuilt(uncheckpointed_layers=99).configure_model()


def test_uncheckpointed_layers_refuse_a_model_without_decoder_layers():
    with pytest.raises(ValueError, match="found none in Linear; set it to 0"):
        keep_activations(torch.nn.Linear(2, 2), 1)


@needs_cxx
@pytest.mark.usefixtures("compile_counters")
def test_uncheckpointed_layers_in_compiled_layers(
    checkpoint_calls, make_examples, speed_module, loss_and_grads, assert_steps_close
):
    """Compiled, checkpointing goes around each compiled call but the last N layers'."""
    module = speed_module(compile=True, uncheckpointed_layers=1, **FAST)
    batch = pack_examples(make_examples([40, 17, 63]))
    got = loss_and_grads(module, batch)
    assert len(checkpoint_calls) == len(module.model.get_base_model().model.layers) - 1
    assert_steps_close(got, loss_and_grads(speed_module(**FAST), batch), 1e-3, 5e-2)


# ------------------------------------------------------------------------------ compile: auto
def test_compile_pays_only_when_the_steps_save_more_than_compiling_costs():
    chosen, why = fast_compile.compile_pays(steps=100, eager_s=0.5, compiled_s=0.3, compile_s=15)
    assert chosen and why == "100 steps x 0.2 s saved per step = 20 s > 15 s of compilation"
    chosen, why = fast_compile.compile_pays(steps=50, eager_s=0.5, compiled_s=0.3, compile_s=15)
    assert not chosen and "= 10 s <= 15 s" in why


@pytest.mark.parametrize(("max_steps", "chosen"), [("60", "eager"), ("100000", "compiled layers")])
def test_compile_auto_is_decided_by_the_planned_run_length(run_dir, capsys, max_steps, chosen):
    """On a calibrated GPU (named, so the CPU can plan for it), fast.yaml's small steps: the
    tiny config's 60 steps do not repay compiling; 100,000 do."""
    from lit_cats.cli import main

    fast = ("--config", str(CONFIGS / "fast.yaml"), "--data.packing", "false")
    run = ("--trainer.max_steps", max_steps, "--trainer.max_epochs", "-1")
    main(["plan", *tiny_fit_args()[1:5], *fast, "--model.speed.compile", "auto",
          "--plan.gpu", "H100", *run])  # fmt: skip
    lines = [x for x in capsys.readouterr().out.splitlines() if "compile: auto" in x]
    assert len(lines) == 1 and f"compile: auto -> {chosen}: {max_steps[:3]}" in lines[0]


def test_compile_auto_without_a_gpu_trains_eager_layers(run_dir, compile_counters):
    from lit_cats.cli import main

    graphs, _ = compile_counters()
    main(tiny_fit_args("--model.speed.compile", "auto", "--trainer.max_steps", "1"))
    assert compile_counters()[0] == graphs  # nothing was compiled
    saved = (run_dir / "logs" / "tiny-cats" / "version_0" / "config.yaml").read_text()
    assert "compile: auto" in saved  # the choice is the run's; a resumed run decides again


def test_fit_resolves_compile_auto_from_its_plan(run_dir, compile_counters, caplog):
    """With a device to plan for (named, with its memory), fit decides ``auto`` from the plan
    before the model is built: 2 steps do not repay compiling, so the layers stay eager."""
    import logging

    from lit_cats.cli import main

    # Checkpointing on: the H100's small steps are measured with it.
    fast = ("--config", str(CONFIGS / "fast.yaml"), "--data.packing", "false",
            "--model.speed.gradient_checkpointing", "true")  # fmt: skip
    plan = ("--plan.gpu", "H100", "--plan.device_memory_gb", "80")
    graphs, _ = compile_counters()
    with caplog.at_level(logging.INFO):
        main(tiny_fit_args(*fast, *plan, "--trainer.max_steps", "2"))
    assert compile_counters()[0] == graphs
    assert any("compile: auto -> eager: 2 steps x" in r.getMessage() for r in caplog.records)
