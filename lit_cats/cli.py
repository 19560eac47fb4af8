"""The ``lit-cats`` command: LightningCLI for fit/validate/test/predict, plus helper commands."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from jsonargparse import auto_cli, lazy_instance
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from lit_cats.callbacks import GenerationSamples, HubPushCallback, PredictionWriter
from lit_cats.data import CatsDataModule
from lit_cats.hub import push_run
from lit_cats.loading import experiment_dir, newest_match
from lit_cats.merge import merge_adapter
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
    CatsCLI(
        QLoRAModule,
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
