"""Keep the console for what a user can act on: drop the libraries' notices that are not.

Each entry names the notice, the logger or warning it comes from, and why it is dropped. Only
these exact messages go; everything else the libraries say (errors, real warnings, Lightning's
"GPU available" lines) is kept. :func:`install` runs when ``lit_cats`` is imported, before
anything imports bitsandbytes, whose notice is printed at import time.
"""

from __future__ import annotations

import logging
import re
import warnings

#: ``logger name -> messages (regular expressions, matched at the start)`` dropped from it.
LOG_NOISE: dict[str, tuple[str, ...]] = {
    # bitsandbytes' CPU backend asks the `kernels` package for an optional faster CPU 4-bit
    # kernel on every import, and that Hub repository is not from a publisher `kernels` trusts
    # (or is not cached, offline). The fallback is bitsandbytes' own CPU kernel, which lit-cats
    # uses on purpose: trusting remote code to get rid of the line is not an option.
    "bitsandbytes.backends.cpu.ops": (
        "Failed to load CPU gemm_4bit_forward from kernels-community",
    ),
    # The same lookup, offline: `kernels` says it skips the trust check for that repository.
    "kernels._internals.hf_hub": (
        "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'",
    ),
    # Lightning advertises its cloud logger at every fit (lit-cats logs to TensorBoard). Its
    # rank-zero helpers log through whichever of these two loggers was set up last.
    "lightning.pytorch.utilities.rank_zero": ("💡 Tip: For seamless cloud logging",),
    "lightning.fabric.utilities.rank_zero": ("💡 Tip: For seamless cloud logging",),
    # lit-cats turns gradient checkpointing on itself; transformers then turns the KV cache off
    # for training forwards (generation keeps it) and says so once. Nothing to do about it.
    "transformers.utils.generic": (
        r"`use_cache=True` is incompatible with gradient checkpointing\. Setting `use_cache=False`",
    ),
}

#: ``(category, message regular expression)`` of Python warnings dropped: deprecations inside
#: the libraries (peft calls transformers' old names, Lightning uses torch's old pytree class),
#: which only their maintainers can act on.
WARNING_NOISE: tuple[tuple[type[Warning], str], ...] = (
    (FutureWarning, r"`gradient_checkpointing_enable` is deprecated"),
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
)


class DropMessages(logging.Filter):
    """Drops the records of one logger whose message starts with one of ``patterns``."""

    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def install() -> None:
    """Drop the notices of :data:`LOG_NOISE` and :data:`WARNING_NOISE` (safe to call again)."""
    for name, patterns in LOG_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in logger.filters):
            logger.addFilter(DropMessages(patterns))
    install_warning_filters()


def install_warning_filters() -> None:
    """Drop the warnings of :data:`WARNING_NOISE` (again after a ``catch_warnings`` reset)."""
    for category, message in WARNING_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
