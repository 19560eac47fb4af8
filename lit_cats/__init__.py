"""lit-cats: QLoRA fine-tuning of small causal LMs with Lightning, peft and bitsandbytes."""

__version__ = "0.1.0"
