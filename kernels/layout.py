"""Strided copies in whole contiguous runs: the packs and unpacks of DAP's collectives.

An axis switch (all-to-all) packs the blocks it sends into one buffer and unpacks the blocks it
receives; the views it copies are non-contiguous, and torch copies those with its generic
elementwise kernel (index arithmetic per element, narrow loads). For the pair tensor every such
view is a few outer dims around one long contiguous run (the channels, and the residues of a
block). ``copy_`` moves such views run by run with wide loads, and falls back to torch for
anything else. Measured on an H200, DAP-2 inference block at N_res 2048: the switches' copies
3.4 ms per block with torch's kernel, 2.4 ms with this one (benchmarks/results/logs/
dap-inference-kernels_2xh200_3abb9eb.txt and _4xh200_faadec7.txt).
"""
import torch
import triton
import triton.language as tl

from ._triton_utils import collapse_dims, is_interpreter, next_power_of_2

_BLOCK = 4096  # at most this many elements of a run per program
_MIN_RUN = 128  # shorter runs: torch's copy


@triton.jit
def _copy_runs_kernel(SRC, DST, RUN, N1, N2, ss0, ss1, ss2, ds0, ds1, ds2,
                      BLOCK: tl.constexpr):
    """DST[i0, i1, i2, :RUN] = SRC[i0, i1, i2, :RUN]; program (row, block of the run) with
    row = (i0 * N1 + i1) * N2 + i2."""
    row = tl.program_id(0).to(tl.int64)
    i2 = row % N2
    i1 = (row // N2) % N1
    i0 = row // (N2 * N1)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < RUN
    v = tl.load(SRC + (i0 * ss0 + i1 * ss1 + i2 * ss2) + offs, mask=ok)
    tl.store(DST + (i0 * ds0 + i1 * ds1 + i2 * ds2) + offs, v, mask=ok)


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def copy_(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst.copy_(src)`` (same shape and dtype). On a GPU (or in the interpreter), when the two
    layouts collapse to at most three outer dims around a shared contiguous run of at least
    ``_MIN_RUN`` elements and do not share memory, one Triton launch copies whole runs;
    otherwise torch's ``copy_``. Returns `dst`."""
    if dst.shape != src.shape:
        raise ValueError(f"copy_: shapes differ: {tuple(dst.shape)} and {tuple(src.shape)}")
    if (dst.dtype != src.dtype or dst.device != src.device or src.numel() == 0
            or not (src.is_cuda or is_interpreter())):
        return dst.copy_(src)
    sizes, (ss, ds) = collapse_dims(src.shape, [src.stride(), dst.stride()])
    if (not sizes or ss[-1] != 1 or ds[-1] != 1 or sizes[-1] < _MIN_RUN or len(sizes) > 4
            or _same_storage(dst, src)):
        return dst.copy_(src)
    pad = 4 - len(sizes)
    n0, n1, n2, run = [1] * pad + sizes
    s = [0] * pad + ss[:-1] + [1]
    d = [0] * pad + ds[:-1] + [1]
    block = min(_BLOCK, next_power_of_2(run))
    grid = (n0 * n1 * n2, triton.cdiv(run, block))
    if grid[1] > 65535:
        return dst.copy_(src)
    _copy_runs_kernel[grid](src, dst, run, n1, n2, s[0], s[1], s[2], d[0], d[1], d[2],
                            BLOCK=block, num_warps=max(1, min(8, block // 512)))
    return dst


def contiguous(x: torch.Tensor) -> torch.Tensor:
    """`x` itself when contiguous, else a contiguous copy made with :func:`copy_`."""
    if x.is_contiguous():
        return x
    return copy_(torch.empty(x.shape, dtype=x.dtype, device=x.device), x)
