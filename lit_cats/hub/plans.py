"""Upload plans: which local file goes to which path of the Hub repo.

An :data:`UploadPlan` is what one commit uploads. The plans here lay out a run's files the way
the repo holds them: the adapter and tokenizer at the root with the run's ``config.yaml``, and
the resumable checkpoint under ``last-checkpoint/``. :func:`write_plan` is the dry-run
"upload": it copies a plan into a local folder laid out as the repo would be.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

import yaml

UploadPlan = dict[str, Path]
"""What one commit uploads: path in the repo -> local file."""

CONFIG_FILENAME = "config.yaml"
CARD_FILENAME = "README.md"
CHECKPOINT_FOLDER = "last-checkpoint"
CHECKPOINT_FILENAME = "last.ckpt"


def folder_plan(folder: Path, prefix: str = "") -> UploadPlan:
    """Plan every file under ``folder``, placed under ``prefix`` in the repo."""
    return {
        prefix + p.relative_to(folder).as_posix(): p
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def run_plan(run_dir: Path, adapter_dir: Path) -> UploadPlan:
    """Plan the adapter + tokenizer at the repo root and the run's resolved ``config.yaml``."""
    plan = folder_plan(adapter_dir)
    if (run_dir / CONFIG_FILENAME).is_file():
        plan[CONFIG_FILENAME] = run_dir / CONFIG_FILENAME
    return plan


def checkpoint_plan(adapter_dir: Path, checkpoint: Path, config: Path | None) -> UploadPlan:
    """Plan the resumable ``last-checkpoint/`` folder: adapter, Lightning checkpoint, config."""
    prefix = f"{CHECKPOINT_FOLDER}/"
    plan = folder_plan(adapter_dir, prefix)
    plan[prefix + CHECKPOINT_FILENAME] = checkpoint
    if config is not None and config.is_file():
        plan[prefix + CONFIG_FILENAME] = config
    return plan


def rerun_config(config: Path, dest: Path) -> Path:
    """The run's resolved ``config.yaml`` as a config that reruns it from scratch.

    A resumed run's config holds its ``ckpt_path`` (``last`` or a file), so ``lit-cats fit
    --config config.yaml`` would resume from whatever checkpoint is found instead of training
    anew with the same settings. Returns ``config`` itself when it holds no ``ckpt_path``,
    else a copy written to ``dest`` with ``ckpt_path: null``.
    """
    data = yaml.safe_load(config.read_text()) or {}
    if not isinstance(data, dict) or data.get("ckpt_path") is None:
        return config
    data["ckpt_path"] = None
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(yaml.safe_dump(data, sort_keys=False))
    return dest


def rerun_configs(plan: Mapping[str, Path], folder: Path) -> UploadPlan:
    """``plan`` with every ``config.yaml`` replaced by its :func:`rerun_config`, written under
    ``folder`` (mirroring the path in the repo)."""
    return {
        path: rerun_config(local, folder / path) if Path(path).name == CONFIG_FILENAME else local
        for path, local in plan.items()
    }


def write_plan(plan: Mapping[str, Path], dest: Path) -> None:
    """Copy a plan into ``dest`` laid out as in the repo (the dry-run "upload")."""
    for path_in_repo, local in plan.items():
        target = dest / path_in_repo
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, target)
