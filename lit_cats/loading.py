"""Resolving model names and paths, loading tokenizers, and turning Hub failures into advice."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lit_cats.tiny import TINY_MODEL_ID, resolve_model_path


def looks_like_path(name: str) -> bool:
    """True for strings a user means as a local path rather than a Hub id ``owner/name``."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).exists()


def experiment_dir(trainer: Any) -> Path:
    """Where an experiment's runs live: ``<logger save_dir>/<name>``, every version below it.

    Without a logger, the Trainer's ``default_root_dir``; without a Trainer, ``logs``.
    """
    if trainer is None:
        return Path("logs")
    logger = trainer.logger
    if logger is None or logger.save_dir is None:
        return Path(trainer.default_root_dir)
    return Path(logger.save_dir) / (logger.name or "")


def newest_match(root: str | Path, pattern: str) -> Path | None:
    """The most recently written file under ``root`` matching the glob ``pattern``, if any."""
    return max(Path(root).glob(pattern), key=lambda p: p.stat().st_mtime, default=None)


def resolve_pretrained(name_or_path: str) -> str:
    """Resolve the reserved tiny model, and reject local paths that do not exist.

    Raises:
        FileNotFoundError: For a path-like name with nothing at that path.
    """
    if name_or_path == TINY_MODEL_ID:
        return resolve_model_path(name_or_path)
    if looks_like_path(name_or_path) and not Path(name_or_path).expanduser().exists():
        raise FileNotFoundError(
            f"Model path {name_or_path!r} does not exist. Pass an existing folder saved with "
            f"save_pretrained, a Hub id such as 'microsoft/Phi-3-mini-4k-instruct', or "
            f"{TINY_MODEL_ID!r} for the offline tiny model."
        )
    return str(Path(name_or_path).expanduser()) if looks_like_path(name_or_path) else name_or_path


@contextlib.contextmanager
def hub_errors(kind: str, name: str, local_hint: str) -> Iterator[None]:
    """Re-raise connection failures while fetching ``name`` with what to do instead.

    Args:
        kind: What was being loaded ("model", "tokenizer", "dataset"), for the message.
        name: The Hub id that could not be fetched.
        local_hint: How to point at a local copy instead.
    """
    try:
        yield
    except FileNotFoundError:
        raise
    except (OSError, ConnectionError) as exc:  # requests/httpx errors derive from OSError
        raise RuntimeError(
            f"Could not load {kind} {name!r} from the Hugging Face Hub, and it is not in the "
            f"local cache ({type(exc).__name__}: {str(exc).splitlines()[0]}). Check the network "
            f"(and HF_ENDPOINT / HF_HUB_OFFLINE), or {local_hint}."
        ) from exc


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a model, resolving the tiny model and explaining Hub failures."""
    path = resolve_pretrained(name_or_path)
    with hub_errors("tokenizer", name_or_path, "pass a local model folder as the model name"):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        # Standard for causal LMs; harmless because labels are masked by position, not by id.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
