"""The fast decode loop (lit_cats.inference.decode) against transformers' generate, tiny model.

On the CPU the loop runs the same code as on a GPU (static KV cache, per-row positions, refill),
without CUDA graphs; ``decode="fast"`` asks for it there. Exactness tests run in fp32.
"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import save_random_adapter
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM

from lit_cats.inference import decode
from lit_cats.inference.decode import StreamEvent, fast_path_reason, stream, stream_batch
from lit_cats.inference.generation import (
    GenerationSettings,
    encode_prompt,
    generate,
    stop_token_ids,
)
from lit_cats.recipe import load_base
from lit_cats.tiny import PHI3_STOP_TOKENS, TINY_MODEL_ID

PROMPTS = [
    "Why do cats sit in boxes?",
    "meow",
    [{"role": "user", "content": "Is the void warm?"}],
    "Tell me, in many more words than the others, why the red dot is never caught at all.",
]
GREEDY = {"max_new_tokens": 12, "do_sample": False}


def _base():
    return load_base(TINY_MODEL_ID, load_in_4bit=False, dtype="float32")


@pytest.fixture(scope="module")
def merged():
    return _base()


@pytest.fixture(scope="module")
def with_adapter(tmp_path_factory):
    """fp32 base + a random (non-zero) LoRA adapter on all four linear kinds, via peft."""
    folder = tmp_path_factory.mktemp("adapter")
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    save_random_adapter(_base(), folder, targets, r=4)
    return PeftModel.from_pretrained(_base(), str(folder)).eval()


def _answers(results):
    return [(r.response, r.num_tokens, r.stopped) for r in results]


def _argmax_decode(model, ids: list[int], steps: int, stops: list[int]) -> list[int]:
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1]
            out.append(int(logits.argmax()))
            if out[-1] in stops:
                break
    return out


@pytest.mark.parametrize("which", ["merged", "with_adapter"])
def test_greedy_fast_equals_generate_and_step_by_step_argmax(request, tokenizer, which):
    model = request.getfixturevalue(which)
    fast = generate(model, tokenizer, PROMPTS, decode="fast", **GREEDY)
    plain = generate(model, tokenizer, PROMPTS, decode="plain", **GREEDY)
    assert _answers(fast) == _answers(plain)
    stops = stop_token_ids(model, tokenizer)
    for prompt, result in zip(PROMPTS, fast, strict=True):
        expected = _argmax_decode(model, encode_prompt(tokenizer, prompt), 12, stops)
        answer = expected[:-1] if expected[-1] in stops else expected
        assert result.num_tokens == len(expected)
        assert result.response == tokenizer.decode(answer, skip_special_tokens=True).strip()


def test_an_answer_is_the_same_alone_in_a_batch_and_with_refill(merged, tokenizer):
    def fresh(prompts, batch_size):  # a decoder of exactly this many slots
        decode.release(merged)
        results = generate(merged, tokenizer, prompts, decode="fast", batch_size=batch_size,
                           **GREEDY)  # fmt: skip
        assert decode.decoder_of(merged).slots == min(batch_size, len(prompts))
        return results

    together = fresh(PROMPTS, 4)
    refilled = fresh(PROMPTS, 3)  # the fourth prompt takes the first slot that frees
    alone = [fresh([p], 1)[0] for p in PROMPTS]
    assert _answers(together) == _answers(refilled) == _answers(alone)
    assert [r.prompt for r in refilled] == PROMPTS  # the prompts' order, whatever the slots


def test_seeded_sampling_is_reproducible_and_the_seed_matters(merged, tokenizer):
    sampled = {"max_new_tokens": 12, "decode": "fast", "batch_size": 3}
    first = generate(merged, tokenizer, PROMPTS, seed=7, **sampled)
    again = generate(merged, tokenizer, PROMPTS, seed=7, **sampled)
    other = generate(merged, tokenizer, PROMPTS, seed=8, **sampled)
    assert _answers(first) == _answers(again)
    assert _answers(first) != _answers(other)


def test_seeded_sampling_draws_as_transformers_generate_does(with_adapter, tokenizer):
    # torch.multinomial's one-sample draw is argmax(p / E), E ~ Exp(1); the fast loop draws E
    # from a generator seeded alike, so on the CPU, with every prompt in one batch, the two
    # paths sample the same tokens: the same warpers, the same distribution, the same draws.
    sampled = {"max_new_tokens": 12, "seed": 3, "temperature": 1.3, "top_k": 20, "top_p": 0.8}
    fast = generate(with_adapter, tokenizer, PROMPTS, decode="fast", batch_size=4, **sampled)
    plain = generate(with_adapter, tokenizer, PROMPTS, decode="plain", batch_size=4, **sampled)
    assert _answers(fast) == _answers(plain)


def test_seeded_sampling_leaves_the_callers_rng_alone(merged, tokenizer):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    generate(merged, tokenizer, PROMPTS[:1], max_new_tokens=3, seed=1, decode="fast")
    assert torch.equal(torch.rand(3), expected)


def _model_saying(tokenizer, stop_token: str):
    """The tiny model with two head rows swapped: greedy, it says ``stop_token`` at step k."""
    model = _base()
    stop_id = tokenizer.convert_tokens_to_ids(stop_token)
    greedy = _argmax_decode(model, encode_prompt(tokenizer, PROMPTS[0]), 6, [])
    k = next(i for i, t in enumerate(greedy) if t not in greedy[:i] and t != stop_id and i >= 2)
    head = model.get_output_embeddings().weight.data
    head[[greedy[k], stop_id]] = head[[stop_id, greedy[k]]]
    return model, greedy, k


@pytest.mark.parametrize("stop_token", PHI3_STOP_TOKENS)
def test_every_stop_id_ends_an_answer(tokenizer, stop_token):
    model, greedy, k = _model_saying(tokenizer, stop_token)
    [result] = generate(model, tokenizer, PROMPTS[:1], max_new_tokens=20, do_sample=False,
                        decode="fast")  # fmt: skip
    assert result.stopped and result.num_tokens == k + 1
    assert result.response == tokenizer.decode(greedy[:k], skip_special_tokens=True).strip()


def test_min_new_tokens_holds_the_stop_ids_back(tokenizer):
    model, _, k = _model_saying(tokenizer, "<|end|>")
    settings = GenerationSettings(max_new_tokens=k + 4, min_new_tokens=k + 3, do_sample=False)
    fast = generate(model, tokenizer, PROMPTS[:2], settings, decode="fast")
    plain = generate(model, tokenizer, PROMPTS[:2], settings, decode="plain")
    assert _answers(fast) == _answers(plain)
    assert fast[0].num_tokens >= k + 3


def test_stream_pieces_join_to_the_answer(merged, tokenizer):
    [expected] = generate(merged, tokenizer, PROMPTS[:1], decode="fast", **GREEDY)
    pieces = list(stream(merged, tokenizer, PROMPTS[0], **GREEDY))
    assert len(pieces) > 1  # piece by piece, not one answer at the end
    assert "".join(pieces).strip() == expected.response


def test_stream_batch_tags_each_request_and_ends_it_with_its_result(merged, tokenizer):
    expected = generate(merged, tokenizer, PROMPTS, decode="fast", **GREEDY)
    events = list(stream_batch(merged, tokenizer, PROMPTS, batch_size=2, **GREEDY))
    assert all(isinstance(e, StreamEvent) for e in events)
    for i, answer in enumerate(expected):
        mine = [e for e in events if e.index == i]
        assert [e.result is not None for e in mine] == [False] * (len(mine) - 1) + [True]
        assert mine[-1].result == answer
        assert "".join(e.text for e in mine).strip() == answer.response


def test_stream_leaves_autograd_on_between_pieces(merged, tokenizer):
    for _ in stream(merged, tokenizer, PROMPTS[1], max_new_tokens=3):
        assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    assert not merged.training


def test_auto_on_the_cpu_runs_the_plain_path_and_says_so(merged, tokenizer, caplog):
    caplog.set_level(logging.INFO)
    decode._SAID.clear()
    results = generate(merged, tokenizer, PROMPTS[:2], **GREEDY)
    assert _answers(results) == _answers(generate(merged, tokenizer, PROMPTS[:2], decode="fast",
                                                  **GREEDY))  # fmt: skip
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("generation:")]
    assert "generation: plain transformers generate (not on a CUDA device)" in lines
    assert any(line.startswith("generation: fast decode (eager, no graph;") for line in lines)


def test_an_unsupported_model_falls_back_to_the_plain_path(tokenizer):
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(list(PHI3_STOP_TOKENS))
    settings = GenerationSettings(decode="fast", max_new_tokens=3, do_sample=False)
    assert "not a Phi-3-architecture model" in fast_path_reason(model, settings)
    [result] = generate(model, tokenizer, PROMPTS[:1], settings)
    assert result.num_tokens == 3
    pieces = list(stream(model, tokenizer, PROMPTS[0], settings))  # one piece: the answer
    assert pieces == [result.response]


def test_a_long_run_prints_progress_in_prompts_and_tokens_per_second(
    merged, tokenizer, caplog, monkeypatch
):
    monkeypatch.setattr(decode, "PROGRESS_EVERY_S", 0.0)
    caplog.set_level(logging.INFO)
    generate(merged, tokenizer, PROMPTS, decode="fast", batch_size=2, progress=True, **GREEDY)
    lines = [r.getMessage() for r in caplog.records if "tok/s" in r.getMessage()]
    assert lines and lines[-1].startswith("generation: 4/4 prompts, 48 tokens, ")


def test_compiled_4bit_step_equals_generate_through_bitsandbytes_dequantization(
    tokenizer, tmp_path, monkeypatch
):
    """decode="compile" on a 4-bit base + adapter (fused LoRA, as predict runs it): the compiled
    layer step dequantizes through NF4Weight.dequantize (bitsandbytes' arithmetic) and answers
    as transformers' generate does, greedy, token for token."""
    from lit_cats.fast import nf4
    from lit_cats.fast.lora import enable_fast_lora
    from lit_cats.inference.adapters import load_for_inference

    adapter = save_random_adapter(_base(), tmp_path / "a", ["qkv_proj", "down_proj"], r=4)
    model = load_for_inference(TINY_MODEL_ID, str(adapter), dtype="float32")
    enable_fast_lora(model)
    for layer in model.modules():  # keep bitsandbytes' standard layout, as on a GPU (on CPUs
        if hasattr(layer, "support_avx512bf16_for_cpu"):  # with AVX512-BF16 its eager
            layer.support_avx512bf16_for_cpu = False  # inference repacks the weights)
    traced = []
    dequantize = nf4._dequantize_bnb  # what NF4Weight.dequantize runs on the CPU
    monkeypatch.setattr(nf4, "_dequantize_bnb", lambda w, d: traced.append(d) or dequantize(w, d))
    plain = generate(model, tokenizer, PROMPTS, decode="plain", **GREEDY)
    assert not traced  # eager calls keep bitsandbytes' own forward
    compiled = generate(model, tokenizer, PROMPTS, decode="compile", **GREEDY)
    assert decode.decoder_of(model).compiled
    assert traced  # the compiled step went through it (traced once, replayed by the compiler)
    assert _answers(compiled) == _answers(plain)
    decode.release(model)


def _phi3_mini_shaped():
    """Phi-3-mini's shapes (3.8B) on the meta device: no memory, weights never read."""
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32064,
    )
    with torch.device("meta"):
        return Phi3ForCausalLM(config)


def test_auto_compiles_the_step_only_when_the_planned_steps_repay_the_compile():
    """decode: auto on an H200 (its calibration row): eight answers of 250 tokens save ~0.6 s
    compiled, less than a cold compile (~7 s) and more than one from a warm cache; a long run
    repays even the cold compile."""
    phi3_mini = _phi3_mini_shaped()
    h200 = "NVIDIA H200"
    pays, why = decode.choose_compile(phi3_mini, 250, h200, warm=False)
    assert not pays
    assert why == ("not compiled: 250 steps x 2.5 ms saved = 0.64 s <= 7.1 s of compiling "
                   "(cold Inductor cache)")  # fmt: skip
    pays, why = decode.choose_compile(phi3_mini, 250, h200, warm=True)
    assert pays and why.endswith("> 0.4 s of compiling (warm Inductor cache)"), why
    pays, why = decode.choose_compile(phi3_mini, 4000, h200, warm=False)
    assert pays and why.startswith("compiled: 4,000 steps x 2.5 ms saved = 10 s > 7.1 s"), why


def test_auto_scales_the_saving_to_the_model_and_compiles_where_nothing_was_measured(merged):
    """The tiny model's steps save next to nothing (its weights are a few MB): never worth a
    compile. A GPU without decode figures (the H100 has training figures only) compiles, as
    before these figures existed, and says why."""
    pays, why = decode.choose_compile(merged, 100_000, "NVIDIA H200", warm=True)
    assert not pays and why.startswith("not compiled: 100,000 steps x "), why
    pays, why = decode.choose_compile(_phi3_mini_shaped(), 250, "NVIDIA H100 80GB HBM3")
    assert pays and why == "compiled (no bf16 decode figures for NVIDIA H100 80GB HBM3 to weigh)"


def test_settings_refuse_an_unknown_decode_mode():
    with pytest.raises(ValueError, match="decode must be one of"):
        GenerationSettings(decode="turbo")


@pytest.mark.gpu
def test_gpu_graphed_greedy_equals_generate_and_argmax(tokenizer, tmp_path):
    """On CUDA: the graphed loop (fp32, so kernels' rounding cannot flip an argmax) equals
    transformers' generate and step-by-step argmax; the 4-bit base + adapter runs compiled and
    graphed."""
    from lit_cats.inference.adapters import load_for_inference

    model = load_base(TINY_MODEL_ID, load_in_4bit=False, dtype="float32", device="cuda")
    plain = generate(model, tokenizer, PROMPTS, decode="plain", **GREEDY)
    graphed = generate(model, tokenizer, PROMPTS, decode="fast", **GREEDY)
    assert decode.decoder_of(model).graph is not None, decode.decoder_of(model).graph_failed
    assert _answers(graphed) == _answers(plain)
    fast = generate(model, tokenizer, PROMPTS, decode="compile", **GREEDY)
    engine = decode.decoder_of(model)
    assert engine.compiled and engine.graph is not None, engine.graph_failed
    assert _answers(fast) == _answers(plain)
    stops = stop_token_ids(model, tokenizer)
    cpu = _base()
    for prompt, result in zip(PROMPTS, fast, strict=True):
        expected = _argmax_decode(cpu, encode_prompt(tokenizer, prompt), 12, stops)
        assert result.num_tokens == len(expected)
    alone = [generate(model, tokenizer, [p], **GREEDY)[0] for p in PROMPTS]
    assert _answers(alone) == _answers(fast)

    adapter = save_random_adapter(_base(), tmp_path / "a", ["qkv_proj", "down_proj"], r=4)
    quantized = load_for_inference(TINY_MODEL_ID, str(adapter), device="cuda")
    results = generate(quantized, tokenizer, PROMPTS, max_new_tokens=12, min_new_tokens=12)
    assert [r.num_tokens for r in results] == [12] * len(PROMPTS)
    engine = decode.decoder_of(quantized)
    # auto: graphed; compiled only where choose_compile says 12 steps repay it (not on the cards
    # with decode figures, for the tiny model's few MB of weights)
    pays, why = decode.choose_compile(quantized, 12, torch.cuda.get_device_name())
    assert engine.graph is not None and engine.compiled == pays, engine.graph_failed
    assert engine.choice == why


@pytest.mark.gpu
def test_gpu_4bit_graphed_and_compiled_greedy_equal_generate(tokenizer, tmp_path):
    """On CUDA, a 4-bit base + adapter (fp32 compute, so rounding cannot flip an argmax), with
    the fused LoRA as predict runs it: the graphed step (bitsandbytes' layers) and the compiled
    graphed step (lit-cats' one-kernel dequantization, bit-identical to bitsandbytes') answer as
    transformers' generate does, token for token, and alone as in a batch."""
    from lit_cats.fast.lora import enable_fast_lora
    from lit_cats.inference.adapters import load_for_inference

    adapter = save_random_adapter(_base(), tmp_path / "a", ["qkv_proj", "o_proj", "gate_up_proj",
                                                           "down_proj"], r=4)  # fmt: skip
    model = load_for_inference(TINY_MODEL_ID, str(adapter), dtype="float32", device="cuda")
    enable_fast_lora(model)
    plain = generate(model, tokenizer, PROMPTS, decode="plain", **GREEDY)
    graphed = generate(model, tokenizer, PROMPTS, decode="fast", **GREEDY)
    engine = decode.decoder_of(model)
    assert engine.graph is not None and not engine.compiled, engine.graph_failed
    compiled = generate(model, tokenizer, PROMPTS, decode="compile", **GREEDY)
    engine = decode.decoder_of(model)
    assert engine.graph is not None and engine.compiled, engine.graph_failed
    assert _answers(graphed) == _answers(plain) == _answers(compiled)
    alone = [generate(model, tokenizer, [p], decode="compile", **GREEDY)[0] for p in PROMPTS]
    assert _answers(alone) == _answers(plain)


@pytest.mark.gpu
def test_gpu_under_autocast_the_step_is_graphed_and_equals_the_eager_step(
    tokenizer, tmp_path, monkeypatch
):
    """Training's samples run under bf16 autocast: the step is captured with autocast's cache
    of cast weights off, and its seeded samples equal the same loop run eagerly (graph capture
    made to fail: the fallback), replay after replay."""
    from lit_cats.inference.adapters import load_for_inference

    adapter = save_random_adapter(_base(), tmp_path / "a", ["qkv_proj", "down_proj"], r=4)
    model = load_for_inference(TINY_MODEL_ID, str(adapter), dtype="float32", device="cuda")
    sampled = {"max_new_tokens": 24, "seed": 5, "decode": "auto"}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        graphed = generate(model, tokenizer, PROMPTS, **sampled)
        engine = decode.decoder_of(model)
        assert engine.graph is not None and not engine.compiled, engine.graph_failed
    torch.ones(1 << 24, device="cuda")  # reuse freed memory before replaying again
    with torch.autocast("cuda", dtype=torch.bfloat16):
        again = generate(model, tokenizer, PROMPTS, **sampled)
    decode.release(model)

    def no_capture(*args, **kwargs):
        raise RuntimeError("capture refused by the test")

    monkeypatch.setattr(torch.cuda, "graph", no_capture)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = generate(model, tokenizer, PROMPTS, **sampled)
    assert decode.decoder_of(model).graph is None
    assert _answers(graphed) == _answers(again) == _answers(eager)
