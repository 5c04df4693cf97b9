"""Strided copies and adds in whole contiguous runs: the packs and unpacks of DAP's collectives.

An axis switch (all-to-all) packs the blocks it sends into one buffer and unpacks the blocks it
receives; the views it copies are non-contiguous, and torch copies those with its generic
elementwise kernel (index arithmetic per element, narrow loads). For the pair tensor every such
view is a few outer dims around one long contiguous run (the channels, and the residues of a
block). ``copy_`` moves such views run by run with wide loads, and falls back to torch for
anything else; ``add_`` adds such a view into another (an update that arrives in a switched
layout, added into the residual stream) the same way. Short runs (the 128 channels of a pair
entry) are moved several to a program. Measured on an H200, DAP-2 inference block at N_res
2048: the switches' copies 3.4 ms per block with torch's kernel, 2.4 ms with one run per
program (benchmarks/results/logs/dap-inference-kernels_2xh200_3abb9eb.txt and
_4xh200_faadec7.txt).
"""
import torch
import triton
import triton.language as tl

from ._triton_utils import cast_rne, collapse_dims, is_interpreter, next_power_of_2

_BLOCK = 4096  # elements per program (a power of 2): of one run, or of several short ones
_MIN_RUN = 128  # shorter runs: torch


@triton.jit
def _copy_runs_kernel(SRC, DST, RUN, NROWS, N1, N2, ss0, ss1, ss2, ds0, ds1, ds2,
                      ROWS: tl.constexpr, BLOCK: tl.constexpr, ADD: tl.constexpr,
                      INTERP: tl.constexpr):
    """DST[i0, i1, i2, :RUN] = SRC[i0, i1, i2, :RUN] (ADD: DST[...] += SRC[...], summed in
    fp32 and rounded to DST's dtype, as torch's add_ does); program (ROWS rows, block of the
    run) with row = (i0 * N1 + i1) * N2 + i2."""
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    i2 = row % N2
    i1 = (row // N2) % N1
    i0 = row // (N2 * N1)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = (row < NROWS)[:, None] & (offs < RUN)[None, :]
    src = SRC + (i0 * ss0 + i1 * ss1 + i2 * ss2)[:, None] + offs[None, :]
    dst = DST + (i0 * ds0 + i1 * ds1 + i2 * ds2)[:, None] + offs[None, :]
    v = tl.load(src, mask=ok)
    if ADD:
        v = cast_rne(tl.load(dst, mask=ok).to(tl.float32) + v.to(tl.float32),
                     DST.dtype.element_ty, INTERP)
    tl.store(dst, v, mask=ok)


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _runs(dst: torch.Tensor, src: torch.Tensor, add: bool) -> bool:
    """Launch the kernel on dst, src (same shape; same dtype for a copy); False where torch
    should do it instead."""
    if (dst.device != src.device or src.numel() == 0 or not (src.is_cuda or is_interpreter())
            or (dst.is_contiguous() and src.is_contiguous())):
        return False
    if any(st == 0 and n > 1 for n, st in zip(dst.shape, dst.stride())):
        return False  # dst's elements repeat: torch's op refuses to write such a view
    sizes, (ss, ds) = collapse_dims(src.shape, [src.stride(), dst.stride()])
    if (not sizes or ss[-1] != 1 or ds[-1] != 1 or sizes[-1] < _MIN_RUN or len(sizes) > 4
            or _same_storage(dst, src)):
        return False
    pad = 4 - len(sizes)
    n0, n1, n2, run = [1] * pad + sizes
    s = [0] * pad + ss[:-1] + [1]
    d = [0] * pad + ds[:-1] + [1]
    block = min(_BLOCK, next_power_of_2(run))
    rows = 1 << (max(1, _BLOCK // block).bit_length() - 1)  # a power of 2
    n_rows = n0 * n1 * n2
    grid = (triton.cdiv(n_rows, rows), triton.cdiv(run, block))
    if grid[1] > 65535:
        return False
    _copy_runs_kernel[grid](src, dst, run, n_rows, n1, n2, s[0], s[1], s[2], d[0], d[1], d[2],
                            ROWS=rows, BLOCK=block, ADD=add, INTERP=is_interpreter(),
                            num_warps=max(1, min(8, rows * block // 512)))
    return True


def copy_(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst.copy_(src)`` (same shape and dtype). On a GPU (or in the interpreter), when the two
    layouts collapse to at most three outer dims around a shared contiguous run of at least
    ``_MIN_RUN`` elements and do not share memory, one Triton launch copies whole runs;
    otherwise torch's ``copy_``. Returns `dst`."""
    if dst.shape != src.shape:
        raise ValueError(f"copy_: shapes differ: {tuple(dst.shape)} and {tuple(src.shape)}")
    if dst.dtype != src.dtype or not _runs(dst, src, add=False):
        dst.copy_(src)
    return dst


def add_(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst.add_(src)`` (same shape; src's dtype may differ: the sum is formed in fp32 and
    rounded to dst's dtype, as torch does), in whole runs where :func:`copy_` would copy them
    (and one of the two is not contiguous); otherwise torch's ``add_``. Returns `dst`."""
    if dst.shape != src.shape:
        raise ValueError(f"add_: shapes differ: {tuple(dst.shape)} and {tuple(src.shape)}")
    if not (dst.dtype.is_floating_point and src.dtype.is_floating_point
            and dst.element_size() <= 4 and src.element_size() <= 4) or not _runs(dst, src, add=True):
        dst.add_(src)
    return dst


def contiguous(x: torch.Tensor) -> torch.Tensor:
    """`x` itself when contiguous, else a contiguous copy made with :func:`copy_`."""
    if x.is_contiguous():
        return x
    return copy_(torch.empty(x.shape, dtype=x.dtype, device=x.device), x)
