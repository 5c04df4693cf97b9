"""Triangle multiplicative update (AlphaFold2 Algorithms 11 and 12), fused.

Maths (OpenFold's ``TriangleMultiplicativeUpdate.forward``, non-inplace path), with
z ``[*, N, N, C_z]``, mask ``[*, N, N]``, C_h the hidden width::

    zn = LayerNorm_in(z)                                   (OpenFold's LayerNorm contract)
    a  = mask * sigmoid(zn @ a_g_w^T + a_g_b) * (zn @ a_p_w^T + a_p_b)     [*, N, N, C_h]
    b  = mask * sigmoid(zn @ b_g_w^T + b_g_b) * (zn @ b_p_w^T + b_p_b)
    outgoing: x[i, j] = sum_k a[i, k] * b[j, k]
    incoming: x[i, j] = sum_k a[k, i] * b[k, j]
    out = (LayerNorm_out(x) @ z_w^T + z_b) * sigmoid(zn @ g_w^T + g_b)      [*, N, N, C_z]

Design of the Triton path (forward: two Triton kernels around one batched GEMM):

1. ``_trimul_proj_fwd_kernel``: one program normalises BLOCK_M rows of z in registers (fp32
   statistics) and multiplies them by the concatenated projection ``[a_p | a_g | b_p | b_g]``
   (built at call time from the four weights, so it never goes stale across optimizer steps);
   the gate, mask and product are applied in the epilogue and ``a`` and ``b`` are stored straight
   into the channel-major ``[*, C_h, N, N]`` layout the contraction wants (no permute copies).
2. The contraction is one batched GEMM per direction on those planes (cuBLAS via ``torch.bmm``;
   transposes are free stride flips): ``x_c = a_c @ b_c^T`` (outgoing) or ``a_c^T @ b_c``
   (incoming), stored ``[*, C_h, N, N]``.
3. ``_trimul_out_fwd_kernel`` reads BLOCK_M pairs of x across all C_h planes, applies
   LayerNorm_out, ``linear_z``, and multiplies by the gate ``sigmoid(linear_g(zn))``, which it
   recomputes from z (one more read of z instead of writing and reading an ``[*, N, N, C_z]`` gate).

Host time. Small calls are bound by the host's Python.  Everything a single-process call fixes
but the data (grid, dtypes, buffer shapes, every launch's scalars, constexprs and grid, and the
autotuner's key, kept after the first launch) is worked out once per ``_plan`` key (z's shape
and dtype, mask flag, C_h, LayerNorm parameter dtypes, direction, eps, grad, autocast, dot
precision, interpreter, 64-bit offsets), the backward's launches once per (dot precision,
interpreter, 64-bit offsets, dout dtype, carried z's gradient dtype or none); weights are still
packed on every call.

Programs tile the N*N pairs of one batch entry (grid ``(cdiv(N*N, BLOCK_M), batch)``), so the
channel-major loads and stores are contiguous along a tile and coalesce; 32-bit offsets are used
unless a buffer passes 2**31 elements (halves the registers the offset tiles take).

Backward recomputes rather than stores: forward keeps z, the mask, a, b and x (each of a, b, x is
``[*, C_h, N, N]`` in the contraction dtype; without grad, a and b are freed before step 3).
``_trimul_out_bwd_kernel`` recomputes the gate and ``linear_z``'s output, writes dx
(channel-major), dy and LayerNorm_out's output (for ``linear_z``'s weight gradient) and the
gate-logit gradient; two batched GEMMs give da and db; ``_trimul_proj_bwd_kernel`` recomputes
the projections, applies the gating/mask backward, writes the projection gradients and
LayerNorm_in's output, accumulates d(zn) through all five projections and runs LayerNorm_in's
backward (with ``carry``, adding to dz the gradient of the z handed back: the residual add's).
The weight gradients are two long-K GEMMs (``dP^T @ zn`` for the five input projections
together, ``dy^T @ LayerNorm_out(x)`` for ``linear_z``, split-K as one batched GEMM:
``_weight_grad``); bias and LayerNorm gradients are fp32 per-program partial sums reduced in
torch.

Precision contract (matches OpenFold under autocast; ``cdt`` is the autocast dtype, or z's
dtype without autocast):

* LayerNorm statistics and affine maps, gating, masking and every epilogue in fp32.
* Projection and output GEMMs: ``cdt`` operands (zn and LayerNorm_out(x) rounded once to
  ``cdt``), fp32 accumulation.  fp32 operands use IEEE fp32 unless
  ``torch.backends.cuda.matmul.allow_tf32`` is set.
* a, b and the contraction: ``cdt`` with fp32 accumulation, except under fp16 autocast, where
  OpenFold contracts in fp32 (``is_fp16_enabled``): then a, b, x are fp32.
* Output in the autocast dtype (z's dtype without autocast); dz in z's dtype; weight gradients
  in each parameter's dtype (the weight GEMMs round to ``cdt`` first, as autocast's linear
  backward does).

OpenFold's fp16 check looks at CUDA autocast; here autocast is read for z's device, which is the
same thing on a GPU and lets CPU-interpreter tests exercise the branch.

Sharded path (DAP; ``triangle_multiplication_sharded``, P processes of a torch.distributed
group, N a multiple of P).  Rank r holds rows block r of z, ``[*, R, N, C_z]`` with R = N / P
(outgoing), or columns block r, ``[*, N, R, C_z]`` (incoming).  The kernels tile a logical grid
of R x N pairs: the outgoing shard as it is; the incoming one as the rows of z^T, which the
kernels read and write in z's own layout through the ``TRANS`` flag (``_pair_rows``: no
transposed copy), since incoming on z is outgoing on z^T with a and b exchanged.  Then
``x[p, q] = sum_k L[p, k] G[q, k]`` with L the local operand (outgoing a, incoming b) and G the
operand needed for every row q (outgoing b, incoming a, i.e. a along z's columns):

1. the projection kernel writes L ``[Bt, C_h, R, N]`` and this rank's rows of G in the gathered
   layout ``[R, Bt, C_h, N]`` (row outermost, ``G_SIDE``), so that
2. one ``all_gather_into_tensor`` of those rows gives G as ``[N, Bt * C_h, N]``, which the GEMMs
   read through strides (a ``[Bt * C_h, N, N]`` view, row stride ``Bt * C_h * N``: no copy);
3. the contraction writes x ``[Bt, C_h, R, N]`` in column blocks (``bmm(..., out=view)``): this
   rank's block from its own rows of G while the all-gather runs, the others after it;
4. the output kernel as on one device.

Backward: the output kernel's backward gives dx; ``dG = dx^T @ L`` (every row of G: each rank's
partial) is reduce-scattered (sum over ranks, the all-gather's adjoint: a rank's rows of G feed
every rank's output) while ``dL = dx @ G`` runs; then the projection backward.  Communication
per call: forward one all-gather of ``Bt * C_h * N * N`` elements in the contraction dtype,
backward one reduce-scatter of the same size; the weight gradients are this rank's partial sums
(the DAP forwards sum them over the group with ``sum_grads``, once per block), so the op itself
never reduces them.  Padded pairs (mask 0) give a = b = 0, hence contribute exact zeros.
``overlap=False`` makes both collectives synchronous (bit-identical results).
Inference (nothing needs a gradient: ``_sharded_inference``): G is all-gathered one channel
chunk at a time into two alternating buffers (its whole ``[N, Bt * C_h, N]`` is the largest
buffer of the update), the next chunk's all-gather running during the current chunk's GEMMs.
The incoming update can also run on a row shard (``shard="rows"``: ``_TriMulRowsFn`` in
training, ``_sharded_inference_rows`` in inference): the projection kernel writes both operands
in the gathered layout (``G_SIDE`` 2), one all-to-all brings this rank's columns of a from every
rank, b is all-gathered (in inference in channel chunks), and the contraction runs over every
rank's rows in one GEMM (per chunk); backward: the all-to-all back and a reduce-scatter, the
adjoints.  The DAP block then needs no switch of z around the incoming update.
``triangle_multiplication_sharded_reference`` is the same on OpenFold's decomposed maths (an
autograd all-gather / reduce-scatter pair around the torch contraction, synchronous).
"""
import functools
import logging
import math
import os
from typing import Dict, NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
import triton
import triton.language as tl

from ._triton_utils import (
    autocast_dtype,
    autocast_off,
    autotune,
    cdiv,
    check_launchable,
    dot_precision,
    fp16_autocast_enabled,
    is_interpreter,
    next_power_of_2,
)
from ._triton_utils import cast_rne as _cast
from ._triton_utils import dot_acc32 as _dot
from ._triton_utils import weight_grad_fp32 as _weight_grad
from .layer_norm import layer_norm_reference
from .layout import contiguous as dense_runs
from .layout import copy_ as copy_runs


class TriMulWeights(NamedTuple):
    """Parameters of one ``TriangleMultiplicativeUpdate``, in OpenFold's shapes.

    Linear weights are ``[out, in]``: a_p_w, a_g_w, b_p_w, b_g_w ``[C_h, C_z]``; z_w
    ``[C_z, C_h]``; g_w ``[C_z, C_z]``.  LayerNorms: ln_in ``[C_z]``, ln_out ``[C_h]``.
    """

    ln_in_w: torch.Tensor
    ln_in_b: torch.Tensor
    a_p_w: torch.Tensor
    a_p_b: torch.Tensor
    a_g_w: torch.Tensor
    a_g_b: torch.Tensor
    b_p_w: torch.Tensor
    b_p_b: torch.Tensor
    b_g_w: torch.Tensor
    b_g_b: torch.Tensor
    ln_out_w: torch.Tensor
    ln_out_b: torch.Tensor
    z_w: torch.Tensor
    z_b: torch.Tensor
    g_w: torch.Tensor
    g_b: torch.Tensor


# ----------------------------------------------------------------------------------------------
# reference
# ----------------------------------------------------------------------------------------------
def _combine_projections_reference(a: torch.Tensor, b: torch.Tensor, outgoing: bool) -> torch.Tensor:
    """OpenFold's ``_combine_projections`` (permute + matmul + permute back)."""
    if outgoing:
        a = a.permute(*range(a.dim() - 3), -1, -3, -2)  # [*, C, i, k]
        b = b.permute(*range(b.dim() - 3), -1, -2, -3)  # [*, C, k, j]
    else:
        a = a.permute(*range(a.dim() - 3), -1, -2, -3)  # [*, C, i, k] = a[k, i]
        b = b.permute(*range(b.dim() - 3), -1, -3, -2)  # [*, C, k, j]
    p = torch.matmul(a, b)
    return p.permute(*range(p.dim() - 3), -2, -1, -3)


def triangle_multiplication_reference(
    z: torch.Tensor,
    mask: Optional[torch.Tensor],
    w: TriMulWeights,
    outgoing: bool,
    eps: float = 1e-5,
    carry: bool = False,
):
    """OpenFold's non-inplace ``TriangleMultiplicativeUpdate.forward`` in plain PyTorch.

    z ``[*, N, N, C_z]``, mask ``[*, N, N]`` (None: all ones) -> ``[*, N, N, C_z]`` (with
    `carry`, ``(out, z)``).  Same ops in the same order, so fp32 results match stock to
    rounding; under fp16 autocast the contraction runs in fp32 with autocast off, as OpenFold's
    ``is_fp16_enabled`` branch.
    """
    z_in = z
    if mask is None:
        mask = z.new_ones(z.shape[:-1])
    mask = mask.unsqueeze(-1)
    z = layer_norm_reference(z, w.ln_in_w, w.ln_in_b, eps)
    a = mask
    a = a * torch.sigmoid(F.linear(z, w.a_g_w, w.a_g_b))
    a = a * F.linear(z, w.a_p_w, w.a_p_b)
    b = mask
    b = b * torch.sigmoid(F.linear(z, w.b_g_w, w.b_g_b))
    b = b * F.linear(z, w.b_p_w, w.b_p_b)
    if fp16_autocast_enabled(z.device.type):
        with torch.autocast(z.device.type, enabled=False):
            x = _combine_projections_reference(a.float(), b.float(), outgoing)
    else:
        x = _combine_projections_reference(a, b, outgoing)
    del a, b
    x = layer_norm_reference(x, w.ln_out_w, w.ln_out_b, eps)
    x = F.linear(x, w.z_w, w.z_b)
    g = torch.sigmoid(F.linear(z, w.g_w, w.g_b))
    return (x * g, z_in) if carry else x * g


class _AllGatherReference(torch.autograd.Function):
    """Blocks along `dim` -> the whole tensor, read by sharded computation; backward: the
    reduce-scatter (sum over ranks) of the gradient, its exact adjoint."""

    @staticmethod
    def forward(ctx, x, dim, comm):
        ctx.dim, ctx.comm = dim, comm
        x = x.contiguous()
        full = x.new_empty((comm.size * x.shape[0],) + x.shape[1:])  # concatenation along dim 0
        comm.all_gather(full, x, async_op=False).wait()
        return full.unflatten(0, (comm.size, -1)).movedim(0, dim).flatten(dim, dim + 1)

    @staticmethod
    def backward(ctx, g):
        blocks = g.unflatten(ctx.dim, (ctx.comm.size, -1)).movedim(ctx.dim, 0).contiguous()
        out = blocks.new_empty(blocks.shape[1:])
        ctx.comm.reduce_scatter(out, blocks.flatten(0, 1), async_op=False).wait()
        return out, None, None


class _RowsToColumnsReference(torch.autograd.Function):
    """This rank's rows of an operand, ``[*, R, N, C]``, -> every row of this rank's column
    block, ``[*, P R, R, C]`` (an all-to-all); backward: the all-to-all back, its adjoint."""

    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return _exchange_blocks(x, comm, split=-2, cat=-3)

    @staticmethod
    def backward(ctx, g):
        return _exchange_blocks(g, ctx.comm, split=-3, cat=-2), None


def _exchange_blocks(x: torch.Tensor, comm, split: int, cat: int) -> torch.Tensor:
    """An all-to-all: block q of `x` along dim `split` goes to rank q; the blocks received are
    concatenated along dim `cat` in rank order (both dims negative)."""
    send = x.unflatten(split, (comm.size, -1)).movedim(split - 1, 0).contiguous()  # [P (to), ...]
    recv = torch.empty_like(send)  # [P (from), ...]
    comm.all_to_all(recv, send, async_op=False).wait()
    return recv.movedim(0, cat - 1).flatten(cat - 1, cat)


def triangle_multiplication_sharded_reference(
    z: torch.Tensor,
    mask: Optional[torch.Tensor],
    w: TriMulWeights,
    outgoing: bool,
    eps: float = 1e-5,
    group=None,
    overlap: bool = True,
    comm_error: type = RuntimeError,
    inference: Optional[bool] = None,
    shard: Optional[str] = None,
    timeout: Optional[float] = None,
) -> torch.Tensor:
    """``triangle_multiplication_sharded`` in plain PyTorch: OpenFold's maths on the shard
    (outgoing: rows z ``[*, N/P, N, C_z]``; incoming: columns z ``[*, N, N/P, C_z]``, or rows
    with `shard` "rows"), with the operand contracted over every row all-gathered (outgoing: b
    along rows; incoming on columns: a along columns; incoming on rows: b along rows and this
    rank's columns of a by an all-to-all; backward: the adjoints).  Synchronous (`overlap` is
    accepted and ignored); weight gradients are this rank's partial sums.  At P = 1:
    ``triangle_multiplication_reference``.
    """
    w = TriMulWeights(*w)
    comm = _DistComm(group, comm_error)
    rows = _shard_is_rows(shard, outgoing)
    if comm.size == 1:
        return triangle_multiplication_reference(z, mask, w, outgoing, eps)
    _check_shard("triangle_multiplication_sharded_reference", z, w, outgoing, comm.size, rows)
    if mask is None:
        mask = z.new_ones(z.shape[:-1])
    mask = mask.unsqueeze(-1)
    z = layer_norm_reference(z, w.ln_in_w, w.ln_in_b, eps)

    def proj(p_w, p_b, g_w, g_b):
        x = mask * torch.sigmoid(F.linear(z, g_w, g_b))
        return x * F.linear(z, p_w, p_b)

    # the gathered operand first (the order of the decomposed DAP path this replaces)
    if outgoing:
        b = _AllGatherReference.apply(proj(w.b_p_w, w.b_p_b, w.b_g_w, w.b_g_b), z.dim() - 3, comm)
        a = proj(w.a_p_w, w.a_p_b, w.a_g_w, w.a_g_b)
    elif rows:  # x[i, j] = sum_k a[k, i] b[k, j], i this rank's rows: a's columns, all of b
        a = _RowsToColumnsReference.apply(proj(w.a_p_w, w.a_p_b, w.a_g_w, w.a_g_b), comm)
        b = _AllGatherReference.apply(proj(w.b_p_w, w.b_p_b, w.b_g_w, w.b_g_b), z.dim() - 3, comm)
    else:
        a = _AllGatherReference.apply(proj(w.a_p_w, w.a_p_b, w.a_g_w, w.a_g_b), z.dim() - 2, comm)
        b = proj(w.b_p_w, w.b_p_b, w.b_g_w, w.b_g_b)
    g = torch.sigmoid(F.linear(z, w.g_w, w.g_b))
    if fp16_autocast_enabled(z.device.type):
        with torch.autocast(z.device.type, enabled=False):
            x = _combine_projections_reference(a.float(), b.float(), outgoing)
    else:
        x = _combine_projections_reference(a, b, outgoing)
    del a, b
    x = layer_norm_reference(x, w.ln_out_w, w.ln_out_b, eps)
    x = F.linear(x, w.z_w, w.z_b)
    return x * g


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _wide(x, I64: tl.constexpr):
    """x as int64 when offsets may pass 2**31 (I64), else unchanged: 32-bit offset tiles hold
    half the registers."""
    if I64:
        return x.to(tl.int64)
    else:
        return x


@triton.jit
def _pair_rows(bt, r, NN, NJ, TRANS: tl.constexpr):
    """Rows, in the row-major [M, *] tensors (z, mask, out and their gradients), of the pairs
    r = i * NJ + j of batch entry bt: bt * NN + r, or, when the tensors hold the transposed grid
    (TRANS: [NJ, NI] per entry, NI = NN / NJ), bt * NN + j * NI + i."""
    rows = bt * NN + r
    if TRANS:
        i = r // NJ
        rows = bt * NN + (r - i * NJ) * (NN // NJ) + i
    return rows


@triton.jit
def _gathered_offsets(bt, r, NJ, CH, I64: tl.constexpr):
    """Offsets of channel 0 of pairs r = i * NJ + k in the gathered-operand layout
    [NI, Bt, CH, NJ] (row i outermost, so that blocks of rows of different ranks concatenate
    into the whole operand)."""
    i = r // NJ
    k = r - i * NJ
    return ((_wide(i, I64) * tl.num_programs(1) + bt) * CH) * NJ + k


@triton.jit
def _ln_rows(x_ptr, rows, row_ok, cz, cz_ok, CZ, eps):
    """Load rows [BLOCK_M, BLOCK_CZ] of a row-major [M, CZ] tensor: (xhat, rstd) in fp32."""
    ok = row_ok[:, None] & cz_ok[None, :]
    x = tl.load(x_ptr + rows[:, None] * CZ + cz[None, :], mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / CZ
    xc = tl.where(ok, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / CZ
    rstd = 1.0 / tl.sqrt(var + eps)
    return xc * rstd[:, None], rstd


@triton.jit
def _ln_planes(x_ptr, x_row, row_ok, ch_off, ch_ok, CH, eps):
    """Load BLOCK_M pairs across the CH planes of a channel-major [Bt, CH, NN] tensor (x_row:
    offset of channel 0 of each pair, ch_off: of each channel): (xhat, rstd) in fp32,
    normalised over the channels."""
    ok = row_ok[:, None] & ch_ok[None, :]
    x = tl.load(x_ptr + x_row[:, None] + ch_off[None, :], mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / CH
    xc = tl.where(ok, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / CH + eps)
    return xc * rstd[:, None], rstd


@triton.jit
def _trimul_proj_fwd_kernel(
    Z, MASK, LN_W, LN_B, W_IN, B_IN, A_OUT, B_OUT,
    NN, NJ, CZ, CH, eps, M_BUCKET,
    HAS_MASK: tl.constexpr, TRANS: tl.constexpr, G_SIDE: tl.constexpr,
    DOT_PREC: tl.constexpr, INTERP: tl.constexpr, I64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_CZ: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """a, b [Bt, CH, NI, NJ] (NN = NI * NJ pairs per batch entry) for BLOCK_M rows of z [M, CZ]
    (M = Bt * NN; TRANS: z holds the transposed [NJ, NI] grid, see _pair_rows).  The operand
    G_SIDE (0: a, 1: b; 2: both; -1: none) is stored in the gathered layout [NI, Bt, CH, NJ]
    instead.

    W_IN [4 CH, CZ] = [a_p; a_g; b_p; b_g] (cdt), B_IN [4 CH] fp32.
    """
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # pair index within batch entry bt
    bt = _wide(tl.program_id(1), I64)
    row_ok = r < NN
    rows = _pair_rows(bt, r, NN, NJ, TRANS)  # rows of the row-major [M, *] tensors
    cz = tl.arange(0, BLOCK_CZ)
    cz_ok = cz < CZ
    zhat, _ = _ln_rows(Z, rows, row_ok, cz, cz_ok, CZ, eps)
    lw = tl.load(LN_W + cz, mask=cz_ok, other=0.0).to(tl.float32)
    lb = tl.load(LN_B + cz, mask=cz_ok, other=0.0).to(tl.float32)
    zn = _cast((zhat * lw[None, :] + lb[None, :]), W_IN.dtype.element_ty, INTERP)
    if HAS_MASK:
        mk = tl.load(MASK + rows, mask=row_ok, other=0.0).to(tl.float32)
    else:
        mk = tl.where(row_ok, 1.0, 0.0)
    out_row = bt * CH * NN + r  # channel-major offset of channel 0
    if G_SIDE >= 0:
        g_row = _gathered_offsets(bt, r, NJ, CH, I64)
    hh = tl.arange(0, BLOCK_H)
    for h0 in range(0, CH, BLOCK_H):
        h = h0 + hh
        h_ok = h < CH
        w_ok = cz_ok[:, None] & h_ok[None, :]
        o_ok = row_ok[:, None] & h_ok[None, :]
        for side in tl.static_range(2):
            # transposed tiles [BLOCK_CZ, BLOCK_H] of the projection and gate weights
            wp = tl.load(W_IN + ((2 * side) * CH + h)[None, :] * CZ + cz[:, None], mask=w_ok, other=0.0)
            wg = tl.load(W_IN + ((2 * side + 1) * CH + h)[None, :] * CZ + cz[:, None], mask=w_ok, other=0.0)
            bp = tl.load(B_IN + (2 * side) * CH + h, mask=h_ok, other=0.0)
            bg = tl.load(B_IN + (2 * side + 1) * CH + h, mask=h_ok, other=0.0)
            p = _dot(zn, wp, DOT_PREC, INTERP) + bp[None, :]
            g = _dot(zn, wg, DOT_PREC, INTERP) + bg[None, :]
            val = (mk[:, None] * tl.sigmoid(g)) * p
            if side == G_SIDE or G_SIDE == 2:
                offs = g_row[:, None] + _wide(h, I64)[None, :] * NJ
            else:
                offs = out_row[:, None] + _wide(h, I64)[None, :] * NN
            if side == 0:
                tl.store(A_OUT + offs, _cast(val, A_OUT.dtype.element_ty, INTERP), mask=o_ok)
            else:
                tl.store(B_OUT + offs, _cast(val, B_OUT.dtype.element_ty, INTERP), mask=o_ok)


@triton.jit
def _trimul_out_fwd_kernel(
    X, Z, LN_IN_W, LN_IN_B, LN_OUT_W, LN_OUT_B, WZ, BZ, WG, BG, OUT,
    NN, NJ, CZ, CH, eps, M_BUCKET,
    TRANS: tl.constexpr, DOT_PREC: tl.constexpr, INTERP: tl.constexpr, I64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_CZ: tl.constexpr, BLOCK_CH: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """OUT [M, CZ] = (LN_out(x) @ WZ^T + BZ) * sigmoid(LN_in(z) @ WG^T + BG), x [Bt, CH, NN]."""
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # pair index within batch entry bt
    bt = _wide(tl.program_id(1), I64)
    row_ok = r < NN
    rows = _pair_rows(bt, r, NN, NJ, TRANS)  # rows of the row-major [M, *] tensors
    cz = tl.arange(0, BLOCK_CZ)
    cz_ok = cz < CZ
    ch = tl.arange(0, BLOCK_CH)
    ch_ok = ch < CH
    # LayerNorm_out over the channel planes of x
    x_row = bt * CH * NN + r  # channel-major offset of channel 0
    ch_off = _wide(ch, I64) * NN
    xhat, _ = _ln_planes(X, x_row, row_ok, ch_off, ch_ok, CH, eps)
    ow = tl.load(LN_OUT_W + ch, mask=ch_ok, other=0.0).to(tl.float32)
    ob = tl.load(LN_OUT_B + ch, mask=ch_ok, other=0.0).to(tl.float32)
    xn = _cast((xhat * ow[None, :] + ob[None, :]), WZ.dtype.element_ty, INTERP)
    # LayerNorm_in of z for the gate
    zhat, _ = _ln_rows(Z, rows, row_ok, cz, cz_ok, CZ, eps)
    iw = tl.load(LN_IN_W + cz, mask=cz_ok, other=0.0).to(tl.float32)
    ib = tl.load(LN_IN_B + cz, mask=cz_ok, other=0.0).to(tl.float32)
    zn = _cast((zhat * iw[None, :] + ib[None, :]), WG.dtype.element_ty, INTERP)
    nn_ = tl.arange(0, BLOCK_N)
    for n0 in range(0, CZ, BLOCK_N):
        n = n0 + nn_
        n_ok = n < CZ
        wz = tl.load(WZ + n[None, :] * CH + ch[:, None], mask=ch_ok[:, None] & n_ok[None, :], other=0.0)
        wg = tl.load(WG + n[None, :] * CZ + cz[:, None], mask=cz_ok[:, None] & n_ok[None, :], other=0.0)
        bz = tl.load(BZ + n, mask=n_ok, other=0.0)
        bg = tl.load(BG + n, mask=n_ok, other=0.0)
        y = _dot(xn, wz, DOT_PREC, INTERP) + bz[None, :]
        g = _dot(zn, wg, DOT_PREC, INTERP) + bg[None, :]
        out = y * tl.sigmoid(g)
        tl.store(OUT + rows[:, None] * CZ + n[None, :], _cast(out, OUT.dtype.element_ty, INTERP),
                 mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _trimul_out_bwd_kernel(
    DOUT, X, Z, LN_IN_W, LN_IN_B, LN_OUT_W, LN_OUT_B, WZ, BZ, WG, BG,
    DX, DY, XN, DP, PART,
    NN, NJ, CZ, CH, DP_STRIDE, DP_OFF, eps, M_BUCKET,
    TRANS: tl.constexpr, DOT_PREC: tl.constexpr, INTERP: tl.constexpr, I64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_CZ: tl.constexpr, BLOCK_CH: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Backward of the output stage for BLOCK_M pairs.

    y = LN_out(x) @ WZ^T + BZ, s = sigmoid(LN_in(z) @ WG^T + BG), out = y * s:
    dy = dout * s -> DY [M, CZ];  dg = dout * y * s (1 - s) -> DP[:, DP_OFF:DP_OFF + CZ];
    LN_out(x) -> XN [M, CH];  dx (LayerNorm_out backward of dy @ WZ) -> DX [Bt, CH, NN];
    PART[pid] = [sum dy | sum dg | sum d(xn) * xhat | sum d(xn)] (fp32).
    """
    pid = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)  # partial-sum row
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # pair index within batch entry bt
    bt = _wide(tl.program_id(1), I64)
    row_ok = r < NN
    rows = _pair_rows(bt, r, NN, NJ, TRANS)  # rows of the row-major [M, *] tensors
    cz = tl.arange(0, BLOCK_CZ)
    cz_ok = cz < CZ
    ch = tl.arange(0, BLOCK_CH)
    ch_ok = ch < CH
    x_row = bt * CH * NN + r  # channel-major offset of channel 0
    x_ok = row_ok[:, None] & ch_ok[None, :]
    ch_off = _wide(ch, I64) * NN
    x_offs = x_row[:, None] + ch_off[None, :]
    xhat, _ = _ln_planes(X, x_row, row_ok, ch_off, ch_ok, CH, eps)
    ow = tl.load(LN_OUT_W + ch, mask=ch_ok, other=0.0).to(tl.float32)
    ob = tl.load(LN_OUT_B + ch, mask=ch_ok, other=0.0).to(tl.float32)
    xn = _cast((xhat * ow[None, :] + ob[None, :]), WZ.dtype.element_ty, INTERP)
    tl.store(XN + rows[:, None] * CH + ch[None, :], xn, mask=x_ok)
    zhat, _ = _ln_rows(Z, rows, row_ok, cz, cz_ok, CZ, eps)
    iw = tl.load(LN_IN_W + cz, mask=cz_ok, other=0.0).to(tl.float32)
    ib = tl.load(LN_IN_B + cz, mask=cz_ok, other=0.0).to(tl.float32)
    zn = _cast((zhat * iw[None, :] + ib[None, :]), WG.dtype.element_ty, INTERP)
    PART_W = 2 * CZ + 2 * CH
    part = PART + pid.to(tl.int64) * PART_W
    dxn = tl.zeros((BLOCK_M, BLOCK_CH), dtype=tl.float32)
    nn_ = tl.arange(0, BLOCK_N)
    for n0 in range(0, CZ, BLOCK_N):
        n = n0 + nn_
        n_ok = n < CZ
        o_ok = row_ok[:, None] & n_ok[None, :]
        wz_t = tl.load(WZ + n[None, :] * CH + ch[:, None], mask=ch_ok[:, None] & n_ok[None, :], other=0.0)
        wg_t = tl.load(WG + n[None, :] * CZ + cz[:, None], mask=cz_ok[:, None] & n_ok[None, :], other=0.0)
        bz = tl.load(BZ + n, mask=n_ok, other=0.0)
        bg = tl.load(BG + n, mask=n_ok, other=0.0)
        y = _dot(xn, wz_t, DOT_PREC, INTERP) + bz[None, :]
        s = tl.sigmoid(_dot(zn, wg_t, DOT_PREC, INTERP) + bg[None, :])
        do = tl.load(DOUT + rows[:, None] * CZ + n[None, :], mask=o_ok, other=0.0).to(tl.float32)
        dy = do * s
        dg = do * y * s * (1.0 - s)
        dy_c = _cast(dy, DY.dtype.element_ty, INTERP)
        tl.store(DY + rows[:, None] * CZ + n[None, :], dy_c, mask=o_ok)
        tl.store(DP + rows[:, None] * DP_STRIDE + DP_OFF + n[None, :], _cast(dg, DP.dtype.element_ty, INTERP),
                 mask=o_ok)
        tl.store(part + n, tl.sum(dy, axis=0), mask=n_ok)
        tl.store(part + CZ + n, tl.sum(dg, axis=0), mask=n_ok)
        wz = tl.load(WZ + n[:, None] * CH + ch[None, :], mask=n_ok[:, None] & ch_ok[None, :], other=0.0)
        dxn += _dot(dy_c, wz, DOT_PREC, INTERP)
    # recompute xhat rather than keep it live through the loop (register pressure)
    xhat, rstd_x = _ln_planes(X, x_row, row_ok, ch_off, ch_ok, CH, eps)
    tl.store(part + 2 * CZ + ch, tl.sum(dxn * xhat, axis=0), mask=ch_ok)
    tl.store(part + 2 * CZ + CH + ch, tl.sum(dxn, axis=0), mask=ch_ok)
    dxhat = dxn * ow[None, :]
    c1 = tl.sum(dxhat * xhat, axis=1) / CH
    c2 = tl.sum(dxhat, axis=1) / CH
    dx = (dxhat - xhat * c1[:, None] - c2[:, None]) * rstd_x[:, None]
    tl.store(DX + x_offs, _cast(dx, DX.dtype.element_ty, INTERP), mask=x_ok)


@triton.jit
def _trimul_proj_bwd_kernel(
    Z, MASK, LN_W, LN_B, W_IN, B_IN, WG, DA, DB, DP, ZN_OUT, DZ, PART, DRES,
    NN, NJ, CZ, CH, DP_STRIDE, eps, M_BUCKET,
    HAS_MASK: tl.constexpr, HAS_RES: tl.constexpr, TRANS: tl.constexpr, G_SIDE: tl.constexpr,
    DOT_PREC: tl.constexpr, INTERP: tl.constexpr, I64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_CZ: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Backward of LayerNorm_in + the five input projections for BLOCK_M rows (da, db in the
    layouts _trimul_proj_fwd_kernel wrote a, b in).

    Recomputes p = zn @ W^T + b and gates; d(a_p) = da * m * s, d(a_g) = da * m * p * s (1 - s)
    (same for b) -> DP[:, :4 CH]; reads d(g logits) from DP[:, 4 CH:]; d(zn) = DP @ [W_IN; WG];
    LN_in(z) -> ZN_OUT [M, CZ]; dz (LayerNorm_in backward) -> DZ [M, CZ], with HAS_RES
    plus DRES [M, CZ] (rows as z's, read in fp32: the gradient z gets from its other reader,
    the residual add around the update);
    PART[pid] = [sum over rows of DP[:, :4 CH] | sum d(zn) * zhat | sum d(zn)] (fp32).
    """
    pid = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)  # partial-sum row
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # pair index within batch entry bt
    bt = _wide(tl.program_id(1), I64)
    row_ok = r < NN
    rows = _pair_rows(bt, r, NN, NJ, TRANS)  # rows of the row-major [M, *] tensors
    cz = tl.arange(0, BLOCK_CZ)
    cz_ok = cz < CZ
    z_ok = row_ok[:, None] & cz_ok[None, :]
    zhat, _ = _ln_rows(Z, rows, row_ok, cz, cz_ok, CZ, eps)
    lw = tl.load(LN_W + cz, mask=cz_ok, other=0.0).to(tl.float32)
    lb = tl.load(LN_B + cz, mask=cz_ok, other=0.0).to(tl.float32)
    zn = _cast((zhat * lw[None, :] + lb[None, :]), W_IN.dtype.element_ty, INTERP)
    tl.store(ZN_OUT + rows[:, None] * CZ + cz[None, :], zn, mask=z_ok)
    if HAS_MASK:
        mk = tl.load(MASK + rows, mask=row_ok, other=0.0).to(tl.float32)
    else:
        mk = tl.where(row_ok, 1.0, 0.0)
    g_row = bt * CH * NN + r  # channel-major offset of channel 0
    if G_SIDE >= 0:
        gg_row = _gathered_offsets(bt, r, NJ, CH, I64)
    PART_W = 4 * CH + 2 * CZ
    part = PART + pid.to(tl.int64) * PART_W
    dzn = tl.zeros((BLOCK_M, BLOCK_CZ), dtype=tl.float32)
    hh = tl.arange(0, BLOCK_H)
    for h0 in range(0, CH, BLOCK_H):
        h = h0 + hh
        h_ok = h < CH
        w_ok = h_ok[:, None] & cz_ok[None, :]
        o_ok = row_ok[:, None] & h_ok[None, :]
        g_offs = g_row[:, None] + _wide(h, I64)[None, :] * NN
        for side in tl.static_range(2):
            # natural tiles [BLOCK_H, BLOCK_CZ] of the projection and gate weights
            wp = tl.load(W_IN + ((2 * side) * CH + h)[:, None] * CZ + cz[None, :], mask=w_ok, other=0.0)
            wg = tl.load(W_IN + ((2 * side + 1) * CH + h)[:, None] * CZ + cz[None, :], mask=w_ok, other=0.0)
            bp = tl.load(B_IN + (2 * side) * CH + h, mask=h_ok, other=0.0)
            bg = tl.load(B_IN + (2 * side + 1) * CH + h, mask=h_ok, other=0.0)
            p = _dot(zn, tl.trans(wp), DOT_PREC, INTERP) + bp[None, :]
            s = tl.sigmoid(_dot(zn, tl.trans(wg), DOT_PREC, INTERP) + bg[None, :])
            offs = g_offs
            if side == G_SIDE or G_SIDE == 2:
                offs = gg_row[:, None] + _wide(h, I64)[None, :] * NJ
            if side == 0:
                d = tl.load(DA + offs, mask=o_ok, other=0.0).to(tl.float32)
            else:
                d = tl.load(DB + offs, mask=o_ok, other=0.0).to(tl.float32)
            dm = d * mk[:, None]
            dp = dm * s
            dg = dm * p * s * (1.0 - s)
            dp_c = _cast(dp, DP.dtype.element_ty, INTERP)
            dg_c = _cast(dg, DP.dtype.element_ty, INTERP)
            col_p = (2 * side) * CH + h
            col_g = (2 * side + 1) * CH + h
            tl.store(DP + rows[:, None] * DP_STRIDE + col_p[None, :], dp_c, mask=o_ok)
            tl.store(DP + rows[:, None] * DP_STRIDE + col_g[None, :], dg_c, mask=o_ok)
            tl.store(part + col_p, tl.sum(dp, axis=0), mask=h_ok)
            tl.store(part + col_g, tl.sum(dg, axis=0), mask=h_ok)
            dzn += _dot(dp_c, wp, DOT_PREC, INTERP)
            dzn += _dot(dg_c, wg, DOT_PREC, INTERP)
    # the output gate's logits: d(zn) += d(g) @ WG
    for n0 in range(0, CZ, BLOCK_H):
        n = n0 + hh
        n_ok = n < CZ
        dgo = tl.load(DP + rows[:, None] * DP_STRIDE + 4 * CH + n[None, :],
                      mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        wgo = tl.load(WG + n[:, None] * CZ + cz[None, :], mask=n_ok[:, None] & cz_ok[None, :], other=0.0)
        dzn += _dot(dgo, wgo, DOT_PREC, INTERP)
    # recompute zhat rather than keep it live through the loops (register pressure)
    zhat, rstd = _ln_rows(Z, rows, row_ok, cz, cz_ok, CZ, eps)
    tl.store(part + 4 * CH + cz, tl.sum(dzn * zhat, axis=0), mask=cz_ok)
    tl.store(part + 4 * CH + CZ + cz, tl.sum(dzn, axis=0), mask=cz_ok)
    dzhat = dzn * lw[None, :]
    c1 = tl.sum(dzhat * zhat, axis=1) / CZ
    c2 = tl.sum(dzhat, axis=1) / CZ
    dz = (dzhat - zhat * c1[:, None] - c2[:, None]) * rstd[:, None]
    if HAS_RES:
        dz += tl.load(DRES + rows[:, None] * CZ + cz[None, :], mask=z_ok, other=0.0).to(tl.float32)
    tl.store(DZ + rows[:, None] * CZ + cz[None, :], _cast(dz, DZ.dtype.element_ty, INTERP), mask=z_ok)


# ----------------------------------------------------------------------------------------------
# launch configuration
# ----------------------------------------------------------------------------------------------
def _configs(inner_name, shapes):
    """Configs from (BLOCK_M, inner tile, num_warps) triples (num_stages 2)."""
    return [triton.Config({"BLOCK_M": bm, inner_name: bi}, num_warps=nw, num_stages=2)
            for bm, bi, nw in shapes]


def _prune_inner(inner_name: str, width_arg: str):
    """Drop configs whose inner tile is wider than the (padded) width it tiles."""
    def prune(configs, nargs, **kwargs):
        width = max(16, next_power_of_2(nargs[width_arg]))
        kept = [c for c in configs if c.kwargs[inner_name] <= width]
        return kept or configs[:1]
    return prune


# Candidate tiles for c_z = c_hidden = 128 (bf16), from benchmarks/sweep_trimul_tiles.py (an
# H200, N_res 384 and 1024, num_stages 2): each kernel's fastest tile is in its list with the
# runners-up (at N_res 1024: projection forward (128, 32, 8) 0.69 ms, where the best earlier
# candidate took 0.85; projection backward (64, 32, 4) 2.43 ms vs 3.21; output backward
# (32, 32, 4) 1.67 ms). The backward kernels keep d(zn) / d(xn) live across their loops, so their
# tiles stay small. (Splitting each backward in two, the gating part and a GEMM over dP with the
# LayerNorm backward as its epilogue, measured 2.63 ms for the projection backward and 1.73 for
# the output backward on an H100: no faster, two more launches.) (32, 32, 4) in the forward
# list is the earlier default, kept for small N_res (the sweep starts at BLOCK_M 64). The first
# entry of each list is what FASTFOLD_PLUGIN_AUTOTUNE=0 runs.
_FWD_SHAPES = [(64, 32, 4), (128, 32, 8), (128, 32, 4), (64, 64, 8), (32, 32, 4)]
_BWD_SHAPES = [(32, 32, 4), (64, 32, 4), (32, 64, 4), (64, 32, 8), (32, 32, 8)]
# the layout flags change the memory access pattern (TRANS: incoming, G_SIDE: the DAP-gathered
# operand), so each combination gets its own tuned tile
_KEY = ["CZ", "CH", "M_BUCKET", "TRANS"]
_PROJ_KEY = _KEY + ["HAS_MASK", "G_SIDE"]
_PROJ_BWD_KEY = _PROJ_KEY + ["HAS_RES"]  # the residual gradient's load: a variant of its own

_proj_fwd_tuned = autotune(
    _configs("BLOCK_H", _FWD_SHAPES), key=_PROJ_KEY,
    prune=_prune_inner("BLOCK_H", "CH"),
)(_trimul_proj_fwd_kernel)
_out_fwd_tuned = autotune(
    _configs("BLOCK_N", _FWD_SHAPES), key=_KEY,
    prune=_prune_inner("BLOCK_N", "CZ"),
)(_trimul_out_fwd_kernel)
_out_bwd_tuned = autotune(
    _configs("BLOCK_N", _BWD_SHAPES), key=_KEY, reset_to_zero=["PART"],
    prune=_prune_inner("BLOCK_N", "CZ"),
)(_trimul_out_bwd_kernel)
_proj_bwd_tuned = autotune(
    _configs("BLOCK_H", _BWD_SHAPES), key=_PROJ_BWD_KEY, reset_to_zero=["PART"],
    prune=_prune_inner("BLOCK_H", "CH"),
)(_trimul_proj_bwd_kernel)

# the smallest backward BLOCK_M sizes the partial-sum buffers (one row per program)
_MIN_BWD_BLOCK_M = min(bm for bm, _, _ in _BWD_SHAPES)
_INTERP_BLOCK_M = 32  # interpreter: one fixed config, few programs


class _Launch:
    """One kernel launch less the tensors that lead its arguments: the scalars after them, the
    launch keywords (constexprs; on the GPU less the tuned tiles) and the grid, as
    ``_make_launch`` works them out.  `tuned` is None under the interpreter (one fixed config,
    `grid` a tuple).  `key`, the autotuner's key (``Tuned.key``), is taken at the first launch:
    it depends only on what the launch fixes (its scalars and constexprs) and on the tensors'
    dtypes, which whoever keeps a ``_Launch`` for reuse must key it on."""
    __slots__ = ("kernel", "tuned", "grid", "args", "kwargs", "key")

    def __init__(self, kernel, tuned, grid, args: tuple, kwargs: dict):
        self.kernel, self.tuned, self.grid, self.args, self.kwargs = kernel, tuned, grid, args, kwargs
        self.key = None


_TUNED_BLOCKS = ("BLOCK_M", "BLOCK_H", "BLOCK_N")


def _make_launch(kernel, tuned, Bt: int, NN: int, args: tuple, meta: dict) -> _Launch:
    """`kernel` on a (cdiv(NN, BLOCK_M), Bt) grid: programs tile the N*N pairs of one batch
    entry, so channel-major offsets stay contiguous along a tile.  Autotuned on a GPU; `meta`
    (one fixed config) in the interpreter (``meta["INTERP"]``).  `args`: the scalars after
    the tensors."""
    meta = {k: v for k, v in meta.items() if k in kernel.arg_names}
    if meta["INTERP"]:
        bm = meta["BLOCK_M"]
        return _Launch(kernel, None, (cdiv(NN, bm), Bt), args, meta)
    return _Launch(kernel, tuned, lambda m: (cdiv(NN, m["BLOCK_M"]), Bt), args,
                   {k: v for k, v in meta.items() if k not in _TUNED_BLOCKS})


def _launch(launch: _Launch, tensors: tuple) -> None:
    """Run `launch` with its leading `tensors`."""
    args = (*tensors, *launch.args)
    if launch.tuned is None:
        launch.kernel[launch.grid](*args, **launch.kwargs)
        return
    if launch.key is None:
        launch.key = launch.tuned.key(args, launch.kwargs)
    launch.tuned.launch(launch.key, launch.grid, args, launch.kwargs)


def _meta(cdt: torch.dtype, M: int, CZ: int, CH: int) -> dict:
    """Launch constants shared by the four kernels (tile sizes: the interpreter's config)."""
    return _meta_of(dot_precision(cdt), is_interpreter(), _needs_i64(M, CZ, CH), CZ, CH)


def _meta_of(dot_prec: str, interp: bool, i64: bool, CZ: int, CH: int) -> dict:
    """``_meta`` from its switches' values."""
    bcz, bch = max(16, next_power_of_2(CZ)), max(16, next_power_of_2(CH))
    return dict(DOT_PREC=dot_prec, INTERP=interp, I64=i64,
                BLOCK_M=_INTERP_BLOCK_M, BLOCK_CZ=bcz, BLOCK_CH=bch,
                BLOCK_H=min(32, bch), BLOCK_N=min(32, bcz))


def _needs_i64(M: int, CZ: int, CH: int) -> bool:
    """Whether an element offset may pass 2**31 (the widest buffer is dP, [M, 4 CH + CZ])."""
    return M * (4 * CH + 2 * CZ) >= 2**31


def _m_bucket(M: int) -> int:
    return min(next_power_of_2(M), 1 << 24)


# ----------------------------------------------------------------------------------------------
# stages shared by the single-GPU and the sharded Functions
# ----------------------------------------------------------------------------------------------
class _Grid(NamedTuple):
    """The pairs the kernels tile: Bt batch entries of NI x NJ pairs (pair r = i * NJ + j).

    trans: z, mask and out hold the grid transposed, [*, NJ, NI, C] (the incoming shard, run as
    the outgoing update of z^T without a copy).  g_side: the operand (0: a, 1: b; 2: both, in
    the projection forward; -1: none) stored in the gathered layout ``[NI, Bt, C_h, NJ]``
    instead of ``[Bt, C_h, NI, NJ]``.
    """

    Bt: int
    NI: int
    NJ: int
    trans: bool = False
    g_side: int = -1

    @property
    def NN(self) -> int:
        return self.NI * self.NJ

    @property
    def M(self) -> int:
        return self.Bt * self.NI * self.NJ


class _Packed(NamedTuple):
    """The weights as the kernels read them: the concatenated input projection and the output
    weights in the compute dtype, biases in fp32 (built per call: never stale)."""

    w_in: torch.Tensor
    b_in: torch.Tensor
    wz: torch.Tensor
    bz: torch.Tensor
    wg: torch.Tensor
    bg: torch.Tensor


def _pack(w: TriMulWeights, cdt: torch.dtype) -> _Packed:
    return _Packed(
        w_in=torch.cat([w.a_p_w, w.a_g_w, w.b_p_w, w.b_g_w]).to(cdt).contiguous(),
        b_in=torch.cat([w.a_p_b, w.a_g_b, w.b_p_b, w.b_g_b]).to(torch.float32).contiguous(),
        wz=w.z_w.to(cdt).contiguous(), bz=w.z_b.to(torch.float32).contiguous(),
        wg=w.g_w.to(cdt).contiguous(), bg=w.g_b.to(torch.float32).contiguous(),
    )


def _dtypes(z: torch.Tensor):
    """(cdt, xdt, out dtype): the GEMM operand dtype, the a / b / x dtype (fp32 under fp16
    autocast: OpenFold's rule) and the output dtype."""
    ac = autocast_dtype(z.device.type)
    cdt = ac if ac is not None else z.dtype
    xdt = torch.float32 if ac == torch.float16 else cdt
    return cdt, xdt, (ac if ac is not None else z.dtype)


def _rows(z: torch.Tensor, mask: Optional[torch.Tensor], M: int, CZ: int):
    """z as row-major [M, CZ] and the mask as fp32 [M] (None stays None), in z's own layout."""
    z2 = z.reshape(M, CZ).contiguous()
    m2 = None if mask is None else mask.expand(z.shape[:-1]).reshape(M).to(torch.float32).contiguous()
    return z2, m2


def _proj_fwd_launch(g: _Grid, CZ: int, CH: int, eps: float, meta, has_mask: bool) -> _Launch:
    return _make_launch(_trimul_proj_fwd_kernel, _proj_fwd_tuned, g.Bt, g.NN,
                        (g.NN, g.NJ, CZ, CH, eps, _m_bucket(g.M)),
                        dict(meta, HAS_MASK=has_mask, TRANS=g.trans, G_SIDE=g.g_side))


def _proj_fwd_tensors(z2, m2, w: TriMulWeights, pk: _Packed, a, b) -> tuple:
    return (z2, m2 if m2 is not None else z2, w.ln_in_w, w.ln_in_b, pk.w_in, pk.b_in, a, b)


def _proj_fwd(z2, m2, w: TriMulWeights, pk: _Packed, a, b, g: _Grid, eps: float, meta) -> None:
    CZ, CH = z2.shape[1], pk.wz.shape[1]
    _launch(_proj_fwd_launch(g, CZ, CH, eps, meta, m2 is not None),
            _proj_fwd_tensors(z2, m2, w, pk, a, b))


def _out_fwd_launch(g: _Grid, CZ: int, CH: int, eps: float, meta) -> _Launch:
    return _make_launch(_trimul_out_fwd_kernel, _out_fwd_tuned, g.Bt, g.NN,
                        (g.NN, g.NJ, CZ, CH, eps, _m_bucket(g.M)), dict(meta, TRANS=g.trans))


def _out_fwd_tensors(x, z2, w: TriMulWeights, pk: _Packed, out) -> tuple:
    return (x, z2, w.ln_in_w, w.ln_in_b, w.ln_out_w, w.ln_out_b, pk.wz, pk.bz, pk.wg, pk.bg, out)


def _out_fwd(x, z2, w: TriMulWeights, pk: _Packed, g: _Grid, eps: float, meta, out_dtype):
    CZ, CH = z2.shape[1], pk.wz.shape[1]
    out = torch.empty((g.M, CZ), device=z2.device, dtype=out_dtype)
    _launch(_out_fwd_launch(g, CZ, CH, eps, meta), _out_fwd_tensors(x, z2, w, pk, out))
    return out


def _n_partials(g: _Grid, interp: bool) -> int:
    """Rows of the backward partial-sum buffers (one per program of the smallest BLOCK_M)."""
    return g.Bt * triton.cdiv(g.NN, _INTERP_BLOCK_M if interp else _MIN_BWD_BLOCK_M)


def _out_bwd_launch(g: _Grid, CZ: int, CH: int, eps: float, meta) -> _Launch:
    return _make_launch(_trimul_out_bwd_kernel, _out_bwd_tuned, g.Bt, g.NN,
                        (g.NN, g.NJ, CZ, CH, 4 * CH + CZ, 4 * CH, eps, _m_bucket(g.M)),
                        dict(meta, TRANS=g.trans))


class _Backward(NamedTuple):
    """The backward's two kernel launches (less their tensors) and the rows of its partial-sum
    buffers, for one ``_Grid``, C_z, C_h, eps, mask flag, residual-gradient flag and
    ``_meta``."""
    out_bwd: _Launch
    proj_bwd: _Launch
    n_partials: int


def _backward_launches(g: _Grid, CZ: int, CH: int, eps: float, meta, has_mask: bool,
                       has_res: bool = False) -> _Backward:
    return _Backward(_out_bwd_launch(g, CZ, CH, eps, meta),
                     _proj_bwd_launch(g, CZ, CH, eps, meta, has_mask, has_res),
                     _n_partials(g, meta["INTERP"]))


def _out_bwd(dout2, x, z2, w: TriMulWeights, pk: _Packed, g: _Grid, cdt, bw: _Backward):
    """(dx, dy, LayerNorm_out(x), dP with the gate-logit gradient in its last CZ columns, the
    output stage's partial sums)."""
    CZ, CH = z2.shape[1], pk.wz.shape[1]
    dev = z2.device
    dx = torch.empty_like(x)
    dy = torch.empty((g.M, CZ), device=dev, dtype=cdt)
    xn = torch.empty((g.M, CH), device=dev, dtype=cdt)
    dp = torch.empty((g.M, 4 * CH + CZ), device=dev, dtype=cdt)
    part = torch.zeros((bw.n_partials, 2 * CZ + 2 * CH), device=dev, dtype=torch.float32)
    _launch(bw.out_bwd,
            (dout2, x, z2, w.ln_in_w, w.ln_in_b, w.ln_out_w, w.ln_out_b, pk.wz, pk.bz, pk.wg, pk.bg,
             dx, dy, xn, dp, part))
    return dx, dy, xn, dp, part


def _proj_bwd_launch(g: _Grid, CZ: int, CH: int, eps: float, meta, has_mask: bool,
                     has_res: bool = False) -> _Launch:
    return _make_launch(_trimul_proj_bwd_kernel, _proj_bwd_tuned, g.Bt, g.NN,
                        (g.NN, g.NJ, CZ, CH, 4 * CH + CZ, eps, _m_bucket(g.M)),
                        dict(meta, HAS_MASK=has_mask, HAS_RES=has_res, TRANS=g.trans,
                             G_SIDE=g.g_side))


def _proj_bwd(z2, m2, w: TriMulWeights, pk: _Packed, da, db, dp, g: _Grid, cdt, z_dtype,
              bw: _Backward, dres: Optional[torch.Tensor] = None):
    """(LayerNorm_in(z), dz, the input stage's partial sums); fills dP's first 4 CH columns.
    `dres` (with a ``bw`` made for it): contiguous [M, C_z] rows added to dz by the kernel."""
    CZ, CH = z2.shape[1], pk.wz.shape[1]
    dev = z2.device
    zn = torch.empty((g.M, CZ), device=dev, dtype=cdt)
    dz = torch.empty((g.M, CZ), device=dev, dtype=z_dtype)
    part = torch.zeros((bw.n_partials, 4 * CH + 2 * CZ), device=dev, dtype=torch.float32)
    _launch(bw.proj_bwd,
            (z2, m2 if m2 is not None else z2, w.ln_in_w, w.ln_in_b, pk.w_in, pk.b_in, pk.wg, da,
             db, dp, zn, dz, part, dres if dres is not None else dz))
    return zn, dz, part


def _param_grads(dp, zn, dy, xn, part_out, part_in, weights):
    """The 16 parameter gradients (sums over this call's pairs), in the parameters' dtypes."""
    CZ, CH = zn.shape[1], xn.shape[1]
    dw_all = _weight_grad(dp, zn)  # [4 CH + CZ, CZ]: a_p, a_g, b_p, b_g, g
    dwz = _weight_grad(dy, xn)  # [CZ, CH]
    s_out = part_out.sum(0)
    s_in = part_in.sum(0)
    dws = dw_all.split([CH, CH, CH, CH, CZ])
    dbs = s_in[: 4 * CH].split([CH, CH, CH, CH])
    grads = TriMulWeights(
        ln_in_w=s_in[4 * CH: 4 * CH + CZ], ln_in_b=s_in[4 * CH + CZ:],
        a_p_w=dws[0], a_p_b=dbs[0], a_g_w=dws[1], a_g_b=dbs[1],
        b_p_w=dws[2], b_p_b=dbs[2], b_g_w=dws[3], b_g_b=dbs[3],
        ln_out_w=s_out[2 * CZ: 2 * CZ + CH], ln_out_b=s_out[2 * CZ + CH:],
        z_w=dwz, z_b=s_out[:CZ], g_w=dws[4], g_b=s_out[CZ: 2 * CZ],
    )
    return [gr if gr.dtype == p.dtype else gr.to(p.dtype) for gr, p in zip(grads, weights)]


# ----------------------------------------------------------------------------------------------
# autograd Functions
# ----------------------------------------------------------------------------------------------
class _Plan(NamedTuple):
    """What a single-process call fixes but the data (see ``_plan``)."""
    g: _Grid
    CZ: int
    CH: int
    cdt: torch.dtype
    xdt: torch.dtype
    out_dtype: torch.dtype
    z_dtype: torch.dtype
    z_shape: tuple
    x_shape: tuple           # a, b, x: [Bt, C_h, N, N]
    has_mask: bool
    outgoing: bool
    eps: float
    training: bool
    proj_fwd: _Launch
    out_fwd: _Launch
    backward: dict           # (dot precision, interp, I64, dout dtype, dres dtype) -> _Backward


@functools.lru_cache(maxsize=64)
def _plan(z_shape: tuple, z_dtype: torch.dtype, has_mask: bool, CH: int, ln_dtypes: tuple,
          outgoing: bool, eps: float, training: bool, ac: Optional[torch.dtype], dot_prec: str,
          interp: bool, i64: bool) -> _Plan:
    """The ``_Plan`` of a call of ``triangle_multiplication``: its grid, dtypes (``_dtypes``:
    `ac` is the autocast dtype), buffer shapes and forward launches.  Keyed on everything that
    enters them: z's shape and dtype (z and the mask are copied to contiguous rows, whatever
    their strides), whether there is a mask, C_h, the four LayerNorm parameters' dtypes (passed
    to the kernels as they are; the other weights are packed to fixed dtypes), direction, eps,
    grad, autocast dtype, dot precision, interpreter and 64-bit offsets (``_needs_i64``, read
    per call)."""
    cdt = ac if ac is not None else z_dtype
    xdt = torch.float32 if ac == torch.float16 else cdt
    N, CZ = z_shape[-2], z_shape[-1]
    g = _Grid(math.prod(z_shape[:-3]), N, N)
    meta = _meta_of(dot_prec, interp, i64, CZ, CH)
    return _Plan(g, CZ, CH, cdt, xdt, ac if ac is not None else z_dtype, z_dtype, z_shape,
                 (g.Bt, CH, N, N), has_mask, outgoing, eps, training,
                 _proj_fwd_launch(g, CZ, CH, eps, meta, has_mask), _out_fwd_launch(g, CZ, CH, eps, meta),
                 {})


class _TriMulFn(torch.autograd.Function):
    """The whole update on one device: z [*, N, N, C_z].  With `carry`, z comes back as a
    second output (for its other reader, the residual add around the update); its gradient,
    dres, is added to dz by the projection backward kernel (``HAS_RES``)."""

    @staticmethod
    def forward(ctx, plan: _Plan, carry: bool, z, mask, *weights):
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None
        w = TriMulWeights(*weights)
        g = plan.g
        with autocast_off(z.device.type):
            z2, m2 = _rows(z, mask, g.M, plan.CZ)
            pk = _pack(w, plan.cdt)
            a = torch.empty(plan.x_shape, device=z.device, dtype=plan.xdt)
            b = torch.empty_like(a)
            _launch(plan.proj_fwd, _proj_fwd_tensors(z2, m2, w, pk, a, b))
            x = _contract(a, b, plan.outgoing)
            if not plan.training:  # inference: a and b are dead before the output stage
                del a, b
            out = torch.empty((g.M, plan.CZ), device=z2.device, dtype=plan.out_dtype)
            _launch(plan.out_fwd, _out_fwd_tensors(x, z2, w, pk, out))
        if plan.training:
            ctx.save_for_backward(z2, m2, a, b, x, *pk, *weights)
        ctx.plan = plan
        out = out.view(plan.z_shape)
        return (out, z) if carry else out

    @staticmethod
    def backward(ctx, dout, dres=None):
        plan = ctx.plan
        if dout is None:  # only the carried z has a gradient
            return (None, None, dres, None) + (None,) * len(TriMulWeights._fields)
        z2, m2, a, b, x, *rest = ctx.saved_tensors
        pk, weights = _Packed(*rest[:6]), rest[6:]
        w = TriMulWeights(*weights)
        g, CZ, CH, cdt = plan.g, plan.CZ, plan.CH, plan.cdt
        if dres is not None:  # contiguous [M, C_z] rows: a copy only where its strides need one
            dres = dres.reshape(g.M, CZ).contiguous()
        # the switches are read again, as the forward's were (the dot precision as torch's
        # matmuls read it); dout's and dres's dtypes (dres's presence: HAS_RES) enter the kept
        # tuning keys
        key = (dot_precision(cdt), is_interpreter(), _needs_i64(g.M, CZ, CH), dout.dtype,
               None if dres is None else dres.dtype)
        bw = plan.backward.get(key)
        if bw is None:
            bw = plan.backward[key] = _backward_launches(
                g, CZ, CH, plan.eps, _meta_of(*key[:3], CZ, CH), plan.has_mask, dres is not None)
        with autocast_off(z2.device.type):
            dout2 = dout.reshape(g.M, CZ).contiguous()
            dx, dy, xn, dp, part_out = _out_bwd(dout2, x, z2, w, pk, g, cdt, bw)
            da, db = _contract_backward(dx, a, b, plan.outgoing)
            del x, dx
            zn, dz, part_in = _proj_bwd(z2, m2, w, pk, da, db, dp, g, cdt, plan.z_dtype, bw, dres)
            del da, db
            grads = _param_grads(dp, zn, dy, xn, part_out, part_in, weights)
        return (None, None, dz.view(plan.z_shape), None, *grads)


def _contract(a: torch.Tensor, b: torch.Tensor, outgoing: bool) -> torch.Tensor:
    """x [Bt, C, N, N] from channel-major a, b: a_c @ b_c^T (outgoing) or a_c^T @ b_c (incoming)."""
    Bt, C, N, _ = a.shape
    a3, b3 = a.view(Bt * C, N, N), b.view(Bt * C, N, N)
    x = torch.bmm(a3, b3.transpose(1, 2)) if outgoing else torch.bmm(a3.transpose(1, 2), b3)
    return x.view(Bt, C, N, N)


def _contract_backward(dx: torch.Tensor, a: torch.Tensor, b: torch.Tensor, outgoing: bool):
    """(da, db) for _contract."""
    Bt, C, N, _ = a.shape
    a3, b3, dx3 = a.view(Bt * C, N, N), b.view(Bt * C, N, N), dx.view(Bt * C, N, N)
    if outgoing:  # x = a b^T
        da = torch.bmm(dx3, b3)
        db = torch.bmm(dx3.transpose(1, 2), a3)
    else:  # x = a^T b
        da = torch.bmm(b3, dx3.transpose(1, 2))
        db = torch.bmm(a3, dx3)
    return da.view(Bt, C, N, N), db.view(Bt, C, N, N)


class _Work:
    """An issued collective; ``wait()`` completes it (a no-op for a synchronous one)."""

    def __init__(self, comm: "_DistComm", name: str, work):
        self.comm, self.name, self.work = comm, name, work

    def wait(self) -> None:
        if self.work is not None:
            self.comm.guard(self.name, self.work.wait)
            self.work = None


class _DistComm:
    """The sharded Function's two collectives on a torch.distributed process group (None: one
    process).  Buffers are concatenations along dim 0: rank q's block is rows [q R, (q+1) R).
    A failed collective raises `error` (the caller's type: the DAP layer passes its
    DAPCommError; kernels do not import the distributed layer).
    (Also the seam the in-process kernel tests replace with emulated ranks.)"""

    def __init__(self, group, error: type = RuntimeError, timeout: Optional[float] = None):
        self.group = group
        self.error = error
        self.size = 1 if group is None else dist.get_world_size(group)
        self.rank = 0 if group is None else dist.get_rank(group)
        # how long a copy-engine all-gather's barrier waits for the peers, then traps the device
        self.timeout_ms = max(1, int(1000 * (_PEER_TIMEOUT_S if timeout is None else timeout)))

    def guard(self, name: str, fn):
        try:
            return fn()
        except RuntimeError as e:
            raise self.error(
                f"triangle_multiplication_sharded: the {name} on a group of {self.size} processes "
                f"failed on group rank {self.rank}: {e}. (A peer process that exited, or did not "
                f"reach this collective within the process group's timeout, makes the "
                f"collectives of the other ranks fail this way.)") from e

    def all_gather(self, full: torch.Tensor, local: torch.Tensor, async_op: bool) -> _Work:
        """full [P R, ...] <- every rank's local [R, ...]."""
        return _Work(self, "all-gather", self.guard("all-gather", lambda: dist.all_gather_into_tensor(
            full, local, group=self.group, async_op=async_op)))

    def all_to_all(self, recv: torch.Tensor, send: torch.Tensor, async_op: bool) -> _Work:
        """recv [P, ...] <- block `rank` of every rank's send [P, ...] (block q goes to rank q)."""
        return _Work(self, "all-to-all", self.guard("all-to-all", lambda: dist.all_to_all_single(
            recv, send, group=self.group, async_op=async_op)))

    def reduce_scatter(self, local: torch.Tensor, full: torch.Tensor, async_op: bool) -> _Work:
        """local [R, ...] <- block `rank` of the sum over ranks of full [P R, ...]."""
        return _Work(self, "reduce-scatter", self.guard("reduce-scatter", lambda: dist.reduce_scatter_tensor(
            local, full, op=dist.ReduceOp.SUM, group=self.group, async_op=async_op)))


# Inference on GPUs: the channel chunks' all-gathers by copy engines.  NCCL moves data with SMs,
# so an all-gather issued beside the contraction GEMMs slows them nearly by its own duration
# (measured on two H200s: 1 GiB beside 5.6 ms of GEMMs cost them 1.39 ms with NCCL's
# all-to-all, 0.64 ms as copy-engine writes; benchmarks/results/logs/
# probe-collectives_2xh200_74c7130.log).  Each rank copies its chunk straight into the other
# ranks' buffer (``cudaMemcpyAsync`` into their symmetric memory: a copy engine, no SMs), on a
# side stream between two device-side barriers of the group.  FASTFOLD_PLUGIN_DAP_COPY_ENGINE=0
# keeps NCCL.
_COPY_ENGINE = os.environ.get("FASTFOLD_PLUGIN_DAP_COPY_ENGINE", "1") != "0"
_PEER_TIMEOUT_S = 600.0  # the barriers' wait for a peer when the caller gives no timeout


def _slot_bytes(need: int) -> int:
    """The buffer size for chunks of `need` bytes: ``_GATHER_CHUNK_BYTES`` (the usual sizes all
    share one pair of buffers), or, where one channel is larger, a power-of-two number of MiB
    (a few sizes at most over many N_res, each made once)."""
    if need <= _GATHER_CHUNK_BYTES:
        return _GATHER_CHUNK_BYTES
    return 2**20 * next_power_of_2(-(-need // 2**20))


def _retry_after_empty_cache(make):
    """make(); once more after returning the caching allocator's unused blocks to the device if
    it runs out of memory (symmetric memory is allocated outside the caching allocator)."""
    try:
        return make()
    except (torch.cuda.OutOfMemoryError, RuntimeError):
        torch.cuda.empty_cache()
        return make()


class _SlotWork:
    """A copy-engine all-gather issued on the side stream; ``wait()`` orders the current stream
    after it."""

    def __init__(self, event: torch.cuda.Event):
        self.event = event

    def wait(self) -> None:
        torch.cuda.current_stream().wait_event(self.event)


class _PeerSlots:
    """Two buffers of ``nbytes`` in symmetric memory on every rank of a group (the chunk
    all-gathers' two alternating buffers), one side stream, and the all-gather into them.
    Made once per (group, device, size) and kept: the rendezvous that maps the peers' buffers
    is a collective, too slow per call."""

    _made: Dict[tuple, Optional["_PeerSlots"]] = {}

    def __init__(self, comm: "_DistComm", buf: torch.Tensor, hdl, nbytes: int):
        self.rank, self.size, self.nbytes = comm.rank, comm.size, nbytes
        self.buf, self.hdl = buf, hdl
        self.stream = torch.cuda.Stream(buf.device)

    @classmethod
    def get(cls, comm: "_DistComm", device: torch.device, nbytes: int) -> Optional["_PeerSlots"]:
        """The slots of comm's group on `device`, or None where copy engines are not to be used
        (turned off, not CUDA, one process, no group) or symmetric memory cannot be set up on
        every rank (said once; NCCL then). The ranks agree on the outcome (a rank that runs
        out of memory for the buffers must not leave the others waiting in the rendezvous)."""
        if not (_COPY_ENGINE and device.type == "cuda" and type(comm) is _DistComm
                and comm.group is not None and comm.size > 1):
            return None
        key = (comm.group.group_name, tuple(dist.get_process_group_ranks(comm.group)),
               device.index, nbytes)
        if key not in cls._made:
            import torch.distributed._symmetric_memory as symm_mem

            buf = hdl = problem = None
            try:
                buf = _retry_after_empty_cache(
                    lambda: symm_mem.empty(2 * nbytes, dtype=torch.uint8, device=device))
            except Exception as e:  # noqa: BLE001 - any failure to set up: NCCL instead
                problem = e
            ok = cls._everyone(comm, device, problem is None)
            if ok:
                try:
                    hdl = symm_mem.rendezvous(buf, comm.group)
                except Exception as e:  # noqa: BLE001
                    problem = e
                ok = cls._everyone(comm, device, hdl is not None)
            if not ok:
                logging.getLogger("fastfold_plugin").warning(
                    "triangle_multiplication_sharded: symmetric memory unavailable on %s (%s); "
                    "the inference all-gathers use NCCL", "this rank" if problem else "a peer",
                    problem if problem else "see its log")
            cls._made[key] = cls(comm, buf, hdl, nbytes) if ok else None
        return cls._made[key]

    @staticmethod
    def _everyone(comm: "_DistComm", device: torch.device, ok: bool) -> bool:
        """Whether `ok` holds on every rank of the group (an all-reduce of one flag)."""
        flag = torch.tensor([int(ok)], dtype=torch.int32, device=device)
        comm.guard("all-reduce", lambda: dist.all_reduce(flag, op=dist.ReduceOp.MIN,
                                                         group=comm.group))
        return bool(flag.item())

    def view(self, rank: int, slot: int, shape, dtype: torch.dtype) -> torch.Tensor:
        """Rank `rank`'s buffer `slot` as a tensor of `shape` (this rank's, or a peer's mapped
        into this device's address space)."""
        numel = math.prod(shape)
        return self.hdl.get_buffer(rank, (numel,), dtype,
                                   slot * self.nbytes // dtype.itemsize).view(shape)

    def all_gather(self, slot: int, shape, local: torch.Tensor, overlap: bool, timeout_ms: int):
        """Buffer `slot` as full ``[P * R, ...]`` (`shape`) <- every rank's local ``[R, ...]``
        (contiguous): this rank's local is copied into block `rank` of every peer's buffer, once
        every rank's buffer is free (all work queued on each rank's current stream so far, the
        reads of the chunk it held before, is done).  Block `rank` of this rank's own buffer is
        not written (the caller reads its own block from `local`, or wrote it there itself).
        The barriers wait `timeout_ms` for the peers, then trap the device.  Returns
        (full, work)."""
        full = self.view(self.rank, slot, shape, local.dtype)
        blk = local.numel()
        src = local.view(-1)
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            self.hdl.barrier(channel=0, timeout_ms=timeout_ms)  # every buffer is free
            for q in range(self.size):
                if q != self.rank:
                    peer = self.view(q, slot, (math.prod(shape),), local.dtype)
                    peer[self.rank * blk:(self.rank + 1) * blk].copy_(src)
            self.hdl.barrier(channel=0, timeout_ms=timeout_ms)  # every block arrived
            done = torch.cuda.Event()
            done.record(self.stream)
        lo = self.buf.data_ptr()
        if not lo <= local.data_ptr() < lo + self.buf.numel():
            local.record_stream(self.stream)  # (read on the side stream)
        work = _SlotWork(done)
        if not overlap:
            work.wait()
        return full, work


def peer_buffer_bytes() -> int:
    """The symmetric memory this process holds for the copy-engine all-gathers (which torch's
    allocator statistics do not count)."""
    return sum(s.buf.numel() for s in _PeerSlots._made.values() if s is not None)


def release_peer_buffers() -> None:
    """Free the copy-engine all-gathers' symmetric memory (made on first use and kept until
    here; the DAP layer's ``shutdown`` calls this before it destroys the process groups)."""
    if _PeerSlots._made and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # no copy into a buffer about to be unmapped is in flight
    _PeerSlots._made.clear()


def _contract_rows(x3: torch.Tensor, l3: torch.Tensor, g_rows: torch.Tensor, q0: int) -> None:
    """x[:, :, q0:q0 + Q] = L @ G_rows^T, G_rows = rows q0.. of the gathered operand, stored
    [Q, Bt*C, N] (a strided [Bt*C, Q, N] view: no copy), written into x in place."""
    q = g_rows.shape[0]
    torch.bmm(l3, g_rows.permute(1, 2, 0), out=x3[:, :, q0:q0 + q])


class _OutStage(NamedTuple):
    """What the output stage's backward leaves for the input stage's (``_out_stage_bwd``)."""
    dy: torch.Tensor
    xn: torch.Tensor
    dp: torch.Tensor
    part: torch.Tensor
    bw: "_Backward"


def _out_stage_bwd(dout, x, z2, m2, w: TriMulWeights, pk: "_Packed", g: "_Grid", eps: float,
                   cdt) -> tuple:
    """A sharded Function's backward, first part: the output kernel's backward; (dx as
    [Bt * C_h, NI, NJ], what the input stage needs)."""
    CZ, CH = z2.shape[1], w.a_p_w.shape[0]
    meta = _meta(cdt, g.M, CZ, CH)
    bw = _backward_launches(g, CZ, CH, eps, meta, m2 is not None)
    dx, dy, xn, dp, part = _out_bwd(dout.reshape(g.M, CZ).contiguous(), x, z2, w, pk, g, cdt, bw)
    return dx.view(g.Bt * CH, g.NI, g.NJ), _OutStage(dy, xn, dp, part, bw)


def _in_stage_bwd(z2, m2, w: TriMulWeights, pk: "_Packed", da, db, g: "_Grid", cdt, z_dtype,
                  out: _OutStage, weights) -> tuple:
    """A sharded Function's backward, last part: the projection backward given da and db in
    the projection kernel's layouts; (dz [M, C_z], the 16 weights' gradients)."""
    zn, dz, part_in = _proj_bwd(z2, m2, w, pk, da, db, out.dp, g, cdt, z_dtype, out.bw)
    return dz, _param_grads(out.dp, zn, out.dy, out.xn, out.part, part_in, weights)


class _TriMulShardedFn(torch.autograd.Function):
    """One rank's shard of the update.  Logical grid [R, N] (outgoing: z's local rows; incoming:
    the local columns, i.e. the rows of z^T, read and written in z's layout by the kernels):
    x[p, q] = sum_k L[p, k] G[q, k], L the local operand (outgoing a, incoming b), G the one
    contracted over every row (outgoing b, incoming a), all-gathered."""

    @staticmethod
    def forward(ctx, z, mask, outgoing, eps, comm, overlap, training, *weights):
        w = TriMulWeights(*weights)
        dev = z.device.type
        cdt, xdt, out_dtype = _dtypes(z)
        P, rank = comm.size, comm.rank
        CZ, CH = z.shape[-1], w.a_p_w.shape[0]
        R, N = (z.shape[-3], z.shape[-2]) if outgoing else (z.shape[-2], z.shape[-3])
        if not training:
            return _sharded_inference(z, mask, w, outgoing, eps, comm, overlap)
        g = _Grid(math.prod(z.shape[:-3]), R, N, trans=not outgoing, g_side=1 if outgoing else 0)
        BC = g.Bt * CH
        with torch.autocast(dev, enabled=False):
            z2, m2 = _rows(z, mask, g.M, CZ)
            pk = _pack(w, cdt)
            own = torch.empty((g.Bt, CH, R, N), device=z.device, dtype=xdt)  # L
            mine = torch.empty((R, BC, N), device=z.device, dtype=xdt)  # this rank's rows of G
            meta = _meta(cdt, g.M, CZ, CH)
            _proj_fwd(z2, m2, w, pk, *((own, mine) if outgoing else (mine, own)), g, eps, meta)
            full = mine.new_empty((P * R, BC, N))  # G, gathered layout
            work = comm.all_gather(full, mine, overlap)
            x = torch.empty((g.Bt, CH, R, N), device=z.device, dtype=xdt)
            x3, l3 = x.view(BC, R, N), own.view(BC, R, N)
            lo, hi = rank * R, (rank + 1) * R
            _contract_rows(x3, l3, mine, lo)  # this rank's block while the gather runs
            work.wait()
            del mine
            if lo > 0:
                _contract_rows(x3, l3, full[:lo], 0)
            if hi < P * R:
                _contract_rows(x3, l3, full[hi:], hi)
            out = _out_fwd(x, z2, w, pk, g, eps, meta, out_dtype)
        ctx.save_for_backward(z2, m2, own, full, x, *pk, *weights)
        ctx.meta = (outgoing, eps, cdt, z.dtype, z.shape, g, comm, overlap)
        return out.view(z.shape[:-1] + (z.shape[-1],))

    @staticmethod
    def backward(ctx, dout):
        z2, m2, own, full, x, *rest = ctx.saved_tensors
        pk, weights = _Packed(*rest[:6]), rest[6:]
        w = TriMulWeights(*weights)
        outgoing, eps, cdt, z_dtype, z_shape, g, comm, overlap = ctx.meta
        CH = w.a_p_w.shape[0]
        BC, R, N = g.Bt * CH, g.NI, g.NJ
        with torch.autocast(z2.device.type, enabled=False):
            dx3, out_stage = _out_stage_bwd(dout, x, z2, m2, w, pk, g, eps, cdt)
            del x
            # every row of G gets gradient from this rank: dG = dx^T @ L, summed over ranks by
            # the reduce-scatter (the adjoint of the all-gather), which runs during dL = dx @ G
            d_full = torch.empty_like(full)
            torch.bmm(dx3.transpose(1, 2), own.view(BC, R, N), out=d_full.permute(1, 0, 2))
            d_mine = full.new_empty((R, BC, N))
            work = comm.reduce_scatter(d_mine, d_full, overlap)
            d_own = torch.bmm(dx3, full.permute(1, 0, 2)).view(g.Bt, CH, R, N)
            del dx3
            work.wait()
            del d_full
            da, db = (d_own, d_mine) if outgoing else (d_mine, d_own)
            del d_own, d_mine
            dz, grads = _in_stage_bwd(z2, m2, w, pk, da, db, g, cdt, z_dtype, out_stage, weights)
        return (dz.view(z_shape), None, None, None, None, None, None, *grads)


class _RowsOperands(NamedTuple):
    """The incoming update on a row shard up to its collectives (``_rows_operands``)."""
    cdt: torch.dtype
    out_dtype: torch.dtype
    g: "_Grid"
    z2: torch.Tensor
    m2: Optional[torch.Tensor]
    pk: "_Packed"
    meta: dict
    a_cols: torch.Tensor  # [N (k), Bt * C_h, R (i)]: valid once `work` is waited for
    work: "_Work"
    send: torch.Tensor  # a's send buffer (kept alive until `work` completes)
    b_rows: torch.Tensor  # [R (k), Bt * C_h, N]


def _rows_operands(z, mask, w: TriMulWeights, eps: float, comm, overlap: bool) -> _RowsOperands:
    """The incoming update of a row shard z ``[*, R, N, C_z]``, up to its operands: the
    projection kernel writes this rank's rows of a and b in the gathered layout
    ``[R, Bt * C_h, N]`` (``G_SIDE`` 2) and the all-to-all that brings this rank's columns of a
    from every rank is issued.  The dtypes follow the caller's autocast state."""
    cdt, xdt, out_dtype = _dtypes(z)
    P = comm.size
    CZ, CH = z.shape[-1], w.a_p_w.shape[0]
    R, N = z.shape[-3], z.shape[-2]
    g = _Grid(math.prod(z.shape[:-3]), R, N, trans=False, g_side=2)
    BC = g.Bt * CH
    with torch.autocast(z.device.type, enabled=False):
        z2, m2 = _rows(z, mask, g.M, CZ)
        pk = _pack(w, cdt)
        meta = _meta(cdt, g.M, CZ, CH)
        a_rows = torch.empty((R, BC, N), device=z.device, dtype=xdt)  # rows k, every column
        b_rows = torch.empty_like(a_rows)
        _proj_fwd(z2, m2, w, pk, a_rows, b_rows, g, eps, meta)
        # block q of a's columns goes to rank q: [P (to), R (k), BC, R (i)] (runs of R)
        send = dense_runs(a_rows.view(R, BC, P, R).permute(2, 0, 1, 3))
        a_cols = torch.empty_like(send)  # [P (from), R (its k), BC, R (my i)] = [N, BC, R]
        work = comm.all_to_all(a_cols, send, overlap)
    return _RowsOperands(cdt, out_dtype, g, z2, m2, pk, meta, a_cols.view(P * R, BC, R), work,
                         send, b_rows)


class _TriMulRowsFn(torch.autograd.Function):
    """Training: the incoming update of a row shard z ``[*, R, N, C_z]`` (rows block `rank`),
    ``x[i, j] = sum_k a[k, i] b[k, j]`` for this rank's rows i, k over every rank's rows.  The
    projection kernel writes this rank's rows of a and b in the gathered layout
    ``[R, Bt * C_h, N]`` (``G_SIDE`` 2); one all-to-all brings this rank's columns of a from
    every rank (``[N (k), Bt * C_h, R (i)]``) while b is all-gathered (``[N (k), Bt * C_h,
    N (j)]``); the contraction over all of k is one batched GEMM (x accumulates in fp32 over
    every k, as on one device); the output kernel as on one device.  Backward: the output
    kernel's backward gives dx; ``d(a's columns) = dx @ b^T`` goes back by the all-to-all (its
    adjoint) while ``d(b) = a's columns^T @ dx`` is formed, then reduce-scattered (the
    all-gather's adjoint); then the projection backward.  Per call one all-to-all of a
    ((P - 1) / P of its shard leaves the rank) and one all-gather of b, each way: the DAP block keeps z in rows
    instead of switching the fp32 pair shard to columns and back around the update."""

    @staticmethod
    def forward(ctx, z, mask, eps, comm, overlap, *weights):
        w = TriMulWeights(*weights)
        st = _rows_operands(z, mask, w, eps, comm, overlap)
        with torch.autocast(z.device.type, enabled=False):
            g = st.g
            b_full = st.b_rows.new_empty((comm.size * g.NI,) + st.b_rows.shape[1:])
            work_b = comm.all_gather(b_full, st.b_rows, overlap)
            st.work.wait()
            work_b.wait()
            x = torch.empty(st.b_rows.shape[1:2] + (g.NI, g.NJ), device=z.device,
                            dtype=st.b_rows.dtype)
            st = st._replace(send=None, b_rows=None)  # (a's send buffer and b's rows freed)
            # [BC, R (i), N (k)] @ [BC, N (k), N (j)], both read through strides
            torch.bmm(st.a_cols.permute(1, 2, 0), b_full.permute(1, 0, 2), out=x)
            out = _out_fwd(x, st.z2, w, st.pk, g, eps, st.meta, st.out_dtype)
        ctx.save_for_backward(st.z2, st.m2, st.a_cols, b_full, x, *st.pk, *weights)
        ctx.meta = (eps, st.cdt, z.dtype, z.shape, g, comm, overlap)
        return out.view(z.shape[:-1] + (z.shape[-1],))

    @staticmethod
    def backward(ctx, dout):
        z2, m2, a_cols, b_full, x, *rest = ctx.saved_tensors
        pk, weights = _Packed(*rest[:6]), rest[6:]
        w = TriMulWeights(*weights)
        eps, cdt, z_dtype, z_shape, g, comm, overlap = ctx.meta
        P = comm.size
        BC, R, N = g.Bt * w.a_p_w.shape[0], g.NI, g.NJ
        with torch.autocast(z2.device.type, enabled=False):
            dx3, out_stage = _out_stage_bwd(dout, x, z2, m2, w, pk, g, eps, cdt)
            del x
            # d(a's columns) [N (k), BC, R (i)] = (dx @ b^T), block q to rank q (its rows k)
            d_cols = torch.empty_like(a_cols)
            torch.bmm(dx3, b_full.permute(1, 2, 0), out=d_cols.permute(1, 2, 0))
            d_recv = torch.empty_like(d_cols).view(P, R, BC, R)  # [P (from), R (k), BC, R (i)]
            work_a = comm.all_to_all(d_recv, d_cols.view(P, R, BC, R), overlap)
            # d(b) [N (k), BC, N (j)] = a's columns^T @ dx: every rank's rows k, summed over ranks
            d_full = torch.empty_like(b_full)
            torch.bmm(a_cols.permute(1, 0, 2), dx3, out=d_full.permute(1, 0, 2))
            del dx3
            db = b_full.new_empty((R, BC, N))
            work_b = comm.reduce_scatter(db, d_full, overlap)
            work_a.wait()
            da = dense_runs(d_recv.permute(1, 2, 0, 3)).view(R, BC, N)  # my rows k, every i
            work_b.wait()
            del d_cols, d_recv, d_full
            dz, grads = _in_stage_bwd(z2, m2, w, pk, da, db, g, cdt, z_dtype, out_stage, weights)
        return (dz.view(z_shape), None, None, None, None, *grads)


# Inference: the largest buffer of a rank's update is the gathered operand, [N, Bt * C_h, N]
# (at N_res 4096, C_h 128, bf16: 4 GiB, as much as the rank's fp32 z shard).  Without a backward
# to feed, it is all-gathered a channel chunk of at most this many bytes at a time.
_GATHER_CHUNK_BYTES = 256 * 2**20


def _needs_grad(z: torch.Tensor, w: TriMulWeights) -> bool:
    """Whether autograd will call the Function's backward.  Decided by the caller: inside
    ``Function.forward`` grad mode is always off, and ``ctx.needs_input_grad`` ignores
    ``torch.no_grad()`` (a Parameter reports True), so the forward cannot tell inference."""
    return torch.is_grad_enabled() and (z.requires_grad or any(t.requires_grad for t in w))


def _training(z: torch.Tensor, w: TriMulWeights, inference: Optional[bool]) -> bool:
    """The sharded Function's `training` flag from the caller's `inference` (None: decided by
    ``_needs_grad``)."""
    needs_grad = _needs_grad(z, w)
    if inference and needs_grad:
        raise ValueError("triangle_multiplication_sharded: inference=True, but a gradient is "
                         "needed (run it under torch.no_grad(), or pass inference=None)")
    return needs_grad if inference is None else not inference


def _chunk_gathers(n_chunks: int, start):
    """The all-gathers of `n_chunks` channel chunks through two alternating buffers: start(i)
    issues chunk i's into buffer i % 2 and returns a tuple ending with its work.  The first two
    are issued now; iterating yields each chunk's tuple once its all-gather is done, and issues
    chunk i + 2's when the caller asks for the next one, i.e. once the caller has queued the
    GEMMs that read chunk i's buffer (with overlap, that all-gather then runs during them)."""
    pending = [start(i) for i in range(min(2, n_chunks))]

    def gathered():
        for i in range(n_chunks):
            pending[i][-1].wait()
            yield pending[i]
            if i + 2 < n_chunks:
                pending.append(start(i + 2))
    return gathered()


def _sharded_inference(z, mask, w: TriMulWeights, outgoing: bool, eps: float, comm, overlap: bool):
    """``_TriMulShardedFn``'s forward when nothing needs a gradient, in less memory: both
    operands channel-major ``[Bt * C_h, R, N]`` (G as this rank's rows), G all-gathered one
    channel chunk at a time (``_GATHER_CHUNK_BYTES``) into two alternating buffers.  This rank's
    own column block is contracted first, from its own rows of G, while the first two chunks
    arrive; each later chunk's all-gather is issued once the GEMMs reading its buffer are
    queued, so with `overlap` it runs during the previous chunk's GEMMs.  Peak: L, G's rows,
    x and the two chunks, instead of L, G's rows, x and the whole G."""
    cdt, xdt, out_dtype = _dtypes(z)
    P, rank = comm.size, comm.rank
    CZ, CH = z.shape[-1], w.a_p_w.shape[0]
    R, N = (z.shape[-3], z.shape[-2]) if outgoing else (z.shape[-2], z.shape[-3])
    g = _Grid(math.prod(z.shape[:-3]), R, N, trans=not outgoing)
    BC = g.Bt * CH
    with torch.autocast(z.device.type, enabled=False):
        z2, m2 = _rows(z, mask, g.M, CZ)
        pk = _pack(w, cdt)
        meta = _meta(cdt, g.M, CZ, CH)
        own = torch.empty((BC, R, N), device=z.device, dtype=xdt)  # L
        mine = torch.empty_like(own)  # this rank's rows of G, channel-major
        _proj_fwd(z2, m2, w, pk, *((own, mine) if outgoing else (mine, own)), g, eps, meta)
        x = torch.empty_like(own)
        cc = max(1, min(BC, _GATHER_CHUNK_BYTES // (P * R * N * own.element_size())))
        chunks = [(c0, min(c0 + cc, BC)) for c0 in range(0, BC, cc)]
        slots = _PeerSlots.get(comm, z.device, _slot_bytes(P * cc * R * N * own.element_size()))
        bufs = None if slots else [own.new_empty((P * cc * R * N,)) for _ in chunks[:2]]

        def start(i):
            c0, c1 = chunks[i]
            shape = (P * (c1 - c0), R, N)
            if slots is not None:  # (block `rank` of the buffer is not read: `own` is)
                return slots.all_gather(i % 2, shape, mine[c0:c1], overlap, comm.timeout_ms)
            got = bufs[i % 2][:math.prod(shape)].view(shape)
            return got, comm.all_gather(got, mine[c0:c1], overlap)

        gathered = _chunk_gathers(len(chunks), start)
        lo = rank * R
        torch.bmm(own, mine.transpose(1, 2), out=x[:, :, lo:lo + R])
        for (c0, c1), (got, _) in zip(chunks, gathered):
            got = got.view(P, c1 - c0, R, N)  # got[q] = rank q's rows of G, channels c0..c1
            for q in range(P):
                if q != rank:
                    torch.bmm(own[c0:c1], got[q].transpose(1, 2),
                              out=x[c0:c1, :, q * R:(q + 1) * R])
        own = mine = bufs = gathered = got = None  # freed before the output stage
        out = _out_fwd(x, z2, w, pk, g, eps, meta, out_dtype)
    return out.view(z.shape[:-1] + (z.shape[-1],))


def _sharded_inference_rows(z, mask, w: TriMulWeights, eps: float, comm, overlap: bool):
    """The incoming update of a row shard z ``[*, R, N, C_z]`` (rows block `rank`), forward
    only: ``x[i, j] = sum_k a[k, i] b[k, j]`` for this rank's rows i, where k runs over every
    rank's rows.  The projection kernel writes this rank's rows of a and b in the gathered
    layout ``[R, Bt * C_h, N]``; one all-to-all brings this rank's columns of a from every rank
    (``[N (k), Bt * C_h, R (i)]``), b is all-gathered a channel chunk at a time into two
    alternating buffers as in ``_sharded_inference`` (``[N (k), chunk, N (j)]``, read through
    strides), and each chunk's contraction over all of k is one batched GEMM, so x accumulates
    in fp32 over every k as on one device.  This spares the DAP block the two axis switches of
    z around the incoming update (the fp32 pair shard, each way) for one all-to-all of a (in
    the contraction dtype).  Peak: b's rows, a's columns, x and the two chunks."""
    P = comm.size
    st = _rows_operands(z, mask, w, eps, comm, False)
    with torch.autocast(z.device.type, enabled=False):
        st.work.wait()
        g, b_rows, a_cols = st.g, st.b_rows, st.a_cols
        R, N, BC = g.NI, g.NJ, b_rows.shape[1]
        z2, pk, meta, xdt, out_dtype = st.z2, st.pk, st.meta, b_rows.dtype, st.out_dtype
        st = None  # (a's send buffer freed)
        at = a_cols.permute(1, 2, 0)  # [BC, R (i), N (k)], strided
        x = torch.empty((BC, R, N), device=z.device, dtype=xdt)
        cc = max(1, min(BC, _GATHER_CHUNK_BYTES // (P * R * N * a_cols.element_size())))
        chunks = [(c0, min(c0 + cc, BC)) for c0 in range(0, BC, cc)]
        slots = _PeerSlots.get(comm, z.device, _slot_bytes(P * cc * R * N * b_rows.element_size()))
        bufs = None if slots else [b_rows.new_empty((P * R * cc * N,)) for _ in chunks[:2]]

        def start(i):
            c0, c1 = chunks[i]
            shape = (P * R, c1 - c0, N)
            if slots is not None:  # this rank's rows k written into its own block of the buffer
                own_rows = slice(comm.rank * R, (comm.rank + 1) * R)
                mine = copy_runs(slots.view(comm.rank, i % 2, shape, b_rows.dtype)[own_rows],
                                 b_rows[:, c0:c1])
                got, work = slots.all_gather(i % 2, shape, mine, overlap, comm.timeout_ms)
                return got, mine, work
            mine = dense_runs(b_rows[:, c0:c1])  # [R, c, N]: this rank's rows k
            got = bufs[i % 2][:math.prod(shape)].view(shape)
            return got, mine, comm.all_gather(got, mine, overlap)

        # (each staging copy stays referenced by the iterator until it is freed below)
        gathered = _chunk_gathers(len(chunks), start)
        for (c0, c1), (got, _, _) in zip(chunks, gathered):
            torch.bmm(at[c0:c1], got.permute(1, 0, 2), out=x[c0:c1])  # [c, R, N (k)] @ [c, N, N]
        a_cols = at = b_rows = bufs = gathered = got = None  # freed before the output stage
        out = _out_fwd(x, z2, w, pk, g, eps, meta, out_dtype)
    return out.view(z.shape[:-1] + (z.shape[-1],))


# ----------------------------------------------------------------------------------------------
# public ops
# ----------------------------------------------------------------------------------------------
def triangle_multiplication(
    z: torch.Tensor,
    mask: Optional[torch.Tensor],
    w: TriMulWeights,
    outgoing: bool,
    eps: float = 1e-5,
    carry: bool = False,
):
    """Fused triangle multiplicative update: z ``[*, N, N, C_z]``, mask ``[*, N, N]`` (None:
    all ones) -> ``[*, N, N, C_z]``.  Same maths and dtypes as
    ``triangle_multiplication_reference``; see the module docstring for the design and the
    precision contract.  Gradients flow to z and to all 16 weights (not to the mask).
    With `carry`, ``(out, z)``: z handed back for its other reader (the residual add around
    the update), whose gradient the projection backward kernel adds to dz in fp32 (no add of
    its own; it reads that gradient as contiguous ``[M, C_z]`` rows, copied only if its
    strides are not).
    """
    w = TriMulWeights(*w)
    shape = z.shape
    if len(shape) < 3 or shape[-2] != shape[-3]:
        raise ValueError(f"triangle_multiplication: z must be [*, N, N, C_z], got {tuple(shape)}")
    CZ, CH = shape[-1], w.a_p_w.shape[0]
    if w.a_p_w.shape[1] != CZ or w.z_w.shape != (CZ, CH):
        raise ValueError("triangle_multiplication: weight shapes do not match z's channel count")
    check_launchable(z, mask)
    ac = autocast_dtype(z.device.type)
    plan = _plan(shape, z.dtype, mask is not None, CH,
                 (w.ln_in_w.dtype, w.ln_in_b.dtype, w.ln_out_w.dtype, w.ln_out_b.dtype),
                 bool(outgoing), float(eps), _needs_grad(z, w), ac,
                 dot_precision(ac if ac is not None else z.dtype), is_interpreter(),
                 _needs_i64(math.prod(shape[:-1]), CZ, CH))
    return _TriMulFn.apply(plan, bool(carry), z, mask, *w)


def _shard_is_rows(shard: Optional[str], outgoing: bool) -> bool:
    """Whether z is a row shard: `shard` "rows" or "columns", None for the direction's default
    (outgoing: rows, incoming: columns)."""
    if shard is None:
        return outgoing
    if shard not in ("rows", "columns"):
        raise ValueError(f"triangle_multiplication_sharded: shard must be 'rows', 'columns' or "
                         f"None, got {shard!r}")
    if outgoing and shard == "columns":
        raise ValueError("triangle_multiplication_sharded: the outgoing update runs on row shards "
                         "only (shard='rows' or None)")
    return shard == "rows"


def _check_shard(op: str, z: torch.Tensor, w: TriMulWeights, outgoing: bool, p: int,
                 rows: Optional[bool] = None) -> None:
    rows = outgoing if rows is None else rows
    if z.dim() < 3:
        raise ValueError(f"{op}: z must be a shard [*, R, N, C_z] or [*, N, R, C_z], got {tuple(z.shape)}")
    r, n = (z.shape[-3], z.shape[-2]) if rows else (z.shape[-2], z.shape[-3])
    if n != p * r:
        kind = "rows [*, N/P, N, C_z]" if rows else "columns [*, N, N/P, C_z]"
        raise ValueError(
            f"{op}: z {tuple(z.shape)} is not a shard of {kind} for a group of {p} processes "
            f"(pad N_res to a multiple of the group size first)")
    if w.a_p_w.shape[1] != z.shape[-1] or w.z_w.shape != (z.shape[-1], w.a_p_w.shape[0]):
        raise ValueError(f"{op}: weight shapes do not match z's channel count")


def triangle_multiplication_sharded(
    z: torch.Tensor,
    mask: Optional[torch.Tensor],
    w: TriMulWeights,
    outgoing: bool,
    eps: float = 1e-5,
    group=None,
    overlap: bool = True,
    comm_error: type = RuntimeError,
    inference: Optional[bool] = None,
    shard: Optional[str] = None,
    timeout: Optional[float] = None,
) -> torch.Tensor:
    """This rank's shard of the fused triangle multiplicative update under DAP.

    P = size of `group` (a torch.distributed process group; None: one process).  Outgoing: z
    ``[*, N/P, N, C_z]`` holds rows block `rank` of the pair tensor (mask ``[*, N/P, N]``);
    incoming: z ``[*, N, N/P, C_z]`` holds columns block `rank` (mask ``[*, N, N/P]``).  Returns
    the same block of ``triangle_multiplication`` of the whole tensor, in z's layout.  N must be
    a multiple of P (pad with mask 0: padded pairs then contribute exact zeros).

    One autograd Function: the projection kernel on the shard, an all-gather of the operand the
    contraction needs whole (outgoing: b along rows; incoming: a along columns), the contraction
    for the local rows / columns, the output kernel.  Backward: the output kernel's backward, the
    contraction's GEMMs, a reduce-scatter (sum over ranks) of the gathered operand's gradient,
    the projection kernel's backward.  With `overlap`, the all-gather runs during the local
    block's GEMM and the reduce-scatter during the local operand's gradient GEMM; without it
    both are synchronous (same results, bit for bit).

    Gradients: z's is its shard's; each weight's is this rank's partial sum (over its pairs),
    to be summed over the group by the caller (the DAP forwards do, with ``sum_grads``).  At
    P = 1 this is ``triangle_multiplication``.  A failed collective (forward or backward) raises
    `comm_error` naming it, the group size and this rank.

    `inference`: whether to take the forward-only path (``_sharded_inference``: the operand
    gathered in channel chunks).  None: when nothing needs a gradient.  A caller whose forward
    may run twice with different grad modes (a reentrant checkpoint runs the first pass without
    gradients) passes False there, so that both passes compute the same numbers; True while a
    gradient is needed is an error.  The reference takes and ignores it.

    `shard`: "rows" runs the incoming update on a row shard z ``[*, N/P, N, C_z]`` (mask
    ``[*, N/P, N]``: an all-to-all of a and an all-gather of b, backward their adjoints,
    instead of the caller switching z to columns and back).  None: rows for outgoing, columns
    for incoming.

    `timeout`: seconds a copy-engine all-gather (inference on GPUs) waits for the other ranks
    before it traps the device (None: 10 minutes); the DAP forwards pass their context's
    timeout.  The reference takes and ignores it.
    """
    w = TriMulWeights(*w)
    comm = _DistComm(group, comm_error, timeout)
    rows = _shard_is_rows(shard, outgoing)
    if comm.size == 1:
        return triangle_multiplication(z, mask, w, outgoing, eps)
    _check_shard("triangle_multiplication_sharded", z, w, outgoing, comm.size, rows)
    check_launchable(z, mask)
    training = _training(z, w, inference)
    if rows and not outgoing:
        if training:
            return _TriMulRowsFn.apply(z, mask, float(eps), comm, bool(overlap), *w)
        return _sharded_inference_rows(z, mask, w, float(eps), comm, bool(overlap))
    return _TriMulShardedFn.apply(z, mask, bool(outgoing), float(eps), comm, bool(overlap),
                                  training, *w)
