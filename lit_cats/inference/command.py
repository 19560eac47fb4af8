"""The parser of ``lit-cats chat`` and ``lit-cats serve``: predict's, plus the command's options.

Both commands take the training configs as ``predict`` does (``--config configs/qlora.yaml
--config configs/tiny.yaml --model.adapter PATH``), so they parse with the same LightningCLI
(:class:`~lit_cats.cli.CatsCLI` over :class:`~lit_cats.inference.module.AdapterModule` and the
datamodule), built with ``run=False``: no Trainer method runs, the command's own options are
top-level flags (``--port``, ``--transcript``), and ``model.adapter`` defaults to ``latest``.
Chosen over extra LightningCLI subcommands, which would need three private LightningCLI methods
overridden (each subcommand's parser is built from a Trainer method of that name, and the run
looks the method up on the Trainer), and over a second parser, which would restate every key.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jsonargparse import lazy_instance
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.trainer.states import TrainerFn
from transformers import PreTrainedTokenizerBase

from lit_cats.cli import CatsCLI
from lit_cats.data.datamodule import CatsDataModule
from lit_cats.inference.adapters import LATEST, resolve_adapter
from lit_cats.inference.module import AdapterModule
from lit_cats.locations import experiment_dir
from lit_cats.logger import CatsTensorBoardLogger


class ModelCommandCLI(CatsCLI):
    """``CatsCLI`` with one command's options added as top-level flags (see the module doc)."""

    def __init__(self, command: str, options: Callable[..., Any], args: Sequence[str]) -> None:
        self.command, self.options = command, options
        super().__init__(
            AdapterModule,
            CatsDataModule,
            args=list(args),
            run=False,
            seed_everything_default=42,
            auto_configure_optimizers=False,
            parser_kwargs={"prog": f"lit-cats {command}", "description": _summary(options)},
            # The same defaults as the other commands (lit_cats.cli.main).
            trainer_defaults={
                "precision": "bf16-mixed",
                "enable_model_summary": False,
                "logger": lazy_instance(
                    CatsTensorBoardLogger, save_dir="logs", name="lit-cats", default_hp_metric=False
                ),
            },
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_function_arguments(self.options, nested_key=None, as_group=True)
        # Like configs/predict.yaml: the newest adapter of the experiment, the fused LoRA path.
        parser.set_defaults({"model.adapter": LATEST, "model.speed": {"fast_lora": True}})


def _summary(function: Callable[..., Any]) -> str:
    """A docstring's text before its ``Args:`` block (the block lists each flag's help)."""
    return inspect.cleandoc(function.__doc__ or "").split("\n\n")[0]


@dataclass
class LoadedModel:
    """A model ready to generate, with what a command needs to say about it.

    Attributes:
        model: The base with the adapter (or a merged model), in eval mode.
        tokenizer: Its tokenizer.
        description: Which model and adapter these are, for the start-up line.
        adapter: The resolved adapter folder or Hub id; ``None`` for a base or merged model.
        context: Autocast of the Trainer's precision, as ``predict`` generates under.
    """

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    description: str
    adapter: str | None
    context: Callable[[], Any]


def parse(command: str, options: Callable[..., Any], args: Sequence[str]) -> ModelCommandCLI:
    """Parse a command's arguments; the model is not loaded yet (see :func:`load_model`)."""
    with warnings.catch_warnings():
        # ``args`` is sys.argv without the command's name, which LightningCLI warns about.
        warnings.filterwarnings("ignore", "LightningCLI's args parameter", UserWarning)
        return ModelCommandCLI(command, options, args)


def resolved_adapter(cli: ModelCommandCLI) -> str | None:
    """The adapter the command will load (``latest`` made a folder), or None."""
    adapter = cli.model.hparams.adapter
    return None if adapter is None else resolve_adapter(adapter, experiment_dir(cli.trainer))


def describe(cli: ModelCommandCLI, adapter: str | None) -> str:
    """``<base> + adapter <path>``, or ``<model> (no adapter)``, for start-up lines."""
    base = cli.model.hparams.model_name_or_path
    return f"{base} + adapter {adapter}" if adapter else f"{base} (no adapter)"


def load_model(cli: ModelCommandCLI) -> LoadedModel:
    """Load the base and adapter as ``predict`` does, on the Trainer's device."""
    module: AdapterModule = cli.model
    trainer: Trainer = cli.trainer
    module.trainer = trainer
    # AdapterModule loads the trained adapter (not a fresh training one) when predicting.
    trainer.state.fn = TrainerFn.PREDICTING
    module.configure_model()
    model = module.model.eval()
    return LoadedModel(
        model=model,
        tokenizer=module.get_tokenizer(),
        description=describe(cli, module.adapter_path),
        adapter=module.adapter_path,
        context=trainer.precision_plugin.forward_context,
    )
