"""Export a trained adapter for llama.cpp and Ollama: merge, convert to GGUF, write a Modelfile."""

from lit_cats.export.command import ExportReport, export_adapter

__all__ = ["ExportReport", "export_adapter"]
