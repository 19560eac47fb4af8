"""The decode engine behind :mod:`lit_cats.inference.decode`: a model's static KV cache, its
one-token step (eager, compiled, or replayed as a CUDA graph), the sampling inside that step,
and the refill loop that feeds waiting prompts into finished slots.

:mod:`~lit_cats.inference.decode` decides whether this path applies and turns its tokens into
answers and stream events; the design (why a loop of lit-cats' own) is in its docstring.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lit_cats.inference.generation import GenerationSettings


@dataclass
class _Slot:
    """Which request a cache row decodes, and what it has produced so far (host side)."""

    index: int = -1  # -1: free
    sent: int = 0  # tokens already handed out


class Engine:
    """KV cache, decode step (graphed on CUDA) and the refill loop for one model."""

    def __init__(
        self, model: nn.Module, slots: int, length: int, compiled: bool, graphs: bool
    ) -> None:
        self.model_ref = weakref.ref(model)
        self.lm = causal_lm(model)
        config = self.lm.config
        self.slots, self.length, self.compiled = slots, length, compiled
        self.device = model_device(model)
        self.layers = list(self.lm.model.layers)
        attn = self.layers[0].self_attn
        self.shape = _Shape(
            config.num_attention_heads,
            config.num_key_value_heads,
            attn.head_dim,
            attn.scaling,
            sys.modules[type(attn).__module__].apply_rotary_pos_emb,
        )
        self.window = getattr(config, "sliding_window", None)
        self.cache: list[tuple[Tensor, Tensor]] = []  # allocated at the first prefill (dtype)
        self.use_graph = graphs
        self.step_fn: Callable[[Tensor, Tensor], Tensor] = self._decode_forward
        # Compiled: one decoder layer's decode step, which all layers share (their weights
        # are inputs of the graph, not constants), so the compile cost is one layer's.
        self.layer_fn: Callable[..., Tensor] = _decode_layer
        if compiled:
            self.layer_fn = _compiled_decode_layer()
            # A 4-bit base's layers: bitsandbytes' dequantization + matmul as opaque ops,
            # everything around them fused by the compiler (lit_cats.fast.nf4).
            from lit_cats.fast.nf4 import mark_decode_layers

            mark_decode_layers(self.lm)
        # The step's state lives at fixed addresses (what a graph replays): each slot's last
        # token and its position, tokens made, whether finished, the tokens themselves (a
        # spare last column takes the writes of finished slots), and the sampling noise.
        self.vocab = self.lm.get_output_embeddings().weight.shape[0]
        self.rows = torch.arange(slots, device=self.device)
        self.tokens = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.count = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.done = torch.ones(slots, dtype=torch.bool, device=self.device)
        self.out = torch.zeros((slots, length + 1), dtype=torch.long, device=self.device)
        self.noise = torch.ones((slots, self.vocab), device=self.device)
        self.graphs: dict[tuple[Any, ...], torch.cuda.CUDAGraph] = {}
        self.pool = torch.cuda.graph_pool_handle() if graphs else None
        self.graph: torch.cuda.CUDAGraph | None = None  # the latest captured
        self.graph_failed: str | None = None
        self.compile_seconds = 0.0  # warm-up, compilation and capture of the step
        self.last_ttft = 0.0  # seconds from a run's start to its first tokens on the host
        mode = {(True, True): "compiled + CUDA graph", (False, True): "CUDA graph",
                (True, False): "compiled, no graph", (False, False): "eager, no graph"}[
            (compiled, graphs)
        ]  # fmt: skip
        self.choice = ""  # why decode="auto" compiled the step or not (part of describe)
        self._path = f"fast decode ({mode}; static KV cache {slots} slots x {length} positions)"

    @property
    def describe(self) -> str:
        """The path in one line, with why ``decode="auto"`` compiled the step or not."""
        return self._path + (f"; {self.choice}" if self.choice else "")

    def fits(self, model: nn.Module, slots: int, length: int, compiled: bool, graphs: bool) -> bool:
        return (
            self.model_ref() is model
            and self.use_graph == graphs
            # Spare slots cost little while a step reads the weights once for all rows
            # (up to ~16), and save capturing (and compiling) again for a last, smaller batch.
            and slots <= self.slots <= max(2 * slots, 16)
            and self.length >= length
            and self.compiled == compiled
            and self.length <= 2 * length  # a much longer cache reads more per step
        )

    # ---------------------------------------------------------------- forward passes
    def _allocate(self, hidden: Tensor) -> None:
        """The cache, in the dtype the projections produce (bf16 under autocast too)."""
        attn = self.layers[0].self_attn
        dtype = attn.qkv_proj(self.layers[0].input_layernorm(hidden[:1, :1])).dtype
        shape = (self.slots, self.shape.kv_heads, self.length, self.shape.head_dim)
        self.cache = [
            (
                torch.zeros(shape, dtype=dtype, device=self.device),
                torch.zeros(shape, dtype=dtype, device=self.device),
            )
            for _ in self.layers
        ]

    def _decode_forward(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """One token per slot at its own position: write its K/V there, attend to its row."""
        pos = positions[:, None]  # (slots, 1)
        h = self.lm.model.embed_tokens(tokens[:, None])
        cos, sin = self.lm.model.rotary_emb(h, pos)
        columns = torch.arange(self.length, device=tokens.device)
        mask = _causal_mask(columns[None, None, None, :], pos[:, None, :, None], self.window)
        for layer, (keys, values) in zip(self.layers, self.cache, strict=True):
            h = self.layer_fn(layer, h, cos, sin, mask, keys, values, positions, self.shape)
        h = self.lm.model.norm(h)
        return self.lm.lm_head(h[:, 0]).float()

    def _prefill(self, rows: list[int], prompts: list[list[int]]) -> Tensor:
        """Right-padded prompts into their rows from column 0; the logits after each prompt."""
        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.as_tensor(p)
        ids = ids.to(self.device)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        row_index = torch.tensor(rows, device=self.device)
        positions = torch.arange(width, device=self.device)[None, :].expand(len(prompts), -1)
        h = self.lm.model.embed_tokens(ids)
        cos, sin = self.lm.model.rotary_emb(h, positions)
        keys_at = torch.arange(width, device=self.device)
        # Causal within the prompt, no key past its end (the right padding).
        mask = _causal_mask(keys_at[None, None, None, :], keys_at[None, None, :, None], self.window)
        mask = mask & (keys_at[None, None, None, :] < lengths[:, None, None, None])

        if not self.cache:
            self._allocate(h)
        for layer, (keys, values) in zip(self.layers, self.cache, strict=True):
            h = _prefill_layer(layer, h, cos, sin, mask, keys, values, row_index, self.shape)
        last = h[torch.arange(len(prompts), device=self.device), lengths - 1]
        return self.lm.lm_head(self.lm.model.norm(last)).float()

    def _advance(self, plan: _Plan) -> None:
        """One decode step of every slot, sampling and bookkeeping included, on the device:
        what a CUDA graph captures (no host sync, state updated in place)."""
        logits = self.step_fn(self.tokens, self.positions)
        nxt = _pick(logits, self.count, plan, self.noise)
        active = ~self.done
        column = torch.where(active, self.count, self.out.shape[1] - 1)  # finished: the spare
        self.out[self.rows, column] = nxt
        self.count.add_(active)
        ended = plan.stop_mask[nxt] | (self.count >= plan.max_new_tokens)
        self.done.logical_or_(active & ended)
        self.tokens.copy_(torch.where(active, nxt, self.tokens))
        self.positions.add_(active)

    def _step(self, plan: _Plan, generator: torch.Generator | None) -> None:
        """Draw this step's sampling noise, then replay the step's graph (or run it eagerly)."""
        if plan.settings.do_sample:
            self.noise.exponential_(generator=generator)
        if self.use_graph and plan.key not in self.graphs and self.graph_failed is None:
            self._capture(plan)
        graph = self.graphs.get(plan.key)
        if graph is not None:
            graph.replay()
        elif self.compiled and not self.compile_seconds:  # eager: the first call compiles
            start = time.perf_counter()
            self._advance(plan)
            self.compile_seconds = time.perf_counter() - start
        else:
            self._advance(plan)

    def _capture(self, plan: _Plan) -> None:
        """Warm up on a side stream (and compile), then capture the step into a CUDA graph,
        one per sampling plan, all in one memory pool; the state is restored after the
        warm-up steps (their cache writes lie past each row's position, masked until the real
        steps overwrite them).

        A model whose step cannot be captured (an op that syncs with the host) runs eagerly,
        and says so once.
        """
        start = time.perf_counter()
        state = [self.tokens, self.positions, self.count, self.done, self.out]
        saved = [t.clone() for t in state]
        stream = torch.cuda.Stream(device=self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(stream), _uncached_autocast(self.device):
                for _ in range(3):  # compile (when asked) and settle lazy initialisations
                    self._advance(plan)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            for t, old in zip(state, saved, strict=True):
                t.copy_(old)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool), _uncached_autocast(self.device):
                self._advance(plan)
            self.graphs[plan.key] = graph
            self.graph = graph
        except RuntimeError as error:  # e.g. "operation not permitted when stream is capturing"
            self.graph_failed = str(error).splitlines()[0]
            torch.cuda.synchronize(self.device)
            for t, old in zip(state, saved, strict=True):
                t.copy_(old)
            rank_zero_info(
                f"generation: CUDA graph capture failed, decoding eagerly: {self.graph_failed}"
            )
        torch.cuda.synchronize(self.device)
        self.compile_seconds += time.perf_counter() - start

    # ---------------------------------------------------------------- the loop
    def run(
        self,
        encoded: list[list[int]],
        s: GenerationSettings,
        stops: list[int],
        sync_every: int,
        partial: bool = True,
    ) -> Iterator[tuple[int, list[int], bool]]:
        """Decode every prompt; yield ``(request index, new tokens, finished)`` as they come
        (``partial=False``: once per request, when it is finished, with all its tokens; the host
        then copies only the finished rows).
        """
        device = self.device
        plan = _Plan.of(s, stops, self.vocab, device)
        # A generator of its own: reproducible per call, and the caller's RNG is left alone.
        generator = None
        if s.seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(s.seed)
        queue = deque(sorted(range(len(encoded)), key=lambda i: len(encoded[i])))
        slots = [_Slot() for _ in range(self.slots)]
        self.done.fill_(True)
        self.count.zero_()
        start, steps = time.perf_counter(), 0
        known = [0] * self.slots  # tokens of each row as of the last look (host side)
        while True:
            # Refill free slots (all at once: one prefill for the group).
            free = [r for r, slot in enumerate(slots) if slot.index < 0]
            if free and queue:
                take = [queue.popleft() for _ in free[: len(queue)]]
                used = free[: len(take)]
                logits = self._prefill(used, [encoded[i] for i in take])
                if s.do_sample:
                    self.noise.exponential_(generator=generator)
                zero = torch.zeros(len(used), dtype=torch.long, device=device)
                first = _pick(logits, zero, plan, self.noise[: len(used)])
                index = torch.tensor(used, device=device)
                self.tokens[index] = first
                self.positions[index] = torch.tensor([len(encoded[i]) for i in take], device=device)
                self.out[index, 0] = first
                self.count[index] = 1
                self.done[index] = plan.stop_mask[first] | (s.max_new_tokens <= 1)
                for r, i in zip(used, take, strict=True):
                    slots[r] = _Slot(index=i)
                    known[r] = 1
                if steps == 0:  # one sync per run, to measure the time to the first token
                    first.tolist()
                    self.last_ttft = time.perf_counter() - start
            if all(slot.index < 0 for slot in slots):
                return
            # Decode a few steps before looking (each look is a host sync), and no more than
            # the longest answer still needs.
            needed = max(s.max_new_tokens - known[r] for r, t in enumerate(slots) if t.index >= 0)
            for _ in range(min(sync_every, needed)):
                self._step(plan, generator)
                steps += 1
            # Hand out what was decoded; free the finished slots.
            counts, finished = self.count.tolist(), self.done.tolist()
            known = counts
            wanted = [
                r for r, slot in enumerate(slots) if slot.index >= 0 and (partial or finished[r])
            ]
            if not wanted:
                continue
            rows_out = self.out[torch.tensor(wanted, device=device)].tolist()
            produced = dict(zip(wanted, rows_out, strict=True))
            for r in wanted:
                slot = slots[r]
                new = produced[r][slot.sent : counts[r]]
                slot.sent = counts[r]
                if finished[r]:
                    yield slot.index, new, True
                    slots[r] = _Slot()
                elif new:
                    yield slot.index, new, False


class _Plan(NamedTuple):
    """What a step's sampling needs: the settings, transformers' warpers for them, the stop ids
    as a vocabulary mask, and the key of the CUDA graph that bakes them in."""

    settings: GenerationSettings
    warpers: list[Any]
    stop_mask: Tensor
    max_new_tokens: int
    min_new_tokens: int
    key: tuple[Any, ...]

    @classmethod
    def of(cls, s: GenerationSettings, stops: list[int], vocab: int, device: torch.device) -> _Plan:
        stop_mask = torch.zeros(vocab, dtype=torch.bool, device=device)
        stop_mask[torch.tensor(stops, device=device)] = True
        sampling = (s.temperature, s.top_k, s.top_p) if s.do_sample else ()
        autocast = torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type)
        key = (s.do_sample, *sampling, s.max_new_tokens, s.min_new_tokens, tuple(stops), autocast)
        return cls(s, _warpers(s), stop_mask, s.max_new_tokens, s.min_new_tokens, key)


class _Shape(NamedTuple):
    """The attention's sizes, and the model's own rotary-embedding function."""

    heads: int
    kv_heads: int
    head_dim: int
    scaling: float
    rotary: Callable[..., tuple[Tensor, Tensor]]


def _uncached_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """The caller's autocast (training's samples run under it), with its cache of cast weights
    off: a captured graph must not keep pointers into that cache, which autocast frees when it
    exits (torch.cuda.graph's documentation). A no-op outside autocast."""
    if not torch.is_autocast_enabled(device.type):
        return contextlib.nullcontext()
    dtype = torch.get_autocast_dtype(device.type)
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False)


def _causal_mask(keys: Tensor, queries: Tensor, window: int | None) -> Tensor:
    """Causal (and sliding-window, as transformers') boolean mask, True = attend."""
    mask = keys <= queries
    if window is not None:
        mask = mask & (keys > queries - window)
    return mask


def _attention_inputs(
    layer: nn.Module, h: Tensor, cos: Tensor, sin: Tensor, shape: _Shape
) -> tuple[Tensor, Tensor, Tensor]:
    """Phi-3's norm and fused projection, split into (batch, heads, tokens, head_dim) tensors,
    with the rotary embedding applied to the queries and keys."""
    b, t = h.shape[:2]
    qkv = layer.self_attn.qkv_proj(layer.input_layernorm(h))
    q_size, kv_size = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    q = qkv[..., :q_size].view(b, t, shape.heads, shape.head_dim).transpose(1, 2)
    k = qkv[..., q_size : q_size + kv_size].view(b, t, shape.kv_heads, shape.head_dim)
    v = qkv[..., q_size + kv_size :].view(b, t, shape.kv_heads, shape.head_dim)
    q, k = shape.rotary(q, k.transpose(1, 2), cos, sin)
    return q, k, v.transpose(1, 2)


def _layer_output(layer: nn.Module, h: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor,
                  shape: _Shape) -> Tensor:  # fmt: skip
    """Attention, output projection and MLP, each with its residual (Phi3DecoderLayer, eval)."""
    out = nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=shape.scaling, enable_gqa=shape.heads != shape.kv_heads
    )
    b, t = h.shape[:2]
    h = h + layer.self_attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))
    mlp = layer.mlp  # Phi3MLP.forward
    gate, up = mlp.gate_up_proj(layer.post_attention_layernorm(h)).chunk(2, dim=-1)
    return h + mlp.down_proj(up * mlp.activation_fn(gate))


def _decode_layer(
    layer: nn.Module,
    h: Tensor,
    cos: Tensor,
    sin: Tensor,
    mask: Tensor,
    keys: Tensor,
    values: Tensor,
    positions: Tensor,
    shape: _Shape,
) -> Tensor:
    """One decoder layer for one token per row: its K/V written at the row's own position,
    attention over the row's cache."""
    q, k, v = _attention_inputs(layer, h, cos, sin, shape)
    rows = torch.arange(h.shape[0], device=h.device)
    keys[rows, :, positions] = k[:, :, 0].to(keys.dtype)
    values[rows, :, positions] = v[:, :, 0].to(values.dtype)
    return _layer_output(layer, h, q, keys.to(q.dtype), values.to(q.dtype), mask, shape)


def _prefill_layer(
    layer: nn.Module,
    h: Tensor,
    cos: Tensor,
    sin: Tensor,
    mask: Tensor,
    keys: Tensor,
    values: Tensor,
    rows: Tensor,
    shape: _Shape,
) -> Tensor:
    """One decoder layer over whole (right-padded) prompts, their K/V written into their rows
    from column 0; attention among the prompt's own tokens."""
    q, k, v = _attention_inputs(layer, h, cos, sin, shape)
    width = h.shape[1]
    keys[rows, :, :width] = k.to(keys.dtype)
    values[rows, :, :width] = v.to(values.dtype)
    return _layer_output(layer, h, q, k, v, mask, shape)


@functools.cache
def _compiled_decode_layer() -> Callable[..., Tensor]:
    """:func:`_decode_layer` through ``torch.compile``, one per process (its caches are shared).

    Inductor writes its compiled kernels and graphs to its on-disk caches (the FX graph and
    AOTAutograd caches, and Triton's kernel cache, under ``TORCHINDUCTOR_CACHE_DIR``, by default
    ``/tmp/torchinductor_<user>``), so a later process compiles from them in a fraction of the
    time.
    """
    return torch.compile(_decode_layer, dynamic=False)


def _warpers(s: GenerationSettings) -> list[Any]:
    """transformers' logits warpers, as its ``generate`` adds them for these settings."""
    if not s.do_sample:
        return []
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers: list[Any] = []
    if s.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(s.temperature))
    if s.top_k:
        warpers.append(TopKLogitsWarper(top_k=s.top_k, min_tokens_to_keep=1))
    if s.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=s.top_p, min_tokens_to_keep=1))
    return warpers


def _pick(logits: Tensor, count: Tensor, plan: _Plan, noise: Tensor) -> Tensor:
    """The next token of each row: stop ids suppressed before ``min_new_tokens`` (transformers'
    ``MinNewTokensLengthLogitsProcessor``), then argmax (greedy) or transformers' warpers on
    fp32 logits and a draw from the softmax.

    The draw is ``torch.multinomial``'s own method for one sample, ``argmax(p / E)`` with
    ``E ~ Exp(1)``, with ``E`` (``noise``) drawn by the host before the step, so the whole step
    replays as one CUDA graph and a seeded generator reproduces it.
    """
    scores = logits.float()
    if plan.min_new_tokens:
        early = (count < plan.min_new_tokens)[:, None]
        scores = scores.masked_fill(early & plan.stop_mask, -math.inf)
    if not plan.settings.do_sample:
        return scores.argmax(dim=-1)
    for warper in plan.warpers:
        scores = warper(None, scores)
    probs = nn.functional.softmax(scores, dim=-1)
    return (probs / noise).argmax(dim=-1)


# ------------------------------------------------------------------------------ helpers
def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft model (its LoRA layers stay in place)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def model_device(model: nn.Module) -> torch.device:
    """Where the model's embeddings (and so its inputs) are."""
    return model.get_input_embeddings().weight.device
