"""Generation on the tiny model: reproducibility, greedy decoding, stopping, prompts, predict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS, save_random_adapter, tiny_fit_args
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from lit_cats.cli import main
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


def test_same_seed_same_answers_other_seed_others(model_4bit, tokenizer):
    first = generate(model_4bit, tokenizer, PROMPTS, max_new_tokens=12, seed=7)
    again = generate(model_4bit, tokenizer, PROMPTS, max_new_tokens=12, seed=7)
    other = generate(model_4bit, tokenizer, PROMPTS, max_new_tokens=12, seed=8)
    assert _tokens(first) == _tokens(again)
    assert _tokens(first) != _tokens(other)
    assert [r.prompt for r in first] == PROMPTS  # results come back in the prompts' order


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


def test_chat_template_generation_prompt_system_and_raw_modes(tokenizer):
    chat = tokenizer.decode(encode_prompt(tokenizer, "hi", system_prompt="Be a cat."))
    assert chat == "<|system|>\nBe a cat.<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\n"
    raw = tokenizer.decode(encode_prompt(tokenizer, "Once upon a cat", raw=True))
    assert "<|user|>" not in raw and raw.endswith("Once upon a cat")


def test_bad_prompts_are_clear_errors(model_4bit, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="no prompts"):
        generate(model_4bit, tokenizer, [])
    with pytest.raises(ValueError, match="No prompts to generate from"):
        load_prompts([], None)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model_4bit, tokenizer, ["ok", "  "])
    with pytest.raises(ValueError, match=r"Prompt 0 is \d+ tokens long.*context is 4096"):
        generate(model_4bit, tokenizer, ["meow " * 5000], max_new_tokens=4)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_prompts(None, str(tmp_path / "missing.txt"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 is not valid JSON"):
        load_prompts(None, str(bad))
    unreadable = tmp_path / "bytes.txt"
    unreadable.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="Cannot read prompt file"):
        load_prompts(None, str(unreadable))


def test_prompt_files_text_and_jsonl(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("first\n\n  second  \n")
    jsonl = tmp_path / "p.jsonl"
    chat = [{"role": "user", "content": "third"}]
    jsonl.write_text(json.dumps({"prompt": "x"}) + "\n" + json.dumps({"messages": chat}) + "\n")
    assert load_prompts(["zero"], str(text)) == ["zero", "first", "second"]
    assert load_prompts(None, str(jsonl)) == ["x", chat]


def test_adapter_errors_missing_path_and_other_base(tmp_path, tiny_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        resolve_adapter(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no adapter folder under"):
        resolve_adapter("latest", tmp_path)
    # An adapter trained on a narrower model of the same architecture.
    config = AutoModelForCausalLM.from_pretrained(tiny_path).config
    config.hidden_size, config.intermediate_size = 64, 192
    other = AutoModelForCausalLM.from_config(config)
    adapter = save_random_adapter(other, tmp_path / "other-adapter", ["qkv_proj", "down_proj"], 4)
    with pytest.raises(ValueError, match="does not fit the base model"):
        load_for_inference(TINY_MODEL_ID, str(adapter), load_in_4bit=False)


def test_latest_and_run_folder_resolve_to_the_adapter(tmp_path):
    for version in (0, 1):
        folder = tmp_path / "exp" / f"version_{version}" / "adapter"
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text("{}")
    newest = tmp_path / "exp" / "version_1" / "adapter"
    assert resolve_adapter("latest", tmp_path / "exp") == str(newest)
    assert resolve_adapter(str(newest.parent)) == str(newest)
    assert resolve_adapter("someone/cats-adapter") == "someone/cats-adapter"  # a Hub id


def test_fit_logs_samples_then_predict_writes_every_prompt(run_dir):
    main(
        tiny_fit_args(
            "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
            "--hub.enabled", "false", "--samples.max_new_tokens", "6",
        )
    )  # fmt: skip
    run = run_dir / "logs" / "tiny-cats" / "version_0"
    events = EventAccumulator(str(run), size_guidance={"tensors": 0})
    events.Reload()
    texts = events.Tensors("samples/0/text_summary")
    assert [e.step for e in texts] == [2, 4]  # each validation; the end is the same step
    assert b"knock things off the table" in texts[-1].tensor_proto.string_val[0]
    assert [e.step for e in events.Scalars("samples/stopped_share")] == [2, 4]

    main(
        [
            "predict",
            *["--config", str(CONFIGS / "qlora.yaml"), "--config", str(CONFIGS / "tiny.yaml")],
            *["--config", str(CONFIGS / "predict.yaml"), "--trainer.enable_progress_bar", "false"],
            *["--model.generation.max_new_tokens", "5", "--data.predict_batch_size", "3"],
        ]
    )
    out = run_dir / "logs" / "tiny-cats" / "version_1"
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    expected = _predict_yaml_prompts()
    assert [r["prompt"] for r in records] == expected
    assert all(set(r) == {"prompt", "response", "num_tokens", "stopped"} for r in records)
    assert all(1 <= r["num_tokens"] <= 5 for r in records)
    markdown = (out / "predictions.md").read_text()
    assert all(prompt in markdown for prompt in expected)
    assert "version_0/adapter" in markdown  # the latest adapter, said in the report
    metrics = json.loads((out / "predictions.metrics.json").read_text())
    assert set(metrics) >= {"stopped_share", "distinct_2", "cat_vocab_share"}


def _predict_yaml_prompts() -> list[str]:
    import yaml

    return yaml.safe_load((CONFIGS / "predict.yaml").read_text())["data"]["prompts"]


def test_fit_refuses_an_adapter(run_dir):
    with pytest.raises(ValueError, match="is for predict/validate/test"):
        main(tiny_fit_args("--trainer.max_steps", "1", "--model.adapter", "latest"))


def test_bench_generate_runs_on_cpu(tmp_path):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_generate.py"
    spec = importlib.util.spec_from_file_location("bench_generate", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = tmp_path / "RESULTS.md"
    args = ["--tiny", "--max-new-tokens", "3", "--loop-prompts", "2", "--results", str(results)]
    rows = bench.main(args)
    assert [r["arm"] for r in rows] == ["original", "batched_4bit", "merged_bf16"]
    assert [r["tokens"] for r in rows] == [6, 24, 24]  # forced to full length
    assert "| merged_bf16 | 8 | 24 |" in results.read_text()
