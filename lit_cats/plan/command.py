"""``lit-cats plan`` and the check ``fit`` runs before it loads the model.

Both parse the configuration with ``fit``'s own parser (same ``--config`` stacking, links and
defaults), so the plan is of exactly the run ``fit`` would start. ``plan`` instantiates nothing;
``fit`` plans after its classes are built (no weights are loaded then) and before the Trainer
starts, refusing a run predicted not to fit the GPU unless ``--plan.force true``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_cats.errors import UsageError
from lit_cats.plan.planner import Plan, PlanSettings, choice_line, make_plan, refusal

_DESCRIPTION = (
    "Predict a fit's GPU memory, steps and time from the same configs and flags as fit, before "
    "anything loads (only config.json and the dataset's lengths are read)."
)


def plan_command(cli_class: type, args: Sequence[str]) -> Plan:
    """``lit-cats plan --config ...``: parse as ``fit`` does, print the plan, build nothing.

    Args:
        cli_class: The ``fit`` command's LightningCLI class (:class:`lit_cats.cli.CatsCLI`).
        args: The arguments after ``plan``.
    """
    from lit_cats.data.datamodule import CatsDataModule
    from lit_cats.model import QLoRAModule

    class PlanCLI(cli_class):  # type: ignore[misc, valid-type]
        def instantiate_classes(self) -> None:
            """Nothing is built: the plan needs only the parsed settings."""

        def _set_seed(self) -> None:
            """No run, so no seed to set (and no "Seed set" line)."""

    with warnings.catch_warnings():  # Lightning's "args and sys.argv both given": plan's own
        warnings.filterwarnings("ignore", message=".*args parameter is intended")
        cli = PlanCLI(
            QLoRAModule,
            CatsDataModule,
            args=list(args),
            run=False,
            auto_configure_optimizers=False,
            parser_kwargs={"prog": "lit-cats plan", "description": _DESCRIPTION},
        )
    config = cli.config.as_dict()
    settings = PlanSettings(**(config.get("plan") or {}))
    trainer = config.get("trainer") or {}
    name, memory = _detected_gpu(trainer.get("accelerator"))
    plan = make_plan(config, settings, name, memory, ranks=_ranks(trainer, name is not None))
    print("\n".join(plan.lines()))
    if plan.fits is False:
        print("  " + refusal(plan))
    return plan


def _detected_gpu(accelerator: Any) -> tuple[str | None, int | None]:
    """Name and memory (bytes) of CUDA device 0, unless the run is on the CPU or has no GPU."""
    if accelerator == "cpu" or not torch.cuda.is_available():
        return None, None
    props = torch.cuda.get_device_properties(0)
    return props.name, props.total_memory


def _ranks(trainer: dict[str, Any], on_gpu: bool) -> int:
    devices = trainer.get("devices", 1)
    if isinstance(devices, int) and devices > 0:
        count = devices
    elif isinstance(devices, list | tuple):
        count = len(devices)
    else:  # -1 or "auto": every visible GPU
        count = torch.cuda.device_count() if on_gpu else 1
    return max(1, count) * int(trainer.get("num_nodes") or 1)


def check_before_fit(cli: Any) -> Plan | None:
    """Print the run's plan; refuse (``UsageError``) a run predicted not to fit the GPU.

    Also resolves ``model.speed.compile: auto`` and ``gradient_checkpointing: auto`` on the
    model before it is built. On the CPU
    (and without ``--plan.device_memory_gb``) the check is skipped, said in one line.

    Args:
        cli: The ``fit`` LightningCLI after it built its classes (model not yet loaded).
    """
    config = cli.config[cli.subcommand].as_dict()
    settings = PlanSettings(**(config.get("plan") or {}))
    trainer, speed = cli.trainer, getattr(getattr(cli.model, "kit", None), "settings", None)
    on_gpu = isinstance(trainer.accelerator, CUDAAccelerator)
    if not on_gpu and settings.device_memory_gb is None:
        rank_zero_info("lit-cats plan: training on the CPU, so the GPU memory check is skipped.")
        _resolve(speed, "compile", False, "no GPU: compiling costs more than it saves here")
        _resolve(speed, "gradient_checkpointing", True, "no GPU memory to plan against")
        return None
    name, memory = _device(trainer) if on_gpu else (None, None)
    ranks = trainer.num_devices * trainer.num_nodes
    try:
        plan = make_plan(config, settings, name, memory, ranks=ranks)
    except UsageError as exc:  # the load itself will say what is wrong, with its own fix
        rank_zero_info(f"lit-cats plan: skipped ({exc})")
        _resolve(speed, "compile", False, "no plan to decide from")
        _resolve(speed, "gradient_checkpointing", True, "no plan to decide from")
        return None
    rank_zero_info("\n".join(plan.lines()))
    if plan.compile_choice is not None:
        _resolve(speed, "compile", *plan.compile_choice, say=False)
    if plan.checkpointing_choice is not None:
        _resolve(speed, "gradient_checkpointing", *plan.checkpointing_choice, say=False)
    if plan.fits is False:
        if not settings.force:
            raise UsageError(refusal(plan))
        rank_zero_warn("--plan.force true: trying a run the plan predicts will not fit.")
    return plan


def _resolve(speed: Any, setting: str, chosen: bool, why: str, say: bool = True) -> None:
    """Replace ``setting: auto`` (``compile``, ``gradient_checkpointing``) on the model's speed
    settings with the decision, before the model is built."""
    if speed is None or getattr(speed, setting) != "auto":
        return
    setattr(speed, setting, chosen)
    if say:
        rank_zero_info(choice_line(setting, chosen, why))


def _device(trainer: Any) -> tuple[str | None, int | None]:
    """The training GPU's name and memory. Not asked where the strategy forks its workers
    (``ddp_fork``, ``ddp_notebook``): CUDA must not start in the parent before the fork."""
    launcher = getattr(trainer.strategy, "launcher", None)
    if getattr(launcher, "_start_method", None) == "fork":
        return None, None
    props = torch.cuda.get_device_properties(trainer.strategy.root_device)
    return props.name, props.total_memory
