"""LayerNorm over the last dim: OpenFold's contract and torch.nn.LayerNorm's contract.

Two ops share one pair of kernels; they differ only in the dtype they compute and return:

* ``layer_norm`` follows OpenFold's ``primitives.LayerNorm.forward``: a bf16 input is normalised
  with the weight and bias cast to bf16 and autocast off (bf16 out); any other input goes
  through ``F.layer_norm`` (fp32 out under autocast, the input's dtype otherwise).
* ``layer_norm_torch`` follows ``torch.nn.LayerNorm`` as CUDA autocast dispatches it: fp32 out
  under autocast whatever the input dtype, the input's dtype otherwise.

Precision contract (Triton path): statistics (mean, 1/std) and the affine map in fp32, one
rounding on store; backward in fp32 (dx rounded to x's dtype, dweight/dbias summed in fp32 over
per-program partials and returned in the parameters' dtype). The references round where
``F.layer_norm`` rounds, so both agree to the output dtype's rounding.

Host time. A block step calls the LayerNorm ~15 times on small tensors, so the Python around a
launch counts. What a launch fixes but the data (the checks, block sizes, grid, warps, the
backward's program split) is worked out once per (rows, channels, device, interpreter or not)
by ``_fwd_plan`` / ``_bwd_plan``; a call reads its strides, allocates and launches. Whether the
interpreter runs is read once per forward and kept for its backward.
"""
import functools
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._triton_utils import (
    autocast_dtype,
    cdiv,
    check_devices,
    collapse_dims,
    is_interpreter,
    max_programs,
    next_power_of_2,
)

MAX_C = 16384  # one row is one block of registers


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _row_offsets(rows, stride, R_IN, stride_in, TWO_LEVEL: tl.constexpr):
    if TWO_LEVEL:
        return (rows // R_IN) * stride + (rows % R_IN) * stride_in
    else:
        return rows * stride


@triton.jit
def _layer_norm_fwd_kernel(
    X, W, B, Y, MEAN, RSTD,
    M, C, stride_x, stride_y, eps, R_IN, stride_x_in,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, STORE_STATS: tl.constexpr,
    TWO_LEVEL: tl.constexpr,
):
    """Y[r] = (X[r] - mean) * rstd * W + B for BLOCK_M rows of length C; fp32 statistics.
    X's row r is at r * stride_x, or with ``TWO_LEVEL`` at (r // R_IN) * stride_x +
    (r % R_IN) * stride_x_in (a transposed view: see ``_row_layout``)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < M
    col_ok = cols < C
    ok = row_ok[:, None] & col_ok[None, :]
    x_rows = _row_offsets(rows, stride_x, R_IN, stride_x_in, TWO_LEVEL)
    x = tl.load(X + x_rows[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    xc = tl.where(ok, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / C
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=ok)
    if STORE_STATS:
        tl.store(MEAN + rows, mean, mask=row_ok)
        tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _layer_norm_bwd_kernel(
    X, W, DY, DX, MEAN, RSTD, DW_PART, DB_PART,
    M, C, stride_x, stride_dy, stride_dx, rows_per_program, R_IN, stride_x_in, stride_dx_in,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, TWO_LEVEL: tl.constexpr,
):
    """dx for `rows_per_program` rows, and this program's partial sums of dweight and dbias.
    X and DX rows as in the forward (``TWO_LEVEL``: each with its own strides, one R_IN).

    xhat = (x - mean) * rstd;  dx = rstd * (w*dy - mean_c(w*dy * xhat) * xhat - mean_c(w*dy));
    dweight = sum_rows dy * xhat;  dbias = sum_rows dy.
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    row0 = pid.to(tl.int64) * rows_per_program
    for i in range(0, rows_per_program, BLOCK_M):
        rows = row0 + i + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        ok = row_ok[:, None] & col_ok[None, :]
        x_rows = _row_offsets(rows, stride_x, R_IN, stride_x_in, TWO_LEVEL)
        x = tl.load(X + x_rows[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        xhat = tl.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = w[None, :] * dy
        c1 = tl.sum(xhat * wdy, axis=1) / C
        c2 = tl.sum(wdy, axis=1) / C
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        dx_rows = _row_offsets(rows, stride_dx, R_IN, stride_dx_in, TWO_LEVEL)
        tl.store(DX + dx_rows[:, None] + cols[None, :], dx.to(DX.dtype.element_ty), mask=ok)
        dw_acc += tl.sum(dy * xhat, axis=0)
        db_acc += tl.sum(dy, axis=0)
    tl.store(DW_PART + pid * C + cols, dw_acc, mask=col_ok)
    tl.store(DB_PART + pid * C + cols, db_acc, mask=col_ok)


# ----------------------------------------------------------------------------------------------
# launchers (2-D row views; also used by transition.py)
# ----------------------------------------------------------------------------------------------
def _block_m(block_c: int, interp: bool) -> int:
    # About 4K elements per program on a GPU (16 rows at C=256); bigger tiles in the interpreter,
    # where each program is a Python-level loop.
    elems = 32768 if interp else 4096
    return max(1, min(128, elems // block_c))


def _rows(t: torch.Tensor, c: int) -> torch.Tensor:
    """[M, C] view of `t` with unit column stride (copies only if it must)."""
    t2 = t.reshape(-1, c)
    if t2.stride(-1) != 1 or (t2.shape[0] > 1 and t2.stride(0) < c):
        t2 = t2.contiguous()
    return t2


class _FwdPlan(NamedTuple):
    """What a forward launch fixes for [M, C] rows: grid, y's row stride, launch keywords."""
    grid: tuple
    stride_y: int
    kwargs: dict  # BLOCK_M, BLOCK_C, STORE_STATS, num_warps


@functools.lru_cache(maxsize=256)
def _fwd_plan(m: int, c: int, device: torch.device, interp: bool, store_stats: bool) -> _FwdPlan:
    """The ``_FwdPlan`` for `m` rows of `c` channels on `device`, under the interpreter
    (`interp`) or not. Raises (and caches nothing) for a channel dim too large or a device the
    kernels cannot run on."""
    if c > MAX_C:
        raise ValueError(f"layer_norm: channel dim {c} > {MAX_C} is not supported by the Triton path")
    check_devices(device)
    block_c = next_power_of_2(c)
    block_m = _block_m(block_c, interp)
    return _FwdPlan(
        grid=(cdiv(m, block_m),),
        stride_y=torch.empty((m, c), device="meta").stride(0),
        kwargs=dict(BLOCK_M=block_m, BLOCK_C=block_c, STORE_STATS=store_stats,
                    num_warps=4 if block_c * block_m <= 4096 else 8),
    )


class _BwdPlan(NamedTuple):
    """What a backward launch fixes for [M, C] rows: the program count and rows per program,
    dx's row stride, launch keywords."""
    n_prog: int
    rows_per_program: int
    stride_dx: int
    kwargs: dict  # BLOCK_M, BLOCK_C, num_warps


@functools.lru_cache(maxsize=256)
def _bwd_plan(m: int, c: int, device: torch.device, interp: bool) -> _BwdPlan:
    """The ``_BwdPlan`` for `m` (> 0) rows of `c` channels on `device`, under the interpreter
    (`interp`) or not."""
    block_c = next_power_of_2(c)
    block_m = _block_m(block_c, interp)
    n_tiles = cdiv(m, block_m)
    n_prog = min(n_tiles, max_programs(device))
    rows_per_program = cdiv(n_tiles, n_prog) * block_m
    return _BwdPlan(
        n_prog=cdiv(m, rows_per_program),
        rows_per_program=rows_per_program,
        stride_dx=torch.empty((m, c), device="meta").stride(0),
        kwargs=dict(BLOCK_M=block_m, BLOCK_C=block_c,
                    num_warps=4 if block_c * block_m <= 4096 else 8),
    )


class RowLayout(NamedTuple):
    """Where row r (of m) of a [*, C] tensor with unit column stride starts: r * stride, or,
    when `r_in` is set, (r // r_in) * stride + (r % r_in) * stride_in."""
    m: int
    stride: int
    r_in: Optional[int] = None
    stride_in: int = 0


def _row_layout(x: torch.Tensor) -> Optional[RowLayout]:
    """x's rows as a ``RowLayout`` without a copy (unit column stride, rows that collapse to at
    most two strided dims: any contiguous tensor, and transposed views such as OpenFold's
    ``m.transpose(-2, -3)`` or ``z.transpose(-2, -3)``), else None."""
    c = x.shape[-1]
    if x.stride(-1) != 1 and c > 1:
        return None
    m = x.numel() // c if c else 0
    sizes, (strides,) = collapse_dims(x.shape[:-1], [x.stride()[:-1]])
    if len(sizes) == 0:
        return RowLayout(m, c)
    if len(sizes) == 1:
        return RowLayout(m, strides[0])
    if len(sizes) == 2:
        return RowLayout(m, strides[0], sizes[1], strides[1])
    return None


def _kernel_rows(layout: RowLayout) -> tuple:
    """(stride, R_IN, stride_in, TWO_LEVEL) kernel arguments of `layout`."""
    if layout.r_in is None:
        return layout.stride, 1, 0, False
    return layout.stride, layout.r_in, layout.stride_in, True


def layer_norm_fwd_rows(
    x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
    out_dtype: torch.dtype, store_stats: bool = True, interp: Optional[bool] = None,
    layout: Optional[RowLayout] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Normalise the rows of `x2` [M, C] (unit column stride): (y [M, C] out_dtype, mean, rstd).

    With `layout`, `x2` is any tensor whose rows `layout` addresses (``_row_layout``). mean and
    rstd are fp32 [M] (None unless `store_stats`). weight/bias are used in their own dtype (cast
    to fp32 in the kernel). `interp`: ``is_interpreter()`` (read here if None).
    """
    if layout is None:
        layout = RowLayout(x2.shape[0], x2.stride(0))
    m, c = layout.m, x2.shape[-1]
    device = x2.device
    plan = _fwd_plan(m, c, device, is_interpreter() if interp is None else interp, store_stats)
    y = torch.empty((m, c), dtype=out_dtype, device=device)
    mean = rstd = None
    if store_stats:
        mean = torch.empty((m,), dtype=torch.float32, device=device)
        rstd = torch.empty((m,), dtype=torch.float32, device=device)
    if m == 0:
        return y, mean, rstd
    stride_x, r_in, stride_x_in, two_level = _kernel_rows(layout)
    _layer_norm_fwd_kernel[plan.grid](
        x2, weight.contiguous(), bias.contiguous(), y,
        mean if store_stats else y, rstd if store_stats else y,
        m, c, stride_x, plan.stride_y, float(eps), r_in, stride_x_in, TWO_LEVEL=two_level,
        **plan.kwargs,
    )
    return y, mean, rstd


def layer_norm_bwd_rows(
    x2: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
    dy2: torch.Tensor, dx_dtype: torch.dtype, interp: Optional[bool] = None,
    layout: Optional[RowLayout] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx [M, C] dx_dtype, dweight fp32 [C], dbias fp32 [C]) for rows normalised by the forward.
    With `layout` (the forward's), dx has `x2`'s shape and, where `x2` is a permuted dense tensor,
    its strides (a transposed view's gradient is then contiguous once transposed back).
    `interp`: ``is_interpreter()`` (read here if None)."""
    c = x2.shape[-1]
    device = x2.device
    if layout is None:
        layout = RowLayout(x2.shape[0], x2.stride(0))
        dx = torch.empty((layout.m, c), dtype=dx_dtype, device=device)
        dx_layout = RowLayout(layout.m, c)
    else:
        dx = torch.empty_like(x2, dtype=dx_dtype)
        if dx.stride() == x2.stride():
            dx_layout = layout
        else:  # x is not dense (a slice): dx contiguous
            dx = torch.empty(x2.shape, dtype=dx_dtype, device=device)
            dx_layout = RowLayout(layout.m, c) if layout.r_in is None else \
                RowLayout(layout.m, layout.r_in * c, layout.r_in, c)
    m = layout.m
    if m == 0:
        z = torch.zeros((c,), dtype=torch.float32, device=device)
        return dx, z, z.clone()
    plan = _bwd_plan(m, c, device, is_interpreter() if interp is None else interp)
    dw_part = torch.empty((plan.n_prog, c), dtype=torch.float32, device=device)
    db_part = torch.empty((plan.n_prog, c), dtype=torch.float32, device=device)
    stride_x, r_in, stride_x_in, two_level = _kernel_rows(layout)
    stride_dx, _, stride_dx_in, _ = _kernel_rows(dx_layout)
    _layer_norm_bwd_kernel[(plan.n_prog,)](
        x2, weight.contiguous(), dy2, dx, mean, rstd, dw_part, db_part,
        m, c, stride_x, dy2.stride(0), stride_dx, plan.rows_per_program, r_in, stride_x_in,
        stride_dx_in, TWO_LEVEL=two_level, **plan.kwargs,
    )
    return dx, dw_part.sum(0), db_part.sum(0)


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------
class _LayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, out_dtype, param_dtype):
        # param_dtype: the dtype the weight and bias are rounded to before use (OpenFold's bf16
        # branch casts them to bf16); None keeps them as given.
        c = x.shape[-1]
        w = weight if param_dtype is None else weight.to(param_dtype)
        b = bias if param_dtype is None else bias.to(param_dtype)
        # x read where it lies when its rows are at most two strided dims (a transposed view:
        # no copy), else as [M, C] rows (a copy only if it must); y is contiguous
        layout = _row_layout(x)
        xs = x if layout is not None else _rows(x, c)
        interp = is_interpreter()
        y, mean, rstd = layer_norm_fwd_rows(xs, w, b, eps, out_dtype, interp=interp, layout=layout)
        ctx.save_for_backward(xs, w, mean, rstd)
        ctx.meta = (x.shape, x.dtype, weight.dtype, bias.dtype, interp)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        xs, w, mean, rstd = ctx.saved_tensors
        shape, x_dtype, w_dtype, b_dtype, interp = ctx.meta
        # the layout of the saved x as it comes back: a saved-tensor hook (e.g. torch's
        # save_on_cpu) may return it with other strides than the forward read
        layout = _row_layout(xs)
        if layout is None:
            xs = _rows(xs, shape[-1])
        dx, dw, db = layer_norm_bwd_rows(xs, w, mean, rstd, _rows(dy, shape[-1]), x_dtype,
                                         interp=interp, layout=layout)
        return dx.view(shape), dw.to(w_dtype), db.to(b_dtype), None, None, None


def _openfold_dtypes(x: torch.Tensor) -> Tuple[torch.dtype, Optional[torch.dtype]]:
    """(output dtype, parameter rounding dtype) of OpenFold's LayerNorm for input `x`."""
    if x.dtype == torch.bfloat16:
        return torch.bfloat16, torch.bfloat16
    if autocast_dtype(x.device.type) is not None:
        return torch.float32, None
    return x.dtype, None


def _torch_dtypes(x: torch.Tensor) -> Tuple[torch.dtype, Optional[torch.dtype]]:
    """(output dtype, parameter rounding dtype) of torch.nn.LayerNorm for input `x`."""
    if autocast_dtype(x.device.type) is not None:
        return torch.float32, None
    return x.dtype, None


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """OpenFold's LayerNorm over the last dim of x [*, C] (Triton path).

    Output dtype: bf16 for a bf16 x (weight and bias rounded to bf16 first, as OpenFold does);
    fp32 for any other x under autocast; x's dtype otherwise. Statistics and the affine map in
    fp32. Gradients for x, weight and bias.
    """
    out_dtype, param_dtype = _openfold_dtypes(x)
    return _LayerNormFn.apply(x, weight, bias, eps, out_dtype, param_dtype)


def layer_norm_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """torch.nn.LayerNorm over the last dim of x [*, C] (Triton path).

    Output dtype: fp32 under autocast (whatever x's dtype, as CUDA autocast runs layer_norm),
    x's dtype otherwise. Statistics and the affine map in fp32. Gradients for x, weight, bias.
    """
    out_dtype, param_dtype = _torch_dtypes(x)
    return _LayerNormFn.apply(x, weight, bias, eps, out_dtype, param_dtype)


# ----------------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------------
def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """OpenFold's ``primitives.LayerNorm.forward`` in plain PyTorch.

    bf16 x: ``F.layer_norm`` with weight/bias cast to bf16 and autocast off. Otherwise
    ``F.layer_norm`` as CUDA autocast runs it (see ``layer_norm_torch_reference``).
    """
    if x.dtype == torch.bfloat16:
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x, (x.shape[-1],), weight.to(x.dtype), bias.to(x.dtype), eps)
    return layer_norm_torch_reference(x, weight, bias, eps)


def layer_norm_torch_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``torch.nn.LayerNorm``'s forward as CUDA autocast dispatches it, in plain PyTorch.

    Under autocast, layer_norm is an fp32 op: every input is cast to fp32 and the output is fp32.
    Written out explicitly so that the CPU (whose autocast keeps layer_norm in low precision)
    follows the same contract as CUDA.
    """
    if autocast_dtype(x.device.type) is not None:
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
