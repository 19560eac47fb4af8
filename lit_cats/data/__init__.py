"""Data: load a dataset, turn rows into labelled tokens, batch them, and read prompts."""

from lit_cats.data.datamodule import CatsDataModule

__all__ = ["CatsDataModule"]
