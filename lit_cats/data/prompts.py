"""Prompts to generate from: inline lists, text files (one per line) and JSONL files.

A prompt is either a user message (a string) or a whole chat (a list of ``{"role", "content"}``
messages ending with a user turn), the shape a JSONL ``messages`` column holds.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Union

from lit_cats.data.formatting import CHAT_ROLES, is_chat
from lit_cats.errors import InvalidSetting, MissingFile

#: A user message, or a chat whose assistant answer is to be generated.
Prompt = Union[str, list[dict[str, str]]]  # noqa: UP007 (jsonargparse reads this alias)


def load_prompts(prompts: Sequence[Prompt] | None = None, prompts_file: str | None = None) -> list:
    """The inline prompts followed by those of ``prompts_file``, checked.

    Args:
        prompts: Prompts given in the config or on the command line.
        prompts_file: A ``.txt`` file (one prompt per non-blank line) or a ``.jsonl`` file whose
            objects hold ``"prompt"`` (a string) or ``"messages"`` (a chat).

    Raises:
        FileNotFoundError: If ``prompts_file`` does not exist.
        ValueError: If a prompt is malformed or there are no prompts at all.
    """
    found: list[Prompt] = list(prompts or [])
    if prompts_file:
        found += read_prompts_file(prompts_file)
    if not found:
        raise InvalidSetting(
            "No prompts to generate from. Give some with --data.prompts '[\"...\"]' or "
            "--data.prompts_file prompts.txt (one per line) or prompts.jsonl."
        )
    for i, prompt in enumerate(found):
        check_prompt(prompt, f"prompt {i}")
    return found


def read_prompts_file(path: str | Path) -> list[Prompt]:
    """Read a ``.txt`` (one prompt a line, blanks skipped) or ``.jsonl`` prompt file.

    Raises:
        MissingFile: If there is no such file.
        InvalidSetting: If it cannot be read, has another suffix, holds no prompt, or holds
            a malformed line.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingFile(
            f"Prompt file {str(path)!r} does not exist (or is not a file). Pass a .txt file with "
            "one prompt per line or a .jsonl file of {'prompt': ...} or {'messages': [...]}."
        )
    if path.suffix not in (".txt", ".jsonl", ""):
        raise InvalidSetting(
            f"Prompt file {str(path)!r} must end in .txt or .jsonl, not {path.suffix!r}."
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidSetting(f"Cannot read prompt file {str(path)!r}: {exc}") from exc
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:  # given on purpose, so an empty one is a mistake, not "no extra prompts"
        raise InvalidSetting(
            f"Prompt file {str(path)!r} holds no prompts (it is empty or blank). Write one "
            "prompt per line (.txt) or one JSON object per line (.jsonl), or drop "
            "--data.prompts_file."
        )
    if path.suffix == ".jsonl":
        return [_jsonl_prompt(line, f"{path}:{n}") for n, line in lines]
    return [line.strip() for _, line in lines]


def _jsonl_prompt(line: str, where: str) -> Prompt:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidSetting(f"{where} is not valid JSON ({exc.msg}): {line!r:.80}") from None
    if isinstance(row, dict) and "messages" in row:
        return row["messages"]
    if isinstance(row, dict) and "prompt" in row:
        return row["prompt"]
    raise InvalidSetting(f"{where} has neither a 'prompt' nor a 'messages' key: {line!r:.80}")


def check_prompt(prompt: Prompt, where: str) -> None:
    """Raise a ``ValueError`` naming ``where`` unless ``prompt`` is a usable prompt."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise InvalidSetting(f"{where} is empty; remove it or write a question.")
        return
    if not is_chat(prompt):
        raise InvalidSetting(
            f"{where} must be a string or a non-empty list of {{'role': one of {CHAT_ROLES}, "
            f"'content': str}} messages, got {prompt!r:.80}."
        )
    if prompt[-1]["role"] != "user":
        raise InvalidSetting(f"{where} must end with a user message, the one to answer.")


def prompt_text(prompt: Prompt) -> str:
    """The user's question of a prompt, for reports (the last user message of a chat)."""
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]
