"""A merged Phi-3 transformers folder as one GGUF file, written in Python with the ``gguf`` package.

The conversion follows llama.cpp's own converter for ``Phi3ForCausalLM`` (``convert_hf_to_gguf.py``,
class ``Phi3MiniModel``, as vendored by llama-cpp-python 0.3.36): the same ``phi3.*`` keys, the
same tensor names (from ``gguf.TensorNameMap``: fused ``attn_qkv`` and fused gate+up ``ffn_up``),
norms and 1-D tensors in float32, every other weight in the chosen type. It uses only the ``gguf``
package (pinned in pyproject's ``export`` extra), so exporting needs no llama.cpp checkout, no C++
toolchain and no network; the weights are converted one tensor at a time, so memory holds one
tensor, not the model.

Two tokenizer kinds, as llama.cpp reads them:
- SentencePiece (Phi-3's ``tokenizer.model``): the ``llama`` vocabulary with pieces, scores and
  types, read with the ``sentencepiece`` package exactly as llama.cpp's Phi-3 converter does.
- Byte-level BPE with GPT-2's pre-tokenizer (the tiny offline model): the ``gpt2`` vocabulary with
  its merges and ``tokenizer.ggml.pre = "gpt-2"``. llama.cpp's converter recognises a known
  tokenizer by hashing how it splits a test text, which only works for published vocabularies;
  here the pre-tokenizer is read from ``tokenizer.json`` instead (a plain ``ByteLevel`` with
  GPT-2's regular expression and no normalizer is exactly llama.cpp's ``gpt-2`` pre-tokenizer).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lit_cats.errors import UsageError

#: Model types this exporter converts: their transformers class and llama.cpp architecture.
SUPPORTED_MODEL_TYPES = {"phi3": ("Phi3ForCausalLM", gguf.MODEL_ARCH.PHI3)}

#: ``--dtype`` choices: the type of every weight matrix, and the file type recorded for it.
#: Norms and other 1-D tensors stay float32 (llama.cpp's converter does the same).
FILE_TYPES = {
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}

#: The pre-tokenizer of a byte-level BPE tokenizer that llama.cpp implements as ``gpt-2``.
GPT2_PRE_TOKENIZER = {"type": "ByteLevel", "use_regex": True, "add_prefix_space": False}


def check_architecture(config: dict[str, Any], where: str) -> gguf.MODEL_ARCH:
    """The llama.cpp architecture of a model config, or a :class:`UsageError` saying why not.

    Args:
        config: The model's ``config.json`` as a dict.
        where: The model's name, for the message.
    """
    model_type = config.get("model_type")
    cls, arch = SUPPORTED_MODEL_TYPES.get(model_type, (None, None))
    architectures = config.get("architectures") or [cls]  # a config saved alone may not say
    if arch is not None and architectures == [cls]:
        return arch
    supported = ", ".join(cls for cls, _ in SUPPORTED_MODEL_TYPES.values())
    raise UsageError(
        f"{where} is a {', '.join(map(str, architectures))} (model_type {model_type!r}); "
        f"lit-cats export converts {supported} only. For another architecture, merge with "
        "`lit-cats merge` and convert the merged folder with llama.cpp's convert_hf_to_gguf.py."
    )


def write_gguf(
    model_dir: Path, path: Path, dtype: str, name: str, end_token_id: int | None = None
) -> None:
    """Convert the transformers model in ``model_dir`` to a GGUF file at ``path``.

    Args:
        model_dir: A folder with ``config.json``, safetensors weights and the tokenizer.
        path: The GGUF file to write.
        dtype: ``bf16``, ``f16`` or ``q8_0`` (see :data:`FILE_TYPES`).
        name: ``general.name`` of the file.
        end_token_id: The token that ends an assistant turn (``<|end|>`` for Phi-3), recorded as
            the end-of-turn id so llama.cpp stops there.

    Raises:
        UsageError: For an unsupported architecture, tokenizer or tensor.
    """
    config = json.loads((model_dir / "config.json").read_text())
    arch = check_architecture(config, str(model_dir))
    weight_type, file_type = FILE_TYPES[dtype]
    tensors = list(_plan_tensors(model_dir, arch, config["num_hidden_layers"], weight_type))
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    _add_phi3_parameters(writer, config)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_vocab(writer, model_dir, config["vocab_size"], end_token_id)
    for tensor in tensors:
        writer.add_tensor_info(tensor.name, tensor.byte_shape, np.dtype(np.uint8), tensor.nbytes,
                               raw_dtype=tensor.qtype)  # fmt: skip
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in tensors:
        writer.write_tensor_data(tensor.load())
    writer.close()


def _add_phi3_parameters(writer: gguf.GGUFWriter, config: dict[str, Any]) -> None:
    """``Phi3MiniModel.set_gguf_parameters`` of llama.cpp's converter."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("long_factor") or rope.get("rope_type", "default") not in ("default", None):
        raise UsageError(
            f"This model uses {rope.get('rope_type')!r} rope scaling (a long-context Phi-3); "
            "lit-cats export writes the default rope only. Convert the `lit-cats merge` output "
            "with llama.cpp's convert_hf_to_gguf.py."
        )
    n_embd, n_head = config["hidden_size"], config["num_attention_heads"]
    rotary = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    context = config["max_position_embeddings"]
    writer.add_context_length(context)
    writer.add_rope_scaling_orig_ctx_len(config.get("original_max_position_embeddings", context))
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads") or n_head)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_dimension_count(int(rotary * n_embd) // n_head)
    writer.add_rope_freq_base(theta)
    # llama.cpp reads 0 as "no sliding window" (Phi-4); Phi-3-mini attends over 2047 tokens.
    writer.add_sliding_window(config.get("sliding_window") or 0)


# ---------------------------------------------------------------------------------- tensors
@dataclass
class _Tensor:
    """One tensor of the output: its GGUF name and type, and how to load and convert it."""

    name: str
    qtype: gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    file: Path
    key: str

    @property
    def byte_shape(self) -> tuple[int, ...]:
        return gguf.quant_shape_to_byte_shape(self.shape, self.qtype)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.byte_shape))

    def load(self) -> np.ndarray:
        """The tensor in its GGUF type, as raw bytes (bf16 goes through float32 exactly)."""
        with safe_open(self.file, framework="pt") as f:
            data = f.get_tensor(self.key).to(torch.float32).numpy()
        return gguf.quants.quantize(data, self.qtype).view(np.uint8)


def _weight_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UsageError(f"{model_dir} holds no .safetensors weights to convert.")
    return files


def _plan_tensors(
    model_dir: Path, arch: gguf.MODEL_ARCH, n_layers: int, weight_type: gguf.GGMLQuantizationType
) -> Iterator[_Tensor]:
    """Every tensor of the model with its GGUF name and type, without loading any weights."""
    names = gguf.get_tensor_name_map(arch, n_layers)
    for file in _weight_files(model_dir):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if key.endswith(".rotary_emb.inv_freq"):
                    continue  # recomputed from the rope settings, as llama.cpp's converter does
                name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise UsageError(
                        f"Tensor {key!r} of {model_dir} has no place in a llama.cpp "
                        f"{gguf.MODEL_ARCH_NAMES[arch]} model, so it cannot be exported. Was the "
                        "adapter trained with extra modules (modules_to_save) on a changed model?"
                    )
                shape = tuple(f.get_slice(key).get_shape())
                yield _Tensor(name, _tensor_type(name, shape, weight_type), shape, file, key)


def _tensor_type(
    name: str, shape: tuple[int, ...], weight_type: gguf.GGMLQuantizationType
) -> gguf.GGMLQuantizationType:
    """llama.cpp's converter's choice: 1-D tensors and norms in float32; a matrix whose rows do
    not split into whole quantization blocks in float16; every other one in ``weight_type``."""
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return gguf.GGMLQuantizationType.F32
    block, _ = gguf.GGML_QUANT_SIZES[weight_type]
    return weight_type if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


# ---------------------------------------------------------------------------------- vocabulary
def _add_vocab(
    writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int, end_token_id: int | None
) -> None:
    """Tokens, their types (and scores or merges), special ids, BOS/EOS use and chat template."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    if (model_dir / "tokenizer.model").is_file():
        _add_sentencepiece_vocab(writer, model_dir, vocab_size)
        writer.add_add_space_prefix(_space_after_special_tokens(tokenizer))
        special = gguf.SpecialVocab(model_dir, n_vocab=vocab_size)
    elif _is_gpt2_byte_level(spec):
        _add_gpt2_vocab(writer, tokenizer, vocab_size)
        special = gguf.SpecialVocab(model_dir, load_merges=True)
    else:
        raise UsageError(
            f"The tokenizer in {model_dir} is neither SentencePiece (no tokenizer.model) nor a "
            f"byte-level BPE with GPT-2's pre-tokenizer (its pre-tokenizer: "
            f"{json.dumps(spec.get('pre_tokenizer'))[:200]}; normalizer: "
            f"{json.dumps(spec.get('normalizer'))[:100]}). Put the base model's tokenizer.model "
            "next to the merged weights, or convert them with llama.cpp's convert_hf_to_gguf.py."
        )
    # What the tokenizer does, not what its config claims: llama.cpp adds BOS/EOS by these flags.
    probe = tokenizer("a")["input_ids"]
    special.add_special_token["bos"] = bool(probe) and probe[0] == tokenizer.bos_token_id
    special.add_special_token["eos"] = bool(probe) and probe[-1] == tokenizer.eos_token_id
    if end_token_id is not None:
        special.special_token_ids["eot"] = end_token_id
    if special.chat_template is None and tokenizer.chat_template:
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)


def _space_after_special_tokens(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer starts the text after a special token with a word boundary (``▁``).

    llama.cpp's SentencePiece tokenizer does so after every special token and at the start when
    ``add_space_prefix`` is on, and never when it is off. The original Phi-3 ``tokenizer.json``
    did (its normalizer prepends ``▁`` to each text between special tokens); transformers 5's
    Llama tokenizer prepends only at the very start. Chat prompts start with a special token,
    so following the text after one makes llama.cpp encode chats as training did.
    """
    special = tokenizer.eos_token or tokenizer.all_special_tokens[0]
    ids = tokenizer(f"{special}a", add_special_tokens=False)["input_ids"]
    return tokenizer.convert_ids_to_tokens(ids[1]).startswith("\u2581")


def _is_gpt2_byte_level(spec: dict[str, Any]) -> bool:
    pre = spec.get("pre_tokenizer") or {}
    return (
        spec.get("model", {}).get("type") == "BPE"
        and spec.get("normalizer") is None
        and all(pre.get(key) == value for key, value in GPT2_PRE_TOKENIZER.items())
    )


def _add_gpt2_vocab(
    writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerBase, vocab_size: int
) -> None:
    """``get_vocab_base`` of llama.cpp's converter: every id up to the embedding's row count,
    added special tokens as CONTROL, rows without a token as UNUSED ``[PAD<id>]``."""
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(
                gguf.TokenType.CONTROL
                if added[i].special or _looks_special(added[i].content)
                else gguf.TokenType.USER_DEFINED
            )
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)


def _looks_special(text: str) -> bool:
    """``does_token_look_special`` of llama.cpp's converter, for the ``<|...|>`` family."""
    return text.startswith("<|") and text.endswith("|>")


def _add_sentencepiece_vocab(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int) -> None:
    """``Phi3MiniModel.set_vocab`` of llama.cpp's converter: the SentencePiece pieces with their
    scores and types, then the added tokens of ``tokenizer.json`` (CONTROL when special)."""
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError as exc:
        raise UsageError(
            "This model's tokenizer is SentencePiece; reading it needs the sentencepiece "
            "package: pip install 'lit-cats[export]'."
        ) from exc
    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(model_dir / "tokenizer.model"))
    types = gguf.TokenType
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    kinds = [types.UNUSED] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        tokens[i], scores[i] = sp.IdToPiece(i).encode(), sp.GetScore(i)
        kinds[i] = (
            types.UNKNOWN if sp.IsUnknown(i)
            else types.CONTROL if sp.IsControl(i)
            else types.UNUSED if sp.IsUnused(i)
            else types.BYTE if sp.IsByte(i)
            else types.NORMAL
        )  # fmt: skip
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    for added in spec.get("added_tokens", []):
        i = int(added["id"])
        if i < vocab_size:
            tokens[i], scores[i] = added["content"].encode(), -1000.0
            kinds[i] = types.CONTROL if added.get("special") else types.USER_DEFINED
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(kinds)
