"""The QLoRA recipe: 4-bit and LoRA configs, the target check, base and tokenizer loading."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lit_cats.errors import InvalidSetting, MissingDependency, MissingFile
from lit_cats.locations import hub_errors, looks_like_path
from lit_cats.tiny import TINY_MODEL_ID, resolve_model_path

#: Modules that never get an adapter: the output head (peft's ``all-linear`` skips it too).
_EXCLUDED_LINEARS = ("lm_head",)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_dtype(name: str) -> torch.dtype:
    """Turn a config string such as ``"bfloat16"`` into a ``torch.dtype``, with a clear error."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise InvalidSetting(
            f"Unknown dtype {name!r}; expected one of {sorted(_DTYPES)}."
        ) from None


def require_bitsandbytes() -> None:
    """Fail early, with the fix, when 4-bit loading cannot work on this machine."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MissingDependency(
            "load_in_4bit=true needs the 'bitsandbytes' package, which is not installed. "
            "Install it (pip install 'bitsandbytes>=0.48'; it runs NF4 on CPU and CUDA), or "
            "train without quantization with --model.load_in_4bit false."
        )


def build_bnb_config(
    quant_type: str = "nf4", double_quant: bool = True, compute_dtype: str = "bfloat16"
) -> BitsAndBytesConfig:
    """The QLoRA quantization recipe (Dettmers et al., 2023): NF4 weights, quantized scales.

    Args:
        quant_type: ``"nf4"`` (normal-float, the QLoRA paper's choice) or ``"fp4"``.
        double_quant: Also quantize the per-block scales (~0.4 bit/param saved).
        compute_dtype: dtype the 4-bit weights are dequantized to for matmuls.
    """
    if quant_type not in ("nf4", "fp4"):
        raise InvalidSetting(f"bnb_4bit_quant_type must be 'nf4' or 'fp4', got {quant_type!r}.")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=parse_dtype(compute_dtype),
    )


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct leaf names of the model's linear layers (4-bit ones included), sorted.

    For Phi-3 this is ``['down_proj', 'gate_up_proj', 'o_proj', 'qkv_proj']``: the attention
    and MLP input projections are fused, so ``q_proj``/``gate_proj``-style names do not exist.
    """
    names = set()
    for full_name, module in model.named_modules():
        leaf = full_name.rsplit(".", 1)[-1]
        # bitsandbytes' Linear4bit subclasses nn.Linear, so one isinstance covers both.
        if isinstance(module, nn.Linear) and leaf not in _EXCLUDED_LINEARS:
            names.add(leaf)
    return sorted(names)


def resolve_target_modules(model: nn.Module, target_modules: str | Sequence[str]) -> list[str]:
    """Check every requested LoRA target exists in ``model`` and return the concrete list.

    peft silently ignores requested names that match nothing as long as one name matches, which
    is how the original script trained only 2 of its 7 targets on Phi-3. We refuse instead.

    Args:
        model: The base model, before LoRA is applied.
        target_modules: ``"all-linear"`` or leaf names of linear layers.

    Raises:
        ValueError: If a requested name matches no linear layer; the message lists the real ones.
    """
    available = linear_module_names(model)
    if target_modules == "all-linear":
        return available
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    missing = [name for name in target_modules if name not in available]
    if missing or not target_modules:
        raise InvalidSetting(
            f"LoRA target_modules {missing or list(target_modules)} match no linear layer of "
            f"this model. Its linear layers are {available} (Phi-3 fuses q/k/v into 'qkv_proj' "
            "and gate/up into 'gate_up_proj'). Use names from that list, or 'all-linear'."
        )
    return list(target_modules)


def keep_cpu_4bit_weights_trainable(model: nn.Module) -> int:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference; returns layers changed.

    On CPUs with AVX512-BF16, bitsandbytes (0.48-0.50) repacks a ``Linear4bit`` weight in place
    the first time the layer runs in eval mode without grad (Lightning's sanity check or any
    validation), and from then on multiplies with ``gemv_4bit``, which has no autograd kernel:
    training after a validation pass silently drops the gradient through every frozen 4-bit
    matmul (torch warns "an autograd kernel was not registered"). GPUs are unaffected.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def build_lora_config(
    target_modules: Sequence[str], r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.05
) -> LoraConfig:
    """LoRA (Hu et al., 2021) on the given, already-checked module names."""
    if r <= 0:
        raise InvalidSetting(f"LoRA rank r must be a positive integer, got {r}.")
    if not 0.0 <= lora_dropout < 1.0:
        raise InvalidSetting(f"lora_dropout must be in [0, 1), got {lora_dropout}.")
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=list(target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


# ------------------------------------------------------------------------------ loading
def resolve_pretrained(name_or_path: str) -> str:
    """Resolve the reserved tiny model, and reject local paths that do not exist.

    Raises:
        FileNotFoundError: For a path-like name with nothing at that path.
    """
    if name_or_path == TINY_MODEL_ID:
        return resolve_model_path(name_or_path)
    if looks_like_path(name_or_path) and not Path(name_or_path).expanduser().exists():
        raise MissingFile(
            f"Model path {name_or_path!r} does not exist. Pass an existing folder saved with "
            f"save_pretrained, a Hub id such as 'microsoft/Phi-3-mini-4k-instruct', or "
            f"{TINY_MODEL_ID!r} for the offline tiny model."
        )
    return str(Path(name_or_path).expanduser()) if looks_like_path(name_or_path) else name_or_path


def load_base(
    name_or_path: str,
    load_in_4bit: bool = True,
    dtype: str = "bfloat16",
    bnb_4bit_quant_type: str = "nf4",
    bnb_4bit_use_double_quant: bool = True,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = "sdpa",
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Load a causal LM for inference, in eval mode, on ``device``.

    Nothing is upcast to fp32 here (training's ``prepare_model_for_kbit_training`` does that
    on top): norms, embeddings and the head stay in ``dtype``, the fast choice. The whole model
    goes to ``device``: each process of a data-parallel job loads its own copy, where
    ``device_map="auto"`` would shard one copy over every GPU and silently turn data
    parallelism off (trl#921).

    Args:
        name_or_path: Hub id, local folder, or the reserved tiny model's name.
        load_in_4bit: Quantize to NF4/FP4 with bitsandbytes; ``dtype`` is then the compute dtype.
        dtype: ``"bfloat16"``, ``"float16"`` or ``"float32"``.
        bnb_4bit_quant_type: ``"nf4"`` or ``"fp4"`` (4-bit only).
        bnb_4bit_use_double_quant: Quantize the scales too (4-bit only).
        device: Where the weights go.
        attn_implementation: transformers attention backend.
        trust_remote_code: Run modelling code from the Hub repo (off: Phi-3 needs none).
    """
    kwargs: dict = {
        "dtype": parse_dtype(dtype),
        "attn_implementation": attn_implementation,
        "trust_remote_code": trust_remote_code,
        "device_map": {"": str(device)},
    }
    if load_in_4bit:
        require_bitsandbytes()
        kwargs["quantization_config"] = build_bnb_config(
            bnb_4bit_quant_type, bnb_4bit_use_double_quant, dtype
        )
    hint = "pass a local folder saved with save_pretrained instead of the Hub id"
    with hub_errors("model", name_or_path, hint):
        model = AutoModelForCausalLM.from_pretrained(resolve_pretrained(name_or_path), **kwargs)
    if name_or_path == TINY_MODEL_ID:
        # Recorded as the base of every adapter trained on it (peft reads name_or_path): the
        # reserved name, which resolves on any machine, not this machine's cache folder.
        model.config.name_or_path = model.name_or_path = TINY_MODEL_ID
    return model.eval()


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a model, resolving the tiny model and explaining Hub failures."""
    path = resolve_pretrained(name_or_path)
    with hub_errors("tokenizer", name_or_path, "pass a local model folder as the model name"):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        # Standard for causal LMs; harmless because labels are masked by position, not by id.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
