"""Batched generation from a (4-bit or merged) model, usable with or without a Trainer.

:func:`generate` renders each prompt with the tokenizer's chat template (or not, in raw mode),
left-pads prompts of similar length into batches, and samples with transformers' ``generate``,
stopping on every end-of-sequence id of the model's generation config (Phi-3 has three). Each
answer is reported with its token count and whether the model stopped by itself.

Not transformers' ``TextGenerationPipeline`` batching: it neither groups prompts by length nor
reports an answer's token count or whether a stop id ended it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from lit_cats.data.prompts import Prompt
from lit_cats.errors import InvalidSetting


@dataclass
class GenerationSettings:
    """How answers are generated; the defaults are the original script's.

    Args:
        max_new_tokens: Longest answer, in tokens (the original: 250).
        min_new_tokens: Suppress the end-of-sequence ids until this many tokens (benchmarks).
        do_sample: Sample (True) or decode greedily (False; temperature/top-p/top-k unused).
        temperature: Softmax temperature of sampling (the original: 0.7).
        top_p: Nucleus sampling mass (the original: 0.9).
        top_k: Keep the k likeliest tokens before top-p; 50 is transformers' default, which the
            original used without saying so; 0 turns it off.
        seed: Seed of the sampling, for reproducible answers; ``None`` leaves the RNG alone.
        system_prompt: A system message put before every prompt (chat mode only).
        raw: Feed prompts as plain text without the chat template (base-model-style data).
        decode: Which decode loop: ``"auto"`` (on CUDA for supported models lit-cats' fast
            loop, static KV cache and a CUDA graph per step, its step compiled when the run
            is long enough to repay the compilation; else transformers' ``generate``),
            ``"fast"`` (the fast loop without compilation, on any device; the CPU runs it
            without graphs), ``"compile"`` (the fast loop, step compiled) or ``"plain"``
            (transformers' ``generate``). See :mod:`lit_cats.inference.decode`.
        batch_size: Answers decoded at once; more prompts than this are fed in as answers
            finish (continuous refill). ``None``: the caller's batch (``predict``'s batch).
        progress: Print a progress line (prompts, tokens/s) every few seconds.
    """

    max_new_tokens: int = 250
    min_new_tokens: int = 0
    do_sample: bool = True
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    seed: int | None = 42
    system_prompt: str | None = None
    raw: bool = False
    decode: str = "auto"
    batch_size: int | None = None
    progress: bool = False

    def __post_init__(self) -> None:
        modes = ("auto", "fast", "compile", "plain")
        if self.decode not in modes:
            raise InvalidSetting(f"decode must be one of {modes}, got {self.decode!r}.")
        if self.batch_size is not None and self.batch_size < 1:
            raise InvalidSetting(f"batch_size must be >= 1 or None, got {self.batch_size}.")
        if self.max_new_tokens < 1:
            raise InvalidSetting(f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise InvalidSetting(
                f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], got "
                f"{self.min_new_tokens}."
            )
        if self.do_sample and (self.temperature <= 0 or not 0 < self.top_p <= 1):
            raise InvalidSetting(
                f"Sampling needs temperature > 0 and top_p in (0, 1], got {self.temperature} "
                f"and {self.top_p}; for deterministic output use do_sample=False (greedy)."
            )


@dataclass
class GenerationResult:
    """One generated answer.

    Attributes:
        prompt: The prompt as given (a string or a chat).
        response: The decoded answer, without the end marker and special tokens.
        num_tokens: Tokens generated, the end marker included when there is one.
        stopped: The model ended the answer itself (emitted a stop id) within the token limit.
    """

    prompt: Prompt
    response: str
    num_tokens: int
    stopped: bool


def stop_token_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every end-of-sequence id of the model's generation config, else the tokenizer's EOS.

    Phi-3 stops on ``<|endoftext|>``, ``<|assistant|>`` and ``<|end|>``; its tokenizer knows only
    the first, and an answer ends with ``<|end|>``: never let the tokenizer's EOS override.
    """
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if not ids:
        raise ValueError(
            "Neither the model's generation config nor the tokenizer defines an end-of-sequence "
            "token, so generation could never stop early. Set generation_config.eos_token_id."
        )
    return ids


def context_length(model: torch.nn.Module) -> int | None:
    """Longest sequence (prompt + answer) the model was built for, if its config says."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase,
    prompt: Prompt,
    system_prompt: str | None = None,
    raw: bool = False,
) -> list[int]:
    """Token ids of a prompt, ready for the model to continue with its answer.

    Chat mode renders the template with the generation prompt (``<|assistant|>\\n`` for Phi-3)
    and encodes without adding special tokens again (the template holds them: a second BOS
    would be a sequence the model never saw). Raw mode encodes the text as training did.
    """
    if raw:
        if not isinstance(prompt, str):
            raise ValueError("raw=True takes text prompts, not chats; turn raw off for chats.")
        return tokenizer(prompt, add_special_tokens=True)["input_ids"]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt:
        messages = [{"role": "system", "content": system_prompt}, *messages]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def check_fits_context(lengths: Sequence[int], max_new_tokens: int, context: int | None) -> None:
    """Refuse prompts whose answer would run past the model's context window."""
    if context is None:
        return
    for i, n in enumerate(lengths):
        if n + max_new_tokens > context:
            raise ValueError(
                f"Prompt {i} is {n} tokens long; with max_new_tokens={max_new_tokens} it needs "
                f"{n + max_new_tokens} positions but the model's context is {context}. Shorten "
                "the prompt or lower max_new_tokens."
            )


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    settings: GenerationSettings | None = None,
    batch_size: int = 8,
    **overrides: Any,
) -> list[GenerationResult]:
    """Generate one answer per prompt, in batches, in the prompts' order.

    Example::

        results = generate(model, tokenizer, ["Why do cats knock things over?"], seed=0)

    Args:
        model: A causal LM (transformers, or a peft model around one), on its device.
        tokenizer: Its tokenizer (with a chat template unless ``raw``).
        prompts: User messages or chats.
        settings: How to sample; ``None`` uses the original script's settings.
        batch_size: Prompts generated together; larger is faster until memory. The settings'
            ``batch_size``, when set, wins.
        **overrides: Fields of :class:`GenerationSettings` to change (``do_sample=False``, ...).

    Raises:
        ValueError: For no prompts, a malformed prompt, or one too long for the context.
    """
    from lit_cats.inference import decode  # it builds on this module

    s = replace(settings or GenerationSettings(), **overrides)
    batch_size = s.batch_size or batch_size
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    encoded = decode.prepare_prompts(model, tokenizer, prompts, s)
    reason = decode.fast_path_reason(model, s)
    if reason is None:
        with _eval_mode(model):
            return decode.decode_batch(model, tokenizer, prompts, encoded, s, batch_size)
    decode.say_path(model, f"plain transformers generate ({reason})")
    stops = stop_token_ids(model, tokenizer)
    config = _generation_config(s, stops, _pad_id(tokenizer, stops))
    # Batch prompts of similar length together: less padding, fewer wasted positions.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    results: list[GenerationResult | None] = [None] * len(encoded)
    with _eval_mode(model), _seeded(s.seed, _device(model)):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            new_tokens = _generate_batch(model, [encoded[i] for i in rows], config)
            for i, tokens in zip(rows, new_tokens, strict=True):
                results[i] = _result(prompts[i], tokens, stops, tokenizer)
    return results  # type: ignore[return-value]


def _generation_config(s: GenerationSettings, stops: list[int], pad_id: int) -> GenerationConfig:
    sampling = {}
    if s.do_sample:  # greedy decoding warns about sampling parameters it would ignore
        sampling = {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k}
    return GenerationConfig(
        max_new_tokens=s.max_new_tokens,
        min_new_tokens=s.min_new_tokens or None,
        do_sample=s.do_sample,
        eos_token_id=stops,  # every stop id: passing only the tokenizer's EOS would drop the others
        pad_token_id=pad_id,
        use_cache=True,  # training may have switched it off for gradient checkpointing
        **sampling,
    )


def _pad_id(tokenizer: PreTrainedTokenizerBase, stops: list[int]) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]


def _device(model: torch.nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def _generate_batch(
    model: PreTrainedModel, prompts: list[list[int]], config: GenerationConfig
) -> list[list[int]]:
    """Left-pad the prompts (answers must start at the same column) and generate.

    Not ``tokenizer.pad``: it needs a pad token, which many tokenizers lack (a stop id pads here).
    """
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), config.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.as_tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    device = _device(model)
    out = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        generation_config=config,
    )
    return out[:, width:].tolist()


def _result(
    prompt: Prompt, tokens: list[int], stops: list[int], tokenizer: PreTrainedTokenizerBase
) -> GenerationResult:
    """Cut the answer at its first stop id; what follows is padding."""
    end = next((i for i, t in enumerate(tokens) if t in stops), None)
    answer = tokens if end is None else tokens[:end]
    return GenerationResult(
        prompt=prompt,
        response=tokenizer.decode(answer, skip_special_tokens=True).strip(),
        num_tokens=len(tokens) if end is None else end + 1,
        stopped=end is not None,
    )


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd, restoring the training flag afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed the sampling without disturbing the caller's RNG (e.g. a training run's dropout)."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        torch.manual_seed(seed)
        yield
