"""A 4-bit matmul for decode steps: a few rows times an NF4 weight, reading the packed weight once.

At a decode step of 8 slots, bitsandbytes serves a 4-bit linear layer by dequantizing the whole
weight to 16 bits (two kernels under double quantization) and calling cuBLAS: per step it reads
the 4-bit weight, writes and reads again its 16-bit copy, ~4.5 bytes a parameter instead of 0.5.
Its own inference kernel (``gemv_4bit``, which reads the packed weight directly) serves only one
row (``A.numel() == A.shape[-1]`` in ``bitsandbytes.matmul_4bit``). Measured on an H200
(benchmarks/RESULTS.md), that makes the 4-bit decode step ~2x the merged bf16 one.

:func:`nf4_matmul` is the missing kernel for 2 to 16 rows: each program takes a tile of the
weight's output rows and a slice of its input columns, unpacks the codes (high nibble first),
looks them up in the NF4 table, scales them by their block's absmax (decoded on the way under
double quantization, as :func:`lit_cats.fast.nf4._dequantize_triton` does), and multiplies with
``tl.dot``; slices of the input columns add into an fp32 output (split-K), so small layers still
fill the GPU. The weights it multiplies with are bitsandbytes' values bit for bit; the products
differ from dequantize + cuBLAS only in the order of the fp32 additions.

Measured on an H200 (benchmarks/RESULTS.md, 2026-12-03): correct, but a decode step of the
4-bit Phi-3-mini took 23 ms with it against 11 ms with bitsandbytes' dequantize + cuBLAS, so
the fast loop does not use it (``decode.NF4_PATH = "bnb"``); kept, tested, as the starting
point of a faster one (the per-weight table lookups and split-K atomics are the suspects; not
profiled).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lit_cats.fast.nf4 import NF4Weight, _nf4_code, _supported

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch
    triton = None

#: Most rows (decode slots) the kernel takes; larger steps keep bitsandbytes' path.
MAX_ROWS = 16

_BLOCK_N = 32
_BLOCK_K = 256

if triton is not None:

    @triton.jit
    def _nf4_matmul_kernel(
        x, packed, absmax, absmax_scale, absmax_code, offset, code, out,
        M, N, K, ITERATIONS,
        NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """``out[m, n] += sum_k x[m, k] * w[n, k]`` over this program's ``ITERATIONS`` chunks
        of ``BLOCK_K`` columns (``out`` fp32, zeroed)."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rows_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rows_m = tl.arange(0, BLOCK_M)
        half = tl.arange(0, BLOCK_K // 2)
        blocks = tl.arange(0, BLOCK_K // BLOCKSIZE)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        n_ok = rows_n < N
        for i in range(ITERATIONS):
            k0 = (pid_k * ITERATIONS + i) * BLOCK_K
            cols = k0 + tl.arange(0, BLOCK_K)
            xs = tl.load(
                x + rows_m[:, None] * K + cols[None, :],
                mask=(rows_m[:, None] < M) & (cols[None, :] < K),
                other=0.0,
            )
            flat = rows_n[:, None].to(tl.int64) * K + k0  # first weight of the row's chunk
            byte = tl.load(
                packed + flat // 2 + half[None, :],
                mask=n_ok[:, None] & ((k0 + 2 * half[None, :]) < K),
                other=0,
            ).to(tl.int32)
            block = flat // BLOCKSIZE + blocks[None, :]  # (BLOCK_N, BLOCK_K // BLOCKSIZE)
            b_ok = n_ok[:, None] & ((k0 + blocks[None, :] * BLOCKSIZE) < K)
            if NESTED:
                quantized = tl.load(absmax + block, mask=b_ok, other=0).to(tl.int32)
                group = tl.load(absmax_scale + block // 256, mask=b_ok, other=0.0)
                scale = tl.load(absmax_code + quantized) * group + tl.load(offset)
            else:
                scale = tl.load(absmax + block, mask=b_ok, other=0.0)
            high = tl.load(code + (byte >> 4))  # high nibble first
            low = tl.load(code + (byte & 15))
            values = tl.join(high, low).reshape(BLOCK_N, BLOCK_K // BLOCKSIZE, BLOCKSIZE)
            w = (values * scale[:, :, None]).reshape(BLOCK_N, BLOCK_K).to(xs.dtype)
            acc += tl.dot(xs, tl.trans(w))
        tl.atomic_add(
            out + rows_m[:, None] * N + rows_n[None, :],
            acc,
            mask=(rows_m[:, None] < M) & n_ok[None, :],
        )


def available(layer: torch.nn.Module, x: Tensor) -> bool:
    """Whether :func:`nf4_matmul` serves this bitsandbytes layer at this input."""
    if triton is None or not x.is_cuda or not _supported(layer):
        return False
    rows = x.numel() // x.shape[-1]
    blocksize = layer.weight.quant_state.blocksize
    return 1 < rows <= MAX_ROWS and blocksize in (64, 128, 256) and x.shape[-1] % blocksize == 0


@torch.library.custom_op("lit_cats::nf4_matmul", mutates_args=())
def _nf4_matmul(
    x: Tensor, packed: Tensor, absmax: Tensor, absmax_scale: Tensor | None,
    absmax_code: Tensor | None, offset: Tensor | None, shape: list[int], blocksize: int,
) -> Tensor:  # fmt: skip
    """``x @ W.T`` in fp32 for a 2-D ``x`` of at most :data:`MAX_ROWS` rows (an NF4Weight)."""
    n, k = shape
    m = x.shape[0]
    out = torch.zeros((m, n), dtype=torch.float32, device=x.device)
    tiles = triton.cdiv(n, _BLOCK_N)
    chunks = triton.cdiv(k, _BLOCK_K)
    # Enough programs to fill the GPU (~4 per multiprocessor), each with >= 2 chunks.
    cuda = x.device.type == "cuda"  # else Triton's interpreter (TRITON_INTERPRET=1, tests)
    programs = 4 * (torch.cuda.get_device_properties(x.device).multi_processor_count if cuda else 2)
    split = max(1, min(chunks // 2, triton.cdiv(programs, tiles)))
    iterations = triton.cdiv(chunks, split)
    split = triton.cdiv(chunks, iterations)
    nested = absmax_scale is not None
    _nf4_matmul_kernel[(tiles, split)](
        x, packed, absmax,
        absmax_scale if nested else absmax, absmax_code if nested else absmax,
        offset if nested else absmax,
        _nf4_code(x.device), out, m, n, k, iterations,
        NESTED=nested, BLOCKSIZE=blocksize, BLOCK_M=16, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K,
        enable_fp_fusion=False,  # the absmax decoded as bitsandbytes rounds it
    )  # fmt: skip
    return out


@_nf4_matmul.register_fake
def _(x, packed, absmax, absmax_scale, absmax_code, offset, shape, blocksize):
    return x.new_empty((x.shape[0], shape[0]), dtype=torch.float32)


def nf4_matmul(layer: torch.nn.Module, x: Tensor) -> Tensor:
    """A bitsandbytes NF4 ``Linear4bit`` layer's output for ``x`` (any leading shape), through
    the small-batch kernel; the caller checks :func:`available` first."""
    compute = layer.compute_dtype or x.dtype
    flat = x.reshape(-1, x.shape[-1]).to(compute).contiguous()
    out = _nf4_matmul(flat, *NF4Weight.of(layer)).to(x.dtype)
    if layer.bias is not None:
        out = out + layer.bias.to(out.dtype)
    return out.reshape(*x.shape[:-1], -1)
