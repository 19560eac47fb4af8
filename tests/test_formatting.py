"""One dataset row as input ids and labels, for each shape (lit_cats.data.formatting)."""

from __future__ import annotations

from lit_cats.data.formatting import tokenize_chat, tokenize_text

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
