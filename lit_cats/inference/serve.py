"""``lit-cats serve``: a trained adapter behind the OpenAI chat-completions API, on LitServe.

LitServe runs the model in a worker process and the HTTP side (FastAPI) in another; its
``OpenAISpec`` provides ``/v1/chat/completions`` (streamed or not). lit-cats adds, in
:class:`CatsOpenAISpec`: ``/v1/models``; checks of every request *before* it is queued (an
error found in the worker would reach a streaming client as a 200 with an error event), each
answered with a 4xx and an OpenAI-shaped error body; a cap on concurrent requests (429); and the
sampling defaults of ``predict``. Concurrent requests are batched (LitServe's ``max_batch_size``
and ``batch_timeout``): the worker generates a batch's answers together, each with its own
sampling settings and token limit (:class:`~lit_cats.inference.stream.RequestStream`).
The checks and the error shape are :mod:`lit_cats.inference.openai_api`'s.

The worker process is started fresh (spawned), so it parses the same command line again and
loads the model itself; the adapter resolved here (``latest``) is passed to it.
"""

from __future__ import annotations

import os
import secrets
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import litserve as ls
from fastapi import BackgroundTasks, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from lightning.pytorch.accelerators import CUDAAccelerator
from litserve.specs.openai import ChatCompletionRequest
from transformers import AutoConfig

from lit_cats.errors import UsageError
from lit_cats.inference.command import LoadedModel, describe, load_model, parse, resolved_adapter
from lit_cats.inference.generation import GenerationSettings, encode_prompt
from lit_cats.inference.openai_api import (
    Limits,
    RequestError,
    chat_messages,
    check_request,
    openai_error,
    request_settings,
    validation_message,
)
from lit_cats.inference.stream import RequestStream
from lit_cats.inference.vllm import check_vllm_compatible
from lit_cats.recipe import load_tokenizer
from lit_cats.tiny import resolve_model_path

#: Environment variable holding the API key (safer than --api_key, which ``ps`` shows).
API_KEY_ENV = "LIT_CATS_API_KEY"
#: LitServe's own choice of hosts (``LitServer.run`` refuses others).
HOSTS = ("127.0.0.1", "0.0.0.0", "::")
#: Largest request body (413 beyond); far above any prompt that fits a context.
MAX_PAYLOAD_BYTES = 4 * 1024 * 1024


def serve_options(
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    model_id: str | None = None,
    max_tokens: int = 1024,
    max_prompt_tokens: int | None = None,
    max_concurrent_requests: int = 64,
    max_batch_size: int = 8,
    batch_timeout: float = 0.05,
    timeout: float = 300.0,
) -> None:
    """Serve a trained adapter (or merged model) with the OpenAI chat-completions API
    (/v1/chat/completions, streamed or not, and /v1/models), on LitServe. Takes the training
    configs as predict does: lit-cats serve --config configs/qlora.yaml --config
    configs/tiny.yaml --port 8000 (the newest adapter; --model.adapter PATH for another). A
    request's default sampling is --model.generation.* (predict's).

    Args:
        host: Address to listen on: 127.0.0.1 (this machine only), 0.0.0.0 or :: (every
            network interface: see the README before doing that).
        port: TCP port.
        api_key: Key every request must send (``Authorization: Bearer KEY``); default
            ``$LIT_CATS_API_KEY``; without one, anyone who can reach the port can use the model.
        model_id: Name of the model in /v1/models and responses (default: the adapter folder,
            or the model for a merged one).
        max_tokens: Most new tokens a request may ask for (``max_tokens``); a request that
            does not say gets --model.generation.max_new_tokens, capped by this.
        max_prompt_tokens: Longest prompt (chat template included), in tokens (default: the
            model's context minus the request's max_tokens).
        max_concurrent_requests: Requests in progress at once; more get 429.
        max_batch_size: Requests generated together in one batch.
        batch_timeout: Seconds to wait for more requests to fill a batch.
        timeout: Seconds a request may wait in the queue before it gets 504.
    """


class CatsOpenAISpec(ls.OpenAISpec):
    """LitServe's OpenAI spec with /v1/models, request checks and a concurrency cap.

    Args:
        model_id: The served model's name.
        tokenizer_name: The base model's tokenizer, to measure prompts before queueing them.
        limits: What requests may ask for.
        trust_remote_code: As the model was loaded.
    """

    def __init__(
        self, model_id: str, tokenizer_name: str, limits: Limits, trust_remote_code: bool = False
    ) -> None:
        super().__init__()
        self.model_id, self.tokenizer_name, self.limits = model_id, tokenizer_name, limits
        self.trust_remote_code = trust_remote_code
        self.created = int(time.time())
        self.active = 0  # requests in progress in this HTTP process
        self._tokenizer = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # the model worker re-encodes: it needs no tokenizer
        state["_tokenizer"] = None
        return state

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_name, self.trust_remote_code)
        return self._tokenizer

    def pre_setup(self, lit_api: ls.LitAPI) -> None:
        super().pre_setup(lit_api)
        self.add_endpoint("/v1/models", self.list_models, ["GET"])

    async def list_models(self) -> dict[str, Any]:
        """``GET /v1/models``: the one model served."""
        model = {"id": self.model_id, "object": "model", "created": self.created}
        return {"object": "list", "data": [{**model, "owned_by": "lit-cats"}]}

    async def chat_completion(
        self, request: ChatCompletionRequest, background_tasks: BackgroundTasks
    ) -> Any:
        """Check the request, then let LitServe queue it, within the concurrency cap."""
        check_request(request, self.tokenizer, self.limits)
        request.model = self.model_id  # answers name the served model, as OpenAI's do
        limit = self.limits.max_concurrent_requests
        if self.active >= limit:
            raise RequestError(
                f"The server is busy: {limit} requests are in progress "
                "(--max_concurrent_requests). Retry shortly.",
                status_code=429,
            )
        self.active += 1
        try:
            response = await super().chat_completion(request, background_tasks)
        except BaseException:
            self.active -= 1
            raise
        if isinstance(response, StreamingResponse):
            response.body_iterator = self._counted(response.body_iterator)
        else:
            self.active -= 1
        return response

    async def _counted(self, chunks: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """A streamed response that leaves the count when it ends (or the client leaves)."""
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            self.active -= 1


@dataclass
class Decoded:
    """A request as the worker generates it: its messages, their token ids, its sampling."""

    messages: list[dict[str, str]]
    ids: list[int]
    settings: GenerationSettings


class CatsChatAPI(ls.LitAPI):
    """The model worker: loads the model, generates each batch's answers as they stream.

    Args:
        argv: The ``serve`` command line, parsed again in the worker process.
        adapter: The adapter resolved in the main process (``None``: none).
        limits: What requests may ask for.
        api_key: The key requests must send, if any.
        max_batch_size: Requests generated together.
        batch_timeout: Seconds to wait to fill a batch.
        spec: The OpenAI spec.
    """

    def __init__(
        self,
        argv: Sequence[str],
        adapter: str | None,
        limits: Limits,
        api_key: str | None,
        max_batch_size: int,
        batch_timeout: float,
        spec: CatsOpenAISpec,
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, spec=spec)
        self.argv, self.adapter, self.limits, self.api_key = list(argv), adapter, limits, api_key
        self.loaded: LoadedModel | None = None
        self.settings: GenerationSettings | None = None

    def authorize(
        self,
        authorization: str | None = Header(default=None),
        x_api_key: str | None = Header(default=None),
    ) -> None:
        """Every endpoint's check: the key as ``Authorization: Bearer KEY`` or ``X-API-Key``."""
        if self.api_key is None:
            return
        sent = x_api_key or ""
        if authorization and authorization.lower().startswith("bearer "):
            sent = authorization[len("bearer ") :].strip()
        if not secrets.compare_digest(sent.encode(), self.api_key.encode()):
            raise RequestError(
                "Missing or wrong API key: send 'Authorization: Bearer <key>' (the openai "
                "client's api_key).",
                status_code=401,
            )

    def setup(self, device: str) -> None:
        """Parse the command line again (a spawned process) and load the model on ``device``."""
        place = ["--trainer.accelerator", "cpu"]
        if device.startswith("cuda"):
            index = device.partition(":")[2] or "0"
            place = ["--trainer.accelerator", "gpu", "--trainer.devices", f"[{index}]"]
        adapter = self.adapter if self.adapter is not None else "null"
        cli = parse("serve", serve_options, [*self.argv, "--model.adapter", adapter, *place])
        self.settings = cli.model.generation
        self.loaded = load_model(cli)

    def decode_request(self, request: ChatCompletionRequest) -> Decoded:
        messages = chat_messages(request)
        ids = encode_prompt(self.loaded.tokenizer, messages)
        return Decoded(messages, ids, request_settings(request, self.settings, self.limits))

    def batch(self, inputs: list[Decoded]) -> list[Decoded]:
        return list(inputs)

    def predict(self, x: Decoded | list[Decoded]) -> Iterator[Any]:
        """Each step's new text per request, then each request's token counts."""
        batched = self.max_batch_size > 1
        rows = x if batched else [x]
        loaded = self.loaded
        stream = RequestStream(
            loaded.model,
            loaded.tokenizer,
            [r.messages for r in rows],
            [r.ids for r in rows],
            [r.settings for r in rows],
            loaded.context,
        )
        for pieces in stream:
            step = [{"role": "assistant", "content": piece} for piece in pieces]
            yield step if batched else step[0]
        usage = [
            {
                "role": "assistant",
                "content": "",
                "prompt_tokens": len(r.ids),
                "completion_tokens": state.num_tokens,
                "total_tokens": len(r.ids) + state.num_tokens,
            }
            for r, state in zip(rows, stream.rows, strict=True)
        ]
        yield usage if batched else usage[0]

    def unbatch(self, output: Any) -> Any:
        return output

    def encode_response(self, output: Iterator[Any]) -> Iterator[Any]:
        yield from output  # predict already yields OpenAI message dicts (per request)


def run_serve(args: Sequence[str]) -> None:
    """``lit-cats serve ARGS``: parse, check, print the start-up lines, and serve until Ctrl-C."""
    cli = parse("serve", serve_options, args)
    config = cli.config
    host, port = config["host"], config["port"]
    if host not in HOSTS:
        raise UsageError(f"--host {host!r}: LitServe listens on one of {', '.join(HOSTS)}.")
    api_key = config.get("api_key") or os.environ.get(API_KEY_ENV) or None
    settings: GenerationSettings = cli.model.generation
    if settings.raw:
        raise UsageError("serve answers chats in the chat template; drop --model.generation.raw.")
    for name in ("max_tokens", "max_concurrent_requests", "max_batch_size"):
        if config[name] < 1:
            raise UsageError(f"--{name} must be at least 1, got {config[name]}.")
    adapter = resolved_adapter(cli)
    for warning in check_vllm_compatible(adapter) if adapter else []:
        print(f"warning: {warning}", file=sys.stderr)
    hp = cli.model.hparams
    model_config = AutoConfig.from_pretrained(
        resolve_model_path(hp.model_name_or_path), trust_remote_code=hp.trust_remote_code
    )
    limits = Limits(
        max_tokens=config["max_tokens"],
        default_max_tokens=min(settings.max_new_tokens, config["max_tokens"]),
        max_prompt_tokens=config.get("max_prompt_tokens"),
        context=getattr(model_config, "max_position_embeddings", None),
        max_concurrent_requests=config["max_concurrent_requests"],
    )
    model_id = config.get("model_id") or adapter or hp.model_name_or_path
    spec = CatsOpenAISpec(model_id, hp.model_name_or_path, limits, hp.trust_remote_code)
    spec.tokenizer  # noqa: B018  (loaded once here; the HTTP process is forked from this one)
    api = CatsChatAPI(
        args, adapter, limits, api_key, config["max_batch_size"], config["batch_timeout"], spec
    )
    cuda = isinstance(cli.trainer.accelerator, CUDAAccelerator)
    server = ls.LitServer(
        api,
        accelerator="cuda" if cuda else "cpu",
        devices=1,
        timeout=config["timeout"],
        max_payload_size=MAX_PAYLOAD_BYTES,
        model_metadata={"model": model_id},
    )
    server.app.add_exception_handler(RequestValidationError, _invalid_request)
    server.app.add_exception_handler(HTTPException, _http_error)
    print(f"lit-cats serve: {describe(cli, adapter)}", flush=True)
    print(
        f"  OpenAI API at http://{host}:{port}/v1 (model {model_id!r}); "
        f"batches of up to {config['max_batch_size']} requests",
        flush=True,
    )
    if api_key:
        print("  API key required: send 'Authorization: Bearer <key>'.", flush=True)
    else:
        print(
            f"  No API key (--api_key or ${API_KEY_ENV}): anyone who can reach port {port} can "
            "use the model.",
            flush=True,
        )
    server.run(
        host=host, port=port, num_api_servers=1, generate_client_file=False, log_level="warning"
    )


async def _invalid_request(request: Request, error: Exception) -> JSONResponse:
    return openai_error(400, validation_message(error))  # type: ignore[arg-type]


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, HTTPException)
    return openai_error(error.status_code, str(error.detail), getattr(error, "param", None))
