"""The ``lit-cats`` command: LightningCLI for fit/validate/test/predict, plus helper commands."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import ArgumentParser, auto_cli, lazy_instance
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_warn

from lit_cats.callbacks import (
    GenerationSamples,
    HubPushCallback,
    PredictionWriter,
    RunProgress,
    RunSummary,
)
from lit_cats.data.datamodule import CatsDataModule
from lit_cats.errors import reported
from lit_cats.fast.settings import LEGACY_KEYS
from lit_cats.hub import push_run
from lit_cats.inference.merge import merge_adapter
from lit_cats.inference.module import AdapterModule
from lit_cats.locations import experiment_dir, newest_match
from lit_cats.logger import CatsTensorBoardLogger
from lit_cats.model import QLoRAModule
from lit_cats.tiny import tiny_model_path


class CatsCLI(LightningCLI):
    """LightningCLI with the tokenizer linked to the model, run-aware ``--ckpt_path last``, a
    ``checkpoint:`` section, and the helper commands listed with the Trainer's."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.model_name_or_path", "data.tokenizer_name_or_path")
        parser.link_arguments("model.trust_remote_code", "data.trust_remote_code")
        # Top-level sections rather than entries of trainer.callbacks, so a stacked config can
        # change one key (`hub.dry_run_dir`) without restating the whole callback list.
        parser.add_lightning_class_args(HubPushCallback, "hub")
        parser.add_lightning_class_args(GenerationSamples, "samples")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        """Lightning's subcommands with a one-line help each, then the helper commands, so
        ``lit-cats --help`` lists every command. ``main`` runs the helpers before this parser."""
        for subcommand in self.subcommands().keys() & COMMANDS.keys():
            kwargs.setdefault(subcommand, {}).setdefault("description", COMMANDS[subcommand])
        super()._add_subcommands(parser, **kwargs)
        subcommands = parser._subcommands_action
        for choice in subcommands._choices_actions:
            choice.help = COMMANDS.get(choice.dest, choice.help)
        for name in _helper_commands():
            helper = ArgumentParser(description=f"{COMMANDS[name]} See 'lit-cats {name} --help'.")
            subcommands.add_subcommand(name, helper, help=COMMANDS[name])

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer, with TF32 tensor-core matmuls on CUDA (``high`` float32 precision).

        A user's own choice (anything but torch's default ``highest``) is kept. On GPUs without
        tensor cores, ``high`` changes nothing. Decided from the accelerator, not by asking the
        GPU, so the CUDA runtime is not started before Lightning forks any worker.
        """
        trainer = super().instantiate_trainer(**kwargs)
        use_tensor_cores(trainer)
        return trainer

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        """Lightning's, with the ``checkpoint:`` section's ModelCheckpoint added only when
        checkpointing is on and ``trainer.callbacks`` has no ModelCheckpoint of its own (two
        would both write ``last.ckpt``; Lightning adds a default one only when none is given)."""
        section = self.config_init[self.subcommand].get("checkpoint") if self.subcommand else None
        if section is not None and section in callbacks:
            own = [c for c in config.get("callbacks") or [] if isinstance(c, ModelCheckpoint)]
            if config.get("enable_checkpointing") is False:
                callbacks = [c for c in callbacks if c is not section]
            elif own:
                rank_zero_warn(
                    "trainer.callbacks has a ModelCheckpoint, so the `checkpoint:` section is not "
                    "used. Move its settings to `checkpoint:` (e.g. --checkpoint."
                    "every_n_train_steps) and drop it from trainer.callbacks."
                )
                callbacks = [c for c in callbacks if c is not section]
        callbacks = [*callbacks, *self._progress(config, callbacks)]
        return super()._instantiate_trainer(config, callbacks)

    def _progress(self, config: dict[str, Any], callbacks: list[Callback]) -> list[Callback]:
        """lit-cats' progress display (unless off or the user chose another) and, for ``fit``,
        the end summary, which names this run's ``--config`` files in its predict command."""
        added: list[Callback] = []
        given = [*callbacks, *(config.get("callbacks") or [])]
        given += self.trainer_defaults.get("callbacks", [])
        if config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in given
        ):
            added.append(RunProgress())
        if self.subcommand == "fit":
            configs = self.config[self.subcommand].get("config") or []
            added.append(RunSummary([str(c) for c in configs]))
        return added

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
            return  # nothing to read (Lightning's own method returns here too)
        checkpoint = torch.load(ckpt_path, weights_only=True, map_location="cpu")
        hparams = migrate_hparams(checkpoint.get("hyper_parameters", {}))
        hparams.pop("_instantiator", None)
        if hparams:
            self.config = self.parser.parse_object(
                {self.config.subcommand: {"model": hparams}}, self.config
            )


def use_tensor_cores(trainer: Trainer) -> None:
    """On CUDA, let float32 matmuls use TF32 tensor cores unless the user chose a precision.

    lit-cats trains in bf16 autocast; what stays float32 (LoRA weights, norms, head) loses
    nothing that matters with TF32. This is also what Lightning's hint at every start asks for.
    """
    chosen = torch.get_float32_matmul_precision() != "highest"  # torch's default: no choice
    if isinstance(trainer.accelerator, CUDAAccelerator) and not chosen:
        torch.set_float32_matmul_precision("high")


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
    "QLoRA fine-tuning of causal language models with Lightning. "
    "'lit-cats COMMAND --help' shows a command's options."
)

#: One line of help per command, as ``lit-cats --help`` lists them (at most 56 characters, so
#: each fits one line of an 80-column terminal).
COMMANDS = {
    "fit": "Train a LoRA adapter on a 4-bit base (QLoRA).",
    "validate": "Score an adapter or checkpoint on the validation set.",
    "test": "Score an adapter or checkpoint on the test set.",
    "predict": "Answer prompts with a trained adapter.",
    "merge": "Fold an adapter into its base; save a bf16 model.",
    "push": "Push a run folder's adapter to the Hugging Face Hub.",
    "tiny": "Build the offline tiny model; print its folder.",
}


def _helper_commands() -> dict[str, Callable[..., None]]:
    """Commands that are not Trainer entry points, each a typed function."""
    return {"merge": merge_adapter, "push": push_run, "tiny": build_tiny}


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``lit-cats`` console script (returns None, as console scripts must).

    Args:
        args: Command-line arguments; ``None`` reads ``sys.argv``.
    """
    argv = list(sys.argv[1:] if args is None else args)
    with reported(argv):
        _main(argv)


def _main(argv: list[str]) -> None:
    """:func:`main` inside the usage-error report (see :mod:`lit_cats.errors`)."""
    if "--debug" in argv:  # read by lit_cats.errors; not an option of any command
        argv = [a for a in argv if a != "--debug"]
    helpers = _helper_commands()
    if argv and argv[0] in helpers:
        auto_cli(helpers[argv[0]], args=argv[1:], prog=f"lit-cats {argv[0]}")
        return
    subcommand = next((a for a in argv if a in ("fit", "validate", "test", "predict")), "fit")
    mistake = usage_error(argv, subcommand)
    if mistake:  # a usage error, as jsonargparse's own: status 2, no traceback
        print(f"error: {mistake}", file=sys.stderr)
        sys.exit(2)
    CatsCLI(
        QLoRAModule if subcommand == "fit" else AdapterModule,
        CatsDataModule,
        args=argv,
        seed_everything_default=42,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,  # the module's injected optimizer/scheduler decide
        parser_kwargs={"prog": "lit-cats", "description": _DESCRIPTION},
        trainer_defaults={
            "precision": "bf16-mixed",
            # Lightning's summary counts the 4-bit weights as packed bytes (and bf16 as float32),
            # so its numbers disagree with the start report's, which are lit-cats' own.
            "enable_model_summary": False,
            "logger": lazy_instance(
                CatsTensorBoardLogger, save_dir="logs", name="lit-cats", default_hp_metric=False
            ),
        },
    )


if __name__ == "__main__":
    main()
