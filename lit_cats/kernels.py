"""Optional fused Triton kernels (Liger) for the elementwise work between Phi-3's matmuls.

On packed 16k-token steps the 4-bit matmuls already run near the GPU's peak; about half of the
step is elementwise glue around them: RMSNorm, the SwiGLU gate, rotary embeddings (profile in
benchmarks/RESULTS.md). Liger (linkedin/Liger-Kernel) fuses each of those into one kernel with
a hand-written backward. CUDA only (Triton); an optional dependency: ``pip install liger-kernel``.
"""

from __future__ import annotations

import importlib.util

from torch import nn


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
            "model.liger_kernels=true needs the 'liger-kernel' package: pip install "
            "'lit-cats[liger]' (or liger-kernel), or set --model.liger_kernels false."
        )
    if getattr(getattr(model, "config", None), "model_type", None) != "phi3":
        raise ValueError("model.liger_kernels supports Phi-3 models only; set it to false.")
    if next(model.parameters()).device.type != "cuda":
        raise ValueError(
            "model.liger_kernels needs a CUDA GPU (Liger's kernels are Triton); set it to false "
            "on this machine."
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
        fused_linear_cross_entropy=False,  # lit-cats has its own chunked loss (losses.py)
        model=model,
    )
    for name, cls in classes.items():
        setattr(modeling_phi3, name, cls)
