"""GPU memory of a QLoRA training step, from the architecture alone (no weights, no GPU).

Every term is a count of bytes that a tensor of the step holds, written from the model's shape
(hidden size, layers, heads, vocabulary, intermediate size) and the settings that change which
tensors exist (4-bit base, LoRA rank and targets, checkpointing, fp32 copies, chunked loss,
compiled layers, the optimizer). Nothing is fitted: each term's docstring says which tensors it
counts and why. What PyTorch's caching allocator reports as *allocated* is the target
(``torch.cuda.max_memory_allocated``); fragmentation (*reserved*) comes on top.

The peak of a training step is the resident memory (base, adapters, gradients, optimizer
state), plus what the forward keeps for the backward, plus the larger of two transients: the
loss (logits or one chunk of them, with their gradient) at the start of the backward, and one
decoder layer's backward (its recomputed activations under checkpointing, and the gradients in
flight). The two do not overlap: the logits are freed before the first layer's backward starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

GIB = 2**30

#: bitsandbytes' 4-bit block: 64 weights share one absmax scale.
BLOCKSIZE = 64
#: With double quantization the absmax scales are themselves quantized to 8 bits in blocks of
#: 256, each block with an fp32 scale (QLoRA paper, section 3).
DOUBLE_QUANT_BLOCKSIZE = 256
#: bitsandbytes' 4-bit path is taken only by steps of more than this many tokens in compiled
#: layers (:data:`lit_cats.fast.nf4.MAX_TOKENS`); fewer keep the compiler's own dropout.
LARGE_STEP_TOKENS = 2048

#: Phi-3 fuses q/k/v and gate/up; Llama-style models keep them apart.
_FUSED = {"qkv_proj", "gate_up_proj"}


@dataclass(frozen=True)
class Architecture:
    """The shape of a decoder-only transformer, as its ``config.json`` gives it.

    Args:
        hidden_size: Width of the residual stream (h).
        intermediate_size: Width of the MLP's hidden layer (I).
        num_hidden_layers: Decoder layers (L).
        num_attention_heads: Query heads.
        num_key_value_heads: Key/value heads (fewer than query heads with grouped-query attention).
        vocab_size: Rows of the embedding and of the output head (V).
        tie_word_embeddings: Whether the output head shares the embedding's weight.
        fused: Phi-3's fused ``qkv_proj``/``gate_up_proj`` (else Llama's seven projections).
    """

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False
    fused: bool = True

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Architecture:
        """From a ``config.json`` dict (Phi-3, Llama, Mistral, Qwen2 naming)."""
        heads = int(config["num_attention_heads"])
        return cls(
            hidden_size=int(config["hidden_size"]),
            intermediate_size=int(config["intermediate_size"]),
            num_hidden_layers=int(config["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(config.get("num_key_value_heads") or heads),
            vocab_size=int(config["vocab_size"]),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            fused=config.get("model_type") == "phi3",
        )

    @property
    def kv_size(self) -> int:
        """Width of the keys (and of the values): key/value heads x head size."""
        return self.num_key_value_heads * (self.hidden_size // self.num_attention_heads)

    @property
    def qkv_size(self) -> int:
        """Width of the queries, keys and values together."""
        return self.hidden_size + 2 * self.kv_size

    def linears(self) -> dict[str, tuple[int, int]]:
        """``name -> (in_features, out_features)`` of one decoder layer's linear layers."""
        h, i, kv = self.hidden_size, self.intermediate_size, self.kv_size
        if self.fused:
            return {
                "qkv_proj": (h, self.qkv_size),
                "o_proj": (h, h),
                "gate_up_proj": (h, 2 * i),
                "down_proj": (i, h),
            }
        return {
            "q_proj": (h, h),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (h, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def linear_params(self) -> int:
        """Weights of all decoder linear layers: what 4-bit quantization packs."""
        return self.num_hidden_layers * sum(a * b for a, b in self.linears().values())

    def other_params(self) -> int:
        """Embedding, output head (unless tied) and RMSNorm weights (2 per layer + the final)."""
        heads = 1 if self.tie_word_embeddings else 2
        return heads * self.vocab_size * self.hidden_size + (
            (2 * self.num_hidden_layers + 1) * self.hidden_size
        )


@dataclass(frozen=True)
class TrainingShape:
    """What one training step holds, as the settings decide it.

    Args:
        tokens: Tokens in the largest step (packed: the row's length; padded: rows x width).
        r: LoRA rank.
        target_modules: Adapted linear layer names, or ``"all-linear"``.
        lora_dropout: Dropout on the LoRA input.
        load_in_4bit: 4-bit base (else the whole base in bf16).
        double_quant: Quantized quantization scales.
        gradient_checkpointing: Recompute each layer in the backward.
        uncheckpointed_layers: With checkpointing, the last this many layers keep everything.
        upcast_to_fp32: fp32 norms, embeddings and head (``prepare_model_for_kbit_training``).
        loss_chunk_size: Tokens per chunk of the chunked loss; ``None``: full logits.
        compiled: Compiled decoder layers (``model.speed.compile``).
        fast_lora: lit-cats' fused LoRA forward (its seeded dropout keeps no mask).
        keep_dequantized_weights: Every 16-bit copy of the 4-bit weights kept for the backward.
        optimizer_bytes_per_param: Optimizer state per trainable parameter held by PyTorch's
            allocator: 8 for AdamW (two fp32 moments); 0 for bitsandbytes' paged optimizers,
            whose state lives in CUDA unified memory outside PyTorch's allocator.
    """

    tokens: int
    r: int = 16
    target_modules: tuple[str, ...] | str = "all-linear"
    lora_dropout: float = 0.05
    load_in_4bit: bool = True
    double_quant: bool = True
    gradient_checkpointing: bool = True
    uncheckpointed_layers: int = 0
    upcast_to_fp32: bool = True
    loss_chunk_size: int | None = None
    compiled: bool = False
    fast_lora: bool = False
    keep_dequantized_weights: bool = False
    optimizer_bytes_per_param: int = 8


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted bytes of each part of a training step and the peak (all in bytes).

    Args:
        terms: Name -> bytes, in the order they are printed.
        peak: The predicted peak allocated memory.
        lora_params: Trainable LoRA parameters.
    """

    terms: dict[str, int] = field(default_factory=dict)
    peak: int = 0
    lora_params: int = 0

    def gib(self, name: str) -> float:
        return self.terms[name] / GIB


def targets_of(arch: Architecture, target_modules: tuple[str, ...] | str) -> dict[str, tuple]:
    """The adapted linear layers of one decoder layer, ``name -> (in, out)``."""
    linears = arch.linears()
    if target_modules == "all-linear":
        return linears
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    return {n: linears[n] for n in names if n in linears}


def lora_params(arch: Architecture, r: int, target_modules: tuple[str, ...] | str) -> int:
    """LoRA's A (r x in) and B (out x r) for every adapted layer of every decoder layer."""
    per_layer = sum(r * (a + b) for a, b in targets_of(arch, target_modules).values())
    return arch.num_hidden_layers * per_layer


def base_bytes(arch: Architecture, shape: TrainingShape) -> int:
    """The frozen base: packed 4-bit linear weights with their scales, the rest in 16 or 32 bit.

    NF4 packs two weights per byte. Each block of 64 weights has an absmax scale: fp32 (4 bytes)
    without double quantization; with it, one byte, plus an fp32 scale per 256 blocks.
    ``prepare_model_for_kbit_training`` (``upcast_to_fp32``) casts every non-4-bit tensor
    (embedding, head, norms) to fp32.
    """
    linear = arch.linear_params()
    other = arch.other_params() * (4 if shape.upcast_to_fp32 else 2)
    if not shape.load_in_4bit:
        return linear * 2 + other
    blocks = math.ceil(linear / BLOCKSIZE)
    scales = (
        blocks + 4 * math.ceil(blocks / DOUBLE_QUANT_BLOCKSIZE)
        if shape.double_quant
        else (4 * blocks)
    )
    return linear // 2 + scales + other


def _lora_inputs(arch: Architecture, shape: TrainingShape) -> int:
    """Summed input widths of one layer's adapted linears (what LoRA's dropout masks)."""
    return sum(a for a, _ in targets_of(arch, shape.target_modules).values())


def layer_activations_per_token(arch: Architecture, shape: TrainingShape) -> int:
    """Bytes one decoder layer keeps per token for its backward, without checkpointing.

    In the autocast dtype (2 bytes) unless said. Counted from what each op's backward reads,
    with the frozen 4-bit base needing no weight gradients (so a base matmul keeps no input):

    * the two RMSNorms keep their input: eager, the fp32 copy ``hidden.to(float32)`` makes (4h
      each); compiled, the input itself, in the residual stream's dtype (the cast is fused);
    * attention keeps q and k after rotary embedding and v (together ``qkv_size``) and its
      output (h);
    * LoRA's A needs its (dropped-out) input for its gradient: the normed inputs of
      ``qkv``/``gate_up`` (h each) and the attention output for ``o_proj`` (the same tensor
      attention keeps); ``down_proj``'s input is the SwiGLU product (I);
    * the MLP keeps ``gate_up``'s output (2I) for SiLU and the product's backward;
    * each LoRA A output (r per adapted layer) for B's gradient.

    Compiled layers keep exactly that set: Inductor recomputes the cheap elementwise results
    (SiLU, the normed output) from it. Eager layers also keep the SiLU output (I), and the
    fp32 norms' normalized outputs in their own tensors (the norm's inputs are already counted),
    so +I; with ``upcast_to_fp32`` the norms' outputs are fp32 and each linear casts its own
    bf16 copy of them (+4h per norm, 2 norms). LoRA dropout without lit-cats' seeded op (peft's
    path, or the compiler's dropout on small steps) keeps a mask (1 byte) and the dropped copy
    (2 bytes) per input element.
    """
    h, i, r = arch.hidden_size, arch.intermediate_size, shape.r
    targets = len(targets_of(arch, shape.target_modules))
    norm_in = 2 * h * (_residual_bytes(shape) if shape.compiled else 4)
    kept = 2 * (arch.qkv_size + h) + 2 * (2 * h) + 2 * (2 * i) + 2 * i + 2 * r * targets
    if not shape.compiled:
        kept += 2 * i
        if shape.upcast_to_fp32:
            kept += 2 * 4 * h
    seeded = shape.fast_lora and shape.tokens > LARGE_STEP_TOKENS
    if shape.lora_dropout > 0 and not seeded:
        kept += 3 * _lora_inputs(arch, shape)
    return norm_in + kept


def checkpointed_layer_per_token(arch: Architecture, shape: TrainingShape) -> int:
    """Bytes a checkpointed layer keeps per token: its input, in the residual stream's dtype
    (fp32 when the embedding is upcast), and, in compiled layers on large steps, the LoRA A
    outputs that the rerun reuses instead of drawing the dropout again (2r per adapted layer)."""
    kept = arch.hidden_size * _residual_bytes(shape)
    if shape.compiled and shape.tokens > LARGE_STEP_TOKENS:
        kept += 2 * shape.r * len(targets_of(arch, shape.target_modules))
    return kept


def _residual_bytes(shape: TrainingShape) -> int:
    return 4 if shape.upcast_to_fp32 else 2


def loss_bytes(arch: Architecture, shape: TrainingShape) -> int:
    """The loss's transient at the start of the backward, plus the final norm's kept input.

    Full logits (transformers' loss): per token, the autocast-dtype logits (2V), their fp32 log-
    softmax kept for the backward (4V), its gradient (4V) and the gradient of the fp32 upcast
    (4V): 14V bytes. Chunked: the gradient of the hidden states, computed in the forward (4h per
    token), and one chunk's 14V. Either way the final RMSNorm keeps its fp32 input (4h) and the
    head its bf16 input (2h).
    """
    t, v, h = shape.tokens, arch.vocab_size, arch.hidden_size
    final = t * (4 * h + 2 * h)
    if shape.loss_chunk_size is None:
        return final + 14 * v * t
    return final + 4 * h * t + 14 * v * min(shape.loss_chunk_size, t)


def layer_backward_bytes(arch: Architecture, shape: TrainingShape) -> int:
    """One layer's backward transient: the gradients in flight, of the layer's output and input
    and of the residual branch (3 x h per token, fp32 where the residual stream is), and the
    widest intermediate gradient (``gate_up``'s, 2I in the autocast dtype); under checkpointing,
    also the rerun's activations (the whole per-layer set)."""
    t, h, i = shape.tokens, arch.hidden_size, arch.intermediate_size
    grads = t * (3 * h * _residual_bytes(shape) + 2 * (2 * i))
    if shape.gradient_checkpointing:
        return grads + t * layer_activations_per_token(arch, shape)
    return grads


def estimate(arch: Architecture, shape: TrainingShape) -> MemoryEstimate:
    """The predicted memory of a training step: each term and the peak.

    Layers that keep their activations (all without checkpointing, else the last
    ``uncheckpointed_layers``) are the last the forward ran and the first the backward frees: they
    overlap the loss's transient, not a checkpointed layer's rerun, which comes after them.
    """
    t, layers = shape.tokens, arch.num_hidden_layers
    params = lora_params(arch, shape.r, shape.target_modules)
    kept = layers if not shape.gradient_checkpointing else shape.uncheckpointed_layers
    full = t * kept * layer_activations_per_token(arch, shape)
    checkpointed = t * (layers - kept) * checkpointed_layer_per_token(arch, shape)
    # One linear at a time is dequantized to the compute dtype for its matmul (4-bit only),
    # unless every such copy is kept (keep_dequantized_weights).
    widest = max(a * b for a, b in arch.linears().values())
    dequantized = 2 * (arch.linear_params() if shape.keep_dequantized_weights else widest)
    terms = {
        "base": base_bytes(arch, shape),
        "lora": 4 * params,  # peft keeps adapters of a 4-bit base in fp32
        "gradients": 4 * params,
        "optimizer": shape.optimizer_bytes_per_param * params,
        "dequantized weights": dequantized if shape.load_in_4bit else 0,
        "activations": full + checkpointed,
        "loss": loss_bytes(arch, shape),
        "layer backward": layer_backward_bytes(arch, shape),
    }
    resident = sum(terms[k] for k in ("base", "lora", "gradients", "optimizer"))
    resident += terms["dequantized weights"] + checkpointed
    grads_only = layer_backward_bytes(arch, replace(shape, gradient_checkpointing=False))
    at_the_top = full + max(terms["loss"], grads_only)
    rerun = terms["layer backward"] if shape.gradient_checkpointing else 0
    peak = resident + max(at_the_top, rerun)
    return MemoryEstimate(terms=terms, peak=peak, lora_params=params)
