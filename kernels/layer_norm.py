"""LayerNorm over the last dim: OpenFold's contract and torch.nn.LayerNorm's contract.

Three ops share one pair of kernels; the first two differ only in the dtype they compute and
return:

* ``layer_norm`` follows OpenFold's ``primitives.LayerNorm.forward``: a bf16 input is normalised
  with the weight and bias cast to bf16 and autocast off (bf16 out); any other input goes
  through ``F.layer_norm`` (fp32 out under autocast, the input's dtype otherwise).
* ``layer_norm_torch`` follows ``torch.nn.LayerNorm`` as CUDA autocast dispatches it: fp32 out
  under autocast whatever the input dtype, the input's dtype otherwise.
* ``layer_norm_fanout`` is ``layer_norm`` for the n Linears that read its output (an attention's
  q, k, v, gate and bias projections), with the module's input carried for the residual add
  around it: under autocast the output is stored rounded to bf16 once for all readers (the
  values each Linear's own rounding gives), and one backward kernel sums the readers' gradients
  in fp32, runs the LayerNorm backward and adds the residual's gradient to dx.

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
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._triton_utils import (
    autocast_dtype,
    cast_rne,
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
    X, W, B, Y, MEAN, RSTD, U, XS,
    M, C, stride_x, stride_y, eps, R_IN, stride_x_in,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, STORE_STATS: tl.constexpr,
    TWO_LEVEL: tl.constexpr, INTERP: tl.constexpr, HAS_UPD: tl.constexpr,
):
    """Y[r] = (X[r] - mean) * rstd * W + B for BLOCK_M rows of length C; fp32 statistics.
    X's row r is at r * stride_x, or with ``TWO_LEVEL`` at (r // R_IN) * stride_x +
    (r % R_IN) * stride_x_in (a transposed view: see ``_row_layout``). With HAS_UPD the rows
    normalised are X + U (added in fp32, rounded to XS's dtype and stored in XS; U and XS laid
    out as X): a residual add fused into the LayerNorm that reads its sum."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < M
    col_ok = cols < C
    ok = row_ok[:, None] & col_ok[None, :]
    x_rows = _row_offsets(rows, stride_x, R_IN, stride_x_in, TWO_LEVEL)
    x = tl.load(X + x_rows[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_UPD:
        x += tl.load(U + x_rows[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        xs = cast_rne(x, XS.dtype.element_ty, INTERP)
        tl.store(XS + x_rows[:, None] + cols[None, :], xs, mask=ok)
        x = xs.to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    xc = tl.where(ok, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / C
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], cast_rne(y, Y.dtype.element_ty, INTERP),
             mask=ok)
    if STORE_STATS:
        tl.store(MEAN + rows, mean, mask=row_ok)
        tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _layer_norm_bwd_kernel(
    X, W, DY, DY1, DY2, DY3, DY4, DY5, DRES, DX, DXL, MEAN, RSTD, DW_PART, DB_PART,
    M, C, stride_x, stride_dy, stride_dx, rows_per_program, R_IN, stride_x_in, stride_dx_in,
    stride_r, R_IN_R, stride_r_in,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, TWO_LEVEL: tl.constexpr,
    N_DY: tl.constexpr, HAS_RES: tl.constexpr, RES_TWO_LEVEL: tl.constexpr,
    HAS_LOW: tl.constexpr, INTERP: tl.constexpr,
):
    """dx for `rows_per_program` rows, and this program's partial sums of dweight and dbias.
    X and DX rows as in the forward (``TWO_LEVEL``: each with its own strides, one R_IN).

    dy = DY + DY1 + ... (the first N_DY, all with DY's row stride), summed in fp32 in that order
    (the gradients of one output read by several consumers: ``layer_norm_fanout``);
    xhat = (x - mean) * rstd;  dx = rstd * (w*dy - mean_c(w*dy * xhat) * xhat - mean_c(w*dy));
    with HAS_RES, dx += DRES (rows at r * stride_r, or two-level with R_IN_R, stride_r_in):
    the gradient x receives from its other reader, a residual add; with HAS_LOW, dx also
    rounded to DXL's dtype into DXL (laid out as DX: the gradient of a low-precision summand of
    x, ``layer_norm_fwd_rows``' update);
    dweight = sum_rows dy * xhat;  dbias = sum_rows dy.
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    # dweight / dbias partials tile by tile, reduced over rows once at the end (a reduction
    # across each tile's rows would cross warps every step)
    dw_acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    row0 = pid.to(tl.int64) * rows_per_program
    for i in range(0, rows_per_program, BLOCK_M):
        rows = row0 + i + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        ok = row_ok[:, None] & col_ok[None, :]
        x_rows = _row_offsets(rows, stride_x, R_IN, stride_x_in, TWO_LEVEL)
        x = tl.load(X + x_rows[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        dy_off = rows[:, None] * stride_dy + cols[None, :]
        dy = tl.load(DY + dy_off, mask=ok, other=0.0).to(tl.float32)
        if N_DY > 1:
            dy += tl.load(DY1 + dy_off, mask=ok, other=0.0).to(tl.float32)
        if N_DY > 2:
            dy += tl.load(DY2 + dy_off, mask=ok, other=0.0).to(tl.float32)
        if N_DY > 3:
            dy += tl.load(DY3 + dy_off, mask=ok, other=0.0).to(tl.float32)
        if N_DY > 4:
            dy += tl.load(DY4 + dy_off, mask=ok, other=0.0).to(tl.float32)
        if N_DY > 5:
            dy += tl.load(DY5 + dy_off, mask=ok, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        xhat = tl.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = w[None, :] * dy
        c1 = tl.sum(xhat * wdy, axis=1) / C
        c2 = tl.sum(wdy, axis=1) / C
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_RES:
            r_rows = _row_offsets(rows, stride_r, R_IN_R, stride_r_in, RES_TWO_LEVEL)
            dx += tl.load(DRES + r_rows[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        dx_rows = _row_offsets(rows, stride_dx, R_IN, stride_dx_in, TWO_LEVEL)
        tl.store(DX + dx_rows[:, None] + cols[None, :], dx.to(DX.dtype.element_ty), mask=ok)
        if HAS_LOW:
            tl.store(DXL + dx_rows[:, None] + cols[None, :],
                     cast_rne(dx, DXL.dtype.element_ty, INTERP), mask=ok)
        dw_acc += dy * xhat
        db_acc += dy
    # partials [C, programs]: the caller's sum over them runs along contiguous memory
    n_prog = tl.num_programs(0)
    tl.store(DW_PART + cols * n_prog + pid, tl.sum(dw_acc, axis=0), mask=col_ok)
    tl.store(DB_PART + cols * n_prog + pid, tl.sum(db_acc, axis=0), mask=col_ok)


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


def _broadcast_rows(g: torch.Tensor) -> bool:
    """Whether `g` [*, C] has a stride of 0 on every dim but the last (one row broadcast to all:
    the gradient a sum's backward hands out) and more than one row."""
    return g.dim() > 1 and g.numel() > g.shape[-1] > 0 and not any(g.stride()[:-1])


def grad_rows(g: torch.Tensor, c: int) -> torch.Tensor:
    """[M, C] rows of a gradient with unit column stride, for kernels that only read them:
    ``_rows``, except that a gradient broadcast over its rows (``_broadcast_rows``) stays a view
    with row stride 0 (its one row made contiguous first where it is broadcast along C too: C
    elements) instead of being materialised."""
    if not _broadcast_rows(g):
        return _rows(g, c)
    row = g[(0,) * (g.dim() - 1)]
    if row.stride(-1) != 1 and c > 1:
        row = row.contiguous()
    return row.expand(g.numel() // c, c)


def read_grad_rows(g: torch.Tensor) -> Tuple[torch.Tensor, "RowLayout"]:
    """``read_rows`` for a gradient that kernels only read: one broadcast over its rows is read
    where it lies, with row stride 0 (``grad_rows``)."""
    if not _broadcast_rows(g):
        return read_rows(g)
    g2 = grad_rows(g, g.shape[-1])
    return g2, RowLayout(g2.shape[0], 0)


class _FwdPlan(NamedTuple):
    """What a forward launch fixes for [M, C] rows: grid, y's row stride, launch keywords."""
    grid: tuple
    stride_y: int
    kwargs: dict  # BLOCK_M, BLOCK_C, STORE_STATS, INTERP, num_warps


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
        kwargs=dict(BLOCK_M=block_m, BLOCK_C=block_c, STORE_STATS=store_stats, INTERP=interp,
                    num_warps=4 if block_c * block_m <= 4096 else 8),
    )


class _BwdPlan(NamedTuple):
    """What a backward launch fixes for [M, C] rows: the program count and rows per program,
    dx's row stride, launch keywords."""
    n_prog: int
    rows_per_program: int
    stride_dx: int
    kwargs: dict  # BLOCK_M, BLOCK_C, num_warps


# The backward's launch shape on a GPU (``benchmarks/sweep_row_passes.py`` times the
# alternatives): elements per row tile, programs per SM (each loops over its share of the rows
# and writes one partial dweight / dbias column), warps per program. Since the partials are
# reduced once per program (b66c0bf), 4 programs per SM lead or tie every case of the sweep on
# an H100 (``logs/sweep-row-passes_h100_b66c0bf.txt``: 366 vs 379 us for the MSA attention's
# LayerNorm at 512 x 384, 82 vs 111 us at 128 x 256); 16 did before.
_BWD_TILE_ELEMS = 4096
_BWD_PROGRAMS_PER_SM = 4
_BWD_WARPS = 4


@functools.lru_cache(maxsize=256)
def _bwd_plan(m: int, c: int, device: torch.device, interp: bool) -> _BwdPlan:
    """The ``_BwdPlan`` for `m` (> 0) rows of `c` channels on `device`, under the interpreter
    (`interp`) or not."""
    block_c = next_power_of_2(c)
    block_m = _block_m(block_c, interp) if interp else max(1, min(128, _BWD_TILE_ELEMS // block_c))
    n_tiles = cdiv(m, block_m)
    n_prog = min(n_tiles, max_programs(device, _BWD_PROGRAMS_PER_SM))
    rows_per_program = cdiv(n_tiles, n_prog) * block_m
    return _BwdPlan(
        n_prog=cdiv(m, rows_per_program),
        rows_per_program=rows_per_program,
        stride_dx=torch.empty((m, c), device="meta").stride(0),
        kwargs=dict(BLOCK_M=block_m, BLOCK_C=block_c,
                    num_warps=_BWD_WARPS if block_c * block_m <= 4096 else 2 * _BWD_WARPS),
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
    layout: Optional[RowLayout] = None, update: Optional[torch.Tensor] = None,
    xs: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Normalise the rows of `x2` [M, C] (unit column stride): (y [M, C] out_dtype, mean, rstd).

    With `layout`, `x2` is any tensor whose rows `layout` addresses (``_row_layout``). mean and
    rstd are fp32 [M] (None unless `store_stats`). weight/bias are used in their own dtype (cast
    to fp32 in the kernel). `interp`: ``is_interpreter()`` (read here if None). With `update`
    (and `xs`, both with x2's strides), the rows normalised are x2 + update, added in fp32 and
    rounded to xs's dtype, and stored in xs.
    """
    if (update is None) != (xs is None) or (update is not None and not (
            update.shape == xs.shape == x2.shape and update.stride() == xs.stride() == x2.stride())):
        raise ValueError("layer_norm_fwd_rows: update and xs come together, with x2's shape and "
                         "strides")
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
        x2 if update is None else update, x2 if xs is None else xs,
        m, c, stride_x, plan.stride_y, float(eps), r_in, stride_x_in, TWO_LEVEL=two_level,
        HAS_UPD=update is not None, **plan.kwargs,
    )
    return y, mean, rstd


MAX_DY = 6  # gradients of one output summed by the backward kernel (``layer_norm_fanout``)


def layer_norm_bwd_rows(
    x2: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
    dy2: torch.Tensor, dx_dtype: torch.dtype, interp: Optional[bool] = None,
    layout: Optional[RowLayout] = None, more_dy: Sequence[torch.Tensor] = (),
    dres: Optional[torch.Tensor] = None, dres_layout: Optional[RowLayout] = None,
    dx_low: Optional[torch.dtype] = None,
) -> Tuple[torch.Tensor, ...]:
    """(dx [M, C] dx_dtype, dweight fp32 [C], dbias fp32 [C]) for rows normalised by the forward.
    With `layout` (the forward's), dx has `x2`'s shape and, where `x2` is a permuted dense tensor,
    its strides (a transposed view's gradient is then contiguous once transposed back).
    `more_dy`: up to MAX_DY - 1 more output gradients with dy2's row stride, added to dy2 in
    fp32 in order. `dres`: a gradient added to dx (rows as `dres_layout` says; [M, C] rows with
    unit column stride if None). `interp`: ``is_interpreter()`` (read here if None). With
    `dx_low` (a dtype), a fourth result: dx rounded to it, laid out as dx (the gradient of the
    low-precision update of ``layer_norm_fwd_rows``)."""
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
    dxl = None if dx_low is None else torch.empty_like(dx, dtype=dx_low)  # (dx's strides)
    if m == 0:
        z = torch.zeros((c,), dtype=torch.float32, device=device)
        return (dx, z, z.clone()) + ((dxl,) if dxl is not None else ())
    if len(more_dy) >= MAX_DY:
        raise ValueError(f"layer_norm backward sums at most {MAX_DY} output gradients")
    interp = is_interpreter() if interp is None else interp
    plan = _bwd_plan(m, c, device, interp)
    parts = torch.empty((2, c, plan.n_prog), dtype=torch.float32, device=device)
    stride_x, r_in, stride_x_in, two_level = _kernel_rows(layout)
    stride_dx, _, stride_dx_in, _ = _kernel_rows(dx_layout)
    dys = (dy2, *more_dy) + (dy2,) * (MAX_DY - 1 - len(more_dy))
    if dres is None:
        res_rows = (0, 1, 0, False)
    else:
        res_rows = _kernel_rows(dres_layout if dres_layout is not None
                                else RowLayout(m, dres.stride(0)))
    _layer_norm_bwd_kernel[(plan.n_prog,)](
        x2, weight.contiguous(), *dys, dres if dres is not None else dx, dx,
        dxl if dxl is not None else dx, mean, rstd,
        parts[0], parts[1], m, c, stride_x, dy2.stride(0), stride_dx, plan.rows_per_program,
        r_in, stride_x_in, stride_dx_in, *res_rows[:3], TWO_LEVEL=two_level,
        N_DY=1 + len(more_dy), HAS_RES=dres is not None, RES_TWO_LEVEL=res_rows[3],
        HAS_LOW=dxl is not None, INTERP=interp, **plan.kwargs,
    )
    dw, db = parts.sum(2)
    return (dx, dw, db) + ((dxl,) if dxl is not None else ())


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------
def read_rows(x: torch.Tensor) -> Tuple[torch.Tensor, RowLayout]:
    """x's rows as the kernels read them: x where it lies, when its rows are at most two strided
    dims (a transposed view: no copy), else as [M, C] rows (a copy only if it must); with their
    ``RowLayout``."""
    layout = _row_layout(x)
    if layout is not None:
        return x, layout
    x2 = _rows(x, x.shape[-1])
    return x2, RowLayout(x2.shape[0], x2.stride(0))


def _forward(x, weight, bias, eps, out_dtype, param_dtype, store_stats: bool = True):
    """(y [x.shape, out_dtype] contiguous, x's rows as read, the weight as used, mean, rstd,
    interp). param_dtype: the dtype the weight and bias are rounded to before use (OpenFold's
    bf16 branch casts them to bf16); None keeps them as given."""
    w = weight if param_dtype is None else weight.to(param_dtype)
    b = bias if param_dtype is None else bias.to(param_dtype)
    xs, layout = read_rows(x)
    interp = is_interpreter()
    y, mean, rstd = layer_norm_fwd_rows(xs, w, b, eps, out_dtype, store_stats, interp, layout)
    return y.view(x.shape), xs, w, mean, rstd, interp


def _backward(ctx, dys, dres=None):
    """(dx, dweight, dbias) of a forward that saved (xs, w, mean, rstd) and its meta (shape, x,
    weight and bias dtypes, interp) on `ctx`, for the output gradients `dys` (summed) and the
    gradient `dres` added to dx."""
    xs, w, mean, rstd = ctx.saved_tensors
    shape, x_dtype, w_dtype, b_dtype, interp = ctx.meta[:5]
    c = shape[-1]
    dys = [grad_rows(g, c) for g in dys]
    if any(d.stride(0) != dys[0].stride(0) for d in dys):
        dys = [d.contiguous() for d in dys]
    if len(dys) > MAX_DY:  # more readers than the kernel takes: pre-sum the rest
        dys = dys[:MAX_DY - 1] + [torch.stack(dys[MAX_DY - 1:]).float().sum(0)]
    dres_layout = None
    if dres is not None:
        dres, dres_layout = read_grad_rows(dres)
    # the layout of the saved x as it comes back: a saved-tensor hook (e.g. torch's
    # save_on_cpu) may return it with other strides than the forward read
    xs, layout = read_rows(xs)
    dx, dw, db = layer_norm_bwd_rows(xs, w, mean, rstd, dys[0], x_dtype, interp=interp,
                                     layout=layout, more_dy=dys[1:], dres=dres,
                                     dres_layout=dres_layout)
    return dx.view(shape), dw.to(w_dtype), db.to(b_dtype)


class _LayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, out_dtype, param_dtype):
        y, xs, w, mean, rstd, interp = _forward(x, weight, bias, eps, out_dtype, param_dtype)
        ctx.save_for_backward(xs, w, mean, rstd)
        ctx.meta = (x.shape, x.dtype, weight.dtype, bias.dtype, interp)
        return y

    @staticmethod
    def backward(ctx, dy):
        return (*_backward(ctx, [dy]), None, None, None)


class _LayerNormFanoutFn(torch.autograd.Function):
    """LayerNorm whose output `n` readers take as aliases (their gradients summed in fp32 by the
    backward kernel) and, with `carry`, whose input comes back as one more output: the gradient
    of x from its other reader (a residual add) is then added to dx by the same kernel."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, n, carry, out_dtype, param_dtype):
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None
        y, xs, w, mean, rstd, interp = _forward(x, weight, bias, eps, out_dtype, param_dtype)
        ctx.save_for_backward(xs, w, mean, rstd)
        ctx.meta = (x.shape, x.dtype, weight.dtype, bias.dtype, interp, n, carry)
        outs = tuple(y.view_as(y) for _ in range(n))
        return outs + (x,) if carry else outs

    @staticmethod
    def backward(ctx, *grads):
        n, carry = ctx.meta[5:]
        dys = [g for g in grads[:n] if g is not None]
        dres = grads[n] if carry else None
        if not dys:  # only the carried x has a gradient
            return dres, None, None, None, None, None, None, None
        return (*_backward(ctx, dys, dres), None, None, None, None, None)


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


def _fanout_dtype(x: torch.Tensor, out_dtype: torch.dtype) -> torch.dtype:
    """The dtype a Linear reading an `out_dtype` LayerNorm output of `x` computes in: the
    autocast dtype where autocast would round it (an fp32 output), else `out_dtype`."""
    dt = autocast_dtype(x.device.type)
    return dt if dt is not None and out_dtype == torch.float32 else out_dtype


def layer_norm_fanout(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                      n: int, carry: bool = False) -> Tuple[torch.Tensor, ...]:
    """OpenFold's LayerNorm (``layer_norm``) of x [*, C] for `n` Linears that read it, and with
    `carry` x itself (for its other reader, e.g. the residual add around the module): a tuple
    of n (+1) tensors (Triton path).

    Under autocast, where each Linear would round the fp32 LayerNorm output to the autocast
    dtype, the kernel stores it rounded, once (the values every reader gets are the ones
    autocast gives); otherwise the output dtype of ``layer_norm``. The n outputs are aliases of
    one tensor. In backward one kernel sums their gradients in fp32 (in output order), runs the
    LayerNorm backward and, with `carry`, adds the carried x's gradient to dx: what autograd
    would do with one cast and one add per reader. Gradients for x, weight and bias."""
    if n < 1:
        raise ValueError(f"layer_norm_fanout needs n >= 1 readers, got {n}")
    out_dtype, param_dtype = _openfold_dtypes(x)
    out_dtype = _fanout_dtype(x, out_dtype)
    if not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad
                                           or bias.requires_grad):
        y = _forward(x, weight, bias, eps, out_dtype, param_dtype, store_stats=False)[0]
        return (y,) * n + ((x,) if carry else ())
    return _LayerNormFanoutFn.apply(x, weight, bias, eps, n, carry, out_dtype, param_dtype)


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


def layer_norm_fanout_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                eps: float, n: int, carry: bool = False) -> Tuple[torch.Tensor, ...]:
    """Stock OpenFold: ``layer_norm_reference`` once, its output handed to each of the `n`
    readers (each Linear rounds it under autocast; autograd sums their gradients), then x."""
    if n < 1:
        raise ValueError(f"layer_norm_fanout needs n >= 1 readers, got {n}")
    y = layer_norm_reference(x, weight, bias, eps)
    return (y,) * n + ((x,) if carry else ())
