"""The speed kit: every speed and memory feature of training, behind one door.

:class:`SpeedSettings` (``model.speed:`` in a config) holds the knobs and validates them
together; :class:`SpeedKit` applies them to the model once and runs the steps they shape. The
recipe (:mod:`lit_cats.model`) imports nothing else from this package. Inside: the 4-bit
matmul as traceable ops (``nf4``), the fused LoRA forward (``lora``) and its seeded dropout
(``lora_dropout``), attention for packed rows (``attention``, ``packed_attention``), the chunked
loss (``chunked_loss``), and regional compilation and Liger (``compile``).
"""

from lit_cats.fast.kit import SpeedKit
from lit_cats.fast.settings import SpeedSettings

__all__ = ["SpeedKit", "SpeedSettings"]
