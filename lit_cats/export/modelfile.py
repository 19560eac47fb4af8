"""An Ollama ``Modelfile`` for an exported GGUF: its chat template, stop tokens and sampling.

Ollama does not run the tokenizer's Jinja chat template; it needs the same format as a Go
template. Rather than keep a hand-written copy per model, the turn markers are read off the
tokenizer's own template: render short chats whose contents are marker strings, and cut the
text around them. For Phi-3 this gives Ollama's well-known template::

    {{ if .System }}<|system|>
    {{ .System }}<|end|>
    {{ end }}{{ if .Prompt }}<|user|>
    {{ .Prompt }}<|end|>
    {{ end }}<|assistant|>
    {{ .Response }}<|end|>

A template that cannot be cut into such turns is refused, never approximated. Missing stop
tokens are the commonest cause of endless output in Ollama, so every end-of-sequence id of the
generation config becomes a ``PARAMETER stop``; the sampling parameters are ``predict``'s.

Ollama's Modelfile reference: https://github.com/ollama/ollama/blob/main/docs/modelfile.md
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from lit_cats.errors import UsageError
from lit_cats.inference.generation import GenerationSettings

# Marker contents: plain words, so no template escapes, trims or capitalises them differently.
_SYSTEM, _USER, _REPLY, _USER2 = "SYSTEMMARKER", "USERMARKER", "REPLYMARKER", "SECONDMARKER"


@dataclass(frozen=True)
class ChatTurns:
    """The text around each turn of a chat template.

    Attributes:
        system: Before and after a system message (``None``: the template has no system turn).
        user: Before and after a user message.
        assistant: Before an answer (the generation prompt) and after it (the end of the turn).
    """

    system: tuple[str, str] | None
    user: tuple[str, str]
    assistant: tuple[str, str]


def chat_turns(tokenizer: PreTrainedTokenizerBase) -> ChatTurns:
    """Read the turn markers off the tokenizer's chat template.

    Raises:
        UsageError: If the tokenizer has no chat template, or one that is not a sequence of
            turns each wrapped in fixed text (then Ollama's template must be written by hand).
    """
    if not tokenizer.chat_template:
        raise UsageError("The tokenizer has no chat template, so there is no TEMPLATE to write.")

    def render(*messages: tuple[str, str], prompt: bool) -> str:
        chat = [{"role": role, "content": content} for role, content in messages]
        return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt)

    asked = render(("user", _USER), prompt=True)
    closed = render(("user", _USER), prompt=False)
    eos = tokenizer.eos_token or ""
    if eos and closed.endswith(eos):  # a finished chat ends with EOS (Phi-3's does)
        closed = closed[: -len(eos)]
    if _USER not in closed or not asked.startswith(closed):
        raise _untemplatable(asked)
    user_before, _, user_after = closed.partition(_USER)
    generation_prompt = asked[len(closed) :]
    # A second exchange shows what ends an answer: the text between it and the next user turn.
    head = closed + generation_prompt + _REPLY
    second_user = user_before + _USER2 + user_after + generation_prompt
    two = render(("user", _USER), ("assistant", _REPLY), ("user", _USER2), prompt=True)
    fits = len(two) >= len(head) + len(second_user)
    if not fits or not two.startswith(head) or not two.endswith(second_user):
        raise _untemplatable(two)
    answer_end = two[len(head) : len(two) - len(second_user)]
    turns = ChatTurns(None, (user_before, user_after), (generation_prompt, answer_end))
    try:
        with_system = render(("system", _SYSTEM), ("user", _USER), prompt=True)
    except TemplateError:  # a template may refuse a role it does not know: no system turn
        return turns
    system_before, found, system_after = with_system.removesuffix(asked).partition(_SYSTEM)
    if found and with_system.endswith(asked):
        turns = ChatTurns((system_before, system_after), turns.user, turns.assistant)
    return turns


def _untemplatable(rendered: str) -> UsageError:
    return UsageError(
        "The tokenizer's chat template does not render as fixed text around each turn "
        f"(it rendered {rendered!r:.200}), so it cannot be written as an Ollama TEMPLATE. Write "
        "the Modelfile's TEMPLATE by hand (https://github.com/ollama/ollama/blob/main/docs/"
        "template.md)."
    )


def ollama_template(turns: ChatTurns) -> str:
    """The Go template of Ollama's ``TEMPLATE`` for these turns (``.System``, ``.Prompt``,
    ``.Response``)."""
    for text in (*(turns.system or ()), *turns.user, *turns.assistant):
        if "{{" in text or '"""' in text:
            raise UsageError(f"The chat template's marker {text!r} cannot go in a Modelfile.")
    template = ""
    if turns.system is not None:
        template += "{{ if .System }}" + turns.system[0] + "{{ .System }}" + turns.system[1]
        template += "{{ end }}"
    template += "{{ if .Prompt }}" + turns.user[0] + "{{ .Prompt }}" + turns.user[1] + "{{ end }}"
    return template + turns.assistant[0] + "{{ .Response }}" + turns.assistant[1]


def modelfile(
    gguf_file: str,
    template: str,
    stops: list[str],
    settings: GenerationSettings,
    context_length: int | None,
    header: str = "",
) -> str:
    """The text of an Ollama Modelfile.

    Args:
        gguf_file: ``FROM``: the GGUF file, relative to the Modelfile's folder.
        template: ``TEMPLATE`` (see :func:`ollama_template`).
        stops: One ``PARAMETER stop`` each: the text of every stop token.
        settings: ``predict``'s sampling (temperature, top-p, top-k, answer length, seed).
        context_length: ``num_ctx``, the model's context window (Ollama's default is smaller).
        header: A comment put first (what was exported, from what).
    """
    lines = [f"# {line}" for line in header.splitlines()]
    lines += [f"FROM ./{gguf_file}", f'TEMPLATE """{template}"""']
    if settings.system_prompt:
        lines.append(f'SYSTEM """{settings.system_prompt}"""')
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in stops]
    parameters: dict[str, float | int | None] = {
        "temperature": settings.temperature if settings.do_sample else 0.0,
        "top_p": settings.top_p,
        "top_k": settings.top_k,
        "num_predict": settings.max_new_tokens,
        "seed": settings.seed,
        "num_ctx": context_length,
    }
    lines += [f"PARAMETER {key} {value}" for key, value in parameters.items() if value is not None]
    return "\n".join(lines) + "\n"
