"""``lit-cats merge``: fold a LoRA adapter into its base, reloaded in bf16, and check the result.

Merging into the 4-bit weights would re-quantize ``W + BA`` and lose quality (peft#2321,
transformers#31293), so the base is reloaded unquantized. The merged folder is a plain
transformers model (safetensors, tokenizer, generation config with every stop id) that
``AutoModelForCausalLM.from_pretrained`` loads, and that ``lit-cats predict`` serves without peft:
no LoRA glue at each generated token, no dequantization.

The check: the loss and logits of adapter-on-base and of the merged model *as reloaded from
disk*, on a few examples of a dataset, must agree within a tolerance.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from lit_cats.assets import SHIPPED_DATASET_ID
from lit_cats.data.collate import collate
from lit_cats.data.datamodule import load_raw_dataset
from lit_cats.data.formatting import (
    detect_format,
    format_columns,
    tokenize_row,
    validate_column,
)
from lit_cats.errors import InvalidSetting
from lit_cats.inference.adapters import adapter_base_model, apply_adapter, resolve_adapter
from lit_cats.inference.vllm import warn_unless_vllm_servable
from lit_cats.loss import label_token_count
from lit_cats.recipe import load_base, load_tokenizer, parse_dtype

Batches = list[dict[str, torch.Tensor]]


@dataclass
class MergeReport:
    """What ``merge`` wrote and how closely the merged model matches adapter-on-base.

    Attributes:
        output_dir: The merged model folder.
        adapter: The adapter that was merged (resolved path or Hub id).
        base: The base model it was merged into.
        loss_adapter: Per-token loss of adapter-on-base on the check examples.
        loss_merged: The same for the merged model reloaded from ``output_dir``.
        max_logit_diff: Largest absolute logit difference over the check examples.
    """

    output_dir: Path
    adapter: str
    base: str
    loss_adapter: float
    loss_merged: float
    max_logit_diff: float

    @property
    def loss_diff(self) -> float:
        return abs(self.loss_merged - self.loss_adapter)


def merge_adapter(
    adapter: str = "latest",
    output_dir: str | None = None,
    base: str | None = None,
    dtype: str = "bfloat16",
    device: str = "auto",
    check_dataset: str = SHIPPED_DATASET_ID,
    num_check_examples: int = 8,
    tolerance: float = 0.02,
    overwrite: bool = False,
) -> MergeReport:
    """Merge a LoRA adapter into its base (reloaded unquantized) and save a transformers model.

    Checks the saved model: its loss on a few examples must match adapter-on-base's. Prints
    what it wrote, the check, and the ``predict`` command that serves the merged model.

    Args:
        adapter: ``latest`` (newest adapter under ./logs), an adapter or run folder, or a Hub id.
        output_dir: Where to save; default ``merged/`` next to a local adapter's folder.
        base: Base model; default the one recorded in the adapter's config.
        dtype: dtype of the merged weights (``bfloat16``; ``float32`` for an exact check).
        device: ``auto`` (a GPU if there is one), ``cpu`` or ``cuda``.
        check_dataset: Dataset whose first examples check the merge (a lit-cats dataset spec).
        num_check_examples: How many examples the check uses.
        tolerance: Largest allowed difference of the mean per-token loss (nats).
        overwrite: Write into ``output_dir`` even if it is not empty (files of the same name
            are replaced; transformers removes stale weight shards).

    Raises:
        FileNotFoundError: If the adapter cannot be found.
        ValueError: If the adapter does not fit the base, or no base is known.
        RuntimeError: If the merged model's loss differs by more than ``tolerance``.
    """
    resolved = resolve_adapter(adapter)
    base = base or adapter_base_model(resolved)
    if base is None and not Path(resolved).is_dir():
        raise InvalidSetting(
            f"Adapter {resolved!r} is not a folder here, so it was taken for a Hub id, and the "
            "base model is read only from a local adapter_config.json. Pass the adapter's "
            "folder (logs/<name>/version_N, or its adapter/), or --base <model id or folder>."
        )
    if base is None:
        raise InvalidSetting(
            f"Adapter {resolved!r} does not name its base model; pass --base <model id or folder>."
        )
    out = _output_dir(resolved, output_dir)
    warn_unless_vllm_servable(resolved)  # a Hub id or missing folder is not checked
    if not overwrite and out.is_dir() and any(out.iterdir()):
        raise InvalidSetting(
            f"{str(out)!r} is not empty ({_listing(out)}); merging into it would mix two "
            "models' files. Choose another --output_dir, or pass --overwrite true to write "
            "over it."
        )
    if out.exists() and not out.is_dir():
        raise InvalidSetting(f"{str(out)!r} is a file; pass a folder as --output_dir.")
    target = _device(device)
    batches, tokenizer = check_batches(base, check_dataset, num_check_examples)

    # fp32 adapter weights (dtype=None): the update BA is computed in fp32 and rounded once.
    model = apply_adapter(
        load_base(base, load_in_4bit=False, dtype=dtype, device=target), resolved, None
    )
    loss_adapter, logits_adapter = evaluate(model, batches)
    merged = model.merge_and_unload()
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model, merged
    _free_memory()

    reloaded = AutoModelForCausalLM.from_pretrained(
        out, dtype=parse_dtype(dtype), device_map={"": str(target)}
    ).eval()
    loss_merged, logits_merged = evaluate(reloaded, batches)
    diff = max(
        (a - b).abs().max().item() for a, b in zip(logits_adapter, logits_merged, strict=True)
    )
    report = MergeReport(out, resolved, base, loss_adapter, loss_merged, diff)
    if report.loss_diff > tolerance:
        raise RuntimeError(
            f"The merged model at {out} does not match adapter-on-base: loss {loss_merged:.5f} vs "
            f"{loss_adapter:.5f} (|diff| {report.loss_diff:.2e} > tolerance {tolerance}). Do not "
            "use it; check the adapter was trained on this base and merge in float32 "
            "(--dtype float32) to compare."
        )
    print(
        f"Merged {report.adapter} into {report.base} ({dtype}) -> {report.output_dir}\n"
        f"  check on {num_check_examples} examples of {check_dataset}: loss adapter-on-base "
        f"{report.loss_adapter:.5f}, merged {report.loss_merged:.5f} (|diff| "
        f"{report.loss_diff:.2e} <= tolerance {tolerance}); max |logit diff| "
        f"{report.max_logit_diff:.3g}\n"
        f"  predict with it: lit-cats predict --config configs/qlora.yaml --config "
        f"configs/predict.yaml --model.model_name_or_path {report.output_dir} "
        "--model.adapter null --model.load_in_4bit false"
    )
    return report


#: The check tokenizes as ``CatsDataModule``'s defaults do: columns, no loss on the prompt, no
#: padding multiple; only the length is capped (a few short rows suffice for a parity check).
CHECK_COLUMNS = ("text", "messages", "prompt", "response")
CHECK_MAX_SEQ_LENGTH = 256
CHECK_BATCH_SIZE = 4


def check_batches(
    tokenizer_name: str, dataset: str, num_examples: int
) -> tuple[Batches, PreTrainedTokenizerBase]:
    """The first ``num_examples`` rows of ``dataset``, tokenized as training does, in padded
    batches, and the tokenizer that did it (the merged model is saved with it)."""
    if num_examples < 1:
        raise InvalidSetting(f"num_check_examples must be >= 1, got {num_examples}.")
    tokenizer = load_tokenizer(tokenizer_name)
    raw = load_raw_dataset(dataset)
    rows = raw.select(range(min(num_examples, len(raw))))
    fmt = detect_format(rows.column_names, "auto", *CHECK_COLUMNS)
    for column in format_columns(*CHECK_COLUMNS)[fmt]:
        validate_column(rows[column], column, fmt)
    examples = [
        tokenize_row(tokenizer, row, fmt, CHECK_COLUMNS, CHECK_MAX_SEQ_LENGTH) for row in rows
    ]
    batches = [
        collate(examples[i : i + CHECK_BATCH_SIZE], tokenizer.pad_token_id)
        for i in range(0, len(examples), CHECK_BATCH_SIZE)
    ]
    return batches, tokenizer


@torch.inference_mode()
def evaluate(model: torch.nn.Module, batches: Batches) -> tuple[float, list[torch.Tensor]]:
    """Mean per-token loss over the batches, and each batch's logits (fp32, on the CPU).

    Not ``transformers.Trainer.evaluate``: its loss is a mean over batches, not label tokens.
    """
    device = model.get_input_embeddings().weight.device
    total, tokens, all_logits = 0.0, 0, []
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**batch)
        n = int(label_token_count(batch["labels"]))
        total, tokens = total + out.loss.float().item() * n, tokens + n
        all_logits.append(out.logits.float().cpu())
    return total / max(tokens, 1), all_logits


def _output_dir(adapter: str, output_dir: str | None) -> Path:
    if output_dir is not None:
        return Path(output_dir).expanduser()
    local = Path(adapter)
    if not local.is_dir():
        raise InvalidSetting(
            f"Adapter {adapter!r} is a Hub id: pass --output_dir for the merged model."
        )
    return local.parent / "merged"


def _listing(folder: Path, shown: int = 3) -> str:
    """``"holds config.json, model.safetensors and 2 more"``, for messages."""
    names = sorted(p.name for p in folder.iterdir())
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return "holds " + ", ".join(names[:shown]) + more


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _free_memory() -> None:
    """``accelerate.utils.clear_device_cache`` does the same; accelerate is no dependency here."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
