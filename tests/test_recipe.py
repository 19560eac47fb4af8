"""The QLoRA recipe (``lit_cats.recipe``): the 4-bit and LoRA builders, the target-module check
that the original lacked, and loading the base with advice when it cannot be found."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM

from lit_cats.recipe import (
    build_bnb_config,
    build_lora_config,
    linear_module_names,
    load_base,
    parse_dtype,
    require_bitsandbytes,
    resolve_target_modules,
)

PHI3_LINEARS = ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
ORIGINAL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base(tiny_path):
    return AutoModelForCausalLM.from_pretrained(tiny_path)


def test_phi3_linear_names_are_the_fused_ones(base):
    assert linear_module_names(base) == PHI3_LINEARS


def test_all_linear_resolves_to_every_phi3_kind(base):
    assert resolve_target_modules(base, "all-linear") == PHI3_LINEARS


def test_the_original_target_list_is_refused_and_the_real_names_listed(base):
    # peft would silently train only o_proj and down_proj with this list.
    with pytest.raises(ValueError) as err:
        resolve_target_modules(base, ORIGINAL_TARGETS)
    message = str(err.value)
    for name in ("q_proj", "gate_proj", "up_proj"):
        assert name in message
    for name in PHI3_LINEARS:
        assert name in message


def test_explicit_existing_targets_pass(base):
    assert resolve_target_modules(base, ["qkv_proj", "o_proj"]) == ["qkv_proj", "o_proj"]


def test_bnb_config_is_the_qlora_recipe():
    cfg = build_bnb_config()
    assert cfg.load_in_4bit
    assert cfg.bnb_4bit_quant_type == "nf4"
    assert cfg.bnb_4bit_use_double_quant
    assert cfg.bnb_4bit_compute_dtype == torch.bfloat16


def test_bad_quant_type_and_dtype_are_named():
    with pytest.raises(ValueError, match="'int3'"):
        build_bnb_config(quant_type="int3")
    with pytest.raises(ValueError, match="'bf17'"):
        parse_dtype("bf17")


def test_lora_config_rejects_bad_values():
    with pytest.raises(ValueError, match="rank"):
        build_lora_config(["o_proj"], r=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        build_lora_config(["o_proj"], lora_dropout=1.5)
    cfg = build_lora_config(["o_proj"], r=16, lora_alpha=32, lora_dropout=0.05)
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (16, 32, 0.05)


def test_missing_bitsandbytes_gives_the_fix(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a)
    )
    with pytest.raises(RuntimeError, match="load_in_4bit false"):
        require_bitsandbytes()


def test_missing_model_path_is_named():
    with pytest.raises(FileNotFoundError, match="'./no/such/model' does not exist"):
        load_base("./no/such/model")


def test_unreachable_hub_model_says_how_to_use_a_local_folder():
    # conftest sets HF_HUB_OFFLINE=1: the Hub is unreachable, as on an air-gapped machine.
    with pytest.raises(RuntimeError, match="Could not load model.*local folder"):
        load_base("microsoft/Phi-3-mini-4k-instruct")
