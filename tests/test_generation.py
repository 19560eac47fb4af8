"""Generation on the tiny model: reproducibility, greedy decoding, stopping, prompts, adapters.

The CLI commands that generate (``predict``, the training samples) are in test_predict.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import save_random_adapter
from transformers import AutoModelForCausalLM

from lit_cats.data.prompts import load_prompts
from lit_cats.inference.adapters import load_for_inference, resolve_adapter
from lit_cats.inference.generation import encode_prompt, generate, stop_token_ids
from lit_cats.recipe import load_base
from lit_cats.tiny import PHI3_STOP_TOKENS, TINY_MODEL_ID

PROMPTS = ["Why do cats sit in boxes?", "meow", [{"role": "user", "content": "Is the void warm?"}]]


@pytest.fixture(scope="module")
def model_4bit():
    return load_for_inference(TINY_MODEL_ID, load_in_4bit=True)


@pytest.fixture(scope="module")
def model_fp32():
    """Exactness tests run in fp32: bf16 rounding differs between cached and full passes."""
    return load_base(TINY_MODEL_ID, load_in_4bit=False, dtype="float32")


def _tokens(results):
    return [(r.response, r.num_tokens, r.stopped) for r in results]


def test_same_seed_same_answers(model_4bit, tokenizer):
    first = generate(model_4bit, tokenizer, PROMPTS, max_new_tokens=12, seed=7)
    again = generate(model_4bit, tokenizer, PROMPTS, max_new_tokens=12, seed=7)
    assert _tokens(first) == _tokens(again)


def test_other_seed_other_answers(model_4bit, tokenizer):
    first = generate(model_4bit, tokenizer, PROMPTS, max_new_tokens=12, seed=7)
    other = generate(model_4bit, tokenizer, PROMPTS, max_new_tokens=12, seed=8)
    assert _tokens(first) != _tokens(other)


def test_results_come_back_in_the_prompts_order(model_4bit, tokenizer):
    results = generate(model_4bit, tokenizer, PROMPTS, max_new_tokens=2, seed=7)
    assert [r.prompt for r in results] == PROMPTS


def test_seeded_generation_leaves_the_callers_rng_alone(model_4bit, tokenizer):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    generate(model_4bit, tokenizer, PROMPTS[:1], max_new_tokens=3, seed=1)
    assert torch.equal(torch.rand(3), expected)


def _argmax_decode(model, ids: list[int], steps: int, stops: list[int]) -> list[int]:
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1]
            out.append(int(logits.argmax()))
            if out[-1] in stops:
                break
    return out


def test_greedy_batched_equals_step_by_step_argmax(model_fp32, tokenizer):
    # Prompts of different lengths in one batch: left padding must not change any answer.
    results = generate(model_fp32, tokenizer, PROMPTS, max_new_tokens=10, do_sample=False)
    stops = stop_token_ids(model_fp32, tokenizer)
    for prompt, result in zip(PROMPTS, results, strict=True):
        expected = _argmax_decode(model_fp32, encode_prompt(tokenizer, prompt), 10, stops)
        assert result.num_tokens == len(expected)
        answer = expected[:-1] if expected[-1] in stops else expected
        assert result.response == tokenizer.decode(answer, skip_special_tokens=True).strip()


def test_stops_on_the_template_end_token_not_only_the_tokenizer_eos(tokenizer):
    model = load_base(TINY_MODEL_ID, load_in_4bit=False, dtype="float32")
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    assert end_id != tokenizer.eos_token_id  # the pitfall: the tokenizer knows one EOS only
    prompt_ids = encode_prompt(tokenizer, PROMPTS[0])
    greedy = _argmax_decode(model, prompt_ids, 6, [])
    k = next(i for i, t in enumerate(greedy) if t not in greedy[:i] and t != end_id and i >= 2)
    # Swap the head rows of the k-th greedy token and <|end|>: the model now says <|end|> there.
    head = model.get_output_embeddings().weight.data
    head[[greedy[k], end_id]] = head[[end_id, greedy[k]]]
    [result] = generate(model, tokenizer, PROMPTS[:1], max_new_tokens=20, do_sample=False)
    assert result.stopped
    assert result.num_tokens == k + 1
    assert result.response == tokenizer.decode(greedy[:k], skip_special_tokens=True).strip()
    assert stop_token_ids(model, tokenizer) == tokenizer.convert_tokens_to_ids(
        list(PHI3_STOP_TOKENS)
    )


def test_chat_mode_renders_system_user_and_the_generation_prompt(tokenizer):
    chat = tokenizer.decode(encode_prompt(tokenizer, "hi", system_prompt="Be a cat."))
    assert chat == "<|system|>\nBe a cat.<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\n"


def test_raw_mode_encodes_the_text_without_the_template(tokenizer):
    raw = tokenizer.decode(encode_prompt(tokenizer, "Once upon a cat", raw=True))
    assert "<|user|>" not in raw and raw.endswith("Once upon a cat")


@pytest.mark.parametrize(
    ("prompts", "kwargs", "message"),
    [
        ([], {}, "no prompts"),
        (["ok", "  "], {}, "prompt 1 is empty"),
        (["meow " * 5000], {"max_new_tokens": 4}, r"Prompt 0 is \d+ tokens long.*context is 4096"),
    ],
    ids=["none", "empty", "too-long"],
)
def test_generate_refuses_bad_prompts(model_4bit, tokenizer, prompts, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(model_4bit, tokenizer, prompts, **kwargs)


def test_no_prompts_to_load_is_an_error():
    with pytest.raises(ValueError, match="No prompts to generate from"):
        load_prompts([], None)


def test_a_missing_prompt_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_prompts(None, str(tmp_path / "missing.txt"))


def test_a_bad_jsonl_prompt_line_is_located(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 is not valid JSON"):
        load_prompts(None, str(bad))


def test_an_unreadable_prompt_file_is_an_error(tmp_path):
    unreadable = tmp_path / "bytes.txt"
    unreadable.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="Cannot read prompt file"):
        load_prompts(None, str(unreadable))


def test_a_text_prompt_file_adds_one_prompt_per_nonblank_line(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("first\n\n  second  \n")
    assert load_prompts(["zero"], str(text)) == ["zero", "first", "second"]


def test_a_jsonl_prompt_file_holds_prompts_and_chats(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    chat = [{"role": "user", "content": "third"}]
    jsonl.write_text(json.dumps({"prompt": "x"}) + "\n" + json.dumps({"messages": chat}) + "\n")
    assert load_prompts(None, str(jsonl)) == ["x", chat]


def test_a_missing_adapter_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        resolve_adapter(str(tmp_path / "nope"))


def test_latest_without_any_adapter_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapter folder under"):
        resolve_adapter("latest", tmp_path)


def test_an_adapter_of_another_shape_is_refused(tmp_path, tiny_path):
    # An adapter trained on a narrower model of the same architecture.
    config = AutoModelForCausalLM.from_pretrained(tiny_path).config
    config.hidden_size, config.intermediate_size = 64, 192
    other = AutoModelForCausalLM.from_config(config)
    adapter = save_random_adapter(other, tmp_path / "other-adapter", ["qkv_proj", "down_proj"], 4)
    with pytest.raises(ValueError, match="does not fit the base model"):
        load_for_inference(TINY_MODEL_ID, str(adapter), load_in_4bit=False)


@pytest.fixture
def two_runs(tmp_path):
    """An experiment folder with the adapters of two runs, version_1 written last."""
    for version in (0, 1):
        folder = tmp_path / "exp" / f"version_{version}" / "adapter"
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text("{}")
    return tmp_path / "exp"


def test_latest_resolves_to_the_newest_adapter(two_runs):
    assert resolve_adapter("latest", two_runs) == str(two_runs / "version_1" / "adapter")


def test_a_run_folder_resolves_to_its_adapter(two_runs):
    run = two_runs / "version_0"
    assert resolve_adapter(str(run)) == str(run / "adapter")


def test_a_hub_id_is_passed_through():
    assert resolve_adapter("someone/cats-adapter") == "someone/cats-adapter"


def test_bench_generate_runs_on_cpu(tmp_path):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_generate.py"
    spec = importlib.util.spec_from_file_location("bench_generate", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = tmp_path / "RESULTS.md"
    args = ["--tiny", "--max-new-tokens", "3", "--loop-prompts", "2", "--many", "12"]
    rows = bench.main([*args, "--results", str(results)])
    assert [r["arm"] for r in rows] == [
        "original",
        "batched_4bit",
        "fast_4bit",
        "merged_bf16",
        "fast_merged_bf16",
        "fast_merged_bf16_x12",
    ]
    assert [r["tokens"] for r in rows] == [6, 24, 24, 24, 24, 36]  # forced to full length
    assert all(r["ttft"] > 0 and r["decode_tok_s"] > 0 for r in rows if "fast" in r["arm"])
    text = results.read_text()
    assert "| merged_bf16 | 8 | 24 |" in text and "| fast_merged_bf16_x12 | 12 | 36 |" in text
