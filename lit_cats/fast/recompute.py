"""Whether code runs inside a checkpointed layer's recompute: the one place that knows.

Non-reentrant checkpointing (``torch.utils.checkpoint``) runs a layer twice: its forward, and in
the backward a rerun that rebuilds the activations the backward reads. Two ops of this package
behave differently in that rerun, and both learn it from here:

- the 4-bit LoRA op skips a layer output's matmul (:func:`lit_cats.fast.nf4.linear_4bit_lora`,
  through :func:`is_recomputing`);
- the seeded dropout op hands back the outputs its forward computed instead of computing them
  again (:func:`lit_cats.fast.lora_dropout.dropout_lora_a`, through :func:`stash`).

:func:`checkpoint_contexts` is the pair of contexts that sets both, for ``checkpoint``'s
``context_fn`` (:func:`lit_cats.fast.compile.checkpoint_around`). The state is per thread: the
backward, and so the rerun, runs on autograd's worker thread.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Iterator

_state = threading.local()

#: A stash: its mode (``"keep"`` in the forward, ``"reuse"`` in the rerun) and the outputs.
Stash = tuple[str, collections.deque]


def is_recomputing() -> bool:
    """Whether this thread runs a checkpointed layer's rerun (inside :func:`recomputing`)."""
    return getattr(_state, "recomputing", False)


@contextlib.contextmanager
def recomputing() -> Iterator[None]:
    """Mark a checkpointed layer's second forward, the one the backward runs to rebuild its
    activations."""
    before = is_recomputing()
    _state.recomputing = True
    try:
        yield
    finally:
        _state.recomputing = before


def stash() -> Stash | None:
    """The outputs of one checkpointed call that ops keep in its forward (mode ``"keep"``:
    append) and hand back in its rerun (mode ``"reuse"``: pop from the left); None outside."""
    return getattr(_state, "stash", None)


@contextlib.contextmanager
def _stash_mode(mode: str, outputs: collections.deque) -> Iterator[None]:
    before = stash()
    _state.stash = (mode, outputs)
    try:
        yield
    finally:
        _state.stash = before


@contextlib.contextmanager
def _rerun(outputs: collections.deque) -> Iterator[None]:
    with recomputing(), _stash_mode("reuse", outputs):
        yield


def checkpoint_contexts() -> tuple[
    contextlib.AbstractContextManager, contextlib.AbstractContextManager
]:
    """``checkpoint``'s ``context_fn`` for one call of a layer: inside the first context (its
    forward) ops keep their outputs in a fresh :func:`stash`; inside the second (the backward's
    rerun of that call) they may take them back, in the same order, and :func:`is_recomputing`
    is true."""
    outputs: collections.deque = collections.deque()
    return _stash_mode("keep", outputs), _rerun(outputs)
