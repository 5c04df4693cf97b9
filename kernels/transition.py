"""OpenFold's MSA / pair transition: ``linear_2(relu(linear_1(layer_norm(x)))) * mask``.

With ``residual``, the op returns ``x + that``: the residual add the Evoformer blocks put around
the transition, fused with the row mask (below). With ``update`` too, it runs on ``x + update``:
the block's previous residual add (the column attention's update of m), which the LayerNorm's
forward kernel sums as it reads x (storing the sum, which the rest reads) and whose gradient for
the update the LayerNorm's backward kernel rounds as it writes dx: stock's fp32 add and its
backward's conversion, two passes over m, gone.

``MSATransition._transition`` (c_m 256, n 4) and ``PairTransition._transition`` (c_z 128, n 4).

Triton path, forward:
  1. Triton LayerNorm (OpenFold's contract) that stores straight in the dtype linear_1 runs in
     (one rounding where stock rounds the LayerNorm output, then casts it for autocast), plus the
     fp32 row statistics.
  2. linear_1 + bias + ReLU as one cuBLASLt GEMM with its bias/ReLU epilogue
     (``torch._addmm_activation``): the hidden [*, 4C] pre-activation is never written.
  3. linear_2 + bias (cuBLASLt epilogue), then the row mask (in place when the dtypes allow);
     with ``residual``, one Triton pass x + y * mask instead (stock: the mask multiply, then
     the block's add, two activation-sized passes and an fp32 intermediate).
  The GEMMs are compute-bound at AF2 sizes and stay on cuBLAS.
Backward (memory: x, the fp32 row statistics and the hidden activation are kept; the LayerNorm
output is recomputed, it is not stored as stock does):
  - one Triton pass d2 = d_out * mask (rounded to the compute dtype) with the column sums for b2;
  - dW2 = d2^T h, dh = d2 W2 (cuBLAS);
  - one Triton pass, in place, d_pre = dh * (h > 0) with the column sums for b1;
  - the LayerNorm output recomputed by the Triton kernel, dW1 = d_pre^T ln, d_ln = d_pre W1;
  - Triton LayerNorm backward (dx, and dln_w / dln_b from per-program partials); with
    ``residual`` the same kernel adds the sum's gradient to dx (the residual's own gradient,
    stock's separate add).

Precision contract (both paths agree with stock OpenFold to rounding):
  - compute dtype: the autocast dtype under autocast, else x's dtype (weights cast to it);
  - LayerNorm per ``layer_norm`` (fp32 statistics; bf16 x: bf16 weights), rounded once to the
    compute dtype;
  - GEMMs in the compute dtype with fp32 accumulation (cuBLAS; fp32 is IEEE unless
    ``torch.backends.cuda.matmul.allow_tf32``), outputs rounded to the compute dtype;
  - output dtype: promote(compute dtype, mask dtype) (stock multiplies by the mask after linear_2,
    so an fp32 mask under autocast gives an fp32 output);
  - gradients: dx in x's dtype; weight gradients from GEMMs in the compute dtype, cast to each
    parameter's dtype; bias gradients summed in fp32 by the Triton passes (stock rounds them to
    the compute dtype first). The mask gets no gradient.

Host time. The backward passes' launch geometry is worked out once per (rows, columns, device,
interpreter or not) by ``_bwd_pass_plan``, the LayerNorm's by layer_norm.py's plans; whether the
interpreter runs is read once per forward and kept for its backward; autocast is switched off
around the GEMMs only where it is on (entering ``torch.autocast`` costs more Python than the
rest of a small call's host work).
"""
import functools
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._triton_utils import (
    autocast_dtype,
    autocast_off,
    cast_rne,
    cdiv,
    check_devices,
    is_interpreter,
    max_programs,
    next_power_of_2,
)
from .layer_norm import (
    _rows,
    grad_rows,
    layer_norm_bwd_rows,
    layer_norm_fwd_rows,
    layer_norm_reference,
)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _transition_bwd_kernel(
    G, AUX, OUT, PART,
    M, N, stride_g, stride_aux, stride_out, rows_per_program,
    RELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One backward elementwise pass over [M, N] with the column sums of its output.

    RELU False: OUT = G * AUX[row] (AUX: the [M] row mask), the gradient into linear_2.
    RELU True:  OUT = G * (AUX > 0) (AUX: the [M, N] ReLU output), the gradient into linear_1;
                OUT may be G itself (in place).
    OUT is rounded to its dtype; PART[cols, pid_m] gets the fp32 column sums of the rounded OUT
    over this program's rows (the bias gradient, reduced by the caller along PART's rows).
    """
    pid_m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # reduced over rows once, at the end
    row0 = pid_m.to(tl.int64) * rows_per_program
    for i in range(0, rows_per_program, BLOCK_M):
        rows = row0 + i + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        ok = row_ok[:, None] & col_ok[None, :]
        g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        if RELU:
            h = tl.load(AUX + rows[:, None] * stride_aux + cols[None, :], mask=ok, other=0.0)
            d = tl.where(h > 0, g, 0.0)
        else:
            s = tl.load(AUX + rows, mask=row_ok, other=0.0).to(tl.float32)
            d = g * s[:, None]
        d = d.to(OUT.dtype.element_ty)
        tl.store(OUT + rows[:, None] * stride_out + cols[None, :], d, mask=ok)
        acc += d.to(tl.float32)
    tl.store(PART + cols * tl.num_programs(0) + pid_m, tl.sum(acc, axis=0), mask=col_ok)


@triton.jit
def _masked_residual_kernel(
    X, Y, MASK, OUT, M, N, stride_x, stride_y,
    ROUND_PROD: tl.constexpr, INTERP: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """OUT = X + Y * MASK[row] over [M, N] rows (OUT contiguous): the row mask and the residual
    add in one pass. The product is rounded to Y's dtype when ROUND_PROD (stock's product has
    Y's dtype then, else fp32), the sum to OUT's dtype; launched without fp fusion, so the
    multiply and the add round separately, as stock's two ops do."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    ok = row_ok[:, None] & (cols < N)[None, :]
    y = tl.load(Y + rows[:, None] * stride_y + cols[None, :], mask=ok, other=0.0)
    s = tl.load(MASK + rows, mask=row_ok, other=0.0).to(tl.float32)
    p = y.to(tl.float32) * s[:, None]
    if ROUND_PROD:
        p = cast_rne(p, y.dtype, INTERP).to(tl.float32)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + rows[:, None] * N + cols[None, :], cast_rne(x + p, OUT.dtype.element_ty, INTERP),
             mask=ok)


class _BwdPassPlan(NamedTuple):
    """What a ``_transition_bwd_kernel`` launch fixes for [M, N]: grid, rows per program and
    launch keywords."""
    grid: tuple
    rows_per_program: int
    kwargs: dict  # BLOCK_M, BLOCK_N


# programs per SM of the backward passes (``benchmarks/sweep_row_passes.py`` times the
# choices): each loops over its share of the rows, one tile at a time
_BWD_PROGRAMS_PER_SM = 4


@functools.lru_cache(maxsize=256)
def _bwd_pass_plan(m: int, n: int, device: torch.device, interp: bool) -> _BwdPassPlan:
    """The ``_BwdPassPlan`` for `m` (> 0) rows of `n` columns on `device`, under the interpreter
    (`interp`) or not."""
    block_n = min(next_power_of_2(n), 128 if not interp else 1024)
    block_m = max(1, (32768 if interp else 4096) // block_n)
    n_col = cdiv(n, block_n)
    n_tiles = cdiv(m, block_m)
    n_row = min(n_tiles, max(1, max_programs(device, _BWD_PROGRAMS_PER_SM) // n_col))
    rows_per_program = cdiv(n_tiles, n_row) * block_m
    n_row = cdiv(m, rows_per_program)
    return _BwdPassPlan((n_row, n_col), rows_per_program, dict(BLOCK_M=block_m, BLOCK_N=block_n))


def _bwd_pass(g: torch.Tensor, aux: torch.Tensor, out: torch.Tensor, relu: bool,
              interp: bool) -> torch.Tensor:
    """Launch ``_transition_bwd_kernel``; returns the fp32 column sums of `out` [N].
    `interp`: ``is_interpreter()``."""
    m, n = g.shape
    if m == 0:
        return torch.zeros((n,), dtype=torch.float32, device=g.device)
    plan = _bwd_pass_plan(m, n, g.device, interp)
    part = torch.empty((n, plan.grid[0]), dtype=torch.float32, device=g.device)
    _transition_bwd_kernel[plan.grid](
        g, aux, out, part, m, n, g.stride(0), aux.stride(0) if relu else 0, out.stride(0),
        plan.rows_per_program, RELU=relu, **plan.kwargs,
    )
    return part.sum(1)


@functools.lru_cache(maxsize=256)
def _residual_launch(m: int, n: int, interp: bool) -> tuple:
    """(grid, launch keywords) of ``_masked_residual_kernel`` for [m, n] rows: about 4K elements
    per program on a GPU (bigger tiles in the interpreter)."""
    block_n = min(next_power_of_2(n), 1024)
    block_m = max(1, (32768 if interp else 4096) // block_n)
    return (cdiv(m, block_m), cdiv(n, block_n)), dict(BLOCK_M=block_m, BLOCK_N=block_n)


def _masked_residual(x2: torch.Tensor, y: torch.Tensor, mask_rows: torch.Tensor,
                     dtype: torch.dtype, round_prod: bool, interp: bool) -> torch.Tensor:
    """x2 + y * mask_rows[:, None] as a contiguous [M, N] tensor of `dtype` (x2 and y: rows
    with unit column stride)."""
    m, n = y.shape
    out = torch.empty((m, n), dtype=dtype, device=y.device)
    if m:
        grid, kwargs = _residual_launch(m, n, interp)
        _masked_residual_kernel[grid](x2, y, mask_rows, out, m, n, x2.stride(0), y.stride(0),
                                      ROUND_PROD=round_prod, INTERP=interp, **kwargs,
                                      enable_fp_fusion=False)
    return out


def _linear_relu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """relu(x @ w^T + b): cuBLASLt GEMM with the bias+ReLU epilogue where available."""
    if x.shape[0] == 0:
        return x.new_empty((0, w.shape[0]))
    return torch._addmm_activation(b, x, w.t())


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------
class _TransitionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask_rows, ln_w, ln_b, w1, b1, w2, b2, eps, cdt, out_dtype, residual,
                update):
        c = x.shape[-1]
        x2 = _rows(x, c)
        check_devices(x2.device)
        interp = is_interpreter()
        s_dt = x.dtype  # the dtype of what is normalised: x, or x + update
        u2 = None
        if update is not None:
            s_dt = torch.promote_types(x.dtype, update.dtype)
            x2, u2 = x2.contiguous(), _rows(update, c).contiguous()  # (rows: no copies)
        # OpenFold's LayerNorm: a bf16 x is normalised with bf16 weights
        lw, lb = (ln_w, ln_b) if s_dt != torch.bfloat16 else (ln_w.to(s_dt), ln_b.to(s_dt))
        w1c, b1c, w2c, b2c = (t.to(cdt) for t in (w1, b1, w2, b2))
        with autocast_off(x.device.type):
            xs = None if u2 is None else torch.empty_like(x2, dtype=s_dt)
            ln, mean, rstd = layer_norm_fwd_rows(x2, lw, lb, eps, cdt, interp=interp, update=u2,
                                                 xs=xs)
            if xs is not None:
                x2 = xs  # x + update: what the rest reads, and the backward's LayerNorm input
            h = _linear_relu(ln, w1c, b1c)
            del ln
            y = torch.addmm(b2c, h, w2c.t())
            if residual:
                out = _masked_residual(x2, y, mask_rows, torch.promote_types(s_dt, out_dtype),
                                       out_dtype == y.dtype, interp)
            elif out_dtype == y.dtype:
                out = y.mul_(mask_rows[:, None])
            else:
                out = y * mask_rows[:, None]
        ctx.save_for_backward(x2, lw, lb, mean, rstd, w1c, w2c, h, mask_rows)
        ctx.eps = eps
        ctx.interp = interp
        ctx.residual = residual
        ctx.meta = (x.shape, x.dtype, ln_w.dtype, ln_b.dtype, w1.dtype, b1.dtype, w2.dtype, b2.dtype)
        ctx.update = (s_dt, None if update is None else update.dtype)
        return out.view(*x.shape[:-1], w2.shape[0])

    @staticmethod
    def backward(ctx, g):
        x2, lw, lb, mean, rstd, w1c, w2c, h, mask_rows = ctx.saved_tensors
        shape, x_dt, lw_dt, lb_dt, w1_dt, b1_dt, w2_dt, b2_dt = ctx.meta
        cdt = h.dtype
        m = x2.shape[0]
        interp = ctx.interp
        with autocast_off(x2.device.type):
            g2 = grad_rows(g, g.shape[-1])  # (a sum's broadcast gradient: read in place)
            # with residual, g is also the residual's gradient, added to dx by the LayerNorm's
            # backward kernel
            dres = g2 if ctx.residual else None
            d2 = torch.empty((m, g2.shape[1]), dtype=cdt, device=g.device)
            db2 = _bwd_pass(g2, mask_rows, d2, relu=False, interp=interp)
            dw2 = d2.t().mm(h)
            dh = d2.mm(w2c)
            del d2
            db1 = _bwd_pass(dh, h, dh, relu=True, interp=interp)  # dh becomes d_pre, in place
            ln = layer_norm_fwd_rows(x2, lw, lb, ctx.eps, cdt, store_stats=False, interp=interp)[0]
            dw1 = dh.t().mm(ln)
            del ln
            dln = dh.mm(w1c)
            del dh
            s_dt, u_dt = ctx.update
            # with an update, dx is the sum's gradient: x's and the update's, each in its dtype
            # (the update's rounded by the same kernel where its dtype differs)
            need_upd = u_dt is not None and ctx.needs_input_grad[12]
            low = u_dt if need_upd and u_dt != s_dt else None
            dx, dlw, dlb, *du = layer_norm_bwd_rows(x2, lw, mean, rstd, dln, s_dt, interp=interp,
                                                    dres=dres, dx_low=low)
            d_upd = None
            if need_upd:
                d_upd = (du[0] if low is not None else dx.clone()).view(shape)
        return (dx.view(shape).to(x_dt), None, dlw.to(lw_dt), dlb.to(lb_dt), dw1.to(w1_dt),
                db1.to(b1_dt), dw2.to(w2_dt), db2.to(b2_dt), None, None, None, None, d_upd)


# ----------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------
def _mask_or_ones(x: torch.Tensor, mask: Optional[torch.Tensor],
                  dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    # OpenFold's transitions default to ones in their input's dtype: [*, 1]
    return x.new_ones((*x.shape[:-1], 1), dtype=dtype) if mask is None else mask


def _check_update(x: torch.Tensor, update: Optional[torch.Tensor], residual: bool) -> None:
    if update is None:
        return
    if not residual:
        raise ValueError("transition: an update is added to x only with residual=True")
    if update.shape != x.shape:
        raise ValueError(f"transition: update has shape {tuple(update.shape)}, x has "
                         f"{tuple(x.shape)}; they are added elementwise")
    if update.device != x.device:
        raise ValueError(f"transition: update is on {update.device}, x on {x.device}; move "
                         "them to one device")


def transition(
    x: torch.Tensor, mask: Optional[torch.Tensor], ln_w: torch.Tensor, ln_b: torch.Tensor,
    w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, eps: float = 1e-5,
    residual: bool = False, update: Optional[torch.Tensor] = None,
):
    """linear_2(relu(linear_1(layer_norm(x)))) * mask (Triton LayerNorm/backward passes + cuBLAS).

    x [*, C]; mask [*, 1] broadcastable to x's rows (None: ones in x's dtype, as OpenFold);
    ln_w, ln_b [C]; w1 [n*C, C], b1 [n*C]; w2 [C, n*C], b2 [C]. Returns [*, C] in
    promote(compute dtype, mask dtype). Gradients for x and every weight; none for the mask.
    With `residual`, x + that, in promote(x's dtype, that dtype): the residual add around the
    transition, fused with the mask multiply; its gradient reaches x through the LayerNorm's
    backward kernel (no add of its own). With `update` too (x's shape), the input is x + update
    (the previous residual add of a block, in promote(x's dtype, update's dtype)), summed by the
    LayerNorm's forward kernel, and the update's gradient rounded by its backward kernel: one
    pass less each way. See the module docstring for the precision contract.
    """
    _check_update(x, update, residual)
    s_dt = x.dtype if update is None else torch.promote_types(x.dtype, update.dtype)
    mask = _mask_or_ones(x, mask, s_dt)
    cdt = autocast_dtype(x.device.type) or s_dt  # (as the op on x + update would take)
    out_dtype = torch.promote_types(cdt, mask.dtype)
    rows = x.shape[:-1]
    # (contiguous: the backward kernel reads one value per row; a reshape of a strided view, e.g.
    # a DAP column shard's mask one column wide, can stay a strided view)
    mask_rows = mask.detach().expand(*rows, 1).reshape(-1).to(
        torch.promote_types(mask.dtype, cdt)).contiguous()
    return _TransitionFn.apply(x, mask_rows, ln_w, ln_b, w1, b1, w2, b2, eps, cdt, out_dtype,
                               residual, update)


def transition_reference(
    x: torch.Tensor, mask: Optional[torch.Tensor], ln_w: torch.Tensor, ln_b: torch.Tensor,
    w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, eps: float = 1e-5,
    residual: bool = False, update: Optional[torch.Tensor] = None,
):
    """OpenFold's ``MSATransition._transition`` / ``PairTransition._transition`` in plain PyTorch
    (with `residual`, x + that: the blocks' residual add, as OpenFold's ``add``; with `update`
    too, on x + update: the block's previous residual add)."""
    _check_update(x, update, residual)
    if update is not None:
        x = x + update
    mask = _mask_or_ones(x, mask)
    m = layer_norm_reference(x, ln_w, ln_b, eps)
    m = F.linear(m, w1, b1)
    m = torch.relu(m)
    m = F.linear(m, w2, b2) * mask
    return x + m if residual else m
