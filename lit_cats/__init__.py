"""lit-cats: QLoRA fine-tuning of small causal LMs with Lightning, peft and bitsandbytes."""

from lit_cats import quiet

__version__ = "0.1.0"

# Before any lit_cats module imports bitsandbytes, which prints a notice at import time.
quiet.install()
