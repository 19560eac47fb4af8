"""Loading a base model (4-bit or not) with a trained adapter for generation and merging.

An adapter is named by a folder holding ``adapter_config.json``, a run folder holding
``adapter/``, a Hub id, or ``"latest"``: the newest adapter a ``fit`` wrote under a logs folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel
from transformers import PreTrainedModel

from lit_cats.errors import InvalidSetting, MissingFile
from lit_cats.locations import hub_errors, looks_like_path, newest_match
from lit_cats.recipe import load_base, parse_dtype

#: The adapter name that means "the newest adapter a fit wrote".
LATEST = "latest"
#: Where a fit saves its adapter (inside the run folder), and the file that marks an adapter.
ADAPTER_DIRNAME = "adapter"
ADAPTER_CONFIG = "adapter_config.json"


def find_latest_adapter(root: str | Path) -> Path:
    """The most recently written ``adapter/`` folder under ``root`` (any run, any version).

    Raises:
        FileNotFoundError: If ``root`` holds no adapter, with what to do instead.
    """
    found = newest_match(root, f"**/{ADAPTER_DIRNAME}/{ADAPTER_CONFIG}")
    if found is None:
        raise MissingFile(
            f"adapter 'latest': no adapter folder under {str(root)!r}, so no finished fit to "
            "load. Run `lit-cats fit` first (with the same logger settings), or pass an "
            "adapter folder, run folder or Hub id as --model.adapter (null for the base alone)."
        )
    return found.parent


def resolve_adapter(adapter: str, search_root: str | Path = "logs") -> str:
    """Turn an adapter reference into a folder path or a Hub id.

    Args:
        adapter: ``"latest"``, an adapter folder, a run folder holding ``adapter/``, or a Hub id.
        search_root: Where ``"latest"`` looks (a logger's experiment folder, or ``logs``).

    Raises:
        FileNotFoundError: For ``"latest"`` with no adapter, or a path without an adapter.
    """
    if adapter == LATEST:
        return str(find_latest_adapter(search_root))
    path = Path(adapter).expanduser()
    for candidate in (path, path / ADAPTER_DIRNAME):
        if (candidate / ADAPTER_CONFIG).is_file():
            return str(candidate)
    if path.exists() or looks_like_path(adapter):
        raise MissingFile(
            f"Adapter {adapter!r}: {'no' if not path.exists() else 'no adapter_config.json in'} "
            f"such folder. Pass a folder saved by `lit-cats fit` (logs/<name>/version_N/adapter, "
            f"or the run folder above it), a Hub id, or {LATEST!r}."
        )
    return adapter  # a Hub id: peft downloads it (or finds it in the cache)


def apply_adapter(base: PreTrainedModel, adapter: str, dtype: str | None = "bfloat16") -> PeftModel:
    """Put a trained LoRA adapter on ``base`` for inference (not merged).

    The adapter weights are cast to ``dtype``: training keeps them in fp32, which would make
    every LoRA matmul cast its input and output at each generated token. ``None`` keeps the
    saved dtype (merging computes the update in fp32 and rounds once). peft's own
    ``autocast_adapter_dtype`` only upcasts (to fp32), hence the cast below.

    Raises:
        ValueError: If the adapter was trained on a model of another shape or architecture.
    """
    hint = "pass the adapter's local folder"
    try:
        with hub_errors("adapter", adapter, hint):
            model = PeftModel.from_pretrained(base, adapter, autocast_adapter_dtype=False)
    except (RuntimeError, ValueError) as exc:
        if "size mismatch" not in str(exc) and "not found in the base model" not in str(exc):
            raise
        trained_on = adapter_base_model(adapter) or "another model"
        raise InvalidSetting(
            f"Adapter {adapter!r} does not fit the base model {base.name_or_path!r}: it was "
            f"trained on {trained_on!r}, a model of another shape "
            f"({str(exc).strip().splitlines()[-1][:200]}). Load it on the base it was trained "
            "on (--model.model_name_or_path)."
        ) from exc
    if dtype is not None:
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(parse_dtype(dtype))
    return model.eval()


def adapter_base_model(adapter: str) -> str | None:
    """The base model an adapter folder says it was trained on (None if it does not say).

    Plain JSON rather than ``peft.PeftConfig.from_pretrained``: one key is needed, and peft would
    build and check the whole config (and download it for a Hub id).
    """
    config = Path(adapter) / ADAPTER_CONFIG
    if not config.is_file():
        return None
    return json.loads(config.read_text()).get("base_model_name_or_path") or None


def load_for_inference(
    base: str,
    adapter: str | None = None,
    load_in_4bit: bool = True,
    dtype: str = "bfloat16",
    device: str | torch.device = "cpu",
    **base_kwargs: object,
) -> PreTrainedModel | PeftModel:
    """A base model (4-bit by default) with an optional adapter, ready for :func:`generate`.

    Example::

        model = load_for_inference("microsoft/Phi-3-mini-4k-instruct", "logs/phi3-cats/version_0")

    Args:
        base: The base model (Hub id or folder), or a merged model folder with ``adapter=None``.
        adapter: An adapter reference (see :func:`resolve_adapter`), or None for the base alone.
        load_in_4bit: Quantize the base to 4 bits (as the adapter was trained).
        dtype: Compute dtype (and dtype of everything not quantized).
        device: Where the model goes.
        **base_kwargs: More arguments of :func:`load_base`.
    """
    resolved = resolve_adapter(adapter) if adapter is not None else None
    model = load_base(base, load_in_4bit, dtype, device=device, **base_kwargs)  # type: ignore[arg-type]
    return apply_adapter(model, resolved, dtype) if resolved is not None else model
