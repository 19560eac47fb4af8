"""Turning one dataset row into ``input_ids`` and ``labels``: the three supported shapes.

- ``text``: a plain text column (the original script's shape). Every token is trained on, and
  the tokenizer's EOS is appended when the text does not already end with it, so the model
  learns to stop (one EOS, as TRL's SFTTrainer).
- ``messages``: a chat column (list of ``{"role", "content"}``), rendered with the tokenizer's
  chat template. By default only assistant turns carry labels.
- ``prompt_response``: two string columns, turned into a user/assistant chat.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from lit_cats.errors import InvalidSetting

Format = Literal["auto", "text", "messages", "prompt_response"]

#: Label value ignored by the cross-entropy loss (PyTorch's and transformers' convention).
IGNORE_INDEX = -100

#: Roles a chat message may have (Phi-3's template renders exactly these).
CHAT_ROLES = ("system", "user", "assistant")


def format_columns(
    text_column: str, messages_column: str, prompt_column: str, response_column: str
) -> dict[str, list[str]]:
    """The columns each dataset shape reads."""
    return {
        "text": [text_column],
        "messages": [messages_column],
        "prompt_response": [prompt_column, response_column],
    }


def detect_format(
    columns: Sequence[str],
    requested: Format,
    text_column: str,
    messages_column: str,
    prompt_column: str,
    response_column: str,
) -> Literal["text", "messages", "prompt_response"]:
    """Pick the dataset shape from its columns, or check the requested one is possible.

    Raises:
        ValueError: If the needed columns are missing; names the columns that do exist.
    """
    needed = format_columns(text_column, messages_column, prompt_column, response_column)
    if requested == "auto":
        for fmt in ("messages", "prompt_response", "text"):
            if all(c in columns for c in needed[fmt]):
                return fmt  # type: ignore[return-value]
        raise InvalidSetting(
            f"The dataset has no column {text_column!r}, no {messages_column!r} column and no "
            f"{prompt_column!r}/{response_column!r} pair; its columns are {list(columns)}. "
            "Name the right one with --data.text_column (or --data.messages_column, "
            "--data.prompt_column/--data.response_column)."
        )
    missing = [c for c in needed[requested] if c not in columns]
    if missing:
        raise InvalidSetting(
            f"format={requested!r} needs column(s) {missing}, but the dataset's columns are "
            f"{list(columns)}. Set the column name option or use format='auto'."
        )
    return requested


def validate_column(values: Sequence[Any], column: str, fmt: str) -> None:
    """Check every value of a column has the type its shape requires, before tokenizing.

    Raises:
        ValueError: On the first bad row, naming its index, its type and the expectation.
    """
    for i, value in enumerate(values):
        if fmt == "messages":
            _validate_messages(value, column, i)
        elif not isinstance(value, str):
            raise InvalidSetting(
                f"Column {column!r} row {i} holds {type(value).__name__} ({value!r:.60}), "
                "expected a string. Clean or cast the column before training."
            )


def is_chat(value: Any) -> bool:
    """True for a non-empty list of ``{"role": one of CHAT_ROLES, "content": str}`` dicts."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(
            isinstance(m, dict)
            and m.get("role") in CHAT_ROLES
            and isinstance(m.get("content"), str)
            for m in value
        )
    )


def _validate_messages(value: Any, column: str, row: int) -> None:
    if not is_chat(value):
        raise InvalidSetting(
            f"Column {column!r} row {row} is not a chat: expected a non-empty list of "
            f"{{'role': one of {CHAT_ROLES}, 'content': str}} dicts, got {value!r:.80}."
        )
    if not any(m["role"] == "assistant" for m in value):
        raise InvalidSetting(f"Column {column!r} row {row} has no assistant turn to learn from.")


def assistant_char_spans(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], text: str
) -> list[tuple[int, int]]:
    """Character spans of ``text`` (the rendered chat) produced by each assistant turn.

    Works for any template that renders a conversation as a prefix of its continuation: turn
    ``i`` starts where ``messages[:i]`` plus the generation prompt ends, and stops where the
    rendering of ``messages[:i+1]`` stops agreeing with the full text (so the turn's end marker,
    ``<|end|>`` for Phi-3, and the final EOS belong to the answer: the model must learn them).
    """
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(
            messages[:i], tokenize=False, add_generation_prompt=True
        )
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not text.startswith(prefix):
            raise InvalidSetting(
                "The tokenizer's chat template does not render a conversation as a prefix of "
                "its continuation, so assistant turns cannot be located; set "
                "--data.train_on_prompt true to train on the whole text."
            )
        spans.append((len(prefix), _common_prefix_length(upto, text)))
    return spans


def _common_prefix_length(a: str, b: str) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def tokenize_text(
    tokenizer: PreTrainedTokenizerBase, text: str, max_seq_length: int
) -> dict[str, list[int]]:
    """Tokenize plain text, end it with one EOS, truncate; every kept token is a label.

    The EOS is appended only when the text does not already end with it (as TRL's SFTTrainer
    does), so a row written with its own EOS is not trained on a second one. ``num_tokens`` is
    the full length, EOS included, before truncation.
    """
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids = [*ids, eos]
    kept = ids[:max_seq_length]
    return {"input_ids": kept, "labels": list(kept), "num_tokens": len(ids)}


def tokenize_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    max_seq_length: int,
    train_on_prompt: bool = False,
) -> dict[str, list[int]]:
    """Render a chat with the template, tokenize it, and label the assistant turns.

    The template already holds the special tokens, so they are not added again (a second BOS
    would be a sequence the model never saw). Tokens are labelled when they lie wholly inside an
    assistant span, found through the fast tokenizer's offset mapping (a span may end inside the
    next turn's first special token, where the renderings first differ by a character).
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if train_on_prompt:
        labels = list(ids)
    else:
        spans = assistant_char_spans(tokenizer, messages, text)
        labels = [
            tok if any(s <= start and end <= e for s, e in spans) else IGNORE_INDEX
            for tok, (start, end) in zip(ids, enc["offset_mapping"], strict=True)
        ]
    return {
        "input_ids": ids[:max_seq_length],
        "labels": labels[:max_seq_length],
        "num_tokens": len(ids),
    }


def prompt_response_to_messages(prompt: str, response: str) -> list[dict[str, str]]:
    """The chat a prompt/response pair stands for."""
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def tokenize_row(
    tokenizer: PreTrainedTokenizerBase,
    row: dict[str, Any],
    fmt: str,
    columns: Sequence[str],
    max_seq_length: int,
    train_on_prompt: bool = False,
) -> dict[str, list[int]]:
    """One dataset row of shape ``fmt`` as ``input_ids`` and ``labels``.

    Args:
        tokenizer: The model's tokenizer (its chat template renders chats).
        row: The row.
        fmt: ``"text"``, ``"messages"`` or ``"prompt_response"`` (see :func:`detect_format`).
        columns: The text, messages, prompt and response column names, in that order.
        max_seq_length: Longest kept example, in tokens.
        train_on_prompt: Chats: label every token, not only the assistant turns.
    """
    text, messages, prompt, response = columns
    if fmt == "text":
        return tokenize_text(tokenizer, row[text], max_seq_length)
    chat = (
        row[messages]
        if fmt == "messages"
        else prompt_response_to_messages(row[prompt], row[response])
    )
    return tokenize_chat(tokenizer, chat, max_seq_length, train_on_prompt)
