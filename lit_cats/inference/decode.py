"""Fast decoding: lit-cats' own loop over a preallocated KV cache, one CUDA graph per step.

Why not transformers' ``generate``: on a GPU its decode step at batch 8 is paced by the host
(Python per token and per layer, a growing dynamic cache, hundreds of kernel launches), ~33 ms
for Phi-3-mini where reading its weights takes ~1.6 ms (issue 21). Nor transformers' static
cache + compile, or its ``generate_batch``: their cache is written at one position shared by
the batch (left padding, and no refill of a finished row without a new column range), and
their cache and mask APIs change between the 5.x versions in use (5.17 on the GPU image, 5.25
here). This module runs the model's own modules (the projections, norms, MLP activation,
rotary embedding, output head: 4-bit bitsandbytes layers, peft LoRA layers, lit-cats' fused
LoRA, or plain bf16 linears alike) in a loop of its own:

- **static KV cache**: one ``(slots, kv_heads, max_length, head_dim)`` tensor pair per layer,
  allocated once; each slot (row) keeps its own position, so a prompt is written from column 0
  of its row, no left padding is needed, and a row's mask and position ids are its own (an
  answer cannot depend on its batch-mates);
- **one CUDA graph per step**: the whole step, the forward of every slot *and* the sampling
  and bookkeeping (next token, tokens made, finished flags), is captured once per (slots,
  max_length, sampling settings) and replayed; the host draws the sampling noise and launches
  the graph, and looks at the tokens every 8 steps (every step when streaming);
- **compiled step** (``"compile"``, or ``"auto"`` on CUDA outside autocast when it pays:
  :func:`choose_compile` weighs the planned steps' saving against the compile time measured on
  this GPU, cold or from a warm cache; streams, chat and serve, always compile): one
  decoder layer's step goes through ``torch.compile`` once and serves all layers (their
  weights are graph inputs), then is captured as above. A 4-bit base's matmuls are
  bitsandbytes' dequantization (one kernel on CUDA, bit-identical) and cuBLAS, as opaque ops
  (:func:`lit_cats.fast.nf4.mark_decode_layers`); the compiler fuses what lies between them.
  Inductor keeps what it compiles in its on-disk caches (FX graph and AOTAutograd caches,
  Triton kernels; under ``TORCHINDUCTOR_CACHE_DIR``, by default ``/tmp/torchinductor_<user>``),
  so a later process compiles in a fraction of the time (benchmarks/RESULTS.md: cold vs warm);
- **continuous refill**: prompts wait in a queue (shortest first); when an answer finishes, its
  slot is prefilled with the next prompt while the others keep decoding;
- the prefill (prompts, any length) runs eagerly, one forward per refill group: its cost is
  small next to the decode steps, and it needs no shape buckets; only the cache length is
  bucketed (multiples of :data:`LENGTH_BUCKET`), so few graphs are ever captured.

Sampling is transformers' own logits warpers (temperature, top-k, top-p) on fp32 logits and
``torch.multinomial``'s one-sample method (``argmax(p / E)``, ``E ~ Exp(1)``, drawn from a
generator seeded with ``settings.seed``); greedy is argmax; the stop ids are suppressed for the
first ``min_new_tokens`` tokens as transformers' ``MinNewTokensLengthLogitsProcessor`` does.

Supported: Phi-3-architecture models (``Phi3ForCausalLM``: the tiny test model, Phi-3-mini) with
standard RoPE, alone or inside a peft model. :func:`fast_path_reason` says why another model or
setting takes the plain path (transformers' ``generate``); each path says once which it is
(``generation: ...`` on Lightning's rank-zero logger).

Public entry points (also for ``chat``/``serve``): :func:`stream` (one request, text pieces as
they are decoded), :func:`stream_batch` (several requests decoded together, events tagged with
the request's index), :func:`decode_batch` (whole answers; ``generate`` calls it), and
:func:`release` (drop a model's cached decoder and its GPU memory).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lit_cats.data.prompts import Prompt, check_prompt
from lit_cats.inference.engine import Engine, causal_lm, model_device
from lit_cats.inference.generation import (
    GenerationResult,
    GenerationSettings,
    check_fits_context,
    context_length,
    encode_prompt,
    stop_token_ids,
)

#: Decode modes of :attr:`GenerationSettings.decode`.
DECODE_MODES = ("auto", "fast", "compile", "plain")

#: Columns of the KV cache are allocated in multiples of this (fewer distinct graphs).
LENGTH_BUCKET = 64

#: Seconds between two progress lines of a long run.
PROGRESS_EVERY_S = 5.0


@dataclass(frozen=True)
class StreamEvent:
    """A piece of one request's answer, from :func:`stream_batch`.

    Attributes:
        index: The request's position in the list given.
        text: New answer text since this request's previous event (may be empty).
        result: The finished answer, on the request's last event only; else ``None``.
    """

    index: int
    text: str
    result: GenerationResult | None = None


# ------------------------------------------------------------------------------ public API
def stream(
    model: nn.Module,
    tokenizer: Any,
    prompt: Prompt,
    settings: GenerationSettings | None = None,
    **overrides: Any,
) -> Iterator[str]:
    """Answer one prompt (a user message or a chat), yielding text pieces as they are decoded.

    Example::

        for piece in stream(model, tokenizer, [{"role": "user", "content": "meow?"}]):
            print(piece, end="", flush=True)

    The pieces joined are the answer that :func:`~lit_cats.inference.generation.generate` returns
    (before its surrounding whitespace is stripped); a piece ends where the text so far decodes
    to whole characters. Same settings and semantics as ``generate`` (seeded: the same answer).

    Args:
        model: A causal LM (transformers, or a peft model around one), on its device.
        tokenizer: Its tokenizer.
        prompt: A user message or a chat (list of ``{"role", "content"}``).
        settings: How to sample; ``None`` uses the defaults of :class:`GenerationSettings`.
        **overrides: Fields of :class:`GenerationSettings` to change.
    """
    for event in stream_batch(model, tokenizer, [prompt], settings, **overrides):
        if event.text:
            yield event.text


def stream_batch(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    settings: GenerationSettings | None = None,
    batch_size: int | None = None,
    **overrides: Any,
) -> Iterator[StreamEvent]:
    """Answer several requests decoded together, yielding each one's text as it is decoded.

    Events of different requests interleave; each request's last event carries its
    :class:`~lit_cats.inference.generation.GenerationResult`. A request's answer does not depend
    on the others (its own cache row, positions and mask). One call at a time per model: the
    calls share the model's decoder (its KV cache and graphs), which the next call reuses
    when it fits; :func:`release` frees it. All requests share ``settings``; where the fast
    loop does not apply (:func:`fast_path_reason`), each request gets one event, its whole
    answer, from transformers' ``generate``.

    Args:
        model: A causal LM (transformers, or a peft model around one), on its device.
        tokenizer: Its tokenizer.
        prompts: User messages or chats.
        settings: How to sample; ``None`` uses the defaults of :class:`GenerationSettings`.
        batch_size: Requests decoded at once (slots); ``None``: all of them.
        **overrides: Fields of :class:`GenerationSettings` to change.

    Raises:
        ValueError: For no prompts, a malformed prompt, or one too long for the context.
    """
    s = replace(settings or GenerationSettings(), **overrides)
    encoded = prepare_prompts(model, tokenizer, prompts, s)
    stops = stop_token_ids(model, tokenizer)
    reason = fast_path_reason(model, s, for_stream=True)
    if reason is not None:  # whole answers from the plain path, one event each
        from lit_cats.inference.generation import generate

        say_path(model, f"plain transformers generate ({reason})")
        results = generate(model, tokenizer, prompts, s, batch_size=batch_size or 8, decode="plain")
        for i, result in enumerate(results):
            yield StreamEvent(i, result.response, result)
        return
    texts = [_IncrementalText(tokenizer) for _ in prompts]
    slots = batch_size or s.batch_size or len(prompts)
    engine = _engine_saying(model, s, slots, encoded, stream=True)
    was_training = model.training
    model.eval()
    try:
        events = engine.run(encoded, s, stops, sync_every=1)
        while True:
            # Inference mode around each step only: the caller's code between events keeps
            # its own autograd mode (a generator's context would leak into it).
            with torch.inference_mode():
                event = next(events, None)
            if event is None:
                return
            index, tokens, finished = event
            piece = texts[index].add(tokens, stops, finished)
            result = None
            if finished:
                result = _result(prompts[index], texts[index].tokens, stops, tokenizer)
            yield StreamEvent(index, piece, result)
    finally:
        model.train(was_training)


def decode_batch(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    encoded: list[list[int]],
    settings: GenerationSettings,
    batch_size: int,
) -> list[GenerationResult]:
    """Whole answers from the fast loop, in the prompts' order (``generate``'s fast path).

    The caller has checked the prompts and encoded them (``encoded``, by
    :func:`prepare_prompts`) and holds eval and inference mode (as ``generate`` does).
    ``batch_size`` slots decode at once; more prompts than slots are fed in as answers finish
    (continuous refill). ``settings.progress`` prints a line every few seconds: prompts
    answered and tokens/s.
    """
    stops = stop_token_ids(model, tokenizer)
    engine = _engine_saying(model, settings, batch_size, encoded)
    tokens: list[list[int]] = [[] for _ in encoded]
    meter = _Progress(len(encoded)) if settings.progress else None
    for index, new, finished in engine.run(encoded, settings, stops, sync_every=8, partial=False):
        tokens[index].extend(new)
        if meter is not None:
            meter.update(len(new), finished)
    if meter is not None:
        meter.close()
    return [_result(p, t, stops, tokenizer) for p, t in zip(prompts, tokens, strict=True)]


def prepare_prompts(
    model: nn.Module, tokenizer: Any, prompts: Sequence[Prompt], s: GenerationSettings
) -> list[list[int]]:
    """Check and encode prompts as ``generate`` does; their token ids."""
    if not prompts:
        raise ValueError("generate() got no prompts; pass at least one.")
    for i, prompt in enumerate(prompts):
        check_prompt(prompt, f"prompt {i}")
    encoded = [encode_prompt(tokenizer, p, s.system_prompt, s.raw) for p in prompts]
    check_fits_context([len(ids) for ids in encoded], s.max_new_tokens, context_length(model))
    return encoded


def fast_path_reason(
    model: nn.Module, settings: GenerationSettings, for_stream: bool = False
) -> str | None:
    """Why the fast loop does not apply to this model and setting; ``None`` when it does.

    ``decode="auto"`` takes the fast loop on CUDA only (on the CPU, transformers' ``generate``
    is as fast and is the reference); ``"fast"``/``"compile"`` take it on any device (the CPU
    runs it without graphs: the tests compare it with the plain path). Streaming takes the fast
    loop on any device, as the plain path cannot stream.
    """
    mode = settings.decode
    if mode == "plain":
        return "decode='plain'"
    inner = causal_lm(model)
    unsupported = _unsupported(inner)
    if unsupported is not None:
        return unsupported
    if mode == "auto" and not for_stream and model_device(model).type != "cuda":
        return "not on a CUDA device"
    return None


def release(model: nn.Module) -> None:
    """Drop the decoder cached for ``model`` (its KV cache and CUDA graph), freeing GPU memory."""
    model.__dict__.pop(_ENGINE_ATTRIBUTE, None)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def decoder_of(model: nn.Module) -> Engine | None:
    """The decoder cached for ``model`` (for tests and benchmarks: its graph, compile time)."""
    return model.__dict__.get(_ENGINE_ATTRIBUTE)


# ------------------------------------------------------------------------------ the engine
#: Where a model keeps its engine, reused by the next call that fits. On the model, not in a
#: registry: the engine refers to the model, so the two are freed together.
_ENGINE_ATTRIBUTE = "_lit_cats_decoder"


def _engine(
    model: nn.Module,
    s: GenerationSettings,
    slots: int,
    encoded: list[list[int]],
    stream: bool = False,
) -> Engine:
    slots = max(1, min(slots, len(encoded)))
    longest = max(len(ids) for ids in encoded) + s.max_new_tokens
    length = LENGTH_BUCKET * math.ceil(longest / LENGTH_BUCKET)
    context = context_length(model)
    if context is not None:
        length = min(length, max(context, longest))
    device = model_device(model)
    graphs = device.type == "cuda"  # under autocast too (training's samples): captured uncached
    compiled, why = s.decode == "compile", ""
    if s.decode == "auto" and graphs:
        if torch.is_autocast_enabled(device.type):
            # Training's samples: a few short batches per run, where compiling does not pay.
            why = "not compiled under autocast (training's samples)"
        elif stream:
            # chat and serve decode for the whole session: compiling pays over its requests.
            compiled, why = True, "compiled for a streaming session"
        else:
            steps = math.ceil(len(encoded) / slots) * s.max_new_tokens
            compiled, why = choose_compile(model, steps, torch.cuda.get_device_name(device))
    engine = decoder_of(model)
    if engine is None or not engine.fits(model, slots, length, compiled, graphs):
        release(model)  # free the old cache before allocating the new one
        engine = Engine(model, slots, length, compiled, graphs)
        model.__dict__[_ENGINE_ATTRIBUTE] = engine  # not nn.Module's setattr: no submodule
    engine.choice = why
    return engine


def choose_compile(
    model: nn.Module, steps: int, device_name: str, warm: bool | None = None
) -> tuple[bool, str]:
    """``decode: auto``'s rule: compile the step when the run's steps save more than compiling
    costs, from the decode figures measured on this GPU (``lit_cats/plan/calibration.yaml``),
    as ``model.speed.compile: auto`` does for training.

    A short run on a machine whose Inductor cache is cold (8 answers of 250 tokens: ~0.6 s
    saved for ~7 s of compiling on an H200) runs the graphed step instead; with a warm cache, or
    for an evaluation set, the step is compiled. A GPU without decode figures compiles.

    Args:
        model: The model to decode with (its size scales the measured step times).
        steps: Planned decode steps (at most: every answer at ``max_new_tokens``).
        device_name: ``torch.cuda.get_device_name()``.
        warm: Whether Inductor's cache is warm; ``None``: look.

    Returns:
        Whether to compile, and why, in a few words.
    """
    from lit_cats.fast.compile import inductor_cache_is_warm
    from lit_cats.fast.nf4 import has_nf4_layers
    from lit_cats.plan import calibration
    from lit_cats.plan.memory import Architecture

    lm = causal_lm(model)
    weights = "nf4" if has_nf4_layers(lm) else "bf16"
    arch = Architecture.from_config(lm.config.to_dict())
    figures = calibration.decode_figures(calibration.gpu_kind(device_name), weights, arch)
    if figures is None:
        return True, f"compiled (no {weights} decode figures for {device_name} to weigh)"
    saved_ms = figures.graphed_ms - figures.compiled_ms
    warm = inductor_cache_is_warm() if warm is None else warm
    cost = figures.compile_warm_s if warm else figures.compile_cold_s
    saving = steps * saved_ms / 1000
    pays = saving > cost
    return pays, (
        f"{'compiled' if pays else 'not compiled'}: {steps:,} steps x {saved_ms:.2g} ms saved = "
        f"{saving:.2g} s {'>' if pays else '<='} {cost:.2g} s of compiling "
        f"({'warm' if warm else 'cold'} Inductor cache)"
    )


def _engine_saying(
    model: nn.Module,
    s: GenerationSettings,
    slots: int,
    encoded: list[list[int]],
    stream: bool = False,
) -> Engine:
    """:func:`_engine`, and the path it is (and why compiled or not), said once per model and
    path."""
    engine = _engine(model, s, slots, encoded, stream)
    say_path(model, engine.describe)
    return engine


# ------------------------------------------------------------------------------ helpers
def _unsupported(lm: nn.Module) -> str | None:
    config = getattr(lm, "config", None)
    if getattr(config, "model_type", None) != "phi3" or not hasattr(lm, "model"):
        return f"{type(lm).__name__} is not a Phi-3-architecture model"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = (
        rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    )
    if rope_type != "default":
        return f"RoPE type {rope_type!r} (the fast loop has standard RoPE only)"
    return None


_SAID: set[tuple[int, str]] = set()


def say_path(model: nn.Module, line: str) -> None:
    """Say once per model and path which generation path runs."""
    key = (id(model), line)
    if key not in _SAID:
        _SAID.add(key)
        rank_zero_info(f"generation: {line}")


class _IncrementalText:
    """Token ids to text pieces that end on whole characters (transformers' TextStreamer's rule)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.printed = 0
        self.ended = False

    def add(self, new: list[int], stops: list[int], finished: bool) -> str:
        if self.ended:
            return ""
        for t in new:
            self.tokens.append(t)
            if t in stops:
                self.ended = True
                break
        answer = self.tokens[:-1] if self.ended else self.tokens
        text = self.tokenizer.decode(answer, skip_special_tokens=True)
        if not finished and text.endswith("\ufffd"):  # half a character: wait for the rest
            return ""
        if self.printed == 0:
            stripped = text.lstrip()
            self.printed = len(text) - len(stripped)
        piece = text[self.printed :]
        self.printed = len(text)
        return piece


def _result(
    prompt: Prompt, tokens: list[int], stops: list[int], tokenizer: Any
) -> GenerationResult:
    from lit_cats.inference.generation import _result as result

    return result(prompt, tokens, stops, tokenizer)


class _Progress:
    """A line every few seconds: prompts answered and generated tokens/s."""

    def __init__(self, total: int) -> None:
        self.total, self.every = total, PROGRESS_EVERY_S
        self.done = self.tokens = self.lines = 0
        self.start = self.last = time.perf_counter()

    def update(self, tokens: int, finished: bool) -> None:
        self.tokens += tokens
        self.done += finished
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            self._print(now)

    def _print(self, now: float) -> None:
        self.lines += 1
        rate = self.tokens / max(now - self.start, 1e-9)
        rank_zero_info(
            f"generation: {self.done}/{self.total} prompts, {self.tokens:,} tokens, "
            f"{rate:,.0f} tok/s"
        )

    def close(self) -> None:
        """The final count, when the run was long enough to have printed progress."""
        if self.lines:
            self._print(time.perf_counter())
