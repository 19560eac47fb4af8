"""The ``lit-cats`` command: LightningCLI for fit/validate/test/predict, plus helper commands."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import auto_cli, lazy_instance
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from lit_cats.callbacks import GenerationSamples, HubPushCallback, PredictionWriter
from lit_cats.data.datamodule import CatsDataModule
from lit_cats.fast.settings import LEGACY_KEYS
from lit_cats.hub import push_run
from lit_cats.inference.merge import merge_adapter
from lit_cats.inference.module import AdapterModule
from lit_cats.locations import experiment_dir, newest_match
from lit_cats.model import QLoRAModule
from lit_cats.tiny import tiny_model_path


class CatsCLI(LightningCLI):
    """LightningCLI with the tokenizer linked to the model and run-aware ``--ckpt_path last``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.model_name_or_path", "data.tokenizer_name_or_path")
        parser.link_arguments("model.trust_remote_code", "data.trust_remote_code")
        # Top-level sections rather than entries of trainer.callbacks, so a stacked config can
        # change one key (`hub.dry_run_dir`) without restating the whole callback list.
        parser.add_lightning_class_args(HubPushCallback, "hub")
        parser.add_lightning_class_args(GenerationSamples, "samples")
        parser.add_lightning_class_args(PredictionWriter, "predictions")

    def before_fit(self) -> None:
        """Resolve ``ckpt_path: last`` to the newest ``last.ckpt`` of this experiment.

        Lightning looks for "last" only in the new run's own (empty) checkpoint folder, and
        starts from scratch with a warning when there is none; a resumed run would silently
        restart. We look through every version of the experiment instead, and fail loudly.
        """
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") == "last":
            config["ckpt_path"] = str(find_last_checkpoint(self.trainer))

    def _parse_ckpt_path(self) -> None:
        """Read a checkpoint's hyperparameters as Lightning does, after migrating old keys.

        Lightning's own method (private; no public hook parses the checkpoint's
        hyperparameters) would reject checkpoints written before ``model.speed`` existed.
        """
        ckpt_path = (
            self.config[self.config.subcommand].get("ckpt_path")
            if self.config.get("subcommand")
            else None
        )
        if not ckpt_path or not Path(ckpt_path).is_file():
            return super()._parse_ckpt_path()
        checkpoint = torch.load(ckpt_path, weights_only=True, map_location="cpu")
        hparams = migrate_hparams(checkpoint.get("hyper_parameters", {}))
        hparams.pop("_instantiator", None)
        if hparams:
            self.config = self.parser.parse_object(
                {self.config.subcommand: {"model": hparams}}, self.config
            )


def migrate_hparams(hparams: dict[str, Any]) -> dict[str, Any]:
    """Hyperparameters of an older checkpoint in today's shape: the speed keys that sat directly
    under ``model:`` go under ``model.speed:``; ``fit`` does not take ``adapter``/``generation``."""
    hparams = dict(hparams)
    moved = {key: hparams.pop(key) for key in LEGACY_KEYS if key in hparams}
    if moved:
        hparams["speed"] = {**moved, **(hparams.get("speed") or {})}
    for key in INFERENCE_KEYS:
        if hparams.get(key) is None:
            hparams.pop(key, None)
    return hparams


def _model_keys(argv: Sequence[str]) -> list[tuple[str, str]]:
    """``(where, key)`` for every ``model.*`` key given as a flag or in a ``--config`` file."""
    found = []
    for i, arg in enumerate(argv):
        flag = arg.split("=", 1)[0]
        if flag.startswith("--model."):
            found.append((flag, flag[len("--model.") :]))
        if flag in ("--config", "-c") and i + 1 < len(argv) and Path(argv[i + 1]).is_file():
            model = (yaml.safe_load(Path(argv[i + 1]).read_text()) or {}).get("model") or {}
            found += [(f"{argv[i + 1]}: model.{key}", key) for key in model]
    return found


def usage_error(argv: Sequence[str], subcommand: str) -> str | None:
    """A message for model keys that moved (pre-``model.speed`` names) or that ``fit`` cannot
    take (the adapter to load and how to generate are predict's), before anything is parsed."""
    keys = _model_keys(argv)
    moved = [
        f"{where} -> {'--' if where.startswith('--') else ''}model.speed.{key}"
        for where, key in keys
        if key in LEGACY_KEYS
    ]
    if moved:
        return (
            "The speed and memory settings moved under model.speed (lit-cats 0.2). Rename: "
            + "; ".join(moved)
            + "."
        )
    inference_only = [where for where, key in keys if key.split(".")[0] in INFERENCE_KEYS]
    if subcommand == "fit" and inference_only:
        return (
            f"{', '.join(inference_only)}: the adapter to load and how to generate are for "
            "predict/validate/test; fit trains a new adapter. Drop them (or the predict config), "
            "or resume a run with --ckpt_path."
        )
    return None


#: Model keys of predict/validate/test only (:class:`~lit_cats.inference.module.AdapterModule`).
INFERENCE_KEYS = ("adapter", "generation")


def find_last_checkpoint(trainer: Trainer) -> Path:
    """Newest ``last.ckpt`` under the logger's experiment folder (all versions).

    Raises:
        FileNotFoundError: If there is none, with where it looked and what to do.
    """
    root = experiment_dir(trainer)
    found = newest_match(root, "**/last*.ckpt")
    if found is None:
        raise FileNotFoundError(
            f"--ckpt_path last: no last.ckpt under {str(root)!r}, so there is no run to resume. "
            "Start without --ckpt_path, or pass a checkpoint file's path."
        )
    return found


def build_tiny(cache_dir: str | None = None) -> None:
    """Build (or find cached) the offline tiny Phi-3 model and tokenizer and print the folder.

    Args:
        cache_dir: Parent folder of the cache (default ``$LIT_CATS_CACHE`` or ~/.cache/lit-cats).
    """
    print(tiny_model_path(cache_dir))


_DESCRIPTION = (
    "QLoRA fine-tuning with Lightning (fit, validate, test, predict). Also: "
    "'lit-cats merge --help' (fold an adapter into a bf16 base), "
    "'lit-cats push --help' (push a run folder to the Hub), "
    "'lit-cats tiny' (build the offline tiny model and print its folder)."
)


def _helper_commands() -> dict[str, Callable[..., None]]:
    """Commands that are not Trainer entry points, each a typed function."""
    return {"tiny": build_tiny, "push": push_run, "merge": merge_adapter}


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``lit-cats`` console script (returns None, as console scripts must).

    Args:
        args: Command-line arguments; ``None`` reads ``sys.argv``.
    """
    argv = list(sys.argv[1:] if args is None else args)
    helpers = _helper_commands()
    if argv and argv[0] in helpers:
        auto_cli(helpers[argv[0]], args=argv[1:])
        return
    subcommand = next((a for a in argv if a in ("fit", "validate", "test", "predict")), "fit")
    mistake = usage_error(argv, subcommand)
    if mistake:  # a usage error, as jsonargparse's own: status 2, no traceback
        print(f"error: {mistake}", file=sys.stderr)
        sys.exit(2)
    CatsCLI(
        QLoRAModule if subcommand == "fit" else AdapterModule,
        CatsDataModule,
        args=None if args is None else argv,
        seed_everything_default=42,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,  # the module's injected optimizer/scheduler decide
        parser_kwargs={"description": _DESCRIPTION},
        trainer_defaults={
            "precision": "bf16-mixed",
            "logger": lazy_instance(
                TensorBoardLogger, save_dir="logs", name="lit-cats", default_hp_metric=False
            ),
        },
    )


if __name__ == "__main__":
    main()
