"""Quiet by default: ``lit-cats`` prints what a user can act on, not the libraries' notices."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator

from lit_cats.cli import use_tensor_cores

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SCRIPT = Path(sys.executable).with_name("lit-cats")

#: What each notice looks like in the output; none may appear.
NOISE = {
    "bitsandbytes' kernels-community lookup": "gemm_4bit_forward",
    "kernels' publisher trust": "publisher trust",
    "deprecation notices": "is deprecated",
    "FutureWarning": "FutureWarning",
    "the litlogger tip": "litlogger",
    "the float32 matmul precision hint": "set_float32_matmul_precision",
    "Lightning's model summary": "Trainable params",
    "Lightning's model summary size": "model summary",
    "transformers' use_cache notice": "use_cache",
}


def _run(*args: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(
        [str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _assert_quiet(output: str) -> None:
    found = {name: text for name, text in NOISE.items() if text in output}
    assert not found, f"noise in the output: {found}\n{output[-3000:]}"


@pytest.mark.parametrize("args", [["--help"], ["fit", "--help"]], ids=" ".join)
def test_help_prints_no_noise(args):
    output = _run(*args)
    assert output.startswith("usage: lit-cats")
    _assert_quiet(output)


def test_fit_prints_no_noise(tmp_path):
    output = _run(
        "fit",
        "--config",
        str(CONFIGS / "qlora.yaml"),
        "--config",
        str(CONFIGS / "tiny.yaml"),
        "--trainer.max_steps",
        "2",
        cwd=tmp_path,
    )
    assert "trainable parameters: 69,632 of 774,784" in output  # lit-cats' own report stays
    assert "Trainer.fit` stopped: `max_steps=2` reached" in output
    _assert_quiet(output)


@pytest.mark.parametrize(
    "cause",
    [
        # online: the Hub publisher of the kernel repository is not trusted (or unreachable)
        "Kernel repository 'kernels-community/quantization-bitsandbytes' could not verify "
        "publisher trust status.",
        # offline: the kernel is not cached
        "Version 1 of 'kernels-community/quantization-bitsandbytes' is not available in the "
        "local cache",
    ],
    ids=["online", "offline"],
)
def test_bitsandbytes_kernel_notice_is_dropped_whatever_the_cause(cause):
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", cause)
        logger.warning("Something else went wrong")  # other messages still reach the user
    finally:
        logger.removeHandler(handler)
    assert seen == ["Something else went wrong"]


@pytest.fixture
def matmul_precision():
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


@pytest.mark.usefixtures("matmul_precision")
def test_tensor_cores_are_used_on_cuda_only():
    use_tensor_cores(SimpleNamespace(accelerator=CPUAccelerator()))
    assert torch.get_float32_matmul_precision() == "highest"
    use_tensor_cores(SimpleNamespace(accelerator=CUDAAccelerator()))
    assert torch.get_float32_matmul_precision() == "high"


@pytest.mark.usefixtures("matmul_precision")
def test_a_users_matmul_precision_is_kept():
    torch.set_float32_matmul_precision("medium")
    use_tensor_cores(SimpleNamespace(accelerator=CUDAAccelerator()))
    assert torch.get_float32_matmul_precision() == "medium"
