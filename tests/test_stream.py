"""Streaming generation (``lit_cats.inference.stream``): per-row sampling and both paths."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lit_cats.inference.generation import GenerationSettings, encode_prompt, generate
from lit_cats.inference.stream import RequestStream, RowSampling, TextStream
from lit_cats.recipe import load_base, load_tokenizer
from lit_cats.tiny import TINY_MODEL_ID

PROMPTS = ["Why?", "Why do you knock every single glass off the kitchen table at night?"]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_path):
    torch.manual_seed(0)
    model = load_base(TINY_MODEL_ID, load_in_4bit=False, dtype="float32")
    return model, load_tokenizer(TINY_MODEL_ID)


def _hf_warped(scores: torch.Tensor, s: GenerationSettings) -> torch.Tensor:
    for warper in (
        TemperatureLogitsWarper(s.temperature),
        TopKLogitsWarper(s.top_k),
        TopPLogitsWarper(s.top_p),
    ):
        scores = warper(None, scores)
    return scores


def test_row_sampling_warps_each_row_as_transformers_does_alone():
    scores = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3
    rows = [
        GenerationSettings(temperature=0.7, top_p=0.9, top_k=50),
        GenerationSettings(temperature=1.3, top_p=0.5, top_k=5),
        GenerationSettings(do_sample=False),
    ]
    warped = RowSampling(rows, torch.device("cpu"))(None, scores.clone())
    for i in (0, 1):
        expected = _hf_warped(scores[i : i + 1].clone(), rows[i])[0]
        kept = expected.isfinite()
        assert torch.equal(warped[i].isfinite(), kept)
        torch.testing.assert_close(warped[i][kept], expected[kept])
    assert warped[1].isfinite().sum() < 5  # top-k 5, then top-p 0.5 removed more
    # A greedy row keeps only its best token: sampling it is argmax.
    assert warped[2].isfinite().sum() == 1 and warped[2].argmax() == scores[2].argmax()


def test_text_stream_greedy_equals_generate_and_rows_keep_their_own_limits(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    greedy = GenerationSettings(do_sample=False, max_new_tokens=12, min_new_tokens=12)
    expected = generate(model, tokenizer, PROMPTS, greedy, batch_size=2, decode="plain")
    encoded = [encode_prompt(tokenizer, p) for p in PROMPTS]
    short = GenerationSettings(do_sample=False, max_new_tokens=5, min_new_tokens=5)
    stream = TextStream(model, tokenizer, encoded, [short, greedy])
    steps = list(stream)
    assert len(steps) > 3  # text arrives step by step
    texts = ["".join(step[i] for step in steps) for i in range(2)]
    assert texts[1].strip() == expected[1].response  # the other row's limit changes nothing
    assert [row.num_tokens for row in stream.rows] == [5, 12]
    assert expected[0].response.startswith(texts[0].strip())  # row 0 cut at 5 tokens


def test_request_stream_takes_the_fast_loop_for_shared_settings_only(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    encoded = [encode_prompt(tokenizer, c) for c in chats]
    greedy = GenerationSettings(do_sample=False, max_new_tokens=10)
    fast = RequestStream(model, tokenizer, chats, encoded, [greedy, greedy])
    fast_steps = list(fast)
    plain = RequestStream(model, tokenizer, chats, encoded, [greedy, GenerationSettings()])
    list(plain)
    assert fast.fast and not plain.fast
    assert len(fast_steps) > 3
    assert [r.text for r in fast.rows] == ["".join(s[i] for s in fast_steps) for i in range(2)]
    # The greedy row is the same answer on both paths.
    assert fast.rows[0].text.strip() == plain.rows[0].text.strip()
    assert fast.rows[0].num_tokens == plain.rows[0].num_tokens
