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
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._triton_utils import (
    autocast_dtype,
    check_launchable,
    is_interpreter,
    max_programs,
    next_power_of_2,
)

MAX_C = 16384  # one row is one block of registers


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _layer_norm_fwd_kernel(
    X, W, B, Y, MEAN, RSTD,
    M, C, stride_x, stride_y, eps,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, STORE_STATS: tl.constexpr,
):
    """Y[r] = (X[r] - mean) * rstd * W + B for BLOCK_M rows of length C; fp32 statistics."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < M
    col_ok = cols < C
    ok = row_ok[:, None] & col_ok[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0).to(tl.float32)
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
    M, C, stride_x, stride_dy, stride_dx, rows_per_program,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dx for `rows_per_program` rows, and this program's partial sums of dweight and dbias.

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
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        xhat = tl.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = w[None, :] * dy
        c1 = tl.sum(xhat * wdy, axis=1) / C
        c2 = tl.sum(wdy, axis=1) / C
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=ok)
        dw_acc += tl.sum(dy * xhat, axis=0)
        db_acc += tl.sum(dy, axis=0)
    tl.store(DW_PART + pid * C + cols, dw_acc, mask=col_ok)
    tl.store(DB_PART + pid * C + cols, db_acc, mask=col_ok)


# ----------------------------------------------------------------------------------------------
# launchers (2-D row views; also used by transition.py)
# ----------------------------------------------------------------------------------------------
def _block_m(block_c: int) -> int:
    # About 4K elements per program on a GPU (16 rows at C=256); bigger tiles in the interpreter,
    # where each program is a Python-level loop.
    elems = 32768 if is_interpreter() else 4096
    return max(1, min(128, elems // block_c))


def _rows(t: torch.Tensor, c: int) -> torch.Tensor:
    """[M, C] view of `t` with unit column stride (copies only if it must)."""
    t2 = t.reshape(-1, c)
    if t2.stride(-1) != 1 or (t2.shape[0] > 1 and t2.stride(0) < c):
        t2 = t2.contiguous()
    return t2


def layer_norm_fwd_rows(
    x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
    out_dtype: torch.dtype, store_stats: bool = True,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Normalise the rows of `x2` [M, C] (unit column stride): (y [M, C] out_dtype, mean, rstd).

    mean and rstd are fp32 [M] (None unless `store_stats`). weight/bias are used in their own
    dtype (cast to fp32 in the kernel).
    """
    m, c = x2.shape
    if c > MAX_C:
        raise ValueError(f"layer_norm: channel dim {c} > {MAX_C} is not supported by the Triton path")
    check_launchable(x2)
    y = torch.empty((m, c), dtype=out_dtype, device=x2.device)
    mean = rstd = None
    if store_stats:
        mean = torch.empty((m,), dtype=torch.float32, device=x2.device)
        rstd = torch.empty((m,), dtype=torch.float32, device=x2.device)
    if m == 0:
        return y, mean, rstd
    block_c = next_power_of_2(c)
    block_m = _block_m(block_c)
    grid = (triton.cdiv(m, block_m),)
    _layer_norm_fwd_kernel[grid](
        x2, weight.contiguous(), bias.contiguous(), y,
        mean if store_stats else y, rstd if store_stats else y,
        m, c, x2.stride(0), y.stride(0), float(eps),
        BLOCK_M=block_m, BLOCK_C=block_c, STORE_STATS=store_stats,
        num_warps=4 if block_c * block_m <= 4096 else 8,
    )
    return y, mean, rstd


def layer_norm_bwd_rows(
    x2: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
    dy2: torch.Tensor, dx_dtype: torch.dtype,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx [M, C] dx_dtype, dweight fp32 [C], dbias fp32 [C]) for rows normalised by the forward."""
    m, c = x2.shape
    dx = torch.empty((m, c), dtype=dx_dtype, device=x2.device)
    if m == 0:
        z = torch.zeros((c,), dtype=torch.float32, device=x2.device)
        return dx, z, z.clone()
    block_c = next_power_of_2(c)
    block_m = _block_m(block_c)
    n_tiles = triton.cdiv(m, block_m)
    n_prog = min(n_tiles, max_programs(x2.device))
    rows_per_program = triton.cdiv(n_tiles, n_prog) * block_m
    n_prog = triton.cdiv(m, rows_per_program)
    dw_part = torch.empty((n_prog, c), dtype=torch.float32, device=x2.device)
    db_part = torch.empty((n_prog, c), dtype=torch.float32, device=x2.device)
    _layer_norm_bwd_kernel[(n_prog,)](
        x2, weight.contiguous(), dy2, dx, mean, rstd, dw_part, db_part,
        m, c, x2.stride(0), dy2.stride(0), dx.stride(0), rows_per_program,
        BLOCK_M=block_m, BLOCK_C=block_c,
        num_warps=4 if block_c * block_m <= 4096 else 8,
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
        x2 = _rows(x, c)
        y, mean, rstd = layer_norm_fwd_rows(x2, w, b, eps, out_dtype)
        ctx.save_for_backward(x2, w, mean, rstd)
        ctx.shape = x.shape
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, w, mean, rstd = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        dx, dw, db = layer_norm_bwd_rows(x2, w, mean, rstd, _rows(dy, x2.shape[1]), x_dtype)
        return dx.view(ctx.shape), dw.to(w_dtype), db.to(b_dtype), None, None, None


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
