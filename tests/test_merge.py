"""`lit-cats merge`: adapter folded into the unquantized base, saved, reloaded, checked."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_random_adapter
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from lit_cats.assets import SHIPPED_DATASET_ID
from lit_cats.cli import main
from lit_cats.data.datamodule import CatsDataModule
from lit_cats.inference.adapters import apply_adapter, load_for_inference
from lit_cats.inference.generation import generate
from lit_cats.inference.merge import check_batches, merge_adapter
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


@pytest.fixture(scope="module")
def merged_fp32(adapter, tmp_path_factory):
    """The adapter merged in float32 (an exact check), and its report."""
    out = tmp_path_factory.mktemp("merged-fp32")
    return merge_adapter(str(adapter), str(out), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def check_ids(tokenizer):
    return torch.tensor([tokenizer("Teh void is a box. I sit in it.")["input_ids"]])


def test_the_merge_check_passes_tightly_in_float32(merged_fp32):
    assert merged_fp32.loss_diff < 1e-4 and merged_fp32.max_logit_diff < 1e-3


def test_the_adapter_changes_the_base(adapter, check_ids):
    base = load_base(TINY_MODEL_ID, load_in_4bit=False, dtype="float32")
    base_logits = _logits(base, check_ids)
    on_base = apply_adapter(base, str(adapter), None)
    assert not torch.allclose(base_logits, _logits(on_base, check_ids), atol=1e-3)


def test_merged_model_logits_match_adapter_on_base(adapter, merged_fp32, check_ids):
    merged = AutoModelForCausalLM.from_pretrained(merged_fp32.output_dir, dtype=torch.float32)
    on_base = apply_adapter(
        load_base(TINY_MODEL_ID, load_in_4bit=False, dtype="float32"), str(adapter), None
    )
    expected = _logits(on_base, check_ids)
    torch.testing.assert_close(_logits(merged, check_ids), expected, atol=1e-4, rtol=1e-4)


def test_merged_folder_is_plain_transformers_without_peft_files(merged_fp32):
    names = {p.name for p in merged_fp32.output_dir.iterdir()}
    assert "model.safetensors" in names and "adapter_config.json" not in names


def test_merged_model_is_not_quantized(merged_fp32):
    config = AutoConfig.from_pretrained(merged_fp32.output_dir)
    assert "quantization_config" not in config.to_dict()


def test_merged_generation_config_keeps_every_stop_id(merged_fp32, tokenizer):
    stops = GenerationConfig.from_pretrained(merged_fp32.output_dir).eos_token_id
    assert stops == tokenizer.convert_tokens_to_ids(list(PHI3_STOP_TOKENS))


def test_merged_folder_has_the_chat_template(merged_fp32):
    assert AutoTokenizer.from_pretrained(merged_fp32.output_dir).chat_template


def test_check_batches_are_the_datamodules_first_rows():
    data = CatsDataModule(SHIPPED_DATASET_ID, TINY_MODEL_ID, val_size=0.0, max_seq_length=256)
    data.setup("validate")
    expected = data.collate([data.train_dataset[i] for i in range(3)])
    [batch], _ = check_batches(TINY_MODEL_ID, SHIPPED_DATASET_ID, 3)
    assert batch.keys() == expected.keys()
    assert all(torch.equal(batch[k], expected[k]) for k in batch)


def test_check_batches_hold_at_most_four_rows_each():
    batches, _ = check_batches(TINY_MODEL_ID, SHIPPED_DATASET_ID, 9)
    assert [len(b["input_ids"]) for b in batches] == [4, 4, 1]


def test_merge_help_lists_its_options(capsys):
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    out = capsys.readouterr().out
    for option in ("--adapter", "--output_dir", "--base", "--dtype", "--check_dataset"):
        assert option in out


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


def test_a_tiny_adapter_names_its_base_by_id_and_merges_offline(adapter, merged_fp32, tiny_path):
    # The reserved name, which resolves on any machine, not this machine's cache folder.
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == TINY_MODEL_ID
    assert "base_model: lit-cats/tiny-phi3" in (adapter / "README.md").read_text()
    assert not any(str(tiny_path).encode() in p.read_bytes() for p in adapter.iterdir())
    assert merged_fp32.base == TINY_MODEL_ID  # found from the adapter alone (no --base), offline


def test_merge_into_a_non_empty_folder_needs_overwrite(adapter, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    args = ["merge", "--adapter", str(adapter), "--output_dir", str(out), "--device", "cpu"]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "is not empty (holds notes.txt)" in err and "--overwrite true" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]  # refused before writing anything
    main([*args, "--overwrite", "true"])
    assert (out / "model.safetensors").is_file()
    assert (out / "notes.txt").read_text() == "keep me"


def test_merge_of_an_adapter_that_is_no_folder_says_what_to_pass(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["merge", "--adapter", "no-such-adapter"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "'no-such-adapter' is not a folder here" in err and "--base" in err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # nothing written
