"""Where things are: local paths vs Hub ids, an experiment's run folders, Hub failures as advice."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lit_cats.errors import Unreachable


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


def run_files(root: str | Path, pattern: str) -> list[Path]:
    """Files matching ``pattern`` inside the run folders (``version_*/``) of the experiment at
    ``root``, newest written first.

    Only the runs' own folders: copies elsewhere under the experiment (the Hub push's
    ``hub-dry-run/last-checkpoint/``, its staging folders) are not this experiment's runs.
    """
    found = Path(root).glob(f"version_*/{pattern}")
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


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
        raise Unreachable(
            f"Could not load {kind} {name!r} from the Hugging Face Hub, and it is not in the "
            f"local cache ({type(exc).__name__}: {str(exc).splitlines()[0]}). Check the network "
            f"(and HF_ENDPOINT / HF_HUB_OFFLINE), or {local_hint}."
        ) from exc
