"""Outer product mean (AlphaFold2 Algorithm 10), fused.

Maths (OpenFold's ``OuterProductMean._forward``), with m ``[*, N_seq, N_res, C_m]``, mask
``[*, N_seq, N_res]``, C the hidden width::

    ln = LayerNorm(m)                                 (torch.nn.LayerNorm contract)
    a  = (ln @ w1^T + b1) * mask,  b = (ln @ w2^T + b2) * mask         [*, N_seq, N_res, C]
    outer[i, j, c, e] = sum_s a[s, i, c] * b[s, j, e]                    [*, N_res, N_res, C, C]
    out[i, j] = (outer[i, j].flatten() @ w_out^T + b_out) / (sum_s mask[s, i] mask[s, j] + eps)

Design of the Triton path:

1. ``_opm_proj_fwd_kernel``: LayerNorm + both projections (one concatenated ``[w1; w2]``,
   built at call time) + mask, one pass over m; a and b stored ``[*, N_seq, N_res, C]``.
2. The outer product is a GEMM over N_seq with fp32 accumulation (cuBLAS, ``torch.bmm``):
   ``O = a^T b`` with a viewed ``[N_seq, N_res * C]``, giving ``O [(i, c), (j, e)]``.  It runs in
   chunks of rows i so that O never exceeds ``_CHUNK_ELEMENTS`` (the full
   ``[N_res, N_res, C * C]`` intermediate is 4 GiB in bf16 at N_res 2048).
3. ``_opm_out_fwd_kernel`` is linear_out fused with the bias and the division by the norm: for a
   pair row i and a block of j it contracts O's ``(c, e)`` directly in the ``(i, c, j, e)`` layout
   (tiles of several c at once, no permute copy) against w_out and writes ``[*, N_res, N_res, C_z]``.

The same kernels serve a block of pair rows from projected operands (``outer_product_mean_rows``,
DAP's outer product mean: a of the local residues, b of every residue), forward and backward.

Backward, per chunk of rows i: ``_opm_out_bwd_kernel`` forms G = dout / norm and
dO = G @ w_out in O's layout (and the bias gradient); O is recomputed by the same GEMM and
``_opm_dw_kernel`` reduces dw_out = sum_ij G[i, j]^T O[i, :, j, :] over the pairs; two GEMMs give
da and db.  ``_opm_proj_bwd_kernel`` recomputes the LayerNorm, applies the mask, writes the
projection gradients and the LayerNorm output (for the weight GEMM), and runs the LayerNorm
backward; with ``carry`` (m handed back as a second output) it also adds that output's
gradient to dm.  Bias and LayerNorm-weight gradients are fp32 per-program partial sums.

Precision contract (``cdt`` is the autocast dtype, or m's dtype without autocast):

* LayerNorm statistics and affine map, masking, bias, norm (an exact fp32 count) and the
  division in fp32.
* Projections, outer product, linear_out and every backward GEMM: ``cdt`` operands with fp32
  accumulation (a, b, O, dO rounded once to ``cdt``, as OpenFold's autocast einsum rounds its
  output).  fp32 operands use IEEE fp32 unless ``torch.backends.cuda.matmul.allow_tf32``.
* Output in ``cdt``; dm in m's dtype; parameter gradients in each parameter's dtype.

OpenFold runs the whole module in fp32 with autocast off under fp16 autocast; that branch is
the caller's (the patched forward does what OpenFold's ``forward`` does).
"""
import math
from typing import Optional

import torch
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
    is_interpreter,
    next_power_of_2,
)
from ._triton_utils import cast_rne as _cast
from ._triton_utils import dot_acc32 as _dot
from ._triton_utils import weight_grad_fp32 as _weight_grad
from .layer_norm import (
    _kernel_rows,
    _row_offsets,
    layer_norm_torch_reference,
    read_grad_rows,
)

# Largest outer-product chunk, in elements (512 MiB in bf16); backward holds two of them.
_CHUNK_ELEMENTS = 1 << 28


# ----------------------------------------------------------------------------------------------
# reference
# ----------------------------------------------------------------------------------------------
def outer_product_mean_reference(
    m: torch.Tensor,
    mask: Optional[torch.Tensor],
    ln_w: torch.Tensor,
    ln_b: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    w_out: torch.Tensor,
    b_out: torch.Tensor,
    eps: float = 1e-3,
    ln_eps: float = 1e-5,
    carry: bool = False,
):
    """OpenFold's ``OuterProductMean._forward`` (no chunking) in plain PyTorch.

    m ``[*, N_seq, N_res, C_m]``, mask ``[*, N_seq, N_res]`` (None: all ones) ->
    ``[*, N_res, N_res, C_z]`` (with `carry`, ``(out, m)``).
    """
    if mask is None:
        mask = m.new_ones(m.shape[:-1])
    ln = layer_norm_torch_reference(m, ln_w, ln_b, ln_eps)
    mask = mask.unsqueeze(-1)
    a = F.linear(ln, w1, b1)
    a = a * mask
    b = F.linear(ln, w2, b2)
    b = b * mask
    del ln
    a = a.transpose(-2, -3)
    b = b.transpose(-2, -3)
    outer = torch.einsum("...bac,...dae->...bdce", a, b)
    outer = outer.reshape(outer.shape[:-2] + (-1,))
    outer = F.linear(outer, w_out, b_out)
    norm = torch.einsum("...abc,...adc->...bdc", mask, mask)
    norm = norm + eps
    out = outer / norm
    return (out, m) if carry else out


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _opm_proj_fwd_kernel(
    M_IN, MASK, LN_W, LN_B, W12, B12, A_OUT, B_OUT,
    M, CM, C, ln_eps, M_BUCKET,
    DOT_PREC: tl.constexpr, INTERP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_CM: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """a, b [M, C] = (LN(m) @ W12[:C]^T + B12[:C]) * mask, (... W12[C:] ...) * mask."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cm = tl.arange(0, BLOCK_CM)
    cm_ok = cm < CM
    ok = row_ok[:, None] & cm_ok[None, :]
    x = tl.load(M_IN + rows[:, None] * CM + cm[None, :], mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / CM
    xc = tl.where(ok, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / CM + ln_eps)
    lw = tl.load(LN_W + cm, mask=cm_ok, other=0.0).to(tl.float32)
    lb = tl.load(LN_B + cm, mask=cm_ok, other=0.0).to(tl.float32)
    ln = _cast((xc * rstd[:, None] * lw[None, :] + lb[None, :]), W12.dtype.element_ty, INTERP)
    mk = tl.load(MASK + rows, mask=row_ok, other=0.0)
    c = tl.arange(0, BLOCK_C)
    c_ok = c < C
    w_ok = cm_ok[:, None] & c_ok[None, :]
    o_ok = row_ok[:, None] & c_ok[None, :]
    for side in tl.static_range(2):
        w = tl.load(W12 + (side * C + c)[None, :] * CM + cm[:, None], mask=w_ok, other=0.0)
        bias = tl.load(B12 + side * C + c, mask=c_ok, other=0.0)
        val = (_dot(ln, w, DOT_PREC, INTERP) + bias[None, :]) * mk[:, None]
        if side == 0:
            tl.store(A_OUT + rows[:, None] * C + c[None, :], _cast(val, A_OUT.dtype.element_ty, INTERP),
                     mask=o_ok)
        else:
            tl.store(B_OUT + rows[:, None] * C + c[None, :], _cast(val, B_OUT.dtype.element_ty, INTERP),
                     mask=o_ok)


@triton.jit
def _opm_proj_bwd_kernel(
    M_IN, MASK, LN_W, LN_B, W12, DA, DB, DP, LN_OUT, DM, PART, DRES,
    M, CM, C, ln_eps, stride_r, R_IN_R, stride_r_in, M_BUCKET,
    DOT_PREC: tl.constexpr, INTERP: tl.constexpr, HAS_RES: tl.constexpr,
    RES_TWO_LEVEL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_CM: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """d(pre-mask a, b) = (da, db) * mask -> DP [M, 2C]; LN(m) -> LN_OUT [M, CM];
    dm (LayerNorm backward of DP @ W12) -> DM; PART[pid] = [sum DP | sum dln * xhat | sum dln].
    With HAS_RES, dm += DRES in fp32 (the gradient of m from its other reader, the carried m;
    rows at r * stride_r, or with RES_TWO_LEVEL at (r // R_IN_R) * stride_r +
    (r % R_IN_R) * stride_r_in, unit column stride)."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cm = tl.arange(0, BLOCK_CM)
    cm_ok = cm < CM
    ok = row_ok[:, None] & cm_ok[None, :]
    x = tl.load(M_IN + rows[:, None] * CM + cm[None, :], mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / CM
    xc = tl.where(ok, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / CM + ln_eps)
    xhat = xc * rstd[:, None]
    lw = tl.load(LN_W + cm, mask=cm_ok, other=0.0).to(tl.float32)
    lb = tl.load(LN_B + cm, mask=cm_ok, other=0.0).to(tl.float32)
    ln = _cast((xhat * lw[None, :] + lb[None, :]), W12.dtype.element_ty, INTERP)
    tl.store(LN_OUT + rows[:, None] * CM + cm[None, :], ln, mask=ok)
    mk = tl.load(MASK + rows, mask=row_ok, other=0.0)
    c = tl.arange(0, BLOCK_C)
    c_ok = c < C
    w_ok = c_ok[:, None] & cm_ok[None, :]
    o_ok = row_ok[:, None] & c_ok[None, :]
    part = PART + pid.to(tl.int64) * (2 * C + 2 * CM)
    dln = tl.zeros((BLOCK_M, BLOCK_CM), dtype=tl.float32)
    for side in tl.static_range(2):
        if side == 0:
            d = tl.load(DA + rows[:, None] * C + c[None, :], mask=o_ok, other=0.0).to(tl.float32)
        else:
            d = tl.load(DB + rows[:, None] * C + c[None, :], mask=o_ok, other=0.0).to(tl.float32)
        d = d * mk[:, None]
        d_c = _cast(d, DP.dtype.element_ty, INTERP)
        tl.store(DP + rows[:, None] * (2 * C) + side * C + c[None, :], d_c, mask=o_ok)
        tl.store(part + side * C + c, tl.sum(d, axis=0), mask=c_ok)
        w = tl.load(W12 + (side * C + c)[:, None] * CM + cm[None, :], mask=w_ok, other=0.0)
        dln += _dot(d_c, w, DOT_PREC, INTERP)
    tl.store(part + 2 * C + cm, tl.sum(dln * xhat, axis=0), mask=cm_ok)
    tl.store(part + 2 * C + CM + cm, tl.sum(dln, axis=0), mask=cm_ok)
    dxhat = dln * lw[None, :]
    c1 = tl.sum(dxhat * xhat, axis=1) / CM
    c2 = tl.sum(dxhat, axis=1) / CM
    dm = (dxhat - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
    if HAS_RES:
        r_rows = _row_offsets(rows, stride_r, R_IN_R, stride_r_in, RES_TWO_LEVEL)
        dm += tl.load(DRES + r_rows[:, None] + cm[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(DM + rows[:, None] * CM + cm[None, :], _cast(dm, DM.dtype.element_ty, INTERP), mask=ok)


@triton.jit
def _opm_out_fwd_kernel(
    OUTER, WO, BO, NORM, OUT,
    RB, R0, R, NJ, C, CZ, eps, R_BUCKET,
    DOT_PREC: tl.constexpr, INTERP: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CZ: tl.constexpr,
):
    """OUT[bt, R0 + il, j] = (sum_{c,e} O[bt, il, c, j, e] WO[:, c C + e] + BO) / (NORM + eps).

    O is one chunk [Bt, RB, C, NJ, C] of the outer product of R pair rows by NJ columns (NORM
    [Bt, R, NJ], OUT [Bt, R, NJ, CZ]); program (bt * RB + il, j block).
    BLOCK_K = (c values per step) * BLOCK_C.
    """
    pid_i = tl.program_id(0)
    bt = pid_i // RB
    i = R0 + pid_i % RB
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = j < NJ
    z = tl.arange(0, BLOCK_CZ)
    z_ok = z < CZ
    k = tl.arange(0, BLOCK_K)
    o_base = OUTER + pid_i.to(tl.int64) * C * NJ * C
    acc = tl.zeros((BLOCK_J, BLOCK_CZ), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_K // BLOCK_C):
        ck = c0 + k // BLOCK_C
        ek = k % BLOCK_C
        k_ok = (ck < C) & (ek < C)
        o = tl.load(o_base + ck[None, :] * NJ * C + j[:, None] * C + ek[None, :],
                    mask=j_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(WO + z[None, :] * (C * C) + (ck * C + ek)[:, None], mask=k_ok[:, None] & z_ok[None, :],
                    other=0.0)
        acc += _dot(o, w, DOT_PREC, INTERP)
    bo = tl.load(BO + z, mask=z_ok, other=0.0)
    pair0 = (bt.to(tl.int64) * R + i) * NJ  # pair (bt, i, 0); 64-bit scalar, 32-bit tile offsets
    nrm = tl.load(NORM + pair0 + j, mask=j_ok, other=1.0)
    out = (acc + bo[None, :]) / (nrm + eps)[:, None]
    tl.store(OUT + pair0 * CZ + j[:, None] * CZ + z[None, :], _cast(out, OUT.dtype.element_ty, INTERP),
             mask=j_ok[:, None] & z_ok[None, :])


@triton.jit
def _opm_out_bwd_kernel(
    DOUT, WO, NORM, DO, PART,
    RB, R0, R, NJ, C, CZ, eps, R_BUCKET,
    DOT_PREC: tl.constexpr, INTERP: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CZ: tl.constexpr,
):
    """G = DOUT / (NORM + eps);  DO[bt, il, c, j, e] = sum_z G[bt, R0 + il, j, z] WO[z, c C + e];
    PART[program] = sum_j G (fp32).  R pair rows by NJ columns (DOUT [Bt, R, NJ, CZ], NORM
    [Bt, R, NJ]; DO one chunk [Bt, RB, C, NJ, C])."""
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    bt = pid_i // RB
    i = R0 + pid_i % RB
    j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = j < NJ
    z = tl.arange(0, BLOCK_CZ)
    z_ok = z < CZ
    pair0 = (bt.to(tl.int64) * R + i) * NJ
    nrm = tl.load(NORM + pair0 + j, mask=j_ok, other=1.0)
    g = tl.load(DOUT + pair0 * CZ + j[:, None] * CZ + z[None, :], mask=j_ok[:, None] & z_ok[None, :],
                other=0.0).to(tl.float32) / (nrm + eps)[:, None]
    part_row = pid_i.to(tl.int64) * tl.num_programs(1) + pid_j
    tl.store(PART + part_row * CZ + z, tl.sum(g, axis=0), mask=z_ok)
    g_c = _cast(g, WO.dtype.element_ty, INTERP)
    k = tl.arange(0, BLOCK_K)
    do_base = DO + pid_i.to(tl.int64) * C * NJ * C
    for c0 in range(0, C, BLOCK_K // BLOCK_C):
        ck = c0 + k // BLOCK_C
        ek = k % BLOCK_C
        k_ok = (ck < C) & (ek < C)
        w = tl.load(WO + z[:, None] * (C * C) + (ck * C + ek)[None, :], mask=z_ok[:, None] & k_ok[None, :],
                    other=0.0)
        d = _dot(g_c, w, DOT_PREC, INTERP)
        tl.store(do_base + ck[None, :] * NJ * C + j[:, None] * C + ek[None, :],
                 _cast(d, DO.dtype.element_ty, INTERP), mask=j_ok[:, None] & k_ok[None, :])


@triton.jit
def _opm_dw_kernel(
    DOUT, OUTER, NORM, PART,
    RB, R0, R, NJ, C, CZ, eps, n_rows, rows_per_program, R_BUCKET,
    DOT_PREC: tl.constexpr, INTERP: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CZ: tl.constexpr,
):
    """PART[group, z, c C + e] = sum_{rows of this group} sum_j G[bt, i, j, z] O[bt, il, c, j, e].

    Program (column block of w_out's gradient, group of `rows_per_program` of the chunk's
    n_rows = Bt * RB pair rows, of R pair rows by NJ columns); G = DOUT / (NORM + eps) is
    recomputed on the fly.
    """
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    ck = k // BLOCK_C
    ek = k % BLOCK_C
    k_ok = (ck < C) & (ek < C)
    group = tl.program_id(1)
    z = tl.arange(0, BLOCK_CZ)
    z_ok = z < CZ
    jj = tl.arange(0, BLOCK_J)
    acc = tl.zeros((BLOCK_CZ, BLOCK_K), dtype=tl.float32)
    for r in range(0, rows_per_program):
        pid_i = group.to(tl.int64) * rows_per_program + r
        r_ok = pid_i < n_rows
        bt = pid_i // RB
        i = R0 + pid_i % RB
        pair0 = (bt * R + i) * NJ
        o_base = OUTER + pid_i * C * NJ * C
        for j0 in range(0, NJ, BLOCK_J):
            j = j0 + jj
            j_ok = (j < NJ) & r_ok
            nrm = tl.load(NORM + pair0 + j, mask=j_ok, other=1.0)
            gt = tl.load(DOUT + pair0 * CZ + j[None, :] * CZ + z[:, None], mask=z_ok[:, None] & j_ok[None, :],
                         other=0.0).to(tl.float32) / (nrm + eps)[None, :]
            o = tl.load(o_base + ck[None, :] * NJ * C + j[:, None] * C + ek[None, :],
                        mask=j_ok[:, None] & k_ok[None, :], other=0.0)
            acc += _dot(_cast(gt, OUTER.dtype.element_ty, INTERP), o, DOT_PREC, INTERP)
    tl.store(PART + group.to(tl.int64) * CZ * C * C + z[:, None] * (C * C) + (ck * C + ek)[None, :], acc,
             mask=z_ok[:, None] & k_ok[None, :])


# ----------------------------------------------------------------------------------------------
# launch configuration
# ----------------------------------------------------------------------------------------------
def _row_configs():
    # C_m = 256: BLOCK_M 64 with 8 warps spills in the backward kernel; the autotuner decides.
    return [triton.Config({"BLOCK_M": bm}, num_warps=nw, num_stages=2)
            for bm, nw in ((32, 4), (32, 8), (64, 8))]


def _pair_configs(shapes):
    """Configs from (BLOCK_J, BLOCK_K, num_warps) triples."""
    return [triton.Config({"BLOCK_J": bj, "BLOCK_K": bk}, num_warps=nw, num_stages=2)
            for bj, bk, nw in shapes]


def _block_c(nargs, kwargs) -> int:
    return kwargs.get("BLOCK_C") or nargs["BLOCK_C"]


def _prune_one_plane(configs, nargs, **kwargs):
    """linear_out kernels: the narrowest BLOCK_K that holds a whole c plane (BLOCK_C).  One plane
    per step keeps the tile indexing plain; several planes per step spill registers."""
    block_c = _block_c(nargs, kwargs)
    kept = [c for c in configs if c.kwargs["BLOCK_K"] >= block_c]
    if not kept:
        raise ValueError(f"outer_product_mean: hidden width {block_c} is wider than the largest tile")
    k_min = min(c.kwargs["BLOCK_K"] for c in kept)
    return [c for c in kept if c.kwargs["BLOCK_K"] == k_min]


def _prune_planes(configs, nargs, **kwargs):
    """dw kernel: BLOCK_K (its output columns) holds whole c planes."""
    block_c = _block_c(nargs, kwargs)
    kept = [c for c in configs if c.kwargs["BLOCK_K"] >= block_c]
    if not kept:
        raise ValueError(f"outer_product_mean: hidden width {block_c} is wider than the largest tile")
    return kept


# Candidate tiles (C = 32, C_z = 128 on an H100, bf16: these compile without register spills).
_OUT_SHAPES = [(bj, bk, nw) for bk in (16, 32, 64, 128) for bj, nw in ((64, 4), (128, 8), (64, 8), (128, 4))]
_DW_SHAPES = [(32, 64, 4), (64, 128, 8), (32, 128, 8), (64, 64, 8), (32, 256, 8)]
_ROW_KEY = ["CM", "C", "M_BUCKET"]
_ROW_BWD_KEY = _ROW_KEY + ["HAS_RES", "RES_TWO_LEVEL"]  # the residual gradient's load: its own variant
_PAIR_KEY = ["C", "CZ", "R_BUCKET"]

_proj_fwd_tuned = autotune(_row_configs(), key=_ROW_KEY)(_opm_proj_fwd_kernel)
_proj_bwd_tuned = autotune(_row_configs(), key=_ROW_BWD_KEY, reset_to_zero=["PART"])(_opm_proj_bwd_kernel)
_out_fwd_tuned = autotune(_pair_configs(_OUT_SHAPES), key=_PAIR_KEY,
                          prune=_prune_one_plane)(_opm_out_fwd_kernel)
_out_bwd_tuned = autotune(_pair_configs(_OUT_SHAPES), key=_PAIR_KEY, prune=_prune_one_plane,
                          reset_to_zero=["PART"])(_opm_out_bwd_kernel)
_dw_tuned = autotune(_pair_configs(_DW_SHAPES), key=_PAIR_KEY, prune=_prune_planes)(_opm_dw_kernel)

_TUNED_META = ("BLOCK_M", "BLOCK_J", "BLOCK_K")
_MIN_BLOCK_M = 32  # smallest BLOCK_M / BLOCK_J among the GPU configs: sizes partial-sum buffers
_MIN_BLOCK_J = min(bj for bj, _, _ in _OUT_SHAPES)
_INTERP = dict(BLOCK_M=32, BLOCK_J=16)  # interpreter: one fixed config, few programs


class _Launcher:
    """`kernel` with the launch keywords `meta`, launched once or per chunk of rows by one call:
    grid(meta) -> launch grid.  Autotuned on a GPU (the keywords less the tuned tiles, worked
    out once; the autotuner's key, ``Tuned.key``, taken at the first launch: a call's launches
    of one kernel pass the same tuning-key values and tensors of the same dtypes); `meta` as
    given in the interpreter (``meta["INTERP"]``)."""
    __slots__ = ("kernel", "tuned", "meta", "kwargs", "key")

    def __init__(self, kernel, tuned, meta: dict):
        self.kernel, self.tuned, self.meta, self.key = kernel, tuned, meta, None
        self.kwargs = None if meta["INTERP"] else {k: v for k, v in meta.items() if k not in _TUNED_META}

    def __call__(self, grid, args: tuple) -> None:
        if self.kwargs is None:
            self.kernel[grid(self.meta)](*args, **self.meta)
            return
        if self.key is None:
            self.key = self.tuned.key(args, self.kwargs)
        self.tuned.launch(self.key, grid, args, self.kwargs)


def _launch(kernel, tuned, grid, args, meta):
    """grid(meta) -> launch grid.  Autotuned on a GPU; `meta` as given in the interpreter."""
    _Launcher(kernel, tuned, meta)(grid, args)


def _bucket(n: int) -> int:
    return min(next_power_of_2(n), 1 << 24)


def _outer_chunk(a: torch.Tensor, b: torch.Tensor, r0: int, nr: int) -> torch.Tensor:
    """O [Bt, nr * C, N * C] = a[:, :, r0:r0+nr]^T b over N_seq (a [Bt, N_seq, R, C], b
    [Bt, N_seq, N, C], both contiguous)."""
    Bt, S, R, C = a.shape
    a_rows = a.view(Bt, S, R * C)[:, :, r0 * C: (r0 + nr) * C]
    return torch.bmm(a_rows.transpose(1, 2), b.view(Bt, S, -1))


def _out_rows_fwd(a, b, norm, wo, bo, eps: float, rb: int, cdt: torch.dtype) -> torch.Tensor:
    """out [Bt, R, N, C_z]: the outer product of a [Bt, N_seq, R, C] and b [Bt, N_seq, N, C]
    (``cdt``, contiguous), rb rows at a time, through ``_opm_out_fwd_kernel`` (norm fp32
    [Bt, R, N] pair counts, wo ``cdt``, bo fp32)."""
    Bt, _, R, C = a.shape
    N, CZ = b.shape[2], wo.shape[0]
    out = torch.empty((Bt, R, N, CZ), device=a.device, dtype=cdt)
    out_fwd = _Launcher(_opm_out_fwd_kernel, _out_fwd_tuned, _pair_meta(C, CZ, cdt))
    n_bucket = _bucket(N)
    for r0 in range(0, R, rb):
        nr = min(rb, R - r0)
        o = _outer_chunk(a, b, r0, nr)
        out_fwd(lambda mt, nr=nr: (Bt * nr, cdiv(N, mt["BLOCK_J"])),
                (o, wo, bo, norm, out, nr, r0, R, N, C, CZ, eps, n_bucket))
        del o
    return out


def _row_meta(cdt: torch.dtype, CM: int, C: int) -> dict:
    return dict(DOT_PREC=dot_precision(cdt), INTERP=is_interpreter(), BLOCK_M=_INTERP["BLOCK_M"],
                BLOCK_CM=next_power_of_2(CM), BLOCK_C=max(16, next_power_of_2(C)))


def _proj_fwd(m2, mk, ln_w, ln_b, w12, b12, ln_eps: float, cdt: torch.dtype):
    """(a, b) [M, C] in ``cdt`` from m2 [M, C_m] and the fp32 mask mk (M values), through
    ``_opm_proj_fwd_kernel`` (w12 = [w1; w2] in ``cdt``, b12 = [b1; b2])."""
    M, CM = m2.shape
    C = w12.shape[0] // 2
    a = torch.empty((M, C), device=m2.device, dtype=cdt)
    b = torch.empty_like(a)
    _launch(_opm_proj_fwd_kernel, _proj_fwd_tuned, lambda mt: (cdiv(M, mt["BLOCK_M"]),),
            (m2, mk, ln_w, ln_b, w12, b12.to(torch.float32).contiguous(), a, b, M, CM, C, ln_eps,
             _bucket(M)), _row_meta(cdt, CM, C))
    return a, b


def _proj_bwd(m2, mk, ln_w, ln_b, w12, da, db, ln_eps: float, cdt: torch.dtype,
              m_dtype: torch.dtype, dres: Optional[torch.Tensor] = None):
    """Backward of ``_proj_fwd`` for da, db (M x C values each, any float dtype): (dm [M, C_m]
    in `m_dtype`, d[w1; w2] [2C, C_m] fp32, the partial sums' total [2C + 2 C_m] fp32: the
    projection biases', then the LayerNorm weight's and bias's gradients).  `dres` (m's shape,
    any strides and float dtype): a gradient the kernel adds to dm in fp32, its rows read where
    they lie when they are at most two strided dims with unit column stride (a transposed view)
    or all broadcast (a sum's gradient: row stride 0), else from an [M, C_m] copy
    (``read_grad_rows``)."""
    M, CM = m2.shape
    C = w12.shape[0] // 2
    dev = m2.device
    dp = torch.empty((M, 2 * C), device=dev, dtype=cdt)
    ln_out = torch.empty((M, CM), device=dev, dtype=cdt)
    dm = torch.empty((M, CM), device=dev, dtype=m_dtype)
    n_prog = cdiv(M, _INTERP["BLOCK_M"] if is_interpreter() else _MIN_BLOCK_M)
    part = torch.zeros((n_prog, 2 * C + 2 * CM), device=dev, dtype=torch.float32)
    res_rows = (0, 1, 0, False)
    if dres is not None:
        dres, layout = read_grad_rows(dres)
        res_rows = _kernel_rows(layout)
    _launch(_opm_proj_bwd_kernel, _proj_bwd_tuned, lambda mt: (cdiv(M, mt["BLOCK_M"]),),
            (m2, mk, ln_w, ln_b, w12, da, db, dp, ln_out, dm, part,
             dm if dres is None else dres, M, CM, C, ln_eps, *res_rows[:3], _bucket(M)),
            dict(_row_meta(cdt, CM, C), HAS_RES=dres is not None, RES_TWO_LEVEL=res_rows[3]))
    return dm, _weight_grad(dp, ln_out), part.sum(0)


def _proj_param_grads(dw12, s, C: int, CM: int) -> tuple:
    """(ln_w, ln_b, w1, b1, w2, b2) gradients from ``_proj_bwd``'s outputs."""
    return (s[2 * C: 2 * C + CM], s[2 * C + CM:], dw12[:C], s[:C], dw12[C:], s[C: 2 * C])


def _out_rows_bwd(dout2, a, b, norm, wo, eps: float, rb: int, cdt: torch.dtype):
    """Backward of ``_out_rows_fwd`` for dout2 [Bt, R, N, C_z] (contiguous): (da [Bt, N_seq,
    R * C] in ``cdt``, db [Bt, N_seq, N * C] (fp32 when summed over several chunks), dw_out and
    db_out in fp32).  Per chunk of rows: ``_opm_out_bwd_kernel`` forms dO in O's layout (and the
    bias gradient), O is recomputed by the same GEMM, ``_opm_dw_kernel`` reduces dw_out over the
    pairs, and two GEMMs give the chunk's da and its share of db."""
    Bt, S, R, C = a.shape
    N, CZ = b.shape[2], wo.shape[0]
    dev = a.device
    interp = is_interpreter()
    pair_meta = _pair_meta(C, CZ, cdt)
    out_bwd = _Launcher(_opm_out_bwd_kernel, _out_bwd_tuned, pair_meta)
    dw = _Launcher(_opm_dw_kernel, _dw_tuned, pair_meta)
    n_bucket = _bucket(N)
    min_bj = pair_meta["BLOCK_J"] if interp else _MIN_BLOCK_J
    dw_cols = C * pair_meta["BLOCK_C"]
    b3 = b.view(Bt, S, N * C)
    da = torch.empty((Bt, S, R * C), device=dev, dtype=cdt)
    db = None
    dwo = torch.zeros((CZ, C * C), device=dev, dtype=torch.float32)
    dbo = torch.zeros((CZ,), device=dev, dtype=torch.float32)
    for r0 in range(0, R, rb):
        nr = min(rb, R - r0)
        n_rows = Bt * nr
        d_o = torch.empty((Bt, nr * C, N * C), device=dev, dtype=cdt)
        part_b = torch.zeros((n_rows * cdiv(N, min_bj), CZ), device=dev, dtype=torch.float32)
        out_bwd(lambda mt, n_rows=n_rows: (n_rows, cdiv(N, mt["BLOCK_J"])),
                (dout2, wo, norm, d_o, part_b, nr, r0, R, N, C, CZ, eps, n_bucket))
        dbo += part_b.sum(0)
        del part_b
        o = _outer_chunk(a, b, r0, nr)
        groups = min(n_rows, 2 if interp else 64)
        rows_per_program = cdiv(n_rows, groups)
        part_w = torch.empty((groups, CZ, C * C), device=dev, dtype=torch.float32)
        dw(lambda mt, g=groups: (cdiv(dw_cols, mt["BLOCK_K"]), g),
           (dout2, o, norm, part_w, nr, r0, R, N, C, CZ, eps, n_rows, rows_per_program, n_bucket))
        dwo += part_w.sum(0)
        del o, part_w
        a_rows = a.view(Bt, S, R * C)[:, :, r0 * C: (r0 + nr) * C]
        da[:, :, r0 * C: (r0 + nr) * C] = torch.bmm(b3, d_o.transpose(1, 2))
        db_chunk = torch.bmm(a_rows, d_o)
        if db is None:
            db = db_chunk if nr == R else db_chunk.float()
        else:
            db += db_chunk
        del d_o, db_chunk
    return da, db, dwo, dbo


def _pair_meta(C: int, CZ: int, cdt: torch.dtype):
    bc = next_power_of_2(C)
    return dict(DOT_PREC=dot_precision(cdt), INTERP=is_interpreter(), BLOCK_C=bc,
                BLOCK_CZ=max(16, next_power_of_2(CZ)), BLOCK_J=_INTERP["BLOCK_J"], BLOCK_K=max(32, bc))


# ----------------------------------------------------------------------------------------------
# autograd Function
# ----------------------------------------------------------------------------------------------
class _OuterProductMeanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, m, mask, eps, ln_eps, chunk_rows, carry, ln_w, ln_b, w1, b1, w2, b2, w_out,
                b_out):
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None
        dev = m.device.type
        ac = autocast_dtype(dev)
        cdt = ac if ac is not None else m.dtype
        batch = m.shape[:-3]
        S, R, CM = m.shape[-3:]
        C, CZ = w1.shape[0], w_out.shape[0]
        Bt = math.prod(batch)
        M = Bt * S * R
        rb = chunk_rows if chunk_rows else max(1, _CHUNK_ELEMENTS // max(1, Bt * C * R * C))
        rb = min(rb, R)
        with autocast_off(dev):
            m2 = m.reshape(M, CM).contiguous()
            if mask is None:
                mk = torch.ones((Bt, S, R), device=m.device, dtype=torch.float32)
            else:
                mk = mask.expand(m.shape[:-1]).reshape(Bt, S, R).to(torch.float32).contiguous()
            w12 = torch.cat([w1, w2]).to(cdt).contiguous()
            a, b = _proj_fwd(m2, mk, ln_w, ln_b, w12, torch.cat([b1, b2]), ln_eps, cdt)
            a, b = a.view(Bt, S, R, C), b.view(Bt, S, R, C)
            norm = torch.bmm(mk.transpose(1, 2), mk)  # [Bt, R, R]: exact pair counts
            wo = w_out.to(cdt).contiguous()
            bo = b_out.to(torch.float32).contiguous()
            out = _out_rows_fwd(a, b, norm, wo, bo, eps, rb, cdt)
        ctx.save_for_backward(m2, mk, a, b, norm, w12, wo, ln_w, ln_b, w1, b1, w2, b2, w_out, b_out)
        ctx.meta = (eps, ln_eps, rb, cdt, m.dtype, m.shape)
        out = out.view(*batch, R, R, CZ)
        return (out, m) if carry else out

    @staticmethod
    def backward(ctx, dout, dres=None):
        if dout is None:  # only the carried m has a gradient
            return (dres,) + (None,) * 13
        m2, mk, a, b, norm, w12, wo, ln_w, ln_b, w1, b1, w2, b2, w_out, b_out = ctx.saved_tensors
        eps, ln_eps, rb, cdt, m_dtype, m_shape = ctx.meta
        Bt, S, R, C = a.shape
        CM, CZ = m2.shape[1], wo.shape[0]
        with autocast_off(m2.device.type):
            dout2 = dout.reshape(Bt, R, R, CZ).contiguous()
            da, db, dwo, dbo = _out_rows_bwd(dout2, a, b, norm, wo, eps, rb, cdt)
            dm, dw12, s = _proj_bwd(m2, mk, ln_w, ln_b, w12, da, db, ln_eps, cdt, m_dtype, dres)
            del da, db
        grads = _proj_param_grads(dw12, s, C, CM) + (dwo, dbo)
        params = (ln_w, ln_b, w1, b1, w2, b2, w_out, b_out)
        grads = [g if g.dtype == p.dtype else g.to(p.dtype) for g, p in zip(grads, params)]
        return (dm.view(m_shape), None, None, None, None, None, *grads)


def _outer_product_mean(m, mask, ln_w, ln_b, w1, b1, w2, b2, w_out, b_out, eps=1e-3, ln_eps=1e-5,
                        chunk_rows: Optional[int] = None, carry: bool = False):
    """``outer_product_mean`` with an explicit number of pair rows per outer-product chunk."""
    if m.dim() < 3:
        raise ValueError(f"outer_product_mean: m must be [*, N_seq, N_res, C_m], got {tuple(m.shape)}")
    if w1.shape[1] != m.shape[-1] or w_out.shape[1] != w1.shape[0] ** 2:
        raise ValueError("outer_product_mean: weight shapes do not match m's channels / c_hidden^2")
    check_launchable(m, mask)
    return _OuterProductMeanFn.apply(m, mask, float(eps), float(ln_eps), chunk_rows, carry,
                                     ln_w, ln_b, w1, b1, w2, b2, w_out, b_out)


def outer_product_mean(
    m: torch.Tensor,
    mask: Optional[torch.Tensor],
    ln_w: torch.Tensor,
    ln_b: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    w_out: torch.Tensor,
    b_out: torch.Tensor,
    eps: float = 1e-3,
    ln_eps: float = 1e-5,
    carry: bool = False,
):
    """Fused outer product mean: m ``[*, N_seq, N_res, C_m]``, mask ``[*, N_seq, N_res]`` (None:
    all ones) -> ``[*, N_res, N_res, C_z]``.  Same maths as ``outer_product_mean_reference``;
    see the module docstring for the design and the precision contract.  Gradients flow to m
    and the eight parameters (not to the mask).
    With `carry`, ``(out, m)``: m handed back for its other reader (the Evoformer block's
    output), whose gradient ``_opm_proj_bwd_kernel`` adds to dm in fp32 (no add of its own).
    """
    return _outer_product_mean(m, mask, ln_w, ln_b, w1, b1, w2, b2, w_out, b_out, eps, ln_eps,
                               carry=carry)


# ----------------------------------------------------------------------------------------------
# the projected, masked operands alone (DAP: a rank's residues, before b's all-gather)
# ----------------------------------------------------------------------------------------------
def outer_product_mean_projections_reference(m, mask, ln_w, ln_b, w1, b1, w2, b2, ln_eps=1e-5):
    """OpenFold's ``OuterProductMean`` up to the outer product: ln = LayerNorm(m) (torch's
    contract), a = (ln @ w1^T + b1) * mask, b = (ln @ w2^T + b2) * mask, for m
    ``[*, C_m]`` and mask ``[*]`` (None: all ones) -> (a, b) ``[*, C]`` each."""
    ln = layer_norm_torch_reference(m, ln_w, ln_b, ln_eps)
    mk = (m.new_ones(m.shape[:-1]) if mask is None else mask).unsqueeze(-1)
    return F.linear(ln, w1, b1) * mk, F.linear(ln, w2, b2) * mk


class _ProjectionsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, m, mask, ln_eps, ln_w, ln_b, w1, b1, w2, b2):
        dev = m.device.type
        cdt = autocast_dtype(dev) or m.dtype
        CM, C = m.shape[-1], w1.shape[0]
        M = math.prod(m.shape[:-1])
        with autocast_off(dev):
            m2 = m.reshape(M, CM).contiguous()
            mk = (torch.ones((M,), device=m.device, dtype=torch.float32) if mask is None else
                  mask.expand(m.shape[:-1]).reshape(M).to(torch.float32).contiguous())
            w12 = torch.cat([w1, w2]).to(cdt).contiguous()
            a, b = _proj_fwd(m2, mk, ln_w, ln_b, w12, torch.cat([b1, b2]), ln_eps, cdt)
        ctx.save_for_backward(m2, mk, w12, ln_w, ln_b, w1, b1, w2, b2)
        ctx.meta = (ln_eps, cdt, m.dtype, m.shape)
        shape = m.shape[:-1] + (C,)
        return a.view(shape), b.view(shape)

    @staticmethod
    def backward(ctx, da, db):
        m2, mk, w12, *params = ctx.saved_tensors
        ln_eps, cdt, m_dtype, m_shape = ctx.meta
        M, CM = m2.shape
        C = w12.shape[0] // 2
        with autocast_off(m2.device.type):  # (an unused output's gradient comes as zeros)
            dm, dw12, s = _proj_bwd(m2, mk, params[0], params[1], w12,
                                    da.reshape(M, C).contiguous(), db.reshape(M, C).contiguous(),
                                    ln_eps, cdt, m_dtype)
        grads = [g if g.dtype == p.dtype else g.to(p.dtype)
                 for g, p in zip(_proj_param_grads(dw12, s, C, CM), params)]
        return (dm.view(m_shape), None, None, *grads)


def outer_product_mean_projections(m, mask, ln_w, ln_b, w1, b1, w2, b2, ln_eps=1e-5):
    """``outer_product_mean_projections_reference`` fused: LayerNorm, both projections and the
    mask in one pass over m (``_opm_proj_fwd_kernel``; backward ``_opm_proj_bwd_kernel`` and one
    weight GEMM), a and b in the compute dtype (the autocast dtype, else m's: the values
    OpenFold's autocast einsum reads). Gradients flow to m and the six parameters."""
    if m.dim() < 1 or w1.shape[1] != m.shape[-1] or w2.shape != w1.shape:
        raise ValueError(f"outer_product_mean_projections: m {tuple(m.shape)} and the weights "
                         f"{tuple(w1.shape)}, {tuple(w2.shape)} must be [*, C_m] and [C, C_m]")
    if mask is not None:
        try:
            torch.broadcast_shapes(mask.shape, m.shape[:-1])
        except RuntimeError:
            raise ValueError(f"outer_product_mean_projections: mask {tuple(mask.shape)} does not "
                             f"broadcast to {tuple(m.shape[:-1])}") from None
    check_launchable(m, mask)
    return _ProjectionsFn.apply(m, mask, float(ln_eps), ln_w, ln_b, w1, b1, w2, b2)


# ----------------------------------------------------------------------------------------------
# rows of the output from projected operands (DAP: this rank's pair rows)
# ----------------------------------------------------------------------------------------------
def outer_product_mean_rows_reference(
    a: torch.Tensor,
    b: torch.Tensor,
    norm: torch.Tensor,
    w_out: torch.Tensor,
    b_out: torch.Tensor,
    eps: float = 1e-3,
    chunk_rows: Optional[int] = None,
    inference: Optional[bool] = None,
) -> torch.Tensor:
    """Pair rows of the outer product mean from its projected, masked operands: a
    ``[*, N_seq, R, C]`` (the rows' residues), b ``[*, N_seq, N, C]`` (every residue), norm
    ``[*, R, N]`` (the pair counts ``sum_s mask[s, i] mask[s, j]``) -> ``[*, R, N, C_z]`` =
    ``(outer(a_i, b_j).flatten() @ w_out^T + b_out) / (norm + eps)``. OpenFold's maths (einsum,
    linear), in chunks of `chunk_rows` rows (None: all). `inference` is the Triton op's; ignored."""
    at = a.transpose(-2, -3)  # [*, R, N_seq, C]
    bt = b.transpose(-2, -3)

    def rows(ac):
        outer = torch.einsum("...bac,...dae->...bdce", ac, bt)
        return F.linear(outer.reshape(outer.shape[:-2] + (-1,)), w_out, b_out)

    n = at.shape[-3]
    step = n if not chunk_rows else chunk_rows
    parts = [rows(at[..., r0:r0 + step, :, :]) for r0 in range(0, n, step)]
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-3)
    return out / (norm.unsqueeze(-1) + eps)


class _OuterProductMeanRowsFn(torch.autograd.Function):
    """Pair rows from projected operands (``outer_product_mean_rows``): forward
    ``_out_rows_fwd``, backward ``_out_rows_bwd`` (O recomputed per chunk of rows)."""

    @staticmethod
    def forward(ctx, a, b, norm, w_out, b_out, eps, rb):
        cdt = autocast_dtype(a.device.type) or a.dtype
        batch, (S, R, C), N = a.shape[:-3], a.shape[-3:], b.shape[-2]
        Bt = math.prod(batch)
        with torch.autocast(a.device.type, enabled=False):
            a3 = a.reshape(Bt, S, R, C).to(cdt).contiguous()
            b3 = b.reshape(Bt, S, N, C).to(cdt).contiguous()
            n3 = norm.expand(*batch, R, N).reshape(Bt, R, N).to(torch.float32).contiguous()
            wo = w_out.to(cdt).contiguous()
            out = _out_rows_fwd(a3, b3, n3, wo, b_out.to(torch.float32).contiguous(), eps, rb, cdt)
        ctx.save_for_backward(a3, b3, n3, wo)
        ctx.meta = (eps, rb, cdt, a.shape, a.dtype, b.shape, b.dtype, w_out.dtype, b_out.dtype)
        return out.view(*batch, R, N, w_out.shape[0])

    @staticmethod
    def backward(ctx, dout):
        a3, b3, n3, wo = ctx.saved_tensors
        eps, rb, cdt, a_shape, a_dtype, b_shape, b_dtype, wo_dtype, bo_dtype = ctx.meta
        Bt, _, R, _ = a3.shape
        N, CZ = b3.shape[2], wo.shape[0]
        with torch.autocast(a3.device.type, enabled=False):
            dout2 = dout.reshape(Bt, R, N, CZ).contiguous()
            da, db, dwo, dbo = _out_rows_bwd(dout2, a3, b3, n3, wo, eps, rb, cdt)
        return (da.view(a_shape).to(a_dtype), db.view(b_shape).to(b_dtype), None,
                dwo.to(wo_dtype), dbo.to(bo_dtype), None, None)


def outer_product_mean_rows(
    a: torch.Tensor,
    b: torch.Tensor,
    norm: torch.Tensor,
    w_out: torch.Tensor,
    b_out: torch.Tensor,
    eps: float = 1e-3,
    chunk_rows: Optional[int] = None,
    inference: Optional[bool] = None,
) -> torch.Tensor:
    """``outer_product_mean_rows_reference``, fused: the outer product as a cuBLAS GEMM per chunk
    of rows and ``_opm_out_fwd_kernel`` (linear_out, bias and the division by the norm fused),
    as the whole op's forward does, without the ``[R, N, C * C]`` intermediate's permute copy;
    backward as the whole op's (``_out_rows_bwd``: O recomputed per chunk, dw_out reduced in a
    kernel, two GEMMs for da and db). Output in the compute dtype (the autocast dtype, else a's);
    gradients flow to a, b, w_out and b_out (not to norm), each in its own dtype. The same
    numbers with and without gradients (a checkpoint's gradient-free pass and its recompute
    agree). `inference` True while a gradient is needed is an error (it is otherwise what the
    DAP forwards pass, not a choice of path)."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (a, b, norm, w_out, b_out))
    if inference and needs_grad:
        raise ValueError("outer_product_mean_rows: inference=True, but a gradient is needed")
    if a.dim() < 3 or b.shape[:-2] != a.shape[:-2] or b.shape[-1] != a.shape[-1]:
        raise ValueError(f"outer_product_mean_rows: a {tuple(a.shape)} and b {tuple(b.shape)} "
                         f"must be [*, N_seq, R, C] and [*, N_seq, N, C]")
    C, R, N = a.shape[-1], a.shape[-2], b.shape[-2]
    if w_out.dim() != 2 or w_out.shape[1] != C * C or b_out.shape != (w_out.shape[0],):
        raise ValueError(f"outer_product_mean_rows: w_out {tuple(w_out.shape)} and b_out "
                         f"{tuple(b_out.shape)} must be [C_z, {C * C}] and [C_z]")
    try:
        torch.broadcast_shapes(norm.shape, (*a.shape[:-3], R, N))
    except RuntimeError:
        raise ValueError(f"outer_product_mean_rows: norm {tuple(norm.shape)} does not broadcast "
                         f"to [*, R, N] = {(*a.shape[:-3], R, N)}") from None
    check_launchable(a, b, norm)
    Bt = math.prod(a.shape[:-3])
    rb = min(R, chunk_rows if chunk_rows else max(1, _CHUNK_ELEMENTS // max(1, Bt * C * N * C)))
    return _OuterProductMeanRowsFn.apply(a, b, norm, w_out, b_out, float(eps), rb)
