"""Requests of the OpenAI chat-completions API as ``lit-cats serve`` takes them: checks, errors.

Every request is checked before it is queued (:func:`check_request`), so whatever the server
cannot answer as asked gets a 4xx with a message that says why, shaped as the OpenAI API's
errors (:func:`openai_error`), never a 500; :func:`request_settings` turns what a request asks
into :class:`~lit_cats.inference.generation.GenerationSettings`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from litserve.specs.openai import ChatCompletionRequest

from lit_cats.inference.generation import GenerationSettings, encode_prompt

ROLES = ("system", "user", "assistant")


@dataclass
class Limits:
    """What the server accepts (``lit-cats serve --help``); ``context`` is the model's."""

    max_tokens: int
    default_max_tokens: int
    max_prompt_tokens: int | None
    context: int | None
    max_concurrent_requests: int


class RequestError(HTTPException):
    """A request the server refuses; its status is a 4xx, its message says what to change."""

    def __init__(self, message: str, status_code: int = 400, param: str | None = None) -> None:
        super().__init__(status_code=status_code, detail=message)
        self.param = param


def openai_error(status: int, message: str, param: str | None = None) -> JSONResponse:
    """An error response shaped as the OpenAI API's (the openai client reads ``error.message``)."""
    kind = {401: "authentication_error", 429: "rate_limit_error"}.get(status)
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


def validation_message(error: RequestValidationError) -> str:
    """FastAPI's validation errors as one line: bad JSON, or which fields are wrong."""
    parts = []
    for item in error.errors():
        if item.get("type") == "json_invalid":
            reason = (item.get("ctx") or {}).get("error", "")
            return f"The request body is not valid JSON ({reason}). Send a JSON object."
        where = ".".join(str(p) for p in item.get("loc", ())[1:]) or "body"
        parts.append(f"{where}: {item.get('msg')}")
    return "Invalid request: " + "; ".join(parts) + "."


def message_text(content: Any, where: str) -> str:
    """A message's text: a string, or the text parts of a list (images and audio refused)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if getattr(part, "type", None) != "text":
            raise RequestError(
                f"{where}: only text content is served, not {part.type!r}.", param=where
            )
        texts.append(part.text)
    return "".join(texts)


def max_new_tokens(request: ChatCompletionRequest, limits: Limits) -> int:
    """The request's token limit (``max_completion_tokens``, else ``max_tokens``), checked."""
    asked = request.max_completion_tokens
    asked = request.max_tokens if asked is None else asked
    if asked is None:
        return limits.default_max_tokens
    if not 1 <= asked <= limits.max_tokens:
        raise RequestError(
            f"max_tokens must be between 1 and {limits.max_tokens} (this server's --max_tokens), "
            f"got {asked}.",
            param="max_tokens",
        )
    return asked


def check_request(request: ChatCompletionRequest, tokenizer: Any, limits: Limits) -> list[int]:
    """Refuse what the server cannot answer as asked; the prompt's token ids otherwise.

    Raises:
        RequestError: No messages, an unknown role, non-text content, unsupported options,
            bad sampling values, or a prompt too long for the limits or the context.
    """
    if not request.messages:
        raise RequestError("messages is empty: send at least one message.", param="messages")
    for i, message in enumerate(request.messages):
        if message.role not in ROLES:
            raise RequestError(
                f"messages[{i}].role is {message.role!r}; this server takes "
                f"{', '.join(ROLES)} messages.",
                param=f"messages[{i}].role",
            )
        message_text(message.content, f"messages[{i}].content")
    if (request.n or 1) != 1:
        raise RequestError(f"n must be 1 (one answer per request), got {request.n}.", param="n")
    if request.tools:
        raise RequestError("tools are not supported by this model server.", param="tools")
    if request.stop:
        raise RequestError("stop sequences are not supported; the model stops by itself.", "stop")
    if request.temperature is not None and not 0 <= request.temperature <= 2:
        raise RequestError(f"temperature must be in [0, 2], got {request.temperature}.")
    if request.top_p is not None and not 0 < request.top_p <= 1:
        raise RequestError(f"top_p must be in (0, 1], got {request.top_p}.", param="top_p")
    new_tokens = max_new_tokens(request, limits)
    try:
        ids = encode_prompt(tokenizer, chat_messages(request))
    except Exception as error:  # the chat template refused the conversation (jinja raise)
        raise RequestError(f"The model's chat template refused these messages: {error}") from error
    if limits.max_prompt_tokens is not None and len(ids) > limits.max_prompt_tokens:
        raise RequestError(
            f"The prompt is {len(ids)} tokens (chat template included); this server takes at "
            f"most {limits.max_prompt_tokens} (--max_prompt_tokens). Send a shorter conversation.",
            param="messages",
        )
    if limits.context is not None and len(ids) + new_tokens > limits.context:
        raise RequestError(
            f"The prompt is {len(ids)} tokens and max_tokens is {new_tokens}: together more than "
            f"the model's context of {limits.context} tokens. Shorten the conversation or lower "
            "max_tokens.",
            param="messages",
        )
    return ids


def chat_messages(request: ChatCompletionRequest) -> list[dict[str, str]]:
    """The request's messages as the chat template takes them."""
    return [
        {"role": m.role, "content": message_text(m.content, f"messages[{i}].content")}
        for i, m in enumerate(request.messages)
    ]


def request_settings(
    request: ChatCompletionRequest, served: GenerationSettings, limits: Limits
) -> GenerationSettings:
    """A request's sampling: what it sets, else the served defaults; temperature 0 is greedy.

    Only fields the client sent count (LitServe's request model fills in its own defaults).
    """
    given = request.model_fields_set
    settings = replace(served, max_new_tokens=max_new_tokens(request, limits), seed=None)
    settings = replace(
        settings, min_new_tokens=min(settings.min_new_tokens, settings.max_new_tokens)
    )
    if "temperature" in given and request.temperature is not None:
        if request.temperature == 0:
            return replace(settings, do_sample=False)
        settings = replace(settings, do_sample=True, temperature=request.temperature)
    if "top_p" in given and request.top_p is not None:
        settings = replace(settings, top_p=request.top_p)
    return settings
