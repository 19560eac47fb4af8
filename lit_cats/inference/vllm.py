"""Whether vLLM can serve an adapter too (``vllm serve BASE --enable-lora --lora-modules ...``).

vLLM applies LoRA to the linear layers of its Phi-3 (``qkv_proj``, ``o_proj``, ``gate_up_proj``,
``down_proj``), refuses ``modules_to_save`` (fully trained copies of layers), DoRA and biases
trained with the adapter, and does not load LoRA on the embeddings or the output head. An
adapter of the lit-cats recipe passes; these checks catch a changed recipe before a GPU server
does. ``serve`` runs the check; the messages are warnings, since lit-cats itself serves all of
them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lit_cats.inference.adapters import ADAPTER_CONFIG

#: Phi-3's linear layers as vLLM names them; LoRA on them is what vLLM serves.
VLLM_PHI3_LORA_MODULES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
#: vLLM's default ``--max-lora-rank``.
VLLM_DEFAULT_MAX_LORA_RANK = 16


def check_vllm_compatible(adapter_dir: str | Path) -> list[str]:
    """What would stop ``vllm serve --enable-lora`` from loading this adapter on Phi-3.

    Example::

        for problem in check_vllm_compatible("logs/phi3-cats/version_0/adapter"):
            print("warning:", problem)

    Args:
        adapter_dir: A PEFT adapter folder (with ``adapter_config.json``). A Hub id or a folder
            without the file is not checked (empty list).

    Returns:
        One sentence per problem, saying what to change; empty when vLLM can serve it.
    """
    config_file = Path(adapter_dir) / ADAPTER_CONFIG
    if not config_file.is_file():
        return []
    config = json.loads(config_file.read_text())
    where = f"Adapter {str(adapter_dir)!r}"
    problems = []
    if config.get("modules_to_save"):
        problems.append(
            f"{where} trains whole copies of {config['modules_to_save']} (modules_to_save), "
            "which vLLM refuses. Serve it with lit-cats, or merge it (lit-cats merge) and serve "
            "the merged model with vLLM."
        )
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    other = sorted(
        t.rsplit(".", 1)[-1] for t in targets if t.rsplit(".", 1)[-1] not in VLLM_PHI3_LORA_MODULES
    )
    if other:
        problems.append(
            f"{where} adapts {other}, which vLLM's Phi-3 LoRA does not (it adapts "
            f"{', '.join(VLLM_PHI3_LORA_MODULES)}). Train with --model.target_modules all-linear, "
            "or merge it and serve the merged model."
        )
    if config.get("use_dora"):
        problems.append(f"{where} is a DoRA adapter, which vLLM does not serve; merge it first.")
    if config.get("bias", "none") != "none":
        problems.append(
            f"{where} trains biases (bias={config['bias']!r}); vLLM needs --enable-lora-bias."
        )
    rank = int(config.get("r") or 0)
    if rank > VLLM_DEFAULT_MAX_LORA_RANK:
        problems.append(
            f"{where} has rank {rank}; vLLM's default --max-lora-rank is "
            f"{VLLM_DEFAULT_MAX_LORA_RANK}: pass --max-lora-rank {rank} (or more)."
        )
    return problems


def warn_unless_vllm_servable(adapter_dir: str | Path) -> None:
    """Print each of :func:`check_vllm_compatible`'s problems as a ``warning:`` line on stderr
    (``merge``, ``push`` and ``serve`` call it: lit-cats serves any adapter; vLLM may not)."""
    for problem in check_vllm_compatible(adapter_dir):
        print(f"warning: {problem}", file=sys.stderr)
