"""User mistakes, told as such: a short message and exit status 2, without a traceback.

Anything raised as :class:`UsageError` (or a subclass) is a mistake the user can fix; the
``lit-cats`` command prints ``error: <message>`` and exits with status 2. Every other exception is
a bug and keeps its traceback. ``LIT_CATS_DEBUG=1`` (or ``--debug`` anywhere on the command line)
shows the traceback of a usage error too.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")

#: Exit status of a usage error, as argparse and jsonargparse use for theirs.
USAGE_STATUS = 2


class UsageError(Exception):
    """A mistake the user can fix. The message says what is wrong and what to do."""


class InvalidSetting(UsageError, ValueError):
    """A setting or input of the wrong value. Also a ``ValueError``, which callers of the
    library (and jsonargparse) catch for bad values."""


class MissingFile(UsageError, FileNotFoundError):
    """A file or folder the user named does not exist. Also a ``FileNotFoundError``."""


class MissingDependency(UsageError, RuntimeError):
    """A package a chosen setting needs is not installed. Also a ``RuntimeError``."""


class Unreachable(UsageError, RuntimeError):
    """A model, tokenizer, adapter or dataset could not be fetched (no network, offline mode)
    and is not cached. Also a ``RuntimeError``."""


class TrainingDiverged(UsageError, ArithmeticError):
    """The loss or gradient norm became NaN or infinite; nothing of the diverged run is saved."""


def debugging(argv: Sequence[str] = ()) -> bool:
    """Whether tracebacks of usage errors are wanted (``LIT_CATS_DEBUG=1`` or ``--debug``)."""
    flag = os.environ.get("LIT_CATS_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
    return flag or "--debug" in argv


def user_error_in(error: BaseException) -> UsageError | None:
    """The :class:`UsageError` behind ``error``, following ``__cause__``/``__context__`` (Lightning
    and torch sometimes wrap or re-raise what a callback or hook raised)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, UsageError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


@contextmanager
def reported(argv: Sequence[str] = ()) -> Iterator[None]:
    """Turn a :class:`UsageError` raised inside into ``error: ...`` on stderr and exit status 2."""
    try:
        yield
    except Exception as error:  # re-raised below unless it is the user's mistake
        mistake = user_error_in(error)
        if mistake is None:
            raise
        if debugging(argv):
            traceback.print_exception(error)
        print(f"error: {mistake}", file=sys.stderr)
        sys.exit(USAGE_STATUS)


def run_reported(function: Callable[[], T], argv: Sequence[str] = ()) -> T:
    """``function()`` inside :func:`reported`."""
    with reported(argv):
        return function()
