"""The ``lit-cats`` command: LightningCLI for fit/validate/predict, plus helper commands."""

from __future__ import annotations

import difflib
import importlib
import re
import sys
import warnings
from argparse import ArgumentError
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
from lit_cats.callbacks.failed_run import FailedRunFolder
from lit_cats.callbacks.rng_state import RNGState
from lit_cats.data.datamodule import CatsDataModule
from lit_cats.errors import UsageError, reported
from lit_cats.fast.settings import LEGACY_KEYS
from lit_cats.hub import push_run
from lit_cats.inference.merge import merge_adapter
from lit_cats.inference.module import AdapterModule
from lit_cats.locations import experiment_dir
from lit_cats.logger import CatsTensorBoardLogger
from lit_cats.model import QLoRAModule
from lit_cats.plan import PlanSettings
from lit_cats.plan.command import check_before_fit, plan_command
from lit_cats.resume import find_last, prepare_resume, read_checkpoint
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
        parser.add_class_arguments(PlanSettings, "plan")  # lit-cats plan; fit's check at start

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's Trainer commands but ``test``: lit-cats splits data into train and
        validation only, so ``Trainer.test`` would have nothing to run (``main`` says so)."""
        commands = dict(LightningCLI.subcommands())
        commands.pop("test")
        return commands

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        """Lightning's subcommands with a one-line help each, then the helper commands, so
        ``lit-cats --help`` lists every command. ``main`` runs the helpers before this parser."""
        for subcommand in self.subcommands().keys() & COMMANDS.keys():
            kwargs.setdefault(subcommand, {}).setdefault("description", COMMANDS[subcommand])
        super()._add_subcommands(parser, **kwargs)
        subcommands = parser._subcommands_action
        for choice in subcommands._choices_actions:
            choice.help = COMMANDS.get(choice.dest, choice.help)
        for name in [*_helper_commands(), *MODEL_COMMANDS, "plan"]:
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
        """Save random-number state in checkpoints; check a ``--ckpt_path`` before the model loads.

        Lightning checkpoints no generator state, so a resumed run would draw other dropout
        masks (:class:`~lit_cats.callbacks.RNGState`). Lightning looks for ``last`` only in the
        new run's own (empty) checkpoint folder and silently restarts when there is none; we
        take the newest ``last.ckpt`` of this experiment's run folders instead, and refuse an
        unreadable file, other settings, or a run with nothing left to train
        (:func:`lit_cats.resume.prepare_resume`, which also points the logger at the run's
        folder).
        """
        if not any(isinstance(c, RNGState) for c in self.trainer.callbacks):
            self.trainer.callbacks.append(RNGState())
        check_before_fit(self)  # print the plan; refuse a run it says cannot fit the GPU
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") is not None:
            # As SaveConfigCallback writes config.yaml, so both sides read alike.
            parser = self._parser(self.subcommand)
            settings = yaml.safe_load(parser.dump(self.config[self.subcommand], skip_none=False))
            data = self.datamodule.hparams if self.datamodule is not None else None
            path = prepare_resume(
                self.trainer, self.model.hparams, data, config["ckpt_path"], settings
            )
            config["ckpt_path"] = str(path)

    def _parse_ckpt_path(self) -> None:
        """``fit``: nothing (the command line and config decide; :meth:`before_fit` compares
        them with the checkpoint's). Elsewhere: the checkpoint's model settings, as Lightning
        reads them, after migrating old keys, and an unreadable file is a usage error.

        Lightning's own method (private; no public hook parses the checkpoint's
        hyperparameters) loads them over the command line, so ``fit --ckpt_path FILE --model.r
        8`` would train with the checkpoint's ``r`` and say nothing; it would also reject
        checkpoints written before ``model.speed`` existed.
        """
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if subcommand == "fit" or not ckpt_path or ckpt_path in ("last", "best", "hpc"):
            return  # Lightning resolves those names itself (validate)
        checkpoint = read_checkpoint(ckpt_path)
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
            "predict/validate; fit trains a new adapter. Drop them (or the predict config), "
            "or resume a run with --ckpt_path."
        )
    return None


#: Model keys of predict/validate only (:class:`~lit_cats.inference.module.AdapterModule`).
INFERENCE_KEYS = ("adapter", "generation")


def find_last_checkpoint(trainer: Trainer) -> Path:
    """What ``--ckpt_path last`` resumes: the newest ``last.ckpt`` of the experiment's run
    folders (``version_*/checkpoints/``), or the newest readable checkpoint there if that one
    is unreadable (:func:`lit_cats.resume.find_last`).

    Raises:
        UsageError: If there is none, with where it looked and what to do.
    """
    return find_last(experiment_dir(trainer))


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
    "predict": "Answer prompts with a trained adapter.",
    "merge": "Fold an adapter into its base; save a bf16 model.",
    "push": "Push a run folder's adapter to the Hugging Face Hub.",
    "tiny": "Build the offline tiny model; print its folder.",
    "plan": "Predict a fit's GPU memory, steps and time.",
    "export": "Export an adapter to GGUF + Ollama Modelfile.",
    "chat": "Talk to a trained adapter in the terminal.",
    "serve": "Serve an adapter with the OpenAI chat API.",
}


def _helper_commands() -> dict[str, Callable[..., None]]:
    """Commands that are not Trainer entry points, each a typed function."""
    from lit_cats.export import export_adapter  # imports gguf: only when a command is run

    return {
        "merge": merge_adapter,
        "push": push_run,
        "tiny": build_tiny,
        "export": export_adapter,
    }


#: Commands that load a trained model taking predict's configs; each is
#: ``lit_cats.inference.<name>.run_<name>(argv)``, imported on use (serve needs litserve).
MODEL_COMMANDS = ("chat", "serve")


def _model_command(name: str) -> Callable[[list[str]], None]:
    """The ``run_<name>(argv)`` function of a :data:`MODEL_COMMANDS` command."""
    return getattr(importlib.import_module(f"lit_cats.inference.{name}"), f"run_{name}")


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
    if argv and argv[0] in MODEL_COMMANDS:
        _model_command(argv[0])(argv[1:])
        return
    if argv and argv[0] == "plan":  # fit's parser; nothing is built (lit_cats.plan.command)
        plan_command(CatsCLI, argv[1:])
        return
    helpers = _helper_commands()
    if argv and argv[0] in helpers:
        run_helper(argv[0], helpers[argv[0]], argv[1:])
        return
    if argv and argv[0] == "test":
        raise UsageError(
            "lit-cats has no test command: the data is split into train and validation only. "
            "Score an adapter or checkpoint with `lit-cats validate` (same options)."
        )
    subcommand = next((a for a in argv if a in ("fit", "validate", "predict")), "fit")
    mistake = usage_error(argv, subcommand)
    if mistake:  # before anything is parsed or built
        raise UsageError(mistake)
    run_folder = FailedRunFolder()
    try:
        ReportingCLI(
            QLoRAModule if subcommand == "fit" else AdapterModule,
            CatsDataModule,
            args=argv,
            seed_everything_default=42,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,  # the module's injected optimizer/scheduler decide
            # Parsing errors raise (ReportingCLI adds "did you mean"), rather than printing the
            # whole usage and exiting.
            parser_kwargs={"prog": "lit-cats", "description": _DESCRIPTION, "exit_on_error": False},
            trainer_defaults={
                "precision": "bf16-mixed",
                # Lightning's summary counts the 4-bit weights as packed bytes (and bf16 as
                # float32), so its numbers disagree with the start report's, lit-cats' own.
                "enable_model_summary": False,
                "logger": lazy_instance(
                    CatsTensorBoardLogger, save_dir="logs", name="lit-cats", default_hp_metric=False
                ),
                "callbacks": [run_folder],
            },
        )
    except BaseException:
        run_folder.remove_if_worthless()
        raise


def run_helper(name: str, function: Callable[..., None], argv: list[str]) -> None:
    """Run a helper command (``merge``, ``push``, ``tiny``) through jsonargparse's ``auto_cli``,
    with a parsing mistake reported as a :class:`UsageError` (plus "did you mean")."""
    try:
        auto_cli(function, args=argv, prog=f"lit-cats {name}", exit_on_error=False)
    except ArgumentError as exc:
        parser = ArgumentParser(exit_on_error=False)
        parser.add_function_arguments(function, as_positional=True)
        raise UsageError(explain_parse_error(str(exc), _options(parser), name)) from exc


class ReportingCLI(CatsCLI):
    """:class:`CatsCLI` whose parsing mistakes raise a :class:`UsageError` naming the closest
    known option ("did you mean"): jsonargparse (4.53) has no suggestions of its own, and
    argparse's ``suggest_on_error`` (Python 3.14) covers only choices."""

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        try:
            with warnings.catch_warnings():
                # main passes the console's own argv (less --debug) as args, which Lightning
                # takes for a mix-up of args and sys.argv and warns about on every command.
                warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
                super().parse_arguments(parser, args)
        except ArgumentError as exc:
            argv = list(args or [])
            subcommand = next((a for a in argv if a in self.subcommands()), None)
            subparsers = parser._subcommands_action._name_parser_map
            options = _options(subparsers.get(subcommand, parser))
            raise UsageError(explain_parse_error(str(exc), options, subcommand)) from exc


def _options(parser: ArgumentParser) -> list[str]:
    """Every ``--option`` a parser knows, nested ones (``--model.speed.compile``) included."""
    return [s for a in parser._actions for s in a.option_strings if s.startswith("--")]


def explain_parse_error(message: str, options: Sequence[str], command: str | None) -> str:
    """jsonargparse's parse error with a "did you mean" line per unknown option or config key.

    Args:
        message: jsonargparse's message (``unrecognized arguments: --model.rr 3``, ``Subcommand
            'fit' does not accept option 'model.rr'``, ``invalid choice: 'fti' (choose ...)``).
        options: The options the command knows (``--model.r``, ...).
        command: The command, for the ``--help`` hint.
    """
    lines = [message.strip()]
    flags = re.findall(r"(?<![\w-])--[\w.-]+", message.split("unrecognized arguments:")[-1])
    if "unrecognized arguments:" not in message:
        flags = []
    keys = re.findall(r"does not accept option '([\w.-]+)'", message)
    for unknown, spelled in [(f, f) for f in flags] + [("--" + k, k) for k in keys]:
        candidates = [o for o in options if not unknown.startswith(o + ".")]  # not --model
        close = difflib.get_close_matches(unknown, candidates, n=3, cutoff=0.75)
        if close:
            names = [c if spelled.startswith("--") else c[2:] for c in close]
            lines.append(f"  {spelled}: did you mean {' or '.join(names)}?")
    choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if choice:
        known = re.findall(r"'([^']*)'", choice.group(2))
        close = difflib.get_close_matches(choice.group(1), known, n=1, cutoff=0.5)
        if close:
            lines.append(f"  did you mean '{close[0]}'?")
    lines.append(f"See 'lit-cats {command + ' ' if command else ''}--help' for what it takes.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
