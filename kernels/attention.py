"""Gated multi-head attention with a mask bias and a pair bias, flash-style.

Math (OpenFold's ``primitives._attention`` followed by the gating of ``Attention._wrap_up``)::

    q [*, H, Q, C] (already scaled by 1/sqrt(C)),  k, v [*, H, K, C]
    a = q @ k^T                       [*, H, Q, K]
    a += mask_bias; a += pair_bias    (each broadcast to [*, H, Q, K])
    a = softmax(a, -1)                (OpenFold's softmax_no_cast: in the input dtype)
    o = (a @ v).transpose(-2, -3)     [*, Q, H, C]
    o = o * sigmoid(gate)             gate [*, Q, H, C], when given

OpenFold's users: MSA row attention (pair bias [*, 1, H, N_res, N_res] shared over N_seq),
MSA column attention, triangle attention (pair bias shared over the I rows), extra-MSA row
attention (C = 8), template pointwise attention (Q = 1, K = N_templ, mask bias only).

Precision contract. fp32 inputs: IEEE fp32 dots (``input_precision="ieee"``), or TF32 when
``torch.backends.cuda.matmul.allow_tf32`` is set. fp16/bf16 inputs: tensor-core dots in that
dtype with fp32 accumulation; softmax statistics (max, sum), the biases, the gate
and every gradient accumulator are fp32; results are cast on store. So the low-precision path is
more accurate than OpenFold's (which rounds the logits and the probabilities to bf16). Biases
may have their own dtype (under bf16 autocast OpenFold's mask bias is fp32, the pair bias bf16);
each gradient has its input's dtype. Under autocast, fp32 q/k/v are cast to the autocast dtype,
as ``torch.matmul`` would. The output has ``q``'s dtype, promoted with ``gate``'s.

Memory. The [*, H, Q, K] logits are never materialised, neither forward nor backward. Forward:
online softmax over key blocks; the per-row max and 1/sum (fp32, 2 x [*, H, Q]) are saved, plus
the ungated output when a gate is given and a backward will run. (Not their log-sum-exp: with
OpenFold's finite -1e9 mask a fully masked row has |max| ~ 1e9, where max + log(sum) rounds back
to max; such a row must come out uniform, as in OpenFold.) Backward (FlashAttention-2 order):

1. ``_attention_bwd_preprocess_kernel``: gate gradient, gated dO, delta = rowsum(dO * O).
2. ``_attention_bwd_dkdv_kernel``: one program per (batch, head, key block) loops over query
   blocks, recomputing P = exp(S - max) / sum blockwise; dK and dV stay in registers. By
   default (``_FUSE_DQ``, ``_FUSE_DB``) the same program also adds dS k to a fp32 dQ buffer
   and dS to a fp32 pair-bias-gradient buffer (strides 0 on the bias's broadcast dims) with
   atomics, so the whole backward is one pass with one exp per logit.
3. Otherwise ``_attention_bwd_dq_kernel``: one program per (batch, head, query block) loops
   over key blocks.
4. Otherwise (and always for the mask bias) ``_attention_bwd_dbias_kernel``: one program owns
   one [BLOCK_M, BLOCK_N] tile of the bias gradient and loops over the broadcast dims,
   recomputing dS = P * (dO v^T - delta) there, accumulated in fp32 registers, no atomics
   (deterministic). Measured on an H200 it is the slow part of a separate-kernel backward:
   triangle attention N_res 1024, 23.6 ms of a 32.3 ms backward (dK/dV 5.5, dQ 3.4, forward
   3.2): its loop over the 1024 I rows reads four fresh q/k/v/dO tiles per step, with none of
   the reuse between neighbouring programs that the dK/dV and dQ kernels get. The atomics
   (one fp32 add per logit for the bias, 0.25 per logit for dQ at BLOCK_N 128) cost less: the
   fused backward measured 11.8 ms there (H200; fwd+bwd 14.8 ms, was 35.6), MSA row 512 x 384
   2.0 ms (was 6.5). The price is a run-to-run nondeterminism of the bias and dQ gradients at
   fp32 rounding level. When the bias tiles are too few to fill the card, the broadcast loop is
   split over several programs that write fp32 partial sums, added by one torch reduction.
   The mask bias is OpenFold's constant ``inf * (mask - 1)`` and never needs a gradient there;
   it is still supported by the same kernel (broadcast over H and Q: the tile is then also
   summed over its rows). A bias constant along K shifts a softmax row by a constant: its
   gradient is exactly zero and is returned as zeros.

Layout. Inputs are taken through explicit strides, with no copies: q/k/v as OpenFold's
transposed views of a Linear output, biases with stride 0 on broadcast dims. Leading batch dims
are folded into at most two (size, stride) pairs per tensor (``collapse_dims``); the rare layout
that needs more is handled by an explicit loop over the first batch dim. Offsets of batch and
head are 64-bit. Head dims that are not a power of two or below tl.dot's 16 (extra-MSA: 8) are
padded with masked loads. Key and query tails are handled by clamped loads (no masks in the
main loop) and a masked last block.

Kernels are autotuned on the GPU over a few block configurations keyed on (C, Q, K buckets, bias
and gate flags); under Triton's CPU interpreter one small configuration is used, and the kernels
(flag INTERP) upcast bf16 dot operands (the interpreter's bf16 dot is wrong; the upcast is exact)
and round to bf16 to nearest even (the interpreter truncates), so that they compute what the GPU
computes.
"""
import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._triton_utils import (
    autocast_dtype,
    autotune,
    broadcast_shapes,
    cast_rne,
    check_launchable,
    collapse_dims,
    dot_precision,
    is_interpreter,
    next_power_of_2,
)

_LOG2E = tl.constexpr(1.4426950408889634)
# Logits (in log2 units) are floored here. OpenFold masks with a finite -1e9 bias, where one fp32
# ulp is 64: a fully masked row's logits are -1e9 plus rounding noise, and the same logit
# computed twice (forward max vs exponent after FMA contraction, forward vs the backward's
# recompute with another tile order) can differ by that ulp, i.e. a factor up to 2^64 after exp2
# (measured on an H100 in bf16: outputs 6e4 times too large). Floored, every masked logit is
# exactly this value, so a fully masked row is an exact uniform average over its keys (what
# OpenFold's rounding gives for logits below 32 in size) and both passes agree bit for bit; in a
# row with any key left, a floored logit contributes exp2(floor - max) = 0, as -1e9 did. The
# gradient passes the floor unchanged (dS = P (dP - delta) with the uniform P), as OpenFold's
# softmax backward does for such a row. Real logits are never near 2^20.
_LOGIT_FLOOR = tl.constexpr(-1048576.0)
_LN2 = 0.6931471805599453


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------
def _softmax_no_cast(t: torch.Tensor) -> torch.Tensor:
    """OpenFold's ``softmax_no_cast``: bf16 stays bf16 (autocast off), else plain softmax."""
    if t.dtype is torch.bfloat16:
        with torch.autocast(t.device.type, enabled=False):
            return torch.nn.functional.softmax(t, dim=-1)
    return torch.nn.functional.softmax(t, dim=-1)


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_bias: Optional[torch.Tensor] = None,
    pair_bias: Optional[torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """OpenFold's attention core in plain PyTorch (same ops, same order, same dtypes).

    Args:
        q: [*, H, Q, C] queries, already scaled by 1/sqrt(C)
        k, v: [*, H, K, C]
        mask_bias, pair_bias: broadcast to [*, H, Q, K], added in this order
        gate: [*, Q, H, C] gate logits (the sigmoid is applied here)
    Returns:
        [*, Q, H, C]
    """
    a = torch.matmul(q, k.transpose(-1, -2))
    for b in (mask_bias, pair_bias):
        if b is not None:
            a += b
    a = _softmax_no_cast(a)
    o = torch.matmul(a, v).transpose(-2, -3)
    if gate is not None:
        o = o * torch.sigmoid(gate)
    return o


# --------------------------------------------------------------------------------------------
# Triton helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _mm(a, b, DOT_PREC: tl.constexpr, INTERP: tl.constexpr):
    """a @ b, fp32 result. INTERP (Triton's CPU interpreter, whose bf16 dot is wrong): bf16
    operands are upcast first, which is exact and gives the tensor-core dot's products."""
    if INTERP:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def _mma(a, b, acc, DOT_PREC: tl.constexpr, INTERP: tl.constexpr):
    """acc + a @ b (see ``_mm``)."""
    if INTERP:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def _load_rows(ptr, offs_r, offs_c, s_r, s_c, C: tl.constexpr, CP: tl.constexpr):
    """[R, CP] tile; channels >= C read as 0."""
    p = ptr + offs_r[:, None] * s_r + offs_c[None, :] * s_c
    if C == CP:
        x = tl.load(p)
    else:
        x = tl.load(p, mask=offs_c[None, :] < C, other=0.0)
    return x


@triton.jit
def _load_rows_t(ptr, offs_r, offs_c, s_r, s_c, C: tl.constexpr, CP: tl.constexpr):
    """[CP, R] tile (the transpose of ``_load_rows``)."""
    p = ptr + offs_c[:, None] * s_c + offs_r[None, :] * s_r
    if C == CP:
        x = tl.load(p)
    else:
        x = tl.load(p, mask=offs_c[:, None] < C, other=0.0)
    return x


@triton.jit
def _bias(ptr, offs_m, offs_n, s_m, s_n, Q_BCAST: tl.constexpr, TRANS: tl.constexpr):
    """fp32 bias tile [M, N] (or [N, M] when TRANS); one row vector when broadcast over Q."""
    if Q_BCAST:
        b = tl.load(ptr + offs_n * s_n).to(tl.float32)
        if TRANS:
            b = b[:, None]
        else:
            b = b[None, :]
    else:
        if TRANS:
            b = tl.load(ptr + offs_n[:, None] * s_n + offs_m[None, :] * s_m).to(tl.float32)
        else:
            b = tl.load(ptr + offs_m[:, None] * s_m + offs_n[None, :] * s_n).to(tl.float32)
    return b


@triton.jit
def _logits(q, kT, MB, PB, offs_mc, offs_n, offs_nc, smm, smn, spm, spn, NK,
            HAS_MB: tl.constexpr, MB_QB: tl.constexpr, HAS_PB: tl.constexpr,
            PB_QB: tl.constexpr, MASK_N: tl.constexpr, DOT_PREC: tl.constexpr,
            INTERP: tl.constexpr):
    """((q @ k^T + mask_bias) + pair_bias) * log2(e) as fp32 [M, N], floored at _LOGIT_FLOOR;
    keys >= NK at -inf."""
    s = _mm(q, kT, DOT_PREC, INTERP)
    if HAS_MB:
        s += _bias(MB, offs_mc, offs_nc, smm, smn, MB_QB, False)
    if HAS_PB:
        s += _bias(PB, offs_mc, offs_nc, spm, spn, PB_QB, False)
    s = tl.maximum(s * _LOG2E, _LOGIT_FLOOR)
    if MASK_N:
        s = tl.where(offs_n[None, :] < NK, s, float("-inf"))
    return s


@triton.jit
def _logits_t(k, qT, MB, PB, offs_mc, offs_nc, smm, smn, spm, spn,
              HAS_MB: tl.constexpr, MB_QB: tl.constexpr, HAS_PB: tl.constexpr,
              PB_QB: tl.constexpr, DOT_PREC: tl.constexpr, INTERP: tl.constexpr):
    """The transpose of ``_logits``: [N, M] (no key mask: callers own the keys)."""
    s = _mm(k, qT, DOT_PREC, INTERP)
    if HAS_MB:
        s += _bias(MB, offs_mc, offs_nc, smm, smn, MB_QB, True)
    if HAS_PB:
        s += _bias(PB, offs_mc, offs_nc, spm, spn, PB_QB, True)
    return tl.maximum(s * _LOG2E, _LOGIT_FLOOR)


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------
@triton.jit
def _attention_fwd_block(acc, m_i, l_i, q, K, V, MB, PB, offs_mc, offs_c, start_n,
                         skn, skc, svn, svc, smm, smn, spm, spn, NK,
                         C: tl.constexpr, CP: tl.constexpr,
                         HAS_MB: tl.constexpr, MB_QB: tl.constexpr, HAS_PB: tl.constexpr,
                         PB_QB: tl.constexpr, MASK_N: tl.constexpr, DOT_PREC: tl.constexpr,
                         INTERP: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if MASK_N:
        offs_nc = tl.minimum(offs_n, NK - 1)
    else:
        offs_nc = offs_n
    kT = _load_rows_t(K, offs_nc, offs_c, skn, skc, C, CP)
    s = _logits(q, kT, MB, PB, offs_mc, offs_n, offs_nc, smm, smn, spm, spn, NK,
                HAS_MB, MB_QB, HAS_PB, PB_QB, MASK_N, DOT_PREC, INTERP)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_rows(V, offs_nc, offs_c, svn, svc, C, CP)
    acc = _mma(cast_rne(p, v.dtype, INTERP), v, acc * alpha[:, None], DOT_PREC, INTERP)
    return acc, m_new, l_i


@triton.jit
def _attention_fwd_kernel(
    Q, K, V, MB, PB, G, OUT, ORAW, STATS,
    sq0, sq1, sqh, sqm, sqc,
    sk0, sk1, skh, skn, skc,
    sv0, sv1, svh, svn, svc,
    sm0, sm1, smh, smm, smn,
    sp0, sp1, sph, spm, spn,
    sg0, sg1, sgh, sgm, sgc,
    so0, so1, soh, som, soc,
    Z1, H, NQ, NK, STAT_STRIDE, Q_BUCKET, K_BUCKET,
    C: tl.constexpr, CP: tl.constexpr,
    HAS_MB: tl.constexpr, MB_QB: tl.constexpr, HAS_PB: tl.constexpr, PB_QB: tl.constexpr,
    HAS_GATE: tl.constexpr, STORE_O: tl.constexpr, DOT_PREC: tl.constexpr, INTERP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    n_qb = tl.cdiv(NQ, BLOCK_M)
    qb = pid % n_qb
    zh = pid // n_qb
    h = (zh % H).to(tl.int64)
    z = zh // H
    z1 = (z % Z1).to(tl.int64)
    z0 = (z // Z1).to(tl.int64)

    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_mc = tl.minimum(offs_m, NQ - 1)
    offs_c = tl.arange(0, CP)
    q = _load_rows(Q + z0 * sq0 + z1 * sq1 + h * sqh, offs_mc, offs_c, sqm, sqc, C, CP)
    K += z0 * sk0 + z1 * sk1 + h * skh
    V += z0 * sv0 + z1 * sv1 + h * svh
    if HAS_MB:
        MB += z0 * sm0 + z1 * sm1 + h * smh
    if HAS_PB:
        PB += z0 * sp0 + z1 * sp1 + h * sph

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, CP], tl.float32)
    n_full = (NK // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _attention_fwd_block(
            acc, m_i, l_i, q, K, V, MB, PB, offs_mc, offs_c, start_n,
            skn, skc, svn, svc, smm, smn, spm, spn, NK, C, CP,
            HAS_MB, MB_QB, HAS_PB, PB_QB, False, DOT_PREC, INTERP, BLOCK_N)
    if n_full < NK:
        acc, m_i, l_i = _attention_fwd_block(
            acc, m_i, l_i, q, K, V, MB, PB, offs_mc, offs_c, n_full,
            skn, skc, svn, svc, smm, smn, spm, spn, NK, C, CP,
            HAS_MB, MB_QB, HAS_PB, PB_QB, True, DOT_PREC, INTERP, BLOCK_N)

    o = acc / l_i[:, None]
    m_ok = offs_m < NQ
    # the row max and 1/sum, not their log-sum-exp: with OpenFold's -1e9 mask a fully masked
    # row has |m| ~ 1.4e9, where m + log2(l) would round back to m
    st = STATS + zh.to(tl.int64) * NQ + offs_m
    tl.store(st, m_i, mask=m_ok)
    tl.store(st + STAT_STRIDE, 1.0 / l_i, mask=m_ok)
    io = z0 * so0 + z1 * so1 + h * soh + offs_m[:, None] * som + offs_c[None, :] * soc
    st_mask = m_ok[:, None] & (offs_c[None, :] < C)
    if HAS_GATE:
        if STORE_O:
            tl.store(ORAW + io, cast_rne(o, ORAW.dtype.element_ty, INTERP), mask=st_mask)
        g = _load_rows(G + z0 * sg0 + z1 * sg1 + h * sgh, offs_mc, offs_c, sgm, sgc, C, CP)
        o = o * tl.sigmoid(g.to(tl.float32))
    tl.store(OUT + io, cast_rne(o, OUT.dtype.element_ty, INTERP), mask=st_mask)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------
@triton.jit
def _attention_bwd_preprocess_kernel(
    DOUT, ORAW, G, DO, DG, DELTA,
    sd0, sd1, sdh, sdm, sdc,
    so0, so1, soh, som, soc,
    sg0, sg1, sgh, sgm, sgc,
    sp0, sp1, sph, spm, spc,
    sx0, sx1, sxh, sxm, sxc,
    Z1, H, NQ,
    C: tl.constexpr, CP: tl.constexpr, HAS_GATE: tl.constexpr, INTERP: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Gate gradient, gated dO (stored in q's dtype) and delta = rowsum(dO * O) [fp32]."""
    pid = tl.program_id(0)
    n_qb = tl.cdiv(NQ, BLOCK_M)
    qb = pid % n_qb
    zh = pid // n_qb
    h = (zh % H).to(tl.int64)
    z = zh // H
    z1 = (z % Z1).to(tl.int64)
    z0 = (z // Z1).to(tl.int64)
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, CP)
    mask = (offs_m[:, None] < NQ) & (offs_c[None, :] < C)
    row = offs_m[:, None]
    col = offs_c[None, :]
    dout = tl.load(DOUT + z0 * sd0 + z1 * sd1 + h * sdh + row * sdm + col * sdc,
                   mask=mask, other=0.0).to(tl.float32)
    o = tl.load(ORAW + z0 * so0 + z1 * so1 + h * soh + row * som + col * soc,
                mask=mask, other=0.0).to(tl.float32)
    if HAS_GATE:
        g = tl.sigmoid(tl.load(G + z0 * sg0 + z1 * sg1 + h * sgh + row * sgm + col * sgc,
                               mask=mask, other=0.0).to(tl.float32))
        dg = dout * o * g * (1.0 - g)
        tl.store(DG + z0 * sx0 + z1 * sx1 + h * sxh + row * sxm + col * sxc,
                 cast_rne(dg, DG.dtype.element_ty, INTERP), mask=mask)
        do = cast_rne(dout * g, DO.dtype.element_ty, INTERP)
        tl.store(DO + z0 * sp0 + z1 * sp1 + h * sph + row * spm + col * spc, do, mask=mask)
        dout = do.to(tl.float32)
    else:
        dout = cast_rne(dout, DO.dtype.element_ty, INTERP).to(tl.float32)
    delta = tl.sum(dout * o, 1)
    tl.store(DELTA + zh.to(tl.int64) * NQ + offs_m, delta, mask=offs_m < NQ)


@triton.jit
def _attention_bwd_dkdv_block(dk, dv, k, kq, v, Q, DO, MB, PB, STATS, DELTA, DQA, DB, offs_n,
                              offs_nc, offs_c, start_m, sqm, sqc, sdm, sdc, smm, smn, spm, spn,
                              sbm, sbn, NQ, NK, STAT_STRIDE,
                              C: tl.constexpr, CP: tl.constexpr,
                              HAS_MB: tl.constexpr, MB_QB: tl.constexpr, HAS_PB: tl.constexpr,
                              PB_QB: tl.constexpr, MASK_M: tl.constexpr, FUSE_DQ: tl.constexpr,
                              FUSE_DB: tl.constexpr, DOT_PREC: tl.constexpr,
                              INTERP: tl.constexpr, BLOCK_M: tl.constexpr):
    """One query block's contribution to dK, dV (transposed tiles [BLOCK_N, BLOCK_M]); with
    FUSE_DQ also its dQ contribution dS k, added atomically to the fp32 [NQ, CP] rows at DQA."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    if MASK_M:
        offs_mc = tl.minimum(offs_m, NQ - 1)
    else:
        offs_mc = offs_m
    qT = _load_rows_t(Q, offs_mc, offs_c, sqm, sqc, C, CP)
    sT = _logits_t(k, qT, MB, PB, offs_mc, offs_nc, smm, smn, spm, spn,
                   HAS_MB, MB_QB, HAS_PB, PB_QB, DOT_PREC, INTERP)
    m = tl.load(STATS + offs_mc)
    il = tl.load(STATS + STAT_STRIDE + offs_mc)
    # s <= m in exact arithmetic; a recomputed logit may still round above the forward's max
    # (_LOGIT_FLOOR keeps that to real logits' ulps): p <= 1/l, whatever the rounding
    pT = tl.exp2(tl.minimum(sT - m[None, :], 0.0)) * il[None, :]
    if MASK_M:  # clamped duplicate rows must not contribute
        pT = tl.where(offs_m[None, :] < NQ, pT, 0.0)
    do = _load_rows(DO, offs_mc, offs_c, sdm, sdc, C, CP)
    dv = _mma(cast_rne(pT, do.dtype, INTERP), do, dv, DOT_PREC, INTERP)
    dpT = _mm(v, tl.trans(do), DOT_PREC, INTERP)
    delta = tl.load(DELTA + offs_mc)
    dsT = pT * (dpT - delta[None, :])
    if FUSE_DB:  # bias gradient: dS added atomically (fp32) into its broadcast-summed buffer
        pb = DB + offs_n[:, None] * sbn + offs_m[None, :] * sbm
        if MASK_M:
            tl.atomic_add(pb, dsT, mask=(offs_n[:, None] < NK) & (offs_m[None, :] < NQ),
                          sem="relaxed")
        else:
            tl.atomic_add(pb, dsT, mask=offs_n[:, None] < NK, sem="relaxed")
    dsT = cast_rne(dsT, qT.dtype, INTERP)
    dk = _mma(dsT, tl.trans(qT), dk, DOT_PREC, INTERP)
    if FUSE_DQ:
        dq = _mm(tl.trans(dsT), kq, DOT_PREC, INTERP)
        pq = DQA + offs_m[:, None] * CP + offs_c[None, :]
        if MASK_M:
            tl.atomic_add(pq, dq, mask=offs_m[:, None] < NQ, sem="relaxed")
        else:
            tl.atomic_add(pq, dq, sem="relaxed")
    return dk, dv


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, MB, PB, DO, STATS, DELTA, DK, DV, DQA, DB,
    sq0, sq1, sqh, sqm, sqc,
    sk0, sk1, skh, skn, skc,
    sv0, sv1, svh, svn, svc,
    sm0, sm1, smh, smm, smn,
    sp0, sp1, sph, spm, spn,
    sd0, sd1, sdh, sdm, sdc,
    sdk0, sdk1, sdkh, sdkn, sdkc,
    sdv0, sdv1, sdvh, sdvn, sdvc,
    sb0, sb1, sbh, sbm, sbn,
    Z1, H, NQ, NK, STAT_STRIDE, Q_BUCKET, K_BUCKET,
    C: tl.constexpr, CP: tl.constexpr,
    HAS_MB: tl.constexpr, MB_QB: tl.constexpr, HAS_PB: tl.constexpr, PB_QB: tl.constexpr,
    FUSE_DQ: tl.constexpr, FUSE_DB: tl.constexpr,
    DOT_PREC: tl.constexpr, INTERP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV for one (batch, head, key block); loops over query blocks (transposed tiles).
    With FUSE_DQ, dQ too, accumulated with fp32 atomics in DQA [Z, H, NQ, CP]; with FUSE_DB,
    the pair-bias gradient, accumulated with fp32 atomics in DB (strides 0 on the dims it is
    broadcast on)."""
    pid = tl.program_id(0)
    n_kb = tl.cdiv(NK, BLOCK_N)
    kb = pid % n_kb
    zh = pid // n_kb
    h = (zh % H).to(tl.int64)
    z = zh // H
    z1 = (z % Z1).to(tl.int64)
    z0 = (z // Z1).to(tl.int64)

    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_nc = tl.minimum(offs_n, NK - 1)
    offs_c = tl.arange(0, CP)
    k = _load_rows(K + z0 * sk0 + z1 * sk1 + h * skh, offs_nc, offs_c, skn, skc, C, CP)
    v = _load_rows(V + z0 * sv0 + z1 * sv1 + h * svh, offs_nc, offs_c, svn, svc, C, CP)
    Q += z0 * sq0 + z1 * sq1 + h * sqh
    DO += z0 * sd0 + z1 * sd1 + h * sdh
    if HAS_MB:
        MB += z0 * sm0 + z1 * sm1 + h * smh
    if HAS_PB:
        PB += z0 * sp0 + z1 * sp1 + h * sph
    STATS += zh.to(tl.int64) * NQ
    DELTA += zh.to(tl.int64) * NQ
    DQA += zh.to(tl.int64) * NQ * CP
    if FUSE_DB:
        DB += z0 * sb0 + z1 * sb1 + h * sbh
    kq = k
    if FUSE_DQ:  # keys past NK are clamped duplicates: no dQ from them
        kq = tl.where(offs_n[:, None] < NK, k, 0.0).to(k.dtype)

    dk = tl.zeros([BLOCK_N, CP], tl.float32)
    dv = tl.zeros([BLOCK_N, CP], tl.float32)
    m_full = (NQ // BLOCK_M) * BLOCK_M
    for start_m in range(0, m_full, BLOCK_M):
        dk, dv = _attention_bwd_dkdv_block(
            dk, dv, k, kq, v, Q, DO, MB, PB, STATS, DELTA, DQA, DB, offs_n, offs_nc, offs_c,
            start_m, sqm, sqc, sdm, sdc, smm, smn, spm, spn, sbm, sbn, NQ, NK, STAT_STRIDE, C, CP,
            HAS_MB, MB_QB, HAS_PB, PB_QB, False, FUSE_DQ, FUSE_DB, DOT_PREC, INTERP, BLOCK_M)
    if m_full < NQ:
        dk, dv = _attention_bwd_dkdv_block(
            dk, dv, k, kq, v, Q, DO, MB, PB, STATS, DELTA, DQA, DB, offs_n, offs_nc, offs_c,
            m_full, sqm, sqc, sdm, sdc, smm, smn, spm, spn, sbm, sbn, NQ, NK, STAT_STRIDE, C, CP,
            HAS_MB, MB_QB, HAS_PB, PB_QB, True, FUSE_DQ, FUSE_DB, DOT_PREC, INTERP, BLOCK_M)

    st_mask = (offs_n[:, None] < NK) & (offs_c[None, :] < C)
    tl.store(DK + z0 * sdk0 + z1 * sdk1 + h * sdkh + offs_n[:, None] * sdkn
             + offs_c[None, :] * sdkc, cast_rne(dk, DK.dtype.element_ty, INTERP), mask=st_mask)
    tl.store(DV + z0 * sdv0 + z1 * sdv1 + h * sdvh + offs_n[:, None] * sdvn
             + offs_c[None, :] * sdvc, cast_rne(dv, DV.dtype.element_ty, INTERP), mask=st_mask)


@triton.jit
def _attention_bwd_dq_block(dq, q, do, m, il, delta, K, V, MB, PB, offs_mc, offs_c, start_n,
                            skn, skc, svn, svc, smm, smn, spm, spn, NK,
                            C: tl.constexpr, CP: tl.constexpr,
                            HAS_MB: tl.constexpr, MB_QB: tl.constexpr, HAS_PB: tl.constexpr,
                            PB_QB: tl.constexpr, MASK_N: tl.constexpr,
                            DOT_PREC: tl.constexpr, INTERP: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if MASK_N:
        offs_nc = tl.minimum(offs_n, NK - 1)
    else:
        offs_nc = offs_n
    kT = _load_rows_t(K, offs_nc, offs_c, skn, skc, C, CP)
    s = _logits(q, kT, MB, PB, offs_mc, offs_n, offs_nc, smm, smn, spm, spn, NK,
                HAS_MB, MB_QB, HAS_PB, PB_QB, MASK_N, DOT_PREC, INTERP)
    p = tl.exp2(tl.minimum(s - m[:, None], 0.0)) * il[:, None]  # see the dK/dV block
    vT = _load_rows_t(V, offs_nc, offs_c, svn, svc, C, CP)
    dp = _mm(do, vT, DOT_PREC, INTERP)
    ds = p * (dp - delta[:, None])
    return _mma(cast_rne(ds, kT.dtype, INTERP), tl.trans(kT), dq, DOT_PREC, INTERP)


@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, MB, PB, DO, STATS, DELTA, DQ,
    sq0, sq1, sqh, sqm, sqc,
    sk0, sk1, skh, skn, skc,
    sv0, sv1, svh, svn, svc,
    sm0, sm1, smh, smm, smn,
    sp0, sp1, sph, spm, spn,
    sd0, sd1, sdh, sdm, sdc,
    sdq0, sdq1, sdqh, sdqm, sdqc,
    Z1, H, NQ, NK, STAT_STRIDE, Q_BUCKET, K_BUCKET,
    C: tl.constexpr, CP: tl.constexpr,
    HAS_MB: tl.constexpr, MB_QB: tl.constexpr, HAS_PB: tl.constexpr, PB_QB: tl.constexpr,
    DOT_PREC: tl.constexpr, INTERP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ for one (batch, head, query block); loops over key blocks."""
    pid = tl.program_id(0)
    n_qb = tl.cdiv(NQ, BLOCK_M)
    qb = pid % n_qb
    zh = pid // n_qb
    h = (zh % H).to(tl.int64)
    z = zh // H
    z1 = (z % Z1).to(tl.int64)
    z0 = (z // Z1).to(tl.int64)

    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_mc = tl.minimum(offs_m, NQ - 1)
    offs_c = tl.arange(0, CP)
    q = _load_rows(Q + z0 * sq0 + z1 * sq1 + h * sqh, offs_mc, offs_c, sqm, sqc, C, CP)
    do = _load_rows(DO + z0 * sd0 + z1 * sd1 + h * sdh, offs_mc, offs_c, sdm, sdc, C, CP)
    m = tl.load(STATS + zh.to(tl.int64) * NQ + offs_mc)
    il = tl.load(STATS + STAT_STRIDE + zh.to(tl.int64) * NQ + offs_mc)
    delta = tl.load(DELTA + zh.to(tl.int64) * NQ + offs_mc)
    K += z0 * sk0 + z1 * sk1 + h * skh
    V += z0 * sv0 + z1 * sv1 + h * svh
    if HAS_MB:
        MB += z0 * sm0 + z1 * sm1 + h * smh
    if HAS_PB:
        PB += z0 * sp0 + z1 * sp1 + h * sph

    dq = tl.zeros([BLOCK_M, CP], tl.float32)
    n_full = (NK // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq = _attention_bwd_dq_block(
            dq, q, do, m, il, delta, K, V, MB, PB, offs_mc, offs_c, start_n,
            skn, skc, svn, svc, smm, smn, spm, spn, NK, C, CP,
            HAS_MB, MB_QB, HAS_PB, PB_QB, False, DOT_PREC, INTERP, BLOCK_N)
    if n_full < NK:
        dq = _attention_bwd_dq_block(
            dq, q, do, m, il, delta, K, V, MB, PB, offs_mc, offs_c, n_full,
            skn, skc, svn, svc, smm, smn, spm, spn, NK, C, CP,
            HAS_MB, MB_QB, HAS_PB, PB_QB, True, DOT_PREC, INTERP, BLOCK_N)

    st_mask = (offs_m[:, None] < NQ) & (offs_c[None, :] < C)
    tl.store(DQ + z0 * sdq0 + z1 * sdq1 + h * sdqh + offs_m[:, None] * sdqm
             + offs_c[None, :] * sdqc, cast_rne(dq, DQ.dtype.element_ty, INTERP), mask=st_mask)


@triton.jit
def _attention_bwd_dbias_kernel(
    Q, K, V, MB, PB, DO, STATS, DELTA, DB,
    sq0, sq1, sqh, sqm, sqc,
    sk0, sk1, skh, skn, skc,
    sv0, sv1, svh, svn, svc,
    sm0, sm1, smh, smm, smn,
    sp0, sp1, sph, spm, spn,
    sd0, sd1, sdh, sdm, sdc,
    sbs, sb0, sb1, sbh, sbm, sbn,
    Z0, Z1, H, NQ, NK, STAT_STRIDE, Q_BUCKET, K_BUCKET, R_PER,
    C: tl.constexpr, CP: tl.constexpr,
    HAS_MB: tl.constexpr, MB_QB: tl.constexpr, HAS_PB: tl.constexpr, PB_QB: tl.constexpr,
    RED_Z0: tl.constexpr, RED_Z1: tl.constexpr, RED_H: tl.constexpr, RED_Q: tl.constexpr,
    DOT_PREC: tl.constexpr, INTERP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of a bias gradient: dS summed over the RED_* axes.

    Program id, fastest first: key block, then each owned axis (query block, head, z1, z0),
    then the split of the reduction range; reduction index, fastest first: query block, head,
    z1, z0 (those flagged RED_*). The tile is summed over its rows too when RED_Q.
    """
    pid = tl.program_id(0)
    n_qb = tl.cdiv(NQ, BLOCK_M)
    n_kb = tl.cdiv(NK, BLOCK_N)
    kb = pid % n_kb
    rest = pid // n_kb
    zero = pid * 0
    red = 1
    if RED_Q:
        red = red * n_qb
        qb_o = zero
    else:
        qb_o = rest % n_qb
        rest = rest // n_qb
    if RED_H:
        red = red * H
        h_o = zero
    else:
        h_o = rest % H
        rest = rest // H
    if RED_Z1:
        red = red * Z1
        z1_o = zero
    else:
        z1_o = rest % Z1
        rest = rest // Z1
    if RED_Z0:
        red = red * Z0
        z0_o = zero
    else:
        z0_o = rest % Z0
        rest = rest // Z0
    split = rest
    r_start = split * R_PER
    r_end = tl.minimum(r_start + R_PER, red)

    offs_c = tl.arange(0, CP)
    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    # keys past NK are clamped duplicates: their columns are never stored, and P comes from
    # the saved row statistics, so they need no -inf mask here
    offs_nc = tl.minimum(offs_n, NK - 1)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for r in range(r_start, r_end):
        rr = r
        if RED_Q:
            qb = rr % n_qb
            rr = rr // n_qb
        else:
            qb = qb_o
        if RED_H:
            h = rr % H
            rr = rr // H
        else:
            h = h_o
        if RED_Z1:
            z1 = rr % Z1
            rr = rr // Z1
        else:
            z1 = z1_o
        if RED_Z0:
            z0 = rr
        else:
            z0 = z0_o
        h = h.to(tl.int64)
        z1 = z1.to(tl.int64)
        z0 = z0.to(tl.int64)
        zh = (z0 * Z1 + z1) * H + h
        offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_mc = tl.minimum(offs_m, NQ - 1)
        q = _load_rows(Q + z0 * sq0 + z1 * sq1 + h * sqh, offs_mc, offs_c, sqm, sqc, C, CP)
        kT = _load_rows_t(K + z0 * sk0 + z1 * sk1 + h * skh, offs_nc, offs_c, skn, skc, C, CP)
        s = _logits(q, kT, MB + z0 * sm0 + z1 * sm1 + h * smh,
                    PB + z0 * sp0 + z1 * sp1 + h * sph,
                    offs_mc, offs_n, offs_nc, smm, smn, spm, spn, NK,
                    HAS_MB, MB_QB, HAS_PB, PB_QB, False, DOT_PREC, INTERP)
        m = tl.load(STATS + zh * NQ + offs_mc)
        il = tl.load(STATS + STAT_STRIDE + zh * NQ + offs_mc)
        p = tl.exp2(tl.minimum(s - m[:, None], 0.0)) * il[:, None]  # see the dK/dV block
        do = _load_rows(DO + z0 * sd0 + z1 * sd1 + h * sdh, offs_mc, offs_c, sdm, sdc, C, CP)
        vT = _load_rows_t(V + z0 * sv0 + z1 * sv1 + h * svh, offs_nc, offs_c, svn, svc, C, CP)
        dp = _mm(do, vT, DOT_PREC, INTERP)
        delta = tl.load(DELTA + zh * NQ + offs_mc)
        ds = p * (dp - delta[:, None])
        if RED_Q:
            ds = tl.where(offs_m[:, None] < NQ, ds, 0.0)
        acc += ds

    base = (DB + split.to(tl.int64) * sbs + z0_o.to(tl.int64) * sb0
            + z1_o.to(tl.int64) * sb1 + h_o.to(tl.int64) * sbh)
    if RED_Q:
        tl.store(base + offs_n * sbn, tl.sum(acc, 0), mask=offs_n < NK)
    else:
        offs_m = qb_o * BLOCK_M + tl.arange(0, BLOCK_M)
        tl.store(base + offs_m[:, None] * sbm + offs_n[None, :] * sbn, acc,
                 mask=(offs_m[:, None] < NQ) & (offs_n[None, :] < NK))


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------
def _configs(blocks: Sequence[Tuple[int, int, int, int]]) -> List[triton.Config]:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in blocks]


def _prune(configs, named_args, **kwargs):
    """Drop block sizes far larger than the problem (e.g. Q = 1 in template attention)."""
    max_m = max(16, next_power_of_2(named_args["NQ"]))
    max_n = max(16, next_power_of_2(named_args["NK"]))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max_m and c.kwargs["BLOCK_N"] <= max_n]
    if kept:
        return kept
    smallest = min(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] for c in configs)
    return [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] == smallest]


_TUNE_KEY = ["C", "Q_BUCKET", "K_BUCKET", "HAS_MB", "MB_QB", "HAS_PB", "PB_QB"]
# (BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_M = query rows, BLOCK_N = key rows.
_FWD_BLOCKS = [(128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 128, 4, 2),
               (128, 32, 4, 3), (16, 64, 2, 2), (16, 16, 1, 2)]
# measured on an H200 (tri-att N_res 256/1024, MSA row 128 x 256 / 512 x 384, C 32): the dK/dV
# kernel is fastest at (64, 128, 4, 3) with dQ fused, at (64, 64, 4, 3) without; 8 warps lose
_DKDV_BLOCKS = [(64, 128, 4, 3), (32, 128, 4, 3), (64, 64, 4, 3), (32, 64, 4, 2),
                (128, 128, 8, 3), (16, 64, 2, 2), (16, 16, 1, 2)]
_DQ_BLOCKS = [(128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 4, 3), (64, 128, 4, 3),
              (16, 64, 2, 2), (16, 16, 1, 2)]
_DBIAS_WARPS = [(4, 3), (8, 2), (4, 2)]
_DBIAS_BLOCK_M = _DBIAS_BLOCK_N = 64
_FUSE_DQ = True  # dQ inside the dK/dV kernel with fp32 atomics (else its own kernel)
_FUSE_DB = True  # pair-bias gradient inside the dK/dV kernel with fp32 atomics

_INTERP_BLOCK_M, _INTERP_BLOCK_N = 16, 32  # under the interpreter: uneven, small tiles

_fwd_tuned = autotune(_configs(_FWD_BLOCKS), key=_TUNE_KEY + ["HAS_GATE", "STORE_O"],
                      prune=_prune)(_attention_fwd_kernel)
_dkdv_tuned = autotune(_configs(_DKDV_BLOCKS), key=_TUNE_KEY + ["FUSE_DQ", "FUSE_DB"], prune=_prune,
                       reset_to_zero=["DQA", "DB"])(_attention_bwd_dkdv_kernel)
_dq_tuned = autotune(_configs(_DQ_BLOCKS), key=_TUNE_KEY, prune=_prune)(_attention_bwd_dq_kernel)
_dbias_tuned = autotune(
    [triton.Config({}, num_warps=w, num_stages=s) for w, s in _DBIAS_WARPS],
    key=_TUNE_KEY + ["RED_Z0", "RED_Z1", "RED_H", "RED_Q"])(_attention_bwd_dbias_kernel)


def _launch(jit_fn, tuned, grid, args, kwargs):
    """The autotuned kernel on the GPU; one fixed small configuration under the interpreter."""
    if is_interpreter():
        kw = dict(kwargs)
        if "BLOCK_M" not in kw:
            kw.update(BLOCK_M=_INTERP_BLOCK_M, BLOCK_N=_INTERP_BLOCK_N)
        jit_fn[grid(kw)](*args, **kw, num_warps=4)
    else:
        tuned[grid](*args, **kwargs)


def _target_programs(device: torch.device) -> int:
    """About two waves of programs on the card (a fixed small number under the interpreter)."""
    if device.type != "cuda":
        return 8
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


# --------------------------------------------------------------------------------------------
# Layout planning
# --------------------------------------------------------------------------------------------
class _Plan(NamedTuple):
    """Batch dims folded to (Z0, Z1); `strides[name]` = (s_z0, s_z1) for each tensor."""
    Z0: int
    Z1: int
    strides: dict


def _contiguous_strides(shape: Sequence[int]) -> Tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(strides))


def _make_plan(batch: Sequence[int], q_tail: Tuple[int, int, int], **tensors) -> Optional[_Plan]:
    """Fold the batch dims for all `tensors` (each [*', a, b, c], broadcast to `batch`) and a
    batch-contiguous [*, Q, H, C] output at once; None if more than two dims remain."""
    nb = len(batch)
    H, NQ, C = q_tail
    named = {n: tuple(t.expand(*batch, *t.shape[-3:]).stride()[:nb])
             for n, t in tensors.items() if t is not None}
    named["out"] = _contiguous_strides((*batch, NQ, H, C))[:nb]
    sizes, folded = collapse_dims(batch, list(named.values()))
    if len(sizes) > 2:
        return None
    pad = 2 - len(sizes)
    sizes = [1] * pad + sizes
    strides = {n: (0,) * pad + tuple(s) for n, s in zip(named, folded, strict=True)}
    return _Plan(sizes[0], sizes[1], strides)


def _bias_view(b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A bias with at least 3 dims ([..., H, Q, K]) whose key dim is contiguous.

    The kernels read bias tiles along K: a key stride other than 1 (OpenFold's pair bias is a
    permuted [*, Q, K, H] view) turns every tile load into a gather and made triangle attention
    several times slower at N_res 1024. Such a bias is copied once into [..., H, Q, K] order;
    broadcast (stride 0) dims stay broadcast, so the copy is never larger than the bias itself.
    """
    if b is None:
        return b
    if b.dim() < 3:
        b = b.view((1,) * (3 - b.dim()) + tuple(b.shape))
    if b.shape[-1] > 1 and b.stride(-1) != 1:
        base = b
        for d in range(b.dim()):
            if b.stride(d) == 0 and b.shape[d] > 1:
                base = base.narrow(d, 0, 1)
        b = base.contiguous().expand(b.shape)
    return b


def _strides5(plan: _Plan, name: str, t: Optional[torch.Tensor], dims: Tuple[int, int, int]):
    """(s_z0, s_z1, s_a, s_b, s_c) for `t`, its last three dims picked in order `dims`."""
    if t is None:
        return (0, 0, 0, 0, 0)
    s = t.stride()
    return plan.strides[name] + tuple(s[t.dim() - 3 + d] for d in dims)


def _bias_strides(plan: _Plan, name: str, b: Optional[torch.Tensor], full_tail):
    """(s_z0, s_z1, s_h, s_q, s_k) of a bias broadcast to [*, H, Q, K] (0 on broadcast dims)."""
    if b is None:
        return (0, 0, 0, 0, 0)
    s = b.expand(*b.shape[:-3], *full_tail).stride()
    return plan.strides[name] + tuple(s[-3:])


_QKV = (0, 1, 2)   # [*, H, Q, C]: (h, row, c)
_QHC = (1, 0, 2)   # [*, Q, H, C]: (h, row, c)


# --------------------------------------------------------------------------------------------
# Autograd Function
# --------------------------------------------------------------------------------------------
class _AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan, needs_grad, q, k, v, mask_bias, pair_bias, gate):
        *batch, H, NQ, C = q.shape
        NK = k.shape[-2]
        CP = max(16, next_power_of_2(C))
        out_dtype = q.dtype if gate is None else torch.promote_types(q.dtype, gate.dtype)
        out = q.new_empty((*batch, NQ, H, C), dtype=out_dtype)
        # the backward needs the ungated output too when there is a gate, kept in fp32: delta =
        # rowsum(dO * O) from a bf16-rounded O no longer equals sum_j P dP, so every row's dS
        # sums to a rounding residue instead of 0, and gradients that are zero by symmetry (the
        # LayerNorm bias before a pair-bias projection) came out ~3x noisier than stock's
        o = (q.new_empty((*batch, NQ, H, C), dtype=torch.float32)
             if (gate is not None and needs_grad) else out)
        store_o = gate is not None and needs_grad
        Z = plan.Z0 * plan.Z1
        stats = torch.empty((2, Z, H, NQ), device=q.device, dtype=torch.float32)
        flags = _bias_flags(mask_bias, pair_bias)
        args = (
            q, k, v,
            mask_bias if mask_bias is not None else q,
            pair_bias if pair_bias is not None else q,
            gate if gate is not None else q,
            out, o, stats,
            *_strides5(plan, "q", q, _QKV), *_strides5(plan, "k", k, _QKV),
            *_strides5(plan, "v", v, _QKV),
            *_bias_strides(plan, "mask_bias", mask_bias, (H, NQ, NK)),
            *_bias_strides(plan, "pair_bias", pair_bias, (H, NQ, NK)),
            *_strides5(plan, "gate", gate, _QHC), *_strides5(plan, "out", out, _QHC),
            plan.Z1, H, NQ, NK, stats.stride(0), next_power_of_2(NQ), next_power_of_2(NK),
        )
        kwargs = dict(C=C, CP=CP, **flags, HAS_GATE=gate is not None, STORE_O=store_o,
                      DOT_PREC=dot_precision(q.dtype), INTERP=is_interpreter())
        _launch(_attention_fwd_kernel, _fwd_tuned,
                lambda m: (triton.cdiv(NQ, m["BLOCK_M"]) * Z * H,), args, kwargs)

        ctx.plan = plan
        ctx.shape = (H, NQ, NK, C, CP)
        ctx.save_for_backward(q, k, v, mask_bias, pair_bias, gate, o, stats)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, mask_bias, pair_bias, gate, o, stats = ctx.saved_tensors
        H, NQ, NK, C, CP = ctx.shape
        batch = q.shape[:-3]
        Z = ctx.plan.Z0 * ctx.plan.Z1
        need_q, need_k, need_v, need_mb, need_pb, need_g = ctx.needs_input_grad[2:]
        flags = _bias_flags(mask_bias, pair_bias)
        prec = dot_precision(q.dtype)

        # dout may come with any strides (e.g. expanded from a sum): fold it together with the
        # inputs; if that changes the fold, a contiguous copy folds like `out` always does.
        if dout.is_contiguous():  # the usual case: it folds like `out`
            plan = ctx.plan._replace(strides=dict(ctx.plan.strides, dout=ctx.plan.strides["out"]))
        else:
            tensors = dict(q=q, k=k, v=v, gate=gate, mask_bias=mask_bias, pair_bias=pair_bias)
            plan = _make_plan(batch, (H, NQ, C), dout=dout, **tensors)
            if plan is None or (plan.Z0, plan.Z1) != (ctx.plan.Z0, ctx.plan.Z1):
                dout = dout.contiguous()
                plan = _make_plan(batch, (H, NQ, C), dout=dout, **tensors)
        dout_s = _strides5(plan, "dout", dout, _QHC)

        # 1. preprocess: gate gradient, gated dO, delta
        delta = torch.empty((Z, H, NQ), device=q.device, dtype=torch.float32)
        dgate = None
        if gate is not None:
            do = q.new_empty((*batch, NQ, H, C))
            dgate = torch.empty_like(gate, memory_format=torch.contiguous_format)
            do_s = _contig_strides(plan, do, _QHC)
            dg_s = _contig_strides(plan, dgate, _QHC)
        else:
            do, do_s, dg_s = dout, dout_s, (0,) * 5
        o_s = _contig_strides(plan, o, _QHC)
        g_s = _strides5(plan, "gate", gate, _QHC)
        block = 32 if is_interpreter() else 64
        _attention_bwd_preprocess_kernel[(triton.cdiv(NQ, block) * Z * H,)](
            dout, o, gate if gate is not None else o, do,
            dgate if dgate is not None else o, delta,
            *dout_s, *o_s, *g_s, *do_s, *dg_s, plan.Z1, H, NQ,
            C=C, CP=CP, HAS_GATE=gate is not None, INTERP=is_interpreter(), BLOCK_M=block,
            num_warps=4)

        common = (
            q, k, v,
            mask_bias if mask_bias is not None else q,
            pair_bias if pair_bias is not None else q,
            do, stats, delta,
        )
        common_strides = (
            *_strides5(plan, "q", q, _QKV), *_strides5(plan, "k", k, _QKV),
            *_strides5(plan, "v", v, _QKV),
            *_bias_strides(plan, "mask_bias", mask_bias, (H, NQ, NK)),
            *_bias_strides(plan, "pair_bias", pair_bias, (H, NQ, NK)),
            *do_s,
        )
        kwargs = dict(C=C, CP=CP, **flags, DOT_PREC=prec, INTERP=is_interpreter())
        qb, kb = next_power_of_2(NQ), next_power_of_2(NK)

        dq = dk = dv = dpb = None
        fuse_dq = need_q and (need_k or need_v) and _FUSE_DQ
        # the pair-bias gradient with atomics inside the dK/dV kernel (unless constant along K:
        # then it is zero, see _bias_grad)
        fuse_db = (need_pb and (need_k or need_v) and _FUSE_DB
                   and not (NK > 1 and (pair_bias.shape[-1] == 1 or pair_bias.stride(-1) == 0)))
        if need_k or need_v:
            dk, dv = _grad_like(k), _grad_like(v)
            dqa = (torch.zeros((Z, H, NQ, CP), device=q.device, dtype=torch.float32)
                   if fuse_dq else delta.new_empty(1))
            if fuse_db:
                dba, db_s = _bias_grad_buffer(plan, pair_bias, "pair_bias", (H, NQ, NK))
            else:
                dba, db_s = delta.new_empty(1), (0,) * 5
            _launch(_attention_bwd_dkdv_kernel, _dkdv_tuned,
                    lambda m: (triton.cdiv(NK, m["BLOCK_N"]) * Z * H,),
                    (*common, dk, dv, dqa, dba, *common_strides,
                     *_contig_strides(plan, dk, _QKV), *_contig_strides(plan, dv, _QKV),
                     *db_s, plan.Z1, H, NQ, NK, stats.stride(0), qb, kb),
                    dict(kwargs, FUSE_DQ=fuse_dq, FUSE_DB=fuse_db))
            if fuse_db:
                dpb = dba.reshape(pair_bias.shape).to(pair_bias.dtype)
            if fuse_dq:
                dq = _grad_like(q)
                dq.copy_(dqa[..., :C].view(*batch, H, NQ, C))
        if need_q and not fuse_dq:
            dq = _grad_like(q)
            _launch(_attention_bwd_dq_kernel, _dq_tuned,
                    lambda m: (triton.cdiv(NQ, m["BLOCK_M"]) * Z * H,),
                    (*common, dq, *common_strides, *_contig_strides(plan, dq, _QKV),
                     plan.Z1, H, NQ, NK, stats.stride(0), qb, kb), kwargs)
        dmb = _bias_grad(plan, mask_bias, "mask_bias", common, common_strides, kwargs,
                         (H, NQ, NK)) if need_mb else None
        if need_pb and not fuse_db:
            dpb = _bias_grad(plan, pair_bias, "pair_bias", common, common_strides, kwargs,
                             (H, NQ, NK))
        return None, None, dq, dk, dv, dmb, dpb, (dgate if need_g else None)


def _bias_flags(mask_bias, pair_bias) -> dict:
    return dict(
        HAS_MB=mask_bias is not None,
        MB_QB=mask_bias is not None and (mask_bias.shape[-2] == 1 or mask_bias.stride(-2) == 0),
        HAS_PB=pair_bias is not None,
        PB_QB=pair_bias is not None and (pair_bias.shape[-2] == 1 or pair_bias.stride(-2) == 0),
    )


def _contig_strides(plan: _Plan, t: torch.Tensor, dims) -> Tuple[int, ...]:
    """Strides of a tensor whose batch dims are contiguous (it was allocated here)."""
    inner = t.stride()
    per_batch = t.shape[-1] * t.shape[-2] * t.shape[-3]
    return (per_batch * plan.Z1, per_batch) + tuple(inner[t.dim() - 3 + d] for d in dims)


def _grad_like(t: torch.Tensor) -> torch.Tensor:
    """Gradient buffer for q/k/v: batch dims contiguous; the [H, Q, C] block laid out like `t`
    (OpenFold's q/k/v are [*, Q, H, C] buffers seen as [*, H, Q, C], and so is the gradient,
    so the Linear backward that follows needs no copy)."""
    if t.stride(-3) < t.stride(-2):
        return t.new_empty((*t.shape[:-3], t.shape[-2], t.shape[-3], t.shape[-1])).transpose(-2, -3)
    return t.new_empty(t.shape)


def _bias_grad_buffer(plan, bias, name, full_tail):
    """A zeroed fp32 buffer for a bias gradient, summed over the bias's broadcast dims, and
    its (s_z0, s_z1, s_h, s_q, s_k) strides, 0 on those dims (atomics add there)."""
    H, NQ, NK = full_tail
    b = bias.expand(*bias.shape[:-3], *full_tail)
    s0, s1 = plan.strides[name]
    bs = b.stride()
    flags = [plan.Z0 > 1 and s0 == 0, plan.Z1 > 1 and s1 == 0, H > 1 and bs[-3] == 0,
             NQ > 1 and bs[-2] == 0]
    dims = [1 if f else n for n, f in zip((plan.Z0, plan.Z1, H, NQ), flags, strict=True)]
    buf = torch.zeros((*dims, NK), device=bias.device, dtype=torch.float32)
    st = list(buf.stride())
    for i, f in enumerate(flags):
        if f:
            st[i] = 0
    return buf, tuple(st)


def _bias_grad(plan, bias, name, common, common_strides, kwargs, full_tail):
    """Gradient of one bias, summed over its broadcast dims inside the kernel."""
    H, NQ, NK = full_tail
    b = bias.expand(*bias.shape[:-3], *full_tail)
    s0, s1 = plan.strides[name]
    bs = b.stride()
    if NK > 1 and (bias.shape[-1] == 1 or bs[-1] == 0):
        # constant along K: a per-row shift of the logits, which the softmax ignores
        return torch.zeros_like(bias)
    red = dict(
        RED_Z0=plan.Z0 > 1 and s0 == 0, RED_Z1=plan.Z1 > 1 and s1 == 0,
        RED_H=H > 1 and bs[-3] == 0, RED_Q=NQ > 1 and bs[-2] == 0,
    )
    if is_interpreter():
        bm, bn = _INTERP_BLOCK_M, _INTERP_BLOCK_N
    else:
        bm, bn = _DBIAS_BLOCK_M, _DBIAS_BLOCK_N
    n_qb, n_kb = triton.cdiv(NQ, bm), triton.cdiv(NK, bn)
    owned = [plan.Z0, plan.Z1, H, n_qb]
    flags = [red["RED_Z0"], red["RED_Z1"], red["RED_H"], red["RED_Q"]]
    tiles = n_kb * math.prod(n for n, f in zip(owned, flags, strict=True) if not f)
    reduce_len = math.prod(n for n, f in zip(owned, flags, strict=True) if f)
    split = max(1, min(reduce_len, triton.cdiv(_target_programs(bias.device), tiles)))
    r_per = triton.cdiv(reduce_len, split)
    split = triton.cdiv(reduce_len, r_per)
    dims = [1 if f else n for n, f in zip((plan.Z0, plan.Z1, H, NQ), flags, strict=True)]
    buf = torch.empty((split, *dims, NK), device=bias.device, dtype=torch.float32)
    sb = list(buf.stride())
    for i, f in enumerate(flags):
        if f:
            sb[1 + i] = 0
    grid = (tiles * split,)
    stats = common[6]
    args = (*common, buf, *common_strides, *sb, plan.Z0, plan.Z1, H, NQ, NK, stats.stride(0),
            next_power_of_2(NQ), next_power_of_2(NK), r_per)
    kw = dict(kwargs, **red)
    if is_interpreter():
        _attention_bwd_dbias_kernel[grid](*args, **kw, BLOCK_M=bm, BLOCK_N=bn, num_warps=4)
    else:
        _dbias_tuned[grid](*args, **kw, BLOCK_M=bm, BLOCK_N=bn)
    g = buf.sum(0) if split > 1 else buf[0]
    return g.reshape(bias.shape).to(bias.dtype)


# --------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_bias: Optional[torch.Tensor] = None,
    pair_bias: Optional[torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Flash-style ``attention_reference`` (see the module docstring for the contract).

    Args:
        q: [*, H, Q, C] queries, already scaled by 1/sqrt(C); any strides
        k, v: [*, H, K, C]
        mask_bias, pair_bias: broadcast to [*, H, Q, K] (stride 0 on broadcast dims is fine);
            their gradients are summed over the broadcast dims
        gate: [*, Q, H, C] gate logits; the output is multiplied by sigmoid(gate)
    Returns:
        [*, Q, H, C] in q's dtype (promoted with gate's)
    """
    ac = autocast_dtype(q.device.type)
    if ac is not None and q.dtype == torch.float32:
        q, k, v = q.to(ac), k.to(ac), v.to(ac)  # as torch.matmul does under autocast
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"unsupported dtype {q.dtype}")
    C = q.shape[-1]
    if k.shape[-1] != C or v.shape[-1] != C or k.shape[-2] != v.shape[-2]:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if C > 128:
        raise ValueError(f"head dim {C} > 128 is not supported by the Triton attention")
    check_launchable(q, k, v, mask_bias, pair_bias, gate)
    mask_bias, pair_bias = _bias_view(mask_bias), _bias_view(pair_bias)
    H, NQ, NK = q.shape[-3], q.shape[-2], k.shape[-2]
    lead = [q.shape[:-3], k.shape[:-3], v.shape[:-3]]
    lead += [b.shape[:-3] for b in (mask_bias, pair_bias, gate) if b is not None]
    try:
        batch = broadcast_shapes(*lead)
    except ValueError:
        raise ValueError(f"the batch dims of q, k, v and the biases / gate, {[tuple(t) for t in lead]}, "
                         f"do not broadcast (q {tuple(q.shape)}, k {tuple(k.shape)})") from None
    # expand also checks the head and channel dims (or broadcasts size-1 ones); one that changes
    # nothing would still add a node to the autograd graph, so it is skipped
    q, k, v = (_expand(t, (*batch, H, n, C)) for t, n in ((q, NQ), (k, NK), (v, NK)))
    if gate is not None:
        gate = _expand(gate, (*batch, NQ, H, C))
    for name, b in (("mask_bias", mask_bias), ("pair_bias", pair_bias)):
        if b is not None:
            try:
                broadcast_shapes(b.shape, (*batch, H, NQ, NK))
            except ValueError:
                raise ValueError(f"{name} {tuple(b.shape)} does not broadcast to the logits "
                                 f"[*, H, Q, K] = {(*batch, H, NQ, NK)}") from None
    if q.numel() == 0 or NK == 0:
        return attention_reference(q, k, v, mask_bias, pair_bias, gate)
    plan = _make_plan(batch, (H, NQ, C), q=q, k=k, v=v, gate=gate,
                      mask_bias=mask_bias, pair_bias=pair_bias)
    if plan is None:
        # More than two batch dims that no stride merge folds: loop over the first one.
        return torch.stack([
            attention(*(_select(t, i, len(batch)) for t in (q, k, v, mask_bias, pair_bias, gate)))
            for i in range(batch[0])
        ])
    # the ungated output is kept for the backward only when one will run
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, mask_bias, pair_bias, gate))
    return _AttentionFunction.apply(plan, needs_grad, q, k, v, mask_bias, pair_bias, gate)


def _expand(t: torch.Tensor, shape: Tuple[int, ...]) -> torch.Tensor:
    """``t.expand(shape)``, or `t` itself when it has that shape already."""
    return t if t.shape == shape else t.expand(shape)


def _select(t: Optional[torch.Tensor], i: int, n_batch: int) -> Optional[torch.Tensor]:
    """Entry i of the first batch dim (entry 0 where `t` is broadcast along it)."""
    if t is None:
        return None
    t = t.view((1,) * (n_batch + 3 - t.dim()) + tuple(t.shape))
    return t[i if t.shape[0] > 1 else 0]
