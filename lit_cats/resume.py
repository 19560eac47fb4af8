"""Resuming a run (``fit --ckpt_path``): which checkpoint, is it whole, are its settings this
command's, and where the resumed run writes.

Everything here reads the checkpoint with ``torch.load(weights_only=True, mmap=True)`` on the CPU
(no tensor is read, no code runs), before the model loads; a problem is a
:class:`~lit_cats.errors.UsageError` that names the file and what to do.

- ``last`` is the newest ``last*.ckpt`` of this experiment's run folders
  (``<save_dir>/<name>/version_*/checkpoints/``), never a copy elsewhere (the Hub push's
  ``last-checkpoint/``, its staging folders). If that file is unreadable (a run killed while
  writing it), the newest readable checkpoint of those folders is used, and both are named.
- The command line and config are the run's settings: the checkpoint's are compared with them,
  never loaded over them (Lightning's ``LightningCLI`` would), see :data:`CHANGEABLE`.
- A run resumed from the newest checkpoint of a run folder of this experiment writes into that
  folder, and its TensorBoard events replace the interrupted run's from the resumed step on
  (:meth:`~lit_cats.logger.CatsTensorBoardLogger.resume`): one continuous curve. From an older
  checkpoint, or one outside the experiment, it starts a new version (the later checkpoints of
  the old folder are kept).
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_cats.errors import UsageError
from lit_cats.locations import experiment_dir, run_files

#: Settings that may differ between a checkpoint and the command that resumes it: they leave the
#: adapter's shape, the data and the optimization as they were (speed and memory knobs give the
#: same result up to rounding, see :class:`lit_cats.fast.SpeedSettings`), or they only say how
#: long to train, what to log, where to save and push. A difference is printed, never refused.
#: Every other argument of :class:`~lit_cats.model.QLoRAModule` and
#: :class:`~lit_cats.data.datamodule.CatsDataModule` shapes the adapter or the data and must
#: equal the checkpoint's: the base (``model_name_or_path``, ``trust_remote_code``), its
#: quantization (``load_in_4bit``, ``bnb_4bit_*``), the LoRA (``r``, ``lora_alpha``,
#: ``lora_dropout``, ``target_modules``), the data and how it is rendered and cut
#: (``dataset``, ``format``, the ``*_column`` names, ``train_on_prompt``, ``max_seq_length``,
#: the tokenizer), and the batches (``batch_size``, ``val_size``, ``seed``, ``group_by_length``,
#: ``packing``, ``max_tokens_per_batch``). So must, when the interrupted run's ``config.yaml``
#: is beside its ``checkpoints/`` folder, the optimizer and scheduler (their restored state would
#: override a new learning rate) and ``trainer.accumulate_grad_batches`` (:data:`FIXED_CONFIG`).
CHANGEABLE = (
    "model.attn_implementation",
    "model.output_dir",
    "model.speed",
    "data.pad_to_multiple_of",
    "data.num_workers",
    "data.pin_memory",
    "data.prompts",
    "data.prompts_file",
    "data.predict_batch_size",
)

#: Keys of the run folder's ``config.yaml`` that must not change on resume (see
#: :data:`CHANGEABLE`); the rest of its ``trainer``/``checkpoint``/``hub``/``samples`` sections
#: may. ``model``/``data`` keys are compared with the checkpoint's hyperparameters instead.
FIXED_CONFIG = ("model.optimizer", "model.scheduler", "trainer.accumulate_grad_batches")

#: Keys of ``config.yaml`` that are not settings of the run.
_NOT_SETTINGS = ("ckpt_path", "config", "print_config")

_WHAT_TO_DO = (
    "Pass another checkpoint (each run folder's checkpoints/ holds one per saved step), or start "
    "a new run without --ckpt_path."
)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A lit-cats training checkpoint's contents, its tensors left on disk (memory-mapped).

    Raises:
        UsageError: For a missing, truncated, garbage or non-lit-cats file, naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--ckpt_path {str(path)!r} does not exist. {_WHAT_TO_DO}")
    try:
        checkpoint = _load(path)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError) as exc:
        raise UsageError(
            f"--ckpt_path {str(path)!r} is not a readable checkpoint: {_unreadable(path, exc)}. "
            + _WHAT_TO_DO
        ) from exc
    if not isinstance(checkpoint, dict) or not {"state_dict", "hyper_parameters"} <= set(
        checkpoint
    ):
        raise UsageError(
            f"--ckpt_path {str(path)!r} is not a lit-cats training checkpoint (it holds no "
            f"adapter weights and settings). {_WHAT_TO_DO}"
        )
    return checkpoint


def _load(path: Path) -> Any:
    # weights_only: no code runs; mmap: no tensor is read until used (most never are here).
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _unreadable(path: Path, exc: BaseException) -> str:
    """Why a file is not a checkpoint, in a few words (torch's own messages run to paragraphs)."""
    with path.open("rb") as f:
        head = f.read(4)
    if not head:
        return "it is empty"
    if head == b"PK\x03\x04" and "central directory" in str(exc):
        return (
            f"it is truncated ({path.stat().st_size:,} bytes, the end of the archive is missing; "
            "was the run stopped while writing it?)"
        )
    if head != b"PK\x03\x04":
        return "it is not a torch.save archive"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def _readable(path: Path) -> dict[str, Any] | None:
    try:
        return read_checkpoint(path)
    except UsageError:
        return None


def run_checkpoints(root: str | Path, pattern: str = "*.ckpt") -> list[Path]:
    """Checkpoints matching ``pattern`` in the experiment's run folders, newest written first."""
    return run_files(root, f"checkpoints/{pattern}")


def find_last(root: str | Path) -> Path:
    """What ``--ckpt_path last`` means: the newest ``last*.ckpt`` of the experiment's run
    folders (``root/version_*/checkpoints/``); if it is unreadable, the newest readable
    checkpoint of those folders, with a warning naming both.

    Raises:
        UsageError: When there is no ``last.ckpt``, or no readable checkpoint at all.
    """
    lasts = run_checkpoints(root, "last*.ckpt")
    if not lasts:
        raise UsageError(
            f"--ckpt_path last: no last.ckpt under {str(Path(root))!r} (in a "
            "version_*/checkpoints/ folder), so there is no run to resume. Start without "
            "--ckpt_path, or pass a checkpoint file's path."
        )
    newest = lasts[0]
    if _readable(newest) is not None:
        return newest
    for candidate in run_checkpoints(root):
        if candidate != newest and _readable(candidate) is not None:
            rank_zero_warn(
                f"--ckpt_path last: the newest last.ckpt, {newest}, is unreadable (truncated or "
                f"corrupt); resuming from the newest readable checkpoint, {candidate}, instead."
            )
            return candidate
    read_checkpoint(newest)  # raises, saying why
    raise AssertionError("unreachable: the newest last.ckpt was unreadable a moment ago")


# ------------------------------------------------------------------------------ settings
def _flat(tree: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """``{"model.speed.compile": False, ...}``; private keys (``_instantiator``) left out."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if str(key).startswith("_"):
            continue
        name = f"{prefix}.{key}"
        if isinstance(value, Mapping) and value:
            flat |= _flat(value, name)
        else:
            flat[name] = value
    return flat


def _same(a: Any, b: Any) -> bool:
    """Equal values; tuples and lists alike; two existing paths to the same file alike."""
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str) and Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return False


def _changeable(key: str, allowed: Iterable[str]) -> bool:
    return any(key == a or key.startswith(f"{a}.") for a in allowed)


def _refused(key: str) -> bool:
    """A ``model.*``/``data.*`` key not in :data:`CHANGEABLE`, or a :data:`FIXED_CONFIG` key."""
    shaping = key.split(".")[0] in ("model", "data") and not _changeable(key, CHANGEABLE)
    return shaping or _changeable(key, FIXED_CONFIG)


def compare_settings(
    path: str | Path,
    checkpoint: Mapping[str, Any],
    model_hparams: Mapping[str, Any],
    data_hparams: Mapping[str, Any] | None,
    config: Mapping[str, Any] | None = None,
) -> list[str]:
    """Each setting that differs from the checkpoint's, as ``"key old -> new"``.

    Args:
        path: The checkpoint (for the message).
        checkpoint: Its contents (:func:`read_checkpoint`).
        model_hparams: The hyperparameters of the model this command built.
        data_hparams: Those of its datamodule, if any.
        config: This command's resolved config, compared with the ``config.yaml`` beside the
            checkpoint's ``checkpoints/`` folder when there is one (the interrupted run's).

    Returns:
        The allowed differences (:data:`CHANGEABLE`), for the caller to print.

    Raises:
        UsageError: Listing every difference in a setting that shapes the adapter, the data
            or the optimization, with both values.
    """
    from lit_cats.cli import migrate_hparams  # the checkpoint's keys in today's shape

    old = _flat(migrate_hparams(checkpoint.get("hyper_parameters") or {}), "model")
    new = _flat(dict(model_hparams), "model")
    if data_hparams is not None:
        old |= _flat(checkpoint.get("datamodule_hyper_parameters") or {}, "data")
        new |= _flat(dict(data_hparams), "data")
    saved = Path(path).parent.parent / "config.yaml"
    if config is not None and saved.is_file():
        before = yaml.safe_load(saved.read_text()) or {}
        for section, values in before.items():
            if section in _NOT_SETTINGS or not isinstance(values, Mapping):
                continue
            if section in ("model", "data"):  # the checkpoint's hyperparameters say those
                values = {k: v for k, v in values.items() if k in ("optimizer", "scheduler")}
            now = config.get(section) or {}
            old |= _flat(values, section)
            new |= {k: v for k, v in _flat(now, section).items() if k.split(".")[1] in values}
    keys = old.keys() & new.keys() | {k for k in old | new if _changeable(k, FIXED_CONFIG)}
    diffs = {
        key: (old.get(key, "(unset)"), new.get(key, "(unset)"))
        for key in sorted(keys)
        if not _same(old.get(key), new.get(key))
    }
    refused = [k for k in diffs if _refused(k)]
    if refused:
        listed = "; ".join(f"{k}: {_show(diffs[k][0])} in the checkpoint, {_show(diffs[k][1])} now"
                           for k in refused)  # fmt: skip
        raise UsageError(
            f"--ckpt_path {str(path)!r} was trained with other settings than this command's: "
            f"{listed}. A resumed run must keep what shapes the adapter, the data and the "
            "optimization. Resume with the checkpoint's values, or start a new run without "
            "--ckpt_path to train with the new ones."
        )
    return [f"{k} {_show(diffs[k][0])} -> {_show(diffs[k][1])}" for k in diffs]


def _show(value: Any) -> str:
    """A value as YAML writes it on one line (``true``, ``null``, ``[qkv_proj, o_proj]``)."""
    if isinstance(value, str):
        return value
    try:
        dumped = yaml.safe_dump(value, default_flow_style=True, width=1000)
    except yaml.YAMLError:  # not plain data (an object in a live config)
        return str(value)
    return dumped.removesuffix("\n").removesuffix("\n...").strip()


# ------------------------------------------------------------------------------ progress
def resumed_step(checkpoint: Mapping[str, Any]) -> int:
    """The optimizer steps the checkpoint's run had taken: the first step the resumed run logs."""
    return int(checkpoint.get("global_step", 0))


def finished_epochs(checkpoint: Mapping[str, Any]) -> int:
    """Epochs the checkpoint's run had trained through to their last batch."""
    loop = (checkpoint.get("loops") or {}).get("fit_loop") or {}
    epochs = loop.get("epoch_progress", {}).get("current", {})
    processed, started = int(epochs.get("processed", 0)), int(epochs.get("ready", 0))
    # Saved at an epoch's last batch (on_train_batch_end), Lightning has not yet counted that
    # epoch as processed; saved at the epoch's end (on_train_epoch_end), it has.
    last_batch = bool(loop.get("epoch_loop.batch_progress", {}).get("is_last_batch"))
    return processed + int(last_batch and processed < started)


def nothing_left(
    path: str | Path, checkpoint: Mapping[str, Any], max_steps: int, max_epochs: int | None
) -> str | None:
    """Why the checkpoint's run is already as long as this command asks, or ``None``."""
    step, epochs = resumed_step(checkpoint), finished_epochs(checkpoint)
    if max_steps is not None and max_steps >= 0 and step >= max_steps:
        return (
            f"--ckpt_path {str(path)!r} is at step {step}, and trainer.max_steps is {max_steps}: "
            "there is nothing left to train, so nothing was trained or saved. To train longer, "
            f"raise --trainer.max_steps above {step}."
        )
    if max_epochs is not None and max_epochs >= 0 and epochs >= max_epochs:
        return (
            f"--ckpt_path {str(path)!r} has trained {epochs} epoch(s), and trainer.max_epochs is "
            f"{max_epochs}: there is nothing left to train, so nothing was trained or saved. To "
            f"train longer, raise --trainer.max_epochs above {epochs}."
        )
    return None


# ------------------------------------------------------------------------------ where
def continued_version(
    path: str | Path, checkpoint: Mapping[str, Any], root: str | Path
) -> str | None:
    """The run folder (``version_N``) a resumed run continues in, or ``None`` for a new one.

    The checkpoint's own folder when it lies in ``root/version_*/checkpoints/`` and no readable
    checkpoint beside it is further along: resuming there overwrites nothing the interrupted
    run had saved and had not reached again.
    """
    path = Path(path).resolve()
    folder = path.parent
    run = folder.parent
    if folder.name != "checkpoints" or not run.name.startswith("version_"):
        return None
    if run.parent != Path(root).resolve():
        return None
    step = resumed_step(checkpoint)
    for other in folder.glob("*.ckpt"):
        saved = _readable(other) if other.resolve() != path else None
        if saved is not None and resumed_step(saved) > step:
            return None
    return run.name


def prepare_resume(
    trainer: Any,
    model_hparams: Mapping[str, Any],
    data_hparams: Mapping[str, Any] | None,
    ckpt_path: str | Path,
    config: Mapping[str, Any] | None = None,
) -> Path:
    """Check a ``fit --ckpt_path`` before anything loads, and point the logger at the run folder.

    ``last`` is resolved (:func:`find_last`); the file must be readable, its settings this
    command's (:func:`compare_settings`, allowed differences printed) and its run not already
    as long as asked (:func:`nothing_left`). The logger then continues the interrupted run's
    folder and curve where that applies (:func:`continued_version`).

    Args:
        trainer: The Trainer about to fit (its logger not yet written to).
        model_hparams: The hyperparameters of the model it will fit.
        data_hparams: Those of the datamodule, if any.
        ckpt_path: ``"last"`` or a checkpoint file.
        config: This command's resolved config (its sections as dicts).

    Returns:
        The checkpoint file to resume from.

    Raises:
        UsageError: For any of the problems above, naming the file and what to do.
    """
    from lit_cats.logger import CatsTensorBoardLogger

    root = experiment_dir(trainer)
    path = find_last(root) if str(ckpt_path) == "last" else Path(ckpt_path)
    checkpoint = read_checkpoint(path)
    changed = compare_settings(path, checkpoint, model_hparams, data_hparams, config)
    reason = nothing_left(path, checkpoint, trainer.max_steps, trainer.max_epochs)
    if reason:
        raise UsageError(reason)
    step = resumed_step(checkpoint)
    version = continued_version(path, checkpoint, root)
    where = "a new run folder"
    if version is not None and isinstance(trainer.logger, CatsTensorBoardLogger):
        trainer.logger.resume(version, step)
        where = f"its run folder {version}"
        # Lightning warns that the folder's checkpoints/ is not empty: here that is the point.
        folder = re.escape(str(Path(version, "checkpoints")))
        warnings.filterwarnings(
            "ignore", f"Checkpoint directory .*{folder} exists and is not empty"
        )
    rank_zero_info(f"Resuming {path} at step {step}, in {where}.")
    if changed:
        rank_zero_info("Resuming with changed: " + "; ".join(changed))
    return path
