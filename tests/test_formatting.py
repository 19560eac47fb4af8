"""One dataset row as input ids and labels, for each shape (lit_cats.data.formatting)."""

from __future__ import annotations

import pytest

from lit_cats.data.formatting import IGNORE_INDEX, tokenize_chat, tokenize_row, tokenize_text

CHAT = [
    {"role": "system", "content": "You are a cat."},
    {"role": "user", "content": "Why?"},
    {"role": "assistant", "content": "Because the void."},
    {"role": "user", "content": "And the red dot?"},
    {"role": "assistant", "content": "Futile."},
]


def _trained_text(tokenizer, out: dict) -> str:
    return tokenizer.decode(
        [t for t, lab in zip(out["input_ids"], out["labels"], strict=True) if lab != -100]
    )


def test_text_gets_eos_and_every_token_is_a_label(tokenizer):
    out = tokenize_text(tokenizer, "I can haz meaning?", 512)
    assert out["input_ids"][-1] == tokenizer.eos_token_id
    assert out["labels"] == out["input_ids"]


def _trailing(ids: list[int], token: int) -> int:
    """How many times ``token`` ends ``ids`` in a row."""
    n = 0
    while n < len(ids) and ids[-1 - n] == token:
        n += 1
    return n


@pytest.mark.parametrize("text", ["I can haz meaning?", "I can haz meaning?<|endoftext|>"])
def test_text_ends_with_exactly_one_trained_eos(tokenizer, text):
    # A row written with its own EOS keeps it and gets no second one (as TRL's SFTTrainer).
    eos = tokenizer.eos_token_id
    out = tokenize_text(tokenizer, text, 512)
    assert _trailing(out["input_ids"], eos) == _trailing(out["labels"], eos) == 1
    assert out["input_ids"].count(eos) == 1
    assert out["num_tokens"] == len(out["input_ids"])  # the full length, the one EOS included
    bare = tokenizer("I can haz meaning?", add_special_tokens=True)["input_ids"]
    assert out["input_ids"] == [*bare, eos]


def test_truncated_text_counts_its_one_eos(tokenizer):
    out = tokenize_text(tokenizer, "I can haz meaning?<|endoftext|>", 3)
    full = tokenize_text(tokenizer, "I can haz meaning?<|endoftext|>", 512)
    assert out["input_ids"] == full["input_ids"][:3]
    assert out["num_tokens"] == len(full["input_ids"])


def test_chat_and_prompt_response_end_with_exactly_one_trained_eos(tokenizer):
    eos = tokenizer.eos_token_id
    columns = ("text", "messages", "prompt", "response")
    rows = [
        tokenize_row(tokenizer, {"messages": CHAT}, "messages", columns, 512),
        tokenize_row(
            tokenizer, {"prompt": "Why?", "response": "The void."}, "prompt_response", columns, 512
        ),
    ]
    for out in rows:
        assert _trailing(out["input_ids"], eos) == _trailing(out["labels"], eos) == 1
        assert [t for t in out["labels"] if t != IGNORE_INDEX].count(eos) == 1
        assert out["num_tokens"] == len(out["input_ids"])


def test_chat_masks_system_and_user_turns_and_keeps_end_markers(tokenizer):
    out = tokenize_chat(tokenizer, CHAT, 512)
    trained = _trained_text(tokenizer, out)
    assert trained == "Because the void.<|end|>\nFutile.<|end|>\n<|endoftext|>"
    assert out["labels"][-1] == tokenizer.eos_token_id
    # No BOS is added on top of the template, and the template holds no second one.
    assert out["input_ids"].count(tokenizer.bos_token_id) == 0


def test_train_on_prompt_labels_everything(tokenizer):
    out = tokenize_chat(tokenizer, CHAT, 512, train_on_prompt=True)
    assert out["labels"] == out["input_ids"]


def test_truncation_keeps_the_head_and_reports_the_full_length(tokenizer):
    out = tokenize_chat(tokenizer, CHAT, 8)
    assert len(out["input_ids"]) == len(out["labels"]) == 8
    assert out["num_tokens"] > 8
