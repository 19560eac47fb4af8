"""Every speed and memory setting of training, in one typed group (``model.speed:``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lit_cats.errors import InvalidSetting


@dataclass
class SpeedSettings:
    """How the QLoRA recipe is run: speed and memory knobs that leave the result the same.

    The defaults are the original recipe (checkpointing on, fp32 norms/embeddings/head, peft's
    own LoRA forward, transformers' loss); ``configs/fast.yaml`` turns the fast ones on. Each
    feature gives the same loss and gradients as the plain path, up to rounding (tested on the
    CPU); what each buys is measured in ``benchmarks/RESULTS.md``. A combination that would do
    nothing is refused here, with the fix in the message.

    Args:
        gradient_checkpointing: Recompute activations in the backward (non-reentrant) instead of
            keeping them: far less memory for about a third more compute. ``"auto"``: off when
            the plan predicts the run fits the GPU without it, else on (``lit-cats plan`` says
            which and why; resolved before the model is built; on where nothing is planned).
        uncheckpointed_layers: With checkpointing, the last this many decoder layers keep their
            activations instead of running twice: spare memory spent on speed.
        upcast_to_fp32: Keep fp32 copies of the norms, embeddings and output head, as
            ``prepare_model_for_kbit_training`` makes them (the original recipe). False keeps
            them in the compute dtype: half the bytes of the residual stream.
        loss_chunk_size: Compute the output head and cross-entropy over this many tokens at a
            time, so full-vocabulary logits are never materialised. ``None``: transformers'
            loss on full logits.
        fast_lora: Fused LoRA forward: the update is accumulated into the base output by one
            GEMM instead of peft's clone + matmuls + scale + add.
        liger_kernels: Liger's fused Triton kernels for RMSNorm, SwiGLU and rotary embeddings
            (CUDA and ``pip install 'lit-cats[liger]'``). An alternative to ``compile``.
        compile: ``torch.compile`` each decoder layer for the training step (the elementwise
            work between the matmuls fused); the first steps pay the compilation. Validation
            and generation run the layers eagerly. ``"auto"``: compile only when the planned
            run is long enough for the saving to repay the compile time (``lit-cats plan``
            says which was chosen and why; resolved before the model is built).
        keep_dequantized_weights: Without checkpointing, in compiled layers on large steps:
            keep each 4-bit weight's 16-bit copy from the forward for the backward instead of
            dequantizing it again. Spare memory spent on speed.

    Raises:
        ValueError: For a value out of range, or a combination that would be a silent no-op.
    """

    gradient_checkpointing: bool | Literal["auto"] = True
    uncheckpointed_layers: int = 0
    upcast_to_fp32: bool = True
    loss_chunk_size: int | None = None
    fast_lora: bool = False
    liger_kernels: bool = False
    compile: bool | Literal["auto"] = False
    keep_dequantized_weights: bool = False

    def __post_init__(self) -> None:
        if self.gradient_checkpointing not in (True, False, "auto"):
            raise InvalidSetting(
                "model.speed.gradient_checkpointing must be true, false or auto, got "
                f"{self.gradient_checkpointing!r}."
            )
        if self.loss_chunk_size is not None and self.loss_chunk_size < 1:
            raise InvalidSetting(
                f"model.speed.loss_chunk_size must be >= 1 or null, got {self.loss_chunk_size}."
            )
        if self.uncheckpointed_layers < 0:
            raise InvalidSetting(
                f"model.speed.uncheckpointed_layers must be >= 0, got {self.uncheckpointed_layers}."
            )
        if self.uncheckpointed_layers and self.gradient_checkpointing is False:
            raise InvalidSetting(
                f"model.speed.uncheckpointed_layers is {self.uncheckpointed_layers}, but "
                "gradient_checkpointing is false, so every layer keeps its activations already: "
                "set uncheckpointed_layers to 0, or turn checkpointing on."
            )
        if self.uncheckpointed_layers and self.gradient_checkpointing == "auto":
            raise InvalidSetting(
                f"model.speed.uncheckpointed_layers is {self.uncheckpointed_layers}, which "
                "needs checkpointing, but gradient_checkpointing is auto, which may turn it off: "
                "set gradient_checkpointing true, or uncheckpointed_layers 0."
            )
        if self.compile is True and self.liger_kernels:  # "auto" then chooses eager layers
            raise InvalidSetting(
                "model.speed.compile and model.speed.liger_kernels are alternatives: compiling "
                "fuses the same norm, SwiGLU and rotary work, and torch.compile cannot trace "
                "Liger's kernels. Set one of them to false."
            )
        if self.keep_dequantized_weights:
            self._check_keep_dequantized_weights()

    def _check_keep_dequantized_weights(self) -> None:
        needs = [
            ("gradient_checkpointing false", self.gradient_checkpointing is False,
             "its rerun dequantizes again anyway"),
            ("compile true", self.compile, "it applies to the compiled layers' 4-bit matmuls"),
            ("fast_lora true", self.fast_lora, "the kept weight is used by the fused LoRA op"),
        ]  # fmt: skip
        missing = [f"{setting} ({why})" for setting, ok, why in needs if not ok]
        if missing:
            raise InvalidSetting(
                "model.speed.keep_dequantized_weights needs " + "; ".join(missing) + ". Set "
                "those, or keep_dequantized_weights false."
            )

    def check_base(self, load_in_4bit: bool) -> None:
        """Refuse settings that need a 4-bit base when the base is not quantized.

        Raises:
            ValueError: ``keep_dequantized_weights`` without ``load_in_4bit``.
        """
        if self.keep_dequantized_weights and not load_in_4bit:
            raise InvalidSetting(
                "model.speed.keep_dequantized_weights keeps 4-bit weights' 16-bit copies, but "
                "model.load_in_4bit is false: set keep_dequantized_weights to false."
            )


#: Keys that sat directly under ``model:`` before the ``model.speed:`` group existed.
LEGACY_KEYS = tuple(SpeedSettings.__dataclass_fields__)
