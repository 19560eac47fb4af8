"""Streaming generation for ``lit-cats chat`` and ``lit-cats serve``: text pieces as they decode.

:class:`RequestStream` is what the commands use: requests sharing their sampling settings go
through the fast decode loop of :mod:`lit_cats.inference.decode` where it applies; otherwise
:class:`TextStream` runs transformers' ``generate`` on a thread over one left-padded batch and
yields, step by step, the new text of every row, each row with its own sampling settings (an
HTTP batch mixes requests with different temperatures and token limits), applied by
:class:`RowSampling` in the order transformers applies its own warpers.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
)
from transformers.generation.streamers import BaseStreamer

from lit_cats.inference.generation import GenerationSettings, stop_token_ids

_END = object()  # the generation thread's last message


@dataclass
class RowState:
    """What one row has generated so far.

    Attributes:
        tokens: Answer token ids, without the stop id.
        num_tokens: Tokens generated, the stop id included when there is one.
        stopped: The model ended the answer itself (emitted a stop id).
        done: No more tokens will come (stopped, or its token limit reached).
        text: The answer decoded so far (leading whitespace dropped).
    """

    tokens: list[int]
    num_tokens: int = 0
    stopped: bool = False
    done: bool = False
    text: str = ""


class RowSampling(LogitsProcessor):
    """Per-row greedy or temperature/top-k/top-p sampling, as transformers' warpers do for all
    rows (temperature, then top-k, then top-p, keeping at least one token)."""

    def __init__(self, settings: Sequence[GenerationSettings], device: torch.device) -> None:
        self.greedy = torch.tensor([not s.do_sample for s in settings], device=device)
        temps = [s.temperature if s.do_sample else 1.0 for s in settings]
        self.temperature = torch.tensor(temps, device=device).unsqueeze(1)
        self.top_p = torch.tensor([s.top_p for s in settings], device=device).unsqueeze(1)
        self.top_k = [s.top_k for s in settings]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float()
        best = scores.argmax(dim=-1, keepdim=True)
        only_best = torch.full_like(scores, -float("inf")).scatter(1, best, 0.0)
        scores = torch.where(self.greedy.unsqueeze(1), only_best, scores / self.temperature)
        for row, k in enumerate(self.top_k):
            if 0 < k < scores.shape[-1]:
                kth = torch.topk(scores[row], k).values[-1]
                scores[row] = scores[row].masked_fill(scores[row] < kth, -float("inf"))
        ordered, order = torch.sort(scores, descending=False)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - self.top_p)
        remove[..., -1:] = False
        return scores.masked_fill(remove.scatter(1, order, remove), -float("inf"))


class _RowLimits(StoppingCriteria):
    """Each row ends at its own token limit; every row ends once ``stop`` is set."""

    def __init__(self, width: int, limits: Sequence[int], stop: threading.Event) -> None:
        self.width, self.stop = width, stop
        self.limits = torch.tensor(limits)

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs
    ) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self.width
        done = generated >= self.limits.to(input_ids.device)
        return done | self.stop.is_set()


class _QueueStreamer(BaseStreamer):
    """Hands each step's tokens (one per row) to the consumer; the prompt is skipped."""

    def __init__(self, out: queue.Queue) -> None:
        self.out, self.prompt_seen = out, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate's first put is the prompt batch
            self.prompt_seen = True
            return
        self.out.put(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


class TextStream:
    """Generate answers for a batch of encoded prompts; iterate for each step's new text.

    Example::

        stream = TextStream(model, tokenizer, [ids], [GenerationSettings(max_new_tokens=50)])
        for pieces in stream:
            print(pieces[0], end="", flush=True)
        print(stream.rows[0].num_tokens, stream.rows[0].stopped)

    Args:
        model: A causal LM (or a peft model around one), on its device.
        tokenizer: Its tokenizer.
        prompts: Token ids of each prompt, ready for the answer (see ``encode_prompt``).
        settings: One :class:`GenerationSettings` per prompt (the seed of the first is used).
        context: A context manager factory entered on the generation thread (autocast).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        prompts: Sequence[Sequence[int]],
        settings: Sequence[GenerationSettings],
        context: Callable[[], AbstractContextManager] = nullcontext,
    ) -> None:
        if not prompts or len(prompts) != len(settings):
            raise ValueError(f"{len(prompts)} prompts and {len(settings)} settings: give one each.")
        self.model, self.tokenizer, self.context = model, tokenizer, context
        self.prompts, self.settings = [list(p) for p in prompts], list(settings)
        self.stops = set(stop_token_ids(model, tokenizer))
        self.rows = [RowState(tokens=[]) for _ in prompts]
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    def stop(self) -> None:
        """End the generation at its next step (the text so far stays)."""
        self._stop.set()

    def __iter__(self) -> Iterator[list[str]]:
        """Each step's new text of every row ("" for a row with nothing new)."""
        self._thread = threading.Thread(
            target=self._generate, daemon=True, name="lit-cats-generate"
        )
        self._thread.start()
        try:
            while True:
                item = self._queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                pieces = self._take(item)
                if any(pieces):
                    yield pieces
        finally:
            self._stop.set()
            self._thread.join()

    def _take(self, step: list[int]) -> list[str]:
        """Record one token per row; return each row's new text (none while a multi-byte
        character is incomplete, which decodes as U+FFFD)."""
        pieces = []
        for row, token, settings in zip(self.rows, step, self.settings, strict=True):
            if row.done:
                pieces.append("")
                continue
            row.num_tokens += 1
            if token in self.stops:
                row.stopped = row.done = True
            else:
                row.tokens.append(token)
            row.done = row.done or row.num_tokens >= settings.max_new_tokens
            text = self.tokenizer.decode(row.tokens, skip_special_tokens=True).lstrip()
            if text.endswith("\ufffd") and not row.done:
                pieces.append("")
                continue
            pieces.append(text[len(row.text) :] if text.startswith(row.text) else "")
            row.text = text
        return pieces

    def _generate(self) -> None:
        try:
            with self.context(), torch.inference_mode():
                self._run()
            self._queue.put(_END)
        except BaseException as error:  # handed to the consumer, which re-raises it
            self._queue.put(error)

    def _run(self) -> None:
        model, device = self.model, self.model.get_input_embeddings().weight.device
        width = max(len(p) for p in self.prompts)
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else min(self.stops)
        input_ids = torch.full((len(self.prompts), width), pad, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, ids in enumerate(self.prompts):  # left padding: answers start at one column
            input_ids[i, width - len(ids) :] = torch.tensor(ids)
            attention_mask[i, width - len(ids) :] = 1
        limits = [s.max_new_tokens for s in self.settings]
        config = GenerationConfig(
            max_new_tokens=max(limits),
            min_new_tokens=min(s.min_new_tokens for s in self.settings) or None,
            # RowSampling does each row's warping; transformers only draws from the result.
            do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
            eos_token_id=sorted(self.stops), pad_token_id=pad, use_cache=True,
        )  # fmt: skip
        seed = self.settings[0].seed
        if seed is not None:
            torch.manual_seed(seed)
        was_training = model.training
        model.eval()
        try:
            model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=config,
                logits_processor=[RowSampling(self.settings, device)],
                stopping_criteria=[_RowLimits(width, limits, self._stop)],
                streamer=_QueueStreamer(self._queue),
            )
        finally:
            model.train(was_training)


class RequestStream:
    """Each step's new text of every request, by the fastest path that applies.

    Requests that share their sampling settings go through the fast decode loop of
    :mod:`lit_cats.inference.decode` (static KV cache, a CUDA graph per step) where it applies;
    otherwise (settings that differ per request, a model it does not support) through
    :class:`TextStream` (transformers' ``generate``, per-row settings).

    Args:
        model: A causal LM (or a peft model around one), on its device.
        tokenizer: Its tokenizer.
        chats: Each request's messages, system message included.
        encoded: Each request's prompt ids (``encode_prompt`` of its chat).
        settings: Each request's settings (their ``system_prompt`` is not used: see ``chats``).
        context: Entered around ``generate`` on the plain path (autocast); the fast loop runs
            in the model's own dtype.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        chats: Sequence[list[dict[str, str]]],
        encoded: Sequence[Sequence[int]],
        settings: Sequence[GenerationSettings],
        context: Callable[[], AbstractContextManager] = nullcontext,
    ) -> None:
        from lit_cats.inference import decode  # it imports this package's generation module

        settings = [replace(s, system_prompt=None) for s in settings]
        self.rows = [RowState(tokens=[]) for _ in chats]
        shared = all(s == settings[0] for s in settings)
        reason = decode.fast_path_reason(model, settings[0], for_stream=True) if shared else None
        self.fast = shared and reason is None
        if self.fast:
            self._steps = self._fast(decode, model, tokenizer, chats, settings[0])
        else:
            self._plain = TextStream(model, tokenizer, encoded, settings, context)
            self.rows = self._plain.rows
            self._steps = iter(self._plain)

    def __iter__(self) -> Iterator[list[str]]:
        return self._steps

    def close(self) -> None:
        """End the generation now (after Ctrl-C); the text so far stays in :attr:`rows`."""
        self._steps.close()  # a generator: its cleanup (join the thread, train mode) runs

    def _fast(
        self,
        decode: Any,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        chats: Sequence[list[dict[str, str]]],
        settings: GenerationSettings,
    ) -> Iterator[list[str]]:
        """decode.stream_batch's events (one per request and step) gathered into steps."""
        pending, seen = [""] * len(chats), set()
        events = decode.stream_batch(model, tokenizer, list(chats), settings, batch_size=len(chats))
        for event in events:
            if event.index in seen:  # a request's second event: the next step began
                yield pending
                pending, seen = [""] * len(chats), set()
            seen.add(event.index)
            row = self.rows[event.index]
            pending[event.index] += event.text
            row.text += event.text
            if event.result is not None:
                row.num_tokens, row.stopped = event.result.num_tokens, event.result.stopped
                row.done = True
        if any(pending):
            yield pending
