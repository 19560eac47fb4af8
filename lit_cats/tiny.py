"""A tiny, offline Phi-3-architecture model and tokenizer for demos, tests and CI.

Hub weights cannot be downloaded everywhere (CI, air-gapped clusters), yet the code paths we
care about (``from_pretrained`` with NF4 quantization, peft's LoRA injection on fused Phi-3
projections, the chat template, the multi-EOS generation config) depend on the architecture and
the tokenizer's special tokens, not on the weights' values. So we build a model with Phi-3's exact
module layout and a byte-level BPE tokenizer trained on the shipped cat-meme dataset that carries
Phi-3's special tokens in Phi-3's order and its chat template, and save both with
``save_pretrained`` so the real loading code runs on them.

Reach it from any config with the reserved model name :data:`TINY_MODEL_ID`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from filelock import FileLock
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM, PreTrainedTokenizerFast

from lit_cats.assets import SHIPPED_DATASET, read_jsonl

#: Reserved model name that resolves to the locally built tiny model (never a Hub lookup).
TINY_MODEL_ID = "lit-cats/tiny-phi3"

#: Phi-3-mini-4k-instruct's chat template (transformers' copy of the Hub tokenizer_config).
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# Phi-3 appends these after its 32000-token SentencePiece vocabulary, in this order
# (<|endoftext|> = 32000 ... <|user|> = 32010). We keep the order so relative ids match.
PHI3_ADDED_TOKENS = (
    "<|endoftext|>",
    "<|assistant|>",
    "<|placeholder1|>",
    "<|placeholder2|>",
    "<|placeholder3|>",
    "<|placeholder4|>",
    "<|system|>",
    "<|end|>",
    "<|placeholder5|>",
    "<|placeholder6|>",
    "<|user|>",
)
#: Phi-3's generation config stops on all three of these, not only on the tokenizer's EOS.
PHI3_STOP_TOKENS = ("<|endoftext|>", "<|assistant|>", "<|end|>")


def default_cache_dir() -> Path:
    """Where built artefacts live: ``$LIT_CATS_CACHE`` or ``~/.cache/lit-cats``."""
    return Path(os.environ.get("LIT_CATS_CACHE", Path.home() / ".cache" / "lit-cats"))


def _training_texts() -> list[str]:
    """Every message of the shipped dataset, the corpus the tiny tokenizer is trained on."""
    return [m["content"] for row in read_jsonl(SHIPPED_DATASET) for m in row["messages"]]


def build_tiny_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on the shipped dataset, with Phi-3's special tokens.

    Args:
        vocab_size: Size of the trained vocabulary, before the 11 Phi-3 added tokens.

    Returns:
        A fast tokenizer whose pad token is its EOS (``<|endoftext|>``), as in Phi-3.
    """
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_texts(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        model_max_length=4096,
        padding_side="right",
        chat_template=PHI3_CHAT_TEMPLATE,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(PHI3_ADDED_TOKENS)})
    return tokenizer


def build_tiny_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> Phi3ForCausalLM:
    """A randomly initialised 2-layer, 128-wide Phi-3 whose special token ids match ``tokenizer``.

    The embedding has more rows than the tokenizer has tokens (rounded up to a multiple of 64),
    as in Phi-3 (32064 rows for 32011 tokens): code that resizes embeddings breaks on both.
    """
    vocab = -(-len(tokenizer) // 64) * 64
    config = Phi3Config(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        original_max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        sliding_window=2047,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="silu",
        # Wider than Phi-3's 0.02: at width 128 that would give near-uniform logits, which
        # adapters on a frozen random head can hardly move, and the demo would show no learning.
        initializer_range=0.1,
    )
    # A private RNG state: building (e.g. on first use, mid-run) must not reseed the caller's.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Phi3ForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids(list(PHI3_STOP_TOKENS)),
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def _fingerprint() -> str:
    """Hash of this builder's source and of its corpus: any change to either rebuilds."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(SHIPPED_DATASET.read_bytes())
    return digest.hexdigest()[:12]


def tiny_model_path(cache_dir: str | Path | None = None) -> Path:
    """Build the tiny model and tokenizer once and return the folder holding both.

    Deterministic (fixed seeds, fixed corpus) and cached under a fingerprint of the builder's
    source and the dataset, so every process (and every DDP rank) gets the same files. The
    build writes to a temporary folder and renames it, under a file lock, so concurrent
    callers never see a half-written model.

    Args:
        cache_dir: Parent folder of the cache; defaults to :func:`default_cache_dir`.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"tiny-phi3-{_fingerprint()}"
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").exists():
            return target
        shutil.rmtree(target, ignore_errors=True)  # an incomplete folder from an older build
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tiny-"))
        try:
            tokenizer = build_tiny_tokenizer()
            tokenizer.save_pretrained(tmp)
            _save_model(build_tiny_model(tokenizer), tmp)
            (tmp / "lit_cats.json").write_text(json.dumps({"fingerprint": target.name}))
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _save_model(model: Phi3ForCausalLM, folder: Path) -> None:
    """``save_pretrained``'s files, written on every process.

    Inside a torch.distributed job ``save_pretrained`` writes only on rank 0: a DDP rank that
    built the tiny model first would cache a folder with a tokenizer and no model.
    """
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def resolve_model_path(name_or_path: str) -> str:
    """Map the reserved :data:`TINY_MODEL_ID` to its built folder; pass anything else through."""
    return str(tiny_model_path()) if name_or_path == TINY_MODEL_ID else name_or_path
