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


# ------------------------------------------------------------- the speed kit (tests/test_fast_*)
def _has_cxx_compiler() -> bool:
    from lit_cats.fast.compile import has_cxx_compiler

    return has_cxx_compiler()


#: torch.compile's CPU code is C++: without a compiler, compiling refuses with the fix, and the
#: tests that compile on the CPU cannot run.
needs_cxx = pytest.mark.skipif(
    not _has_cxx_compiler(), reason="torch.compile on the CPU needs a C++ compiler"
)


@pytest.fixture
def make_examples():
    """``make_examples(lengths, seed=0)``: tokenized examples of those lengths, each with a
    masked prompt (its first third), as chat data has."""
    from lit_cats.data.formatting import IGNORE_INDEX

    def make(lengths: list[int], seed: int = 0) -> list[dict[str, list[int]]]:
        gen = torch.Generator().manual_seed(seed)
        out = []
        for n in lengths:
            ids = torch.randint(5, 300, (n,), generator=gen).tolist()
            labels = list(ids)
            labels[: n // 3] = [IGNORE_INDEX] * (n // 3)
            out.append({"input_ids": ids, "labels": labels})
        return out

    return make


@pytest.fixture
def padded():
    """``padded(examples)``: the examples as one padded batch."""
    from lit_cats.data.collate import collate

    return lambda examples: collate(examples, pad_id=0)


@pytest.fixture
def speed_module():
    """``speed_module(device="cpu", lora_dropout=0.0, **speed)``: a built tiny QLoRA module
    with these :class:`~lit_cats.fast.SpeedSettings`, the same LoRA A in every module built,
    and non-zero LoRA B (so gradients reach A and every path is exercised)."""
    from lit_cats.fast import SpeedSettings
    from lit_cats.model import QLoRAModule

    def build(device: str = "cpu", lora_dropout: float = 0.0, **speed):
        module = QLoRAModule(TINY_MODEL_ID, lora_dropout=lora_dropout, speed=SpeedSettings(**speed))
        if device == "cuda":
            import lightning as L

            module.trainer = L.Trainer(accelerator="gpu", devices=1, logger=False)
        tiny_model_path()  # built (seeding torch) before the seed below, never in between
        torch.manual_seed(0)
        module.configure_model()
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in module.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen).to(p.device) * 0.05)
        return module

    return build


@pytest.fixture
def cuda_module(speed_module):
    """``cuda_module(**kwargs)``: :func:`speed_module` on cuda:0, norms in bf16 by default."""
    return lambda **kwargs: speed_module("cuda", **{"upcast_to_fp32": False, **kwargs})


def _step(module, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    device = next(module.parameters()).device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    module.zero_grad()
    module.on_train_batch_start(batch, 0)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = module.kit.loss(module.model, batch)
    loss.backward()
    grads = {
        n: p.grad.float().cpu().clone() for n, p in module.named_parameters() if p.requires_grad
    }
    return loss.item(), grads


@pytest.fixture
def loss_and_grads():
    """``loss_and_grads(module, batch)``: one training step's loss (bf16 autocast, as training
    runs) and the gradient of every trainable parameter."""
    return _step


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|``."""
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _assert_close(got, ref, loss_tol: float, grad_tol: float) -> None:
    (loss, grads), (ref_loss, ref_grads) = got, ref
    assert abs(loss - ref_loss) <= loss_tol * abs(ref_loss), (loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    worst = max(relative_error(grads[k], ref_grads[k]) for k in grads)
    assert worst <= grad_tol, worst
    assert all(g.abs().sum() > 0 for g in grads.values())


@pytest.fixture
def assert_steps_close():
    """``assert_steps_close(got, ref, loss_tol, grad_tol)`` for two :func:`loss_and_grads`
    results: relative loss and worst relative gradient error within bounds, no zero gradient."""
    return _assert_close


@pytest.fixture
def run_in_tritons_interpreter():
    """``run_in_tritons_interpreter(code)``: run ``code`` in a fresh Python whose Triton kernels
    run on the CPU (``TRITON_INTERPRET`` must be set before Triton is imported, hence the
    subprocess); skips without Triton."""
    import subprocess
    import sys

    pytest.importorskip("triton", reason="Triton is not installed (it comes with CUDA torch)")

    def run(code: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=600)  # fmt: skip

    return run


@pytest.fixture
def compile_counters():
    """``compile_counters()``: Dynamo's count of compiled graphs and its graph breaks so far.
    Dynamo's caches are reset before and after the test."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    yield lambda: (counters["stats"]["unique_graphs"], dict(counters["graph_break"]))
    torch._dynamo.reset()


@pytest.fixture(scope="session")
def configs() -> Path:
    """The shipped ``configs/`` folder."""
    return CONFIGS


@pytest.fixture(scope="session")
def fit_args():
    """``fit_args(*extra)``: CLI arguments for a short fit of the tiny model."""
    return tiny_fit_args
