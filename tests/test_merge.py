"""`lit-cats merge`: adapter folded into the unquantized base, saved, reloaded, checked."""

from __future__ import annotations

import pytest
import torch
from conftest import save_random_adapter
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from lit_cats.cli import main
from lit_cats.inference.adapters import apply_adapter, load_for_inference
from lit_cats.inference.generation import generate
from lit_cats.inference.merge import merge_adapter
from lit_cats.recipe import load_base
from lit_cats.tiny import PHI3_STOP_TOKENS, TINY_MODEL_ID


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A random (non-zero) adapter on every linear kind of the tiny model, saved like fit does."""
    folder = tmp_path_factory.mktemp("run") / "adapter"
    base = load_base(TINY_MODEL_ID, load_in_4bit=False, dtype="float32")
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    torch.manual_seed(0)
    return save_random_adapter(base, folder, targets, 8, lora_alpha=16)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_merged_model_logits_match_adapter_on_base(adapter, tmp_path, tokenizer):
    report = merge_adapter(str(adapter), str(tmp_path / "merged"), dtype="float32", device="cpu")
    assert report.loss_diff < 1e-4 and report.max_logit_diff < 1e-3
    merged = AutoModelForCausalLM.from_pretrained(report.output_dir, dtype=torch.float32)
    on_base = apply_adapter(
        load_base(TINY_MODEL_ID, load_in_4bit=False, dtype="float32"), str(adapter), None
    )
    ids = torch.tensor([tokenizer("Teh void is a box. I sit in it.")["input_ids"]])
    base_only = load_base(TINY_MODEL_ID, load_in_4bit=False, dtype="float32")
    assert not torch.allclose(_logits(base_only, ids), _logits(on_base, ids), atol=1e-3)
    torch.testing.assert_close(_logits(merged, ids), _logits(on_base, ids), atol=1e-4, rtol=1e-4)
    # A plain transformers folder: no peft files, no quantization, every stop id kept.
    names = {p.name for p in report.output_dir.iterdir()}
    assert "model.safetensors" in names and "adapter_config.json" not in names
    assert "quantization_config" not in merged.config.to_dict()
    stops = GenerationConfig.from_pretrained(report.output_dir).eos_token_id
    assert stops == tokenizer.convert_tokens_to_ids(list(PHI3_STOP_TOKENS))
    assert AutoTokenizer.from_pretrained(report.output_dir).chat_template


def test_merge_command_bf16_next_to_the_adapter_and_predict_uses_it(adapter, capsys, tokenizer):
    main(["merge", "--adapter", str(adapter.parent)])  # a run folder holding adapter/
    out = capsys.readouterr().out
    merged = adapter.parent / "merged"
    assert f"-> {merged}" in out and "<= tolerance" in out
    model = load_for_inference(str(merged), load_in_4bit=False)
    assert next(model.parameters()).dtype == torch.bfloat16
    [result] = generate(model, tokenizer, ["meow?"], max_new_tokens=4, seed=0)
    assert 1 <= result.num_tokens <= 4


def test_merge_refuses_an_out_of_tolerance_result(adapter, tmp_path):
    with pytest.raises(RuntimeError, match="does not match adapter-on-base"):
        merge_adapter(str(adapter), str(tmp_path / "m"), device="cpu", tolerance=0.0)
