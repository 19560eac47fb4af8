"""The offline tiny model mirrors what matters of Phi-3, deterministically."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_cats.tiny import (
    PHI3_ADDED_TOKENS,
    PHI3_STOP_TOKENS,
    build_tiny_tokenizer,
    resolve_model_path,
    tiny_model_path,
)


def test_tokenizer_carries_phi3_special_tokens_in_phi3_order(tiny_path):
    tok = AutoTokenizer.from_pretrained(tiny_path)
    ids = tok.convert_tokens_to_ids(list(PHI3_ADDED_TOKENS))
    assert ids == list(range(ids[0], ids[0] + len(PHI3_ADDED_TOKENS)))  # contiguous, in order
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|user|>\nhi<|end|>\n<|assistant|>\n"


def test_model_matches_phi3_layout_and_stop_tokens(tiny_path):
    tok = AutoTokenizer.from_pretrained(tiny_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    assert model.config.model_type == "phi3"
    assert model.config.vocab_size > len(tok)  # more embedding rows than tokens, as Phi-3
    assert model.config.vocab_size % 64 == 0
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids(list(PHI3_STOP_TOKENS))
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    assert {"qkv_proj", "gate_up_proj", "o_proj", "down_proj"} <= names
    assert not {"q_proj", "gate_proj"} & names


def test_build_is_deterministic_and_cached(tmp_path, tiny_path):
    assert build_tiny_tokenizer().backend_tokenizer.to_str() == (
        build_tiny_tokenizer().backend_tokenizer.to_str()
    )
    other = tiny_model_path(tmp_path)
    assert other != tiny_path
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (other / name).read_bytes() == (tiny_path / name).read_bytes()
    written = (other / "model.safetensors").stat().st_mtime_ns
    assert tiny_model_path(tmp_path) == other  # second call: cache hit, same folder...
    assert (other / "model.safetensors").stat().st_mtime_ns == written  # ...nothing rewritten


def test_reserved_name_resolves_and_others_pass_through(tiny_path):
    assert resolve_model_path("lit-cats/tiny-phi3") == str(tiny_path)
    assert resolve_model_path("microsoft/Phi-3-mini-4k-instruct") == (
        "microsoft/Phi-3-mini-4k-instruct"
    )


def test_building_does_not_touch_the_global_rng(tmp_path):
    state = torch.random.get_rng_state()
    tiny_model_path(tmp_path / "fresh")
    assert torch.equal(torch.random.get_rng_state(), state)


def test_a_ddp_rank_other_than_zero_builds_a_complete_model(tmp_path, monkeypatch):
    """Inside a torch.distributed job save_pretrained writes only on rank 0; whichever rank
    builds the tiny model first must still cache the whole model (seen under fast + DDP)."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    (tmp_path / f"{tiny_model_path(tmp_path / 'ref').name}").mkdir()  # a broken older build
    path = tiny_model_path(tmp_path)
    monkeypatch.undo()
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json"} <= names
    model = AutoModelForCausalLM.from_pretrained(path)
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_path(tmp_path / "ref"))
    for (name, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
