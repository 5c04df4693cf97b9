"""Shared-mask dropout fused with the residual add: ``residual + update * keep``.

OpenFold's ``Dropout`` (``DropoutRowwise``: ``batch_dim=-3``, ``DropoutColumnwise``:
``batch_dim=-2``) draws one keep-mask for a tensor of the update's shape with the batch dims set
to 1: ``keep = nn.Dropout(p)(update.new_ones(shape))`` (values 0 or 1/(1-p), in the update's
dtype), multiplies the update by it in place, and the caller adds the residual.

Both paths draw ``keep`` with exactly those torch RNG calls, so with the same seed they reproduce
stock OpenFold training runs bit for bit; the mask is tiny ([*, 1, N_res, C] for row-wise
dropout). The Triton path fuses the broadcast multiply and the add into one pass (the mask is
broadcast inside the kernel), and its backward computes d_update = d_out * keep in one pass.

Precision contract (both paths): ``update * keep`` is rounded to the update's dtype (OpenFold
multiplies in place), then added to the residual in the promoted dtype of residual and update;
no other rounding. Backward: d_residual = d_out (cast to the residual's dtype);
d_update = (d_out cast to the update's dtype) * keep, rounded to the update's dtype. The mask
gets no gradient.

Host time. A block step calls this ~15 times on small tensors, so the Python around a launch
counts. The launch geometry (the mask's broadcast folded against the output, block sizes, grid,
every scalar argument) is worked out once per (output shape, mask shape and strides, the
residual's or the gradient's strides, devices, interpreter or not) by ``_plan``.

Layouts: the output is written in the residual's layout when the residual is a permuted dense
tensor (a transposed view: OpenFold's ending-node attention adds its update to z transposed),
so neither the residual nor, transposed back, the output needs a copy; the output's gradient is
read in whatever layout it comes in. Other layouts are made contiguous first.
"""
import functools
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._triton_utils import (
    broadcast_strides,
    cdiv,
    check_devices,
    collapse_dims,
    contiguous_strides,
    is_interpreter,
    next_power_of_2,
)

BatchDim = Union[int, Sequence[int]]


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _keep_offsets(rows, cols, R1, R2, k0, k1, k2, k_inner):
    """Offsets into the keep-mask of the [rows, cols] tile of the (collapsed) output.

    Output rows index an up-to-3-D grid [R0, R1, R2] of outer dims (keep strides k0, k1, k2);
    columns run along the innermost dim (keep stride k_inner, 0 when broadcast).
    """
    r2 = rows % R2
    t = rows // R2
    r1 = t % R1
    r0 = t // R1
    return (r0 * k0 + r1 * k1 + r2 * k2)[:, None] + cols[None, :] * k_inner


@triton.jit
def _strided_offsets(rows, cols, n_inner, R1, R2, s0, s1, s2, s_inner, STRIDED: tl.constexpr):
    """Offsets of the [rows, cols] tile in a tensor with the collapsed strides (s0, s1, s2,
    s_inner) (``STRIDED``), or in the contiguous output layout."""
    if STRIDED:
        r2 = rows % R2
        t = rows // R2
        return (t // R1 * s0 + t % R1 * s1 + r2 * s2)[:, None] + cols[None, :] * s_inner
    else:
        return rows[:, None] * n_inner + cols[None, :]


@triton.jit
def _dropout_add_fwd_kernel(
    RES, UPD, KEEP, OUT,
    n_rows, n_inner, R1, R2, k0, k1, k2, k_inner, s0, s1, s2, s_inner,
    STRIDED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr,
):
    """OUT = RES + round_upd(UPD * KEEP) over a [BLOCK_R, BLOCK_I] tile of the [n_rows, n_inner]
    view of the output. UPD is contiguous; RES and OUT share one layout (RES's: strides s*
    when ``STRIDED``, e.g. a transposed view, else contiguous)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    ok = (rows < n_rows)[:, None] & (cols < n_inner)[None, :]
    offs = rows[:, None] * n_inner + cols[None, :]
    s_offs = _strided_offsets(rows, cols, n_inner, R1, R2, s0, s1, s2, s_inner, STRIDED)
    keep = tl.load(KEEP + _keep_offsets(rows, cols, R1, R2, k0, k1, k2, k_inner), mask=ok, other=0.0)
    u = tl.load(UPD + offs, mask=ok, other=0.0)
    prod = (u.to(tl.float32) * keep.to(tl.float32)).to(u.dtype)  # in place in update's dtype
    res = tl.load(RES + s_offs, mask=ok, other=0.0)
    out = res.to(tl.float32) + prod.to(tl.float32)
    tl.store(OUT + s_offs, out.to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _dropout_add_bwd_kernel(
    G, KEEP, DUPD,
    n_rows, n_inner, R1, R2, k0, k1, k2, k_inner, s0, s1, s2, s_inner,
    STRIDED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr,
):
    """DUPD = round_upd(round_upd(G) * KEEP); G in strides s* when ``STRIDED``, DUPD contiguous."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    ok = (rows < n_rows)[:, None] & (cols < n_inner)[None, :]
    offs = rows[:, None] * n_inner + cols[None, :]
    keep = tl.load(KEEP + _keep_offsets(rows, cols, R1, R2, k0, k1, k2, k_inner), mask=ok, other=0.0)
    g = tl.load(G + _strided_offsets(rows, cols, n_inner, R1, R2, s0, s1, s2, s_inner, STRIDED),
                mask=ok, other=0.0).to(DUPD.dtype.element_ty)
    d = g.to(tl.float32) * keep.to(tl.float32)
    tl.store(DUPD + offs, d.to(DUPD.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------
# launch geometry
# ----------------------------------------------------------------------------------------------
class _Plan(NamedTuple):
    """A call's launch geometry (see ``_plan``)."""
    expand_keep: bool  # the kernels take keep expanded to the output's shape and made contiguous
    grid: tuple
    args: tuple        # n_rows, n_inner, R1, R2, k0, k1, k2, k_inner, s0, s1, s2, s_inner
    kwargs: dict       # STRIDED, BLOCK_R, BLOCK_I


@functools.lru_cache(maxsize=256)
def _plan(shape: torch.Size, keep_shape: torch.Size, keep_strides: tuple, strides: tuple,
          devices: Tuple[torch.device, ...], interp: bool) -> Optional[_Plan]:
    """The launch geometry for an output of `shape`, a keep-mask of `keep_shape` and
    `keep_strides` broadcast to it, and one strided operand of `strides` (the residual and the
    output forward, the output's gradient backward; the update and its gradient are
    contiguous), for tensors on `devices`, under the interpreter (`interp`) or not. None when
    the strided operand's layout takes more dims than the kernels address (the caller makes it
    contiguous). Raises (and caches nothing) for a device the kernels cannot run on."""
    check_devices(*devices)
    keep = torch.empty_strided(keep_shape, keep_strides, device="meta")
    contig = contiguous_strides(shape)
    strided = tuple(strides) != contig
    cols = [broadcast_strides(keep, shape), contig] + ([list(strides)] if strided else [])
    sizes, collapsed = collapse_dims(shape, cols)
    expand_keep = len(sizes) > 4  # more than 3 alternating shared / not shared outer groups: rare
    if expand_keep:
        if strided:
            return None
        keep = keep.expand(shape).contiguous()
        sizes, collapsed = collapse_dims(shape, [keep.stride(), contig])
    k_strides = collapsed[0]
    s_strides = collapsed[2] if strided else collapsed[1]
    dims = list(zip(sizes, k_strides, s_strides, strict=True)) or [(1, 0, 1)]
    outer = [(1, 0, 0)] * (4 - len(dims)) + dims[:-1]
    (r0, k0, s0), (r1, k1, s1), (r2, k2, s2) = outer
    n_inner, k_inner, s_inner = dims[-1]
    n_rows = r0 * r1 * r2
    block_i = min(next_power_of_2(n_inner), 1024)
    elems = 16384 if interp else 2048
    block_r = max(1, min(elems // block_i, next_power_of_2(n_rows)))
    grid = (cdiv(n_rows, block_r), cdiv(n_inner, block_i))
    return _Plan(expand_keep, grid,
                 (n_rows, n_inner, r1, r2, k0, k1, k2, k_inner, s0, s1, s2, s_inner),
                 dict(STRIDED=strided, BLOCK_R=block_r, BLOCK_I=block_i))


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------
def _keep_arg(keep: torch.Tensor, shape, plan: _Plan) -> torch.Tensor:
    return keep.expand(shape).contiguous() if plan.expand_keep else keep


class _DropoutAddFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, residual, update, keep):
        out_dtype = torch.promote_types(residual.dtype, update.dtype)
        upd = update.contiguous()
        shape = update.shape
        devices = (residual.device, upd.device, keep.device)
        interp = is_interpreter()
        # the output in the residual's layout when the residual is a permuted dense tensor (e.g.
        # OpenFold's transposed z around the ending-node attention): no copy of the residual, and
        # the output transposed back is contiguous again
        out = torch.empty_like(residual, dtype=out_dtype)
        res, plan = residual, None
        if out.numel() > 0:
            if out.stride() == residual.stride():
                plan = _plan(shape, keep.shape, keep.stride(), residual.stride(), devices, interp)
            if plan is None:
                res = residual.contiguous()
                out = torch.empty(shape, dtype=out_dtype, device=update.device)
                plan = _plan(shape, keep.shape, keep.stride(), out.stride(), devices, interp)
            _dropout_add_fwd_kernel[plan.grid](
                res, upd, _keep_arg(keep, shape, plan), out, *plan.args, **plan.kwargs,
                enable_fp_fusion=False,  # mul and add rounded separately, as OpenFold's two ops
            )
        ctx.save_for_backward(keep)
        ctx.meta = (shape, residual.dtype, update.dtype, devices, interp)
        return out

    @staticmethod
    def backward(ctx, g):
        (keep,) = ctx.saved_tensors
        shape, res_dtype, upd_dtype, devices, interp = ctx.meta
        d_res = g if g.dtype == res_dtype else g.to(res_dtype)
        d_upd = torch.empty(shape, dtype=upd_dtype, device=g.device)
        if d_upd.numel() > 0:
            plan = _plan(shape, keep.shape, keep.stride(), g.stride(), devices, interp)
            if plan is None:
                g = g.contiguous()
                plan = _plan(shape, keep.shape, keep.stride(), g.stride(), devices, interp)
            _dropout_add_bwd_kernel[plan.grid](
                g, _keep_arg(keep, shape, plan), d_upd, *plan.args, **plan.kwargs,
            )
        return d_res, d_upd, None


# ----------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------
def keep_mask_shape(shape: Sequence[int], batch_dim: BatchDim) -> List[int]:
    """`shape` with the dim(s) in `batch_dim` set to 1 (the dims the mask is shared along)."""
    out = list(shape)
    for bd in [batch_dim] if isinstance(batch_dim, int) else batch_dim:
        out[bd] = 1
    return out


def draw_keep_mask(update: torch.Tensor, p: float, batch_dim: BatchDim) -> torch.Tensor:
    """The keep-mask OpenFold's ``Dropout`` draws in training: the same torch RNG calls, in order."""
    mask = update.new_ones(keep_mask_shape(update.shape, batch_dim))
    return F.dropout(mask, p, True)


def dropout_add(
    residual: torch.Tensor, update: torch.Tensor, p: float, training: bool,
    batch_dim: BatchDim, mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """residual + update * keep, one fused Triton pass forward and one backward.

    residual, update: same shape [*, ...]; keep: `mask` if given (already scaled by 1/(1-p),
    broadcastable to update), else drawn with torch's RNG exactly as OpenFold's ``Dropout``
    (shared along `batch_dim`). Not training (or p == 0) and no mask: ``residual + update`` in
    plain torch (one elementwise op; nothing to fuse). Residual and update of different shapes
    and fp64 tensors take the reference path (explicit branch: OpenFold never broadcasts here, and
    the kernels compute in fp32).
    """
    if mask is None:
        if not training or p == 0.0:
            return residual + update
        mask = draw_keep_mask(update, p, batch_dim)
    if residual.shape != update.shape or torch.float64 in (residual.dtype, update.dtype):
        return dropout_add_reference(residual, update, p, training, batch_dim, mask)
    return _DropoutAddFn.apply(residual, update, mask.detach())


def dropout_add_reference(
    residual: torch.Tensor, update: torch.Tensor, p: float, training: bool,
    batch_dim: BatchDim, mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """OpenFold's ``residual + Dropout(p, batch_dim)(update)`` in plain PyTorch (same RNG calls)."""
    if mask is None:
        if not training or p == 0.0:
            return residual + update
        mask = draw_keep_mask(update, p, batch_dim)
    u = update * mask
    if u.dtype != update.dtype:  # OpenFold multiplies in place, in the update's dtype
        u = u.to(update.dtype)
    return residual + u
