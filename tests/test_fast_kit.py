"""The speed kit's door (lit_cats.fast.SpeedSettings, lit_cats.fast.SpeedKit): every refused
combination with its fix, the fp32 copies on 4-bit and 16-bit bases, the attention switch for
packed steps, all features together and ``configs/fast.yaml`` from the CLI.

Dropping the fp32 copies rounds differently on purpose: loss within 1e-3, worst LoRA gradient
within 5e-2.
"""

from __future__ import annotations

import pytest
import torch
from conftest import CONFIGS, tiny_fit_args

from lit_cats.data.collate import pack_examples
from lit_cats.fast import SpeedKit, SpeedSettings
from lit_cats.fast.attention import VARLEN_ATTENTION
from lit_cats.model import QLoRAModule
from lit_cats.tiny import TINY_MODEL_ID

KEEP = {"keep_dequantized_weights": True, "compile": True, "fast_lora": True}
KEEP |= {"gradient_checkpointing": False}


# ----------------------------------------------------------------------------------- refusals
def test_loss_chunk_size_below_one_is_refused():
    with pytest.raises(ValueError, match=r"loss_chunk_size must be >= 1 or null, got 0"):
        SpeedSettings(loss_chunk_size=0)


def test_negative_uncheckpointed_layers_are_refused():
    with pytest.raises(ValueError, match="uncheckpointed_layers must be >= 0, got -1"):
        SpeedSettings(uncheckpointed_layers=-1)


def test_uncheckpointed_layers_without_checkpointing_are_refused():
    with pytest.raises(ValueError, match="gradient_checkpointing is false, so every layer"):
        SpeedSettings(uncheckpointed_layers=1, gradient_checkpointing=False)


def test_uncheckpointed_layers_with_automatic_checkpointing_are_refused():
    with pytest.raises(ValueError, match="gradient_checkpointing is auto, which may turn it off"):
        SpeedSettings(uncheckpointed_layers=1, gradient_checkpointing="auto")
    with pytest.raises(ValueError, match="must be true, false or auto, got 'yes'"):
        SpeedSettings(gradient_checkpointing="yes")


def test_compile_and_liger_are_alternatives():
    with pytest.raises(ValueError, match="compile and model.speed.liger_kernels are alternatives"):
        SpeedSettings(compile=True, liger_kernels=True)


@pytest.mark.parametrize(
    ("setting", "value", "needs"),
    [
        ("gradient_checkpointing", True, "gradient_checkpointing false"),
        ("compile", False, "compile true"),
        ("fast_lora", False, "fast_lora true"),
    ],
)
def test_keep_dequantized_weights_names_each_missing_setting(setting, value, needs):
    with pytest.raises(ValueError, match=f"keep_dequantized_weights needs {needs} \\("):
        SpeedSettings(**{**KEEP, setting: value})
    SpeedSettings(**KEEP)  # all three right: accepted


def test_keep_dequantized_weights_needs_a_4bit_base():
    with pytest.raises(ValueError, match="model.load_in_4bit is false"):
        SpeedKit(SpeedSettings(**KEEP), load_in_4bit=False)
    with pytest.raises(ValueError, match="model.load_in_4bit is false"):  # through the module
        QLoRAModule(TINY_MODEL_ID, load_in_4bit=False, speed=SpeedSettings(**KEEP))


# ------------------------------------------------------------------------------ fp32 copies
def test_upcast_on_a_16bit_base_casts_only_norms_embeddings_and_head():
    module = QLoRAModule(TINY_MODEL_ID, load_in_4bit=False, speed=SpeedSettings())
    module.configure_model()
    causal_lm = module.model.get_base_model()
    outside = [causal_lm.model.norm, causal_lm.model.embed_tokens, causal_lm.lm_head]
    outside += [m for m in causal_lm.modules() if "RMSNorm" in type(m).__name__]
    assert all(p.dtype == torch.float32 for m in outside for p in m.parameters())
    layer = causal_lm.model.layers[0]
    linears = [layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.down_proj]
    assert all(m.base_layer.weight.dtype == torch.bfloat16 for m in linears)


def test_no_fp32_upcast_keeps_the_norms_in_bf16_and_stays_close(
    make_examples, padded, speed_module, loss_and_grads, assert_steps_close
):
    batch = padded(make_examples([40, 17, 63, 25]))
    ref = loss_and_grads(speed_module(), batch)
    lean = speed_module(upcast_to_fp32=False)
    assert lean.model.get_base_model().model.norm.weight.dtype == torch.bfloat16
    assert_steps_close(loss_and_grads(lean, batch), ref, loss_tol=1e-3, grad_tol=5e-2)


# --------------------------------------------------------------------------------- the steps
def test_packed_steps_switch_the_attention_and_other_steps_switch_back(
    make_examples, padded, speed_module
):
    module = speed_module()
    config = module.model.get_base_model().config
    examples = make_examples([4, 7])
    module.kit.prepare_step(module.model, pack_examples(examples))
    assert config._attn_implementation == VARLEN_ATTENTION
    with module.evaluation():  # validation and generation: the configured backend
        assert config._attn_implementation == "sdpa"
    module.kit.prepare_step(module.model, pack_examples(examples))
    module.kit.prepare_step(module.model, padded(examples))
    assert config._attn_implementation == "sdpa"


def test_all_features_together_equal_the_plain_path(
    make_examples, padded, speed_module, loss_and_grads, assert_steps_close
):
    examples = make_examples([40, 17, 63, 25])
    ref = loss_and_grads(speed_module(), padded(examples))
    fast = speed_module(loss_chunk_size=16, fast_lora=True, upcast_to_fp32=False)
    got = loss_and_grads(fast, pack_examples(examples))
    assert_steps_close(got, ref, loss_tol=1e-3, grad_tol=5e-2)


# ------------------------------------------------------------------------------------ config
def test_fast_config_trains_the_tiny_model_on_cpu(run_dir):
    from lit_cats.cli import main  # here, so the GPU tests run where the CLI's Hub extras are not

    main(
        tiny_fit_args(
            "--config",
            str(CONFIGS / "fast.yaml"),
            "--model.speed.fast_lora",
            "true",
            "--trainer.accelerator",
            "cpu",
            "--trainer.max_steps",
            "3",
            "--data.max_tokens_per_batch",
            "2048",
        )
    )
    adapter = run_dir / "logs" / "tiny-cats" / "version_0" / "adapter"
    assert (adapter / "adapter_model.safetensors").exists()
