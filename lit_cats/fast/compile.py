"""Fewer, fused kernels for the elementwise work between the matmuls: Liger and torch.compile.

On large packed steps the 4-bit matmuls already run near the GPU's peak; much of the rest of
the step is elementwise glue around them: RMSNorm, the SwiGLU gate, rotary embeddings (profile
in benchmarks/RESULTS.md). Liger (linkedin/Liger-Kernel) fuses each of those into one kernel with
a hand-written backward. CUDA only (Triton); an optional dependency: ``pip install liger-kernel``.
``torch.compile`` of each decoder layer (:func:`compile_decoder_layers`) fuses the same work and
the rest of it (dtype casts, LoRA dropout) with no extra package, on CUDA and the CPU.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lit_cats.fast import recompute
from lit_cats.fast.nf4 import mark_layer_output, trace_nf4_layers


def apply_liger_kernels(model: nn.Module) -> None:
    """Swap Phi-3's RMSNorm, SwiGLU MLP and rotary embedding for Liger's fused kernels.

    Call on the loaded base, before LoRA is added (peft then wraps the same ``gate_up_proj`` /
    ``down_proj`` the fused MLP calls). Norms and MLPs are patched on this model's instances;
    the rotary embedding is a module-level function in transformers, so it is replaced for every
    Phi-3 in the process (numerically the same function).

    Raises:
        ImportError: If ``liger-kernel`` is not installed, with the command that installs it.
        ValueError: If the model is not a Phi-3 or is not on a CUDA device.
    """
    if importlib.util.find_spec("liger_kernel") is None:
        raise ImportError(
            "model.speed.liger_kernels=true needs the 'liger-kernel' package: pip install "
            "'lit-cats[liger]' (or liger-kernel), or set --model.speed.liger_kernels false."
        )
    if not _is_phi3(model):
        raise ValueError("model.speed.liger_kernels supports Phi-3 models only; set it to false.")
    if next(model.parameters()).device.type != "cuda":
        raise ValueError(
            "model.speed.liger_kernels needs a CUDA GPU (Liger's kernels are Triton); set it to "
            "false on this machine."
        )
    from liger_kernel.transformers import apply_liger_kernel_to_phi3
    from transformers.models.phi3 import modeling_phi3

    # Liger also rebinds the module's classes for models built later; keep that to this model.
    classes = {name: getattr(modeling_phi3, name) for name in ("Phi3RMSNorm", "Phi3MLP")}
    apply_liger_kernel_to_phi3(
        rope=True,
        rms_norm=True,
        swiglu=True,
        cross_entropy=False,
        fused_linear_cross_entropy=False,  # lit-cats has its own chunked loss (chunked_loss.py)
        model=model,
    )
    for name, cls in classes.items():
        setattr(modeling_phi3, name, cls)


def compile_decoder_layers(model: nn.Module, keep_dequantized_weights: bool = False) -> int:
    """``torch.compile`` every decoder layer of a (peft-wrapped) causal LM; returns how many.

    Regional compilation, as torchtune and LitGPT do it: each layer is compiled in place
    (``nn.Module.compile``), so parameter names, the state dict and checkpoints are unchanged,
    and the layers share one compiled graph, so the cost is one layer's compilation whatever
    the depth. Inductor fuses the elementwise work between the matmuls (norms, rotary
    embeddings, the SwiGLU gate, LoRA dropout, dtype casts, residual adds) into a few kernels,
    and each layer runs as a handful of launches instead of hundreds of eager ops. The varlen
    attention is a custom op inside the graph. So are bitsandbytes' 4-bit matmuls on large
    steps, with the LoRA update folded in, and, on CUDA, LoRA's dropout with the LoRA-A matmul
    (:mod:`lit_cats.fast.lora_dropout`); on small ones (batch 2, where the host is the
    bottleneck) they are torch ops that compile into one dequantization kernel each
    (:mod:`lit_cats.fast.nf4`), and the dropout is the compiler's own (:mod:`lit_cats.fast.lora`).
    The first steps pay the compilation; shapes that vary from step to step
    (packed rows, padded batches) are compiled once more, as dynamic shapes, and a run that
    meets both small and large steps compiles each once. With checkpointing, each layer's rerun
    in the backward skips Phi-3's MLP ``down_proj`` on large steps and reuses the forward's
    LoRA-A outputs (:func:`checkpoint_around`). With ``keep_dequantized_weights``, large steps
    keep each 4-bit weight's 16-bit copy from the forward for the backward
    (:func:`lit_cats.fast.nf4.trace_nf4_layers`).

    Raises:
        ValueError: If no decoder layers are found, or on a CPU without a C++ compiler.
    """
    layers = _decoder_layers(model)
    if not layers:
        raise ValueError(
            "model.speed.compile=true compiles the decoder layers (model.model.layers) and found "
            f"none in {type(model).__name__}; set it to false."
        )
    on_cpu = next(model.parameters()).device.type == "cpu"
    if on_cpu and not has_cxx_compiler():
        raise ValueError(
            "model.speed.compile=true on the CPU needs a C++ compiler for torch.compile's "
            "generated code (e.g. apt install g++); install one or set --model.speed.compile false."
        )
    _refuse_liger_rope(model)
    phi3 = _is_phi3(model)
    for layer in layers:
        # the 4-bit matmuls as torch ops in the graph (lit_cats.fast.nf4)
        trace_nf4_layers(layer, keep_dequantized=keep_dequantized_weights)
        if phi3:  # residual + dropout(mlp.down_proj(...)): not run again when recomputed
            down = layer.mlp.down_proj
            mark_layer_output(getattr(down, "base_layer", down))
        layer.compile(dynamic=True)
        checkpoint_around(layer)
    return len(layers)


def checkpoint_around(layer: nn.Module) -> bool:
    """Take a compiled decoder layer's gradient checkpointing from transformers and put it
    around the layer's compiled call. Returns whether the layer had checkpointing.

    transformers checkpoints around the layer's ``__call__`` in some versions and around its
    ``forward`` in others, which puts the checkpoint outside or inside the compiled code. Inside,
    the compiled graph would skip recomputing what backward never reads, but some torch versions'
    Inductor fail to compile Phi-3's layer that way (benchmarks/RESULTS.md). Around works on
    every version here.

    The checkpoint's contexts are :func:`lit_cats.fast.recompute.checkpoint_contexts`: the
    backward's rerun skips the matmuls whose output it never reads
    (:func:`lit_cats.fast.nf4.mark_layer_output`) on large steps, and reuses the forward's LoRA-A
    outputs of the seeded dropout op (:mod:`lit_cats.fast.lora_dropout`).
    """
    if not getattr(layer, "gradient_checkpointing", False):
        return False
    layer.gradient_checkpointing = False  # transformers' wrapper now passes straight through
    _wrap_compiled_call(
        layer, lambda compiled: functools.partial(_checkpointed_call, layer, compiled)
    )
    return True


def _wrap_compiled_call(layer: nn.Module, wrap: Callable[[Callable], Callable]) -> None:
    """Replace the compiled call of a module compiled in place (``nn.Module.compile``) with
    ``wrap(compiled_call)``.

    ``nn.Module.compile`` keeps the compiled callable in the private ``_compiled_call_impl`` and
    has no public hook to wrap it; checkpointing over the compiled call (not inside it) is the
    combination discussed in pytorch/pytorch#131062. This is the only place that touches it.
    """
    layer._compiled_call_impl = wrap(layer._compiled_call_impl)


def _checkpointed_call(layer: nn.Module, compiled: Callable, *args: Any, **kwargs: Any) -> Any:
    if layer.training and torch.is_grad_enabled():
        return checkpoint(
            compiled,
            *args,
            use_reentrant=False,
            context_fn=recompute.checkpoint_contexts,
            **kwargs,
        )
    return compiled(*args, **kwargs)


def compile_pays(
    steps: int, eager_s: float, compiled_s: float, compile_s: float
) -> tuple[bool, str]:
    """``compile: auto``'s rule: compile when the run's steps save more than compiling costs.

    Args:
        steps: Planned optimizer steps.
        eager_s: Expected seconds per step with eager layers.
        compiled_s: Expected seconds per step with compiled layers.
        compile_s: Expected seconds of compilation (cold, or from a warm cache).

    Returns:
        Whether to compile, and why, in one line.
    """
    saving = steps * (eager_s - compiled_s)
    why = (
        f"{steps:,} steps x {eager_s - compiled_s:.3g} s saved per step = {saving:.0f} s "
        f"{'>' if saving > compile_s else '<='} {compile_s:.0f} s of compilation"
    )
    return saving > compile_s, why


def inductor_cache_dir() -> Path:
    """Where Inductor keeps compiled code between processes: ``TORCHINDUCTOR_CACHE_DIR``, else
    torch's default (``<tmp>/torchinductor_<user>``)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir  # torch's own resolution

    return Path(cache_dir())


def inductor_cache_is_warm() -> bool:
    """Whether Inductor's FX graph cache holds compiled graphs (from an earlier run).

    torch caches compiled code across processes by default (``torch._inductor.config.
    fx_graph_cache`` and ``torch._functorch.config.enable_autograd_cache``): a later run with
    the same shapes and code loads the kernels instead of compiling them, and only Dynamo's
    tracing runs again. Graphs of another model or shape also count here, so this is the
    cache's state, not a promise of a hit.
    """
    graphs = inductor_cache_dir() / "fxgraph"
    return graphs.is_dir() and any(graphs.iterdir())


def has_cxx_compiler() -> bool:
    """Whether torch.compile can build its CPU code here (it generates and compiles C++)."""
    return any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))


def _refuse_liger_rope(model: nn.Module) -> None:
    """Liger's rotary kernel, once applied, is Phi-3's for the whole process; Dynamo cannot
    trace it, and every compiled layer would break its graph there."""
    if not _is_phi3(model):
        return
    from transformers.models.phi3 import modeling_phi3

    rope = getattr(modeling_phi3, "apply_rotary_pos_emb", None)
    if "liger" in getattr(rope, "__module__", ""):
        raise ValueError(
            "model.speed.compile=true cannot trace Liger's rotary kernel, which an earlier "
            "model.speed.liger_kernels=true model installed for every Phi-3 in this process. "
            "Compile in a fresh process, or keep liger_kernels and set compile false."
        )


@contextlib.contextmanager
def eager_layers() -> Iterator[None]:
    """Run compiled layers as plain eager code inside this block (validation, generation).

    The layers are compiled for the training step. Evaluation (no grad) and decoding with a KV
    cache (a new cache state at every position) would each compile new graphs: up to a minute
    apiece, and past Dynamo's recompile limit within a few sampled generations.
    """
    if not hasattr(torch.compiler, "set_stance"):  # torch < 2.6: nothing to switch
        yield
        return
    with torch.compiler.set_stance("force_eager"):
        yield


def _is_phi3(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == "phi3"


def keep_activations(model: nn.Module, layers: int) -> None:
    """Turn gradient checkpointing off for the last ``layers`` decoder layers of ``model``, whose
    checkpointing transformers has enabled: they keep their activations for the backward instead
    of running their forward twice: memory for speed (measured in benchmarks/RESULTS.md). The
    last layers, because the backward reaches them first and frees what they kept before
    any checkpointed layer reruns.

    Raises:
        ValueError: If ``layers`` is more than the model has, or the layers are not found.
    """
    found = _decoder_layers(model)
    if not found:
        raise ValueError(
            "model.speed.uncheckpointed_layers needs the decoder layers (model.model.layers) and "
            f"found none in {type(model).__name__}; set it to 0."
        )
    if layers > len(found):
        raise ValueError(
            f"model.speed.uncheckpointed_layers is {layers}, but the model has {len(found)} "
            f"decoder layers: set it to at most {len(found)} (that many is gradient_checkpointing: "
            "false)."
        )
    for layer in found[len(found) - layers :]:
        layer.gradient_checkpointing = False


def _decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """A (peft-wrapped) causal LM's decoder layers (``model.model.layers``), None if not found."""
    get_decoder = getattr(_causal_lm(model), "get_decoder", None)
    layers = getattr(get_decoder(), "layers", None) if get_decoder else None
    return layers if isinstance(layers, nn.ModuleList) else None


def _causal_lm(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model
