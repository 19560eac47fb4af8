"""``lit-cats export``: an adapter merged, converted to GGUF, and wrapped in an Ollama Modelfile.

The merge is ``lit-cats merge`` itself (bf16 base, its parity check), into a temporary folder
that is removed afterwards; the GGUF is written by :mod:`lit_cats.export.gguf` and the Modelfile
by :mod:`lit_cats.export.modelfile`. Every refusal (an architecture the converter does not know,
an adapter that cannot be merged, files already there) happens before anything is written.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from lit_cats.errors import UsageError
from lit_cats.export.gguf import FILE_TYPES, check_architecture, write_gguf
from lit_cats.export.modelfile import ChatTurns, chat_turns, modelfile, ollama_template
from lit_cats.inference.adapters import ADAPTER_DIRNAME, adapter_base_model, resolve_adapter
from lit_cats.inference.generation import GenerationSettings, stop_token_ids
from lit_cats.inference.merge import MergeReport, merge_adapter
from lit_cats.recipe import resolve_pretrained

#: The Modelfile's name: ``ollama create NAME -f <folder>/Modelfile``.
MODELFILE = "Modelfile"


@dataclass
class ExportReport:
    """What ``export`` wrote.

    Attributes:
        gguf_file: The GGUF model.
        modelfile: The Ollama Modelfile next to it.
        ollama_name: The model name the printed ``ollama create`` command uses.
        merge: The merge's parity check.
    """

    gguf_file: Path
    modelfile: Path
    ollama_name: str
    merge: MergeReport


def export_adapter(
    adapter: str = "latest",
    output_dir: str | None = None,
    dtype: Literal["bf16", "f16", "q8_0"] = "bf16",
    base: str | None = None,
    overwrite: bool = False,
    device: str = "auto",
    tolerance: float = 0.02,
) -> ExportReport:
    """Merge an adapter into its bf16 base and export it for llama.cpp and Ollama.

    Writes ``model-<dtype>.gguf`` and an Ollama ``Modelfile`` (the tokenizer's chat template as
    ``TEMPLATE``, a ``PARAMETER stop`` per stop token, predict's sampling), and prints the
    ``ollama create`` and ``llama-cli`` commands that use them. Smaller quantizations (q4_K_M)
    are llama.cpp's ``llama-quantize`` or ``ollama create -q``'s job (see the README).

    Args:
        adapter: ``latest`` (newest adapter under ./logs), an adapter or run folder, or a Hub id.
        output_dir: Where to write; default ``gguf/`` next to a local adapter's folder.
        dtype: Type of the weight matrices: ``bf16`` (the merged weights, exactly), ``f16``
            (for llama.cpp backends without bf16) or ``q8_0`` (8-bit, about half the size).
        base: Base model; default the one recorded in the adapter's config.
        overwrite: Replace a GGUF file or Modelfile already in ``output_dir``.
        device: Where the merge runs: ``auto`` (a GPU if there is one), ``cpu`` or ``cuda``.
        tolerance: Largest loss difference the merge's check allows (nats).

    Raises:
        UsageError: For an adapter that is missing or cannot be merged, a base the converter
            does not support, or output files that exist (without ``overwrite``).
    """
    if dtype not in FILE_TYPES:  # the CLI checks the choice; a Python caller may not
        raise UsageError(f"dtype must be one of {', '.join(FILE_TYPES)}, not {dtype!r}.")
    try:
        resolved = resolve_adapter(adapter)
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from exc
    check_mergeable(resolved)
    base = base or adapter_base_model(resolved)
    if base is None:
        raise UsageError(f"Adapter {resolved!r} does not name its base model; pass --base.")
    check_base(base)
    out = _output_dir(resolved, output_dir)
    gguf_file, model_file = out / f"model-{dtype}.gguf", out / MODELFILE
    existing = [str(p) for p in (gguf_file, model_file) if p.exists()]
    if existing and not overwrite:
        raise UsageError(
            f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}. Pass "
            "--overwrite to replace them, or --output_dir for another folder."
        )
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    name = ollama_name(resolved)
    try:
        merge = _merge_and_convert(resolved, base, gguf_file, model_file, dtype, name,
                                   device, tolerance)  # fmt: skip
    except BaseException:
        if created and not any(out.iterdir()):  # a refusal or failure leaves nothing behind
            out.rmdir()
        raise
    report = ExportReport(gguf_file, model_file, name, merge)
    print(_summary(report, dtype))
    return report


def _merge_and_convert(
    adapter: str,
    base: str,
    gguf_file: Path,
    model_file: Path,
    dtype: str,
    name: str,
    device: str,
    tolerance: float,
) -> MergeReport:
    """Merge into a temporary folder next to the output, write the GGUF and the Modelfile."""
    with tempfile.TemporaryDirectory(prefix=".export-", dir=gguf_file.parent) as tmp:
        merged_dir = Path(tmp) / "merged"
        # merge prints its own summary, whose predict command names this temporary folder.
        with contextlib.redirect_stdout(io.StringIO()):
            merge = merge_adapter(
                adapter=adapter, output_dir=str(merged_dir), base=base, dtype="bfloat16",
                device=device, tolerance=tolerance,
            )  # fmt: skip
        _copy_sentencepiece_model(base, merged_dir)
        tokenizer = AutoTokenizer.from_pretrained(merged_dir)
        generation = SimpleNamespace(generation_config=GenerationConfig.from_pretrained(merged_dir))
        stops = stop_token_ids(generation, tokenizer)  # type: ignore[arg-type]
        turns = chat_turns(tokenizer)
        config = json.loads((merged_dir / "config.json").read_text())
        text = modelfile(
            gguf_file.name,
            ollama_template(turns),
            [tokenizer.convert_ids_to_tokens(i) for i in stops],
            GenerationSettings(),
            config.get("max_position_embeddings"),
            header=f"lit-cats export: {adapter} merged into {base}, weights {dtype}.\n"
            f"ollama create {name} -f {model_file}",
        )
        partial = Path(tmp) / gguf_file.name  # renamed into place once complete
        end = _end_token(turns, tokenizer, stops)
        write_gguf(merged_dir, partial, dtype, name, end_token_id=end)
        os.replace(partial, gguf_file)
    model_file.write_text(text)
    return merge


def check_mergeable(adapter: str) -> None:
    """Refuse an adapter whose weights cannot be folded into the base (prompt tuning, prefix
    tuning and other methods that add inputs rather than change weights)."""
    config = PeftConfig.from_pretrained(adapter)
    tuner = PEFT_TYPE_TO_TUNER_MAPPING.get(config.peft_type)
    if config.is_prompt_learning or not hasattr(tuner, "merge_and_unload"):
        raise UsageError(
            f"Adapter {adapter!r} is a {config.peft_type} adapter, which adds inputs or modules "
            "at run time instead of changing weights, so it cannot be merged into the base and "
            "exported. Export a LoRA adapter (what `lit-cats fit` trains)."
        )


def check_base(base: str) -> None:
    """Refuse a base model whose architecture the converter does not support."""
    try:
        path = resolve_pretrained(base)
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from exc
    check_architecture(AutoConfig.from_pretrained(path).to_dict(), base)


def ollama_name(adapter: str) -> str:
    """A model name for ``ollama create``: the run (``tiny-cats-version-0``) or the Hub id."""
    path = Path(adapter).resolve() if Path(adapter).is_dir() else Path(adapter)
    parts = path.parent.parts[-2:] if path.name == ADAPTER_DIRNAME else path.parts[-2:]
    return re.sub(r"[^a-z0-9.-]+", "-", "-".join(parts).lower()).strip("-.") or "lit-cats"


def _output_dir(adapter: str, output_dir: str | None) -> Path:
    if output_dir is not None:
        return Path(output_dir).expanduser()
    if not Path(adapter).is_dir():
        raise UsageError(f"Adapter {adapter!r} is a Hub id: pass --output_dir for the export.")
    return Path(adapter).parent / "gguf"


def _copy_sentencepiece_model(base: str, merged_dir: Path) -> None:
    """Put the base's ``tokenizer.model`` next to the merged weights, if it has one.

    llama.cpp reads a SentencePiece vocabulary (Phi-3's) from that file, with its scores;
    ``save_pretrained`` of a transformers 5 tokenizer writes only ``tokenizer.json``.
    """
    target = merged_dir / "tokenizer.model"
    if target.exists():
        return
    local = Path(resolve_pretrained(base))
    if local.is_dir():
        if (local / "tokenizer.model").is_file():
            shutil.copyfile(local / "tokenizer.model", target)
        return
    with contextlib.suppress(EntryNotFoundError):  # a Hub base without one: BPE, or no file
        shutil.copyfile(hf_hub_download(base, "tokenizer.model"), target)


def _end_token(
    turns: ChatTurns, tokenizer: PreTrainedTokenizerBase, stops: list[int]
) -> int | None:
    """The stop token that ends an answer in the chat template (``<|end|>`` for Phi-3)."""
    for i in stops:
        if turns.assistant[1].startswith(tokenizer.convert_ids_to_tokens(i)):
            return i
    return None


def _summary(report: ExportReport, dtype: str) -> str:
    merge, size = report.merge, report.gguf_file.stat().st_size / 2**20
    sampling = GenerationSettings()  # predict's defaults, as the Modelfile's parameters
    smaller = (
        f"llama-quantize {report.gguf_file} {report.gguf_file.with_name('model-q4_K_M.gguf')} "
        f"Q4_K_M   (or: ollama create {report.ollama_name} -q q4_K_M -f {report.modelfile})"
        if dtype in ("bf16", "f16")
        else "export with --dtype f16 first, then llama-quantize it to Q4_K_M (quantizing the "
        f"{dtype} file again loses more)"
    )
    return (
        f"Exported {merge.adapter} merged into {merge.base} -> {report.gguf_file} ({dtype}, "
        f"{size:,.1f} MiB)\n"
        f"  merge check: loss adapter-on-base {merge.loss_adapter:.5f}, merged "
        f"{merge.loss_merged:.5f} (|diff| {merge.loss_diff:.2e})\n"
        f"  Ollama:    ollama create {report.ollama_name} -f {report.modelfile}\n"
        f"             ollama run {report.ollama_name}\n"
        f"  llama.cpp: llama-cli -m {report.gguf_file} -cnv --temp {sampling.temperature} "
        f"--top-p {sampling.top_p} --top-k {sampling.top_k} -n {sampling.max_new_tokens}\n"
        f"  smaller:   {smaller}"
    )
