"""How ``lit-cats serve`` reads a chat-completions request (``lit_cats.inference.openai_api``)."""

from __future__ import annotations

import pytest
from litserve.specs.openai import ChatCompletionRequest

from lit_cats.inference.generation import GenerationSettings
from lit_cats.inference.openai_api import Limits, RequestError, check_request, request_settings

LIMITS = Limits(
    max_tokens=64, default_max_tokens=32, max_prompt_tokens=None, context=4096,
    max_concurrent_requests=4,
)  # fmt: skip
HELLO = [{"role": "user", "content": "hello"}]


def test_what_a_request_leaves_out_comes_from_the_served_settings():
    served = GenerationSettings(temperature=0.5, top_p=0.8, top_k=20, seed=7)
    got = request_settings(ChatCompletionRequest(messages=HELLO), served, LIMITS)
    # LitServe's request model fills in temperature 0.7 and top_p 1.0; unsent, they do not count.
    assert (got.temperature, got.top_p, got.top_k, got.do_sample) == (0.5, 0.8, 20, True)
    assert got.max_new_tokens == 32 and got.seed is None  # requests do not share one seed


def test_what_a_request_sets_applies_and_temperature_0_is_greedy():
    served = GenerationSettings()
    asked = ChatCompletionRequest(messages=HELLO, temperature=1.2, top_p=0.5, max_tokens=9)
    got = request_settings(asked, served, LIMITS)
    assert (got.temperature, got.top_p, got.max_new_tokens) == (1.2, 0.5, 9)
    greedy = request_settings(ChatCompletionRequest(messages=HELLO, temperature=0), served, LIMITS)
    assert not greedy.do_sample
    newer = ChatCompletionRequest(messages=HELLO, max_tokens=5, max_completion_tokens=7)
    assert request_settings(newer, served, LIMITS).max_new_tokens == 7


@pytest.mark.parametrize("max_tokens", [0, 65])
def test_max_tokens_outside_the_limit_is_refused(tokenizer, max_tokens):
    with pytest.raises(RequestError, match="max_tokens must be between 1 and 64") as error:
        check_request(
            ChatCompletionRequest(messages=HELLO, max_tokens=max_tokens), tokenizer, LIMITS
        )
    assert error.value.status_code == 400


def test_a_prompt_with_its_answer_must_fit_the_context(tokenizer):
    small = Limits(64, 32, None, context=40, max_concurrent_requests=1)
    long = [{"role": "user", "content": "meow " * 20}]
    with pytest.raises(RequestError, match="together more than the model's context of 40"):
        check_request(ChatCompletionRequest(messages=long), tokenizer, small)
    ids = check_request(ChatCompletionRequest(messages=HELLO, max_tokens=8), tokenizer, small)
    assert 0 < len(ids) <= 32
