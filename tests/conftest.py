"""Shared fixtures: an offline, hermetic environment and the tiny Phi-3 built once per session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Before anything imports transformers/datasets/huggingface_hub (they read these at import):
# no test may touch the network, and caches go to a throwaway folder, not the user's home.
_CACHE = Path(tempfile.mkdtemp(prefix="lit-cats-tests-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = str(_CACHE / "hf")
os.environ["HF_DATASETS_CACHE"] = str(_CACHE / "datasets")
os.environ["LIT_CATS_CACHE"] = str(_CACHE / "lit-cats")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from lit_cats.tiny import TINY_MODEL_ID, tiny_model_path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    """Folder with the tiny Phi-3 model and tokenizer (built once, cached)."""
    return tiny_model_path()


@pytest.fixture(scope="session")
def tokenizer(tiny_path: Path):
    from lit_cats.recipe import load_tokenizer

    return load_tokenizer(TINY_MODEL_ID)


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh working directory, so each run's ``logs/`` is its own."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def save_random_adapter(base, folder: Path, targets: list[str], r: int, **lora_kwargs) -> Path:
    """Wrap ``base`` with LoRA, give every ``lora_B`` random (non-zero) values, save to ``folder``.

    A fresh adapter's B is zero, which would make adapter-on-base equal the base and hide bugs.
    """
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(base, LoraConfig(r=r, target_modules=targets, **lora_kwargs))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    model.save_pretrained(folder)
    return folder


def tiny_fit_args(*extra: str) -> list[str]:
    """CLI arguments for a short fit of the tiny model on the shipped dataset."""
    return [
        "fit",
        "--config",
        str(CONFIGS / "qlora.yaml"),
        "--config",
        str(CONFIGS / "tiny.yaml"),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        *extra,
    ]
