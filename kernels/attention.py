"""Gated multi-head attention with a mask bias and a pair bias, flash-style.

Math (OpenFold's ``primitives._attention`` followed by the gating of ``Attention._wrap_up``)::

    q [*, H, Q, C] (scaled by 1/sqrt(C): by the caller, or here with q_div),  k, v [*, H, K, C]
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
   Small problems (up to ``_FOLD_PRE_MAX_LOGITS`` logits, where the op is bound by host time)
   whose dO and delta only the dK/dV kernel reads fold this step into it (``FOLD_PRE``): each
   program redoes it, with the same arithmetic, for every query block it visits, and the
   programs of the first key block store the gate gradient.
2. ``_attention_bwd_dkdv_kernel``: one program per (batch, head, key block) loops over query
   blocks, recomputing P = exp(S - max) / sum blockwise; dK and dV stay in registers. By
   default (``_FUSE_DQ``, ``_FUSE_DB``) the same program also adds dS k to a fp32 dQ buffer
   and dS to a fp32 pair-bias-gradient buffer (strides 0 on the bias's broadcast dims) with
   atomics, so the whole backward is one pass with one exp per logit. The two buffers are one
   zeroed allocation, dQ's laid out like dq, and are converted to the inputs' dtypes by one
   copy when those agree. A small fwd+bwd is thus 4 launches (forward, zero fill, dK/dV,
   conversion; 3 in fp32).
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
transposed views of a Linear output, biases with stride 0 on broadcast dims. The output (and
the gated dO and dgate buffers) is laid out like the gate where the gate is a permuted dense
tensor, batch-contiguous [*, Q, H, C] otherwise; dq, dk and dv like q, k and v where those are
permuted dense tensors. So a caller that attends along another dim of its activations (MSA
column attention on the MSA as it lies, [*, S, N, H, C] seen as [*, N, H, S, C]) gets its
output and gradients in that same memory order, and the Linears around the op need no copies.
``attention_packed`` takes q, k, v and the gate as the parts of one packed projection (the four
Linears as one GEMM) and writes their four gradients, each laid out like its part, into one
buffer laid out like the projection: the projection's backward is then one GEMM, with no copy
to gather the gradients (its preprocess is never folded, see 1. above: the folded form stores
the gate's gradient laid out like the output). The output is laid out in the gate's memory
order (ungated: q's).
Leading batch dims
are folded into at most two (size, stride) pairs per tensor (``collapse_dims``); the rare layout
that needs more is handled by an explicit loop over the first batch dim. Offsets of batch and
head are 64-bit. Head dims that are not a power of two or below tl.dot's 16 (extra-MSA: 8) are
padded with masked loads. Key and query tails are handled by clamped loads (no masks in the main
loop) and a masked last block.

Host time. Small calls are bound by the host's Python (triangle attention at N_res 256 runs
0.34 ms of kernels per fwd+bwd on an H200, and took 1.0 ms of wall time; 0.72 ms since, and
0.35 ms on an H100 machine whose host kept up with the kernels: docs/benchmarks.md). Everything a call
fixes but the data (the checks, broadcasts, batch fold, buffer layouts and every launch argument
after the tensors) is worked out once, on meta tensors: per input layout by ``_layout`` (keyed
on the inputs' shapes, strides, dtypes and devices, the grad mode and the precision settings),
and the backward's share per gradients asked for and dout's strides by ``_backward_plan``. A
call then reads its inputs' layouts, allocates its buffers and launches.

Kernels are autotuned on the GPU over a few block configurations keyed on (C, Q, K buckets, bias
and gate flags); under Triton's CPU interpreter one small configuration is used, and the kernels
(flag INTERP) upcast bf16 dot operands (the interpreter's bf16 dot is wrong; the upcast is exact)
and round to bf16 to nearest even (the interpreter truncates), so that they compute what the GPU
computes.
"""
import functools
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
    check_devices,
    collapse_dims,
    contiguous_strides,
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
    q_div: Optional[float] = None,
) -> torch.Tensor:
    """OpenFold's attention core in plain PyTorch (same ops, same order, same dtypes).

    Args:
        q: [*, H, Q, C] queries, scaled by 1/sqrt(C) (OpenFold's ``q / sqrt(C)``: `q_div`)
        k, v: [*, H, K, C]
        mask_bias, pair_bias: broadcast to [*, H, Q, K], added in this order
        gate: [*, Q, H, C] gate logits (the sigmoid is applied here)
        q_div: when given, q is divided by it first, as OpenFold's Attention does
    Returns:
        [*, Q, H, C]
    """
    if q_div is not None:
        q = q / q_div
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
def _logits(q, kT, MB, PB, offs_mc, offs_n, offs_nc, smm, smn, spm, spn, NK, SCALE,
            HAS_MB: tl.constexpr, MB_QB: tl.constexpr, HAS_PB: tl.constexpr,
            PB_QB: tl.constexpr, MASK_N: tl.constexpr, DOT_PREC: tl.constexpr,
            INTERP: tl.constexpr):
    """((SCALE * q @ k^T + mask_bias) + pair_bias) * log2(e) as fp32 [M, N], floored at
    _LOGIT_FLOOR; keys >= NK at -inf."""
    s = _mm(q, kT, DOT_PREC, INTERP) * SCALE
    if HAS_MB:
        s += _bias(MB, offs_mc, offs_nc, smm, smn, MB_QB, False)
    if HAS_PB:
        s += _bias(PB, offs_mc, offs_nc, spm, spn, PB_QB, False)
    s = tl.maximum(s * _LOG2E, _LOGIT_FLOOR)
    if MASK_N:
        s = tl.where(offs_n[None, :] < NK, s, float("-inf"))
    return s


@triton.jit
def _logits_t(k, qT, MB, PB, offs_mc, offs_nc, smm, smn, spm, spn, SCALE,
              HAS_MB: tl.constexpr, MB_QB: tl.constexpr, HAS_PB: tl.constexpr,
              PB_QB: tl.constexpr, DOT_PREC: tl.constexpr, INTERP: tl.constexpr):
    """The transpose of ``_logits``: [N, M] (no key mask: callers own the keys)."""
    s = _mm(k, qT, DOT_PREC, INTERP) * SCALE
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
                         skn, skc, svn, svc, smm, smn, spm, spn, NK, SCALE,
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
    s = _logits(q, kT, MB, PB, offs_mc, offs_n, offs_nc, smm, smn, spm, spn, NK, SCALE,
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
    Z1, H, NQ, NK, STAT_STRIDE, Q_BUCKET, K_BUCKET, SCALE,
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
            skn, skc, svn, svc, smm, smn, spm, spn, NK, SCALE, C, CP,
            HAS_MB, MB_QB, HAS_PB, PB_QB, False, DOT_PREC, INTERP, BLOCK_N)
    if n_full < NK:
        acc, m_i, l_i = _attention_fwd_block(
            acc, m_i, l_i, q, K, V, MB, PB, offs_mc, offs_c, n_full,
            skn, skc, svn, svc, smm, smn, spm, spn, NK, SCALE, C, CP,
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
def _gate_bwd(dout, o, gl, DO_TY: tl.constexpr, HAS_GATE: tl.constexpr, INTERP: tl.constexpr):
    """From tiles of the upstream gradient, the ungated output O and the gate logits: the gated
    dO rounded to DO_TY, the gate gradient dout * O * g (1 - g) [fp32] (with HAS_GATE) and
    delta = rowsum(dO * O) [fp32] of the rounded dO (the dO the dS formula sees)."""
    dout = dout.to(tl.float32)
    o = o.to(tl.float32)
    dg = dout
    if HAS_GATE:
        g = tl.sigmoid(gl.to(tl.float32))
        dg = dout * o * g * (1.0 - g)
        dout = dout * g
    do = cast_rne(dout, DO_TY, INTERP)
    return do, dg, tl.sum(do.to(tl.float32) * o, 1)


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
                   mask=mask, other=0.0)
    o = tl.load(ORAW + z0 * so0 + z1 * so1 + h * soh + row * som + col * soc,
                mask=mask, other=0.0)
    gl = o
    if HAS_GATE:
        gl = tl.load(G + z0 * sg0 + z1 * sg1 + h * sgh + row * sgm + col * sgc,
                     mask=mask, other=0.0)
    do, dg, delta = _gate_bwd(dout, o, gl, DO.dtype.element_ty, HAS_GATE, INTERP)
    if HAS_GATE:
        tl.store(DG + z0 * sx0 + z1 * sx1 + h * sxh + row * sxm + col * sxc,
                 cast_rne(dg, DG.dtype.element_ty, INTERP), mask=mask)
        tl.store(DO + z0 * sp0 + z1 * sp1 + h * sph + row * spm + col * spc, do, mask=mask)
    tl.store(DELTA + zh.to(tl.int64) * NQ + offs_m, delta, mask=offs_m < NQ)


@triton.jit
def _attention_bwd_dkdv_block(dk, dv, k, kq, v, Q, DO, MB, PB, STATS, DELTA, DQA, DB, ORAW, G, DG,
                              offs_n, offs_nc, offs_c, start_m, sqm, sqc, sdm, sdc, smm, smn,
                              spm, spn, sbm, sbn, sdqm, sdqc, som, soc, sgm, sgc, NQ, NK,
                              STAT_STRIDE, first_kb, SCALE,
                              C: tl.constexpr, CP: tl.constexpr,
                              HAS_MB: tl.constexpr, MB_QB: tl.constexpr, HAS_PB: tl.constexpr,
                              PB_QB: tl.constexpr, MASK_M: tl.constexpr, FUSE_DQ: tl.constexpr,
                              FUSE_DB: tl.constexpr, FOLD_PRE: tl.constexpr,
                              HAS_GATE: tl.constexpr, DOT_PREC: tl.constexpr,
                              INTERP: tl.constexpr, BLOCK_M: tl.constexpr):
    """One query block's contribution to dK, dV (transposed tiles [BLOCK_N, BLOCK_M]); with
    FUSE_DQ also its dQ contribution dS k, added atomically to the fp32 rows at DQA. With
    FOLD_PRE, dO and delta come from the upstream gradient at DO, ORAW and the gate here (the
    preprocess kernel's math, redone per key block); the first key block stores the gate
    gradient."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    if MASK_M:
        offs_mc = tl.minimum(offs_m, NQ - 1)
    else:
        offs_mc = offs_m
    qT = _load_rows_t(Q, offs_mc, offs_c, sqm, sqc, C, CP)
    sT = _logits_t(k, qT, MB, PB, offs_mc, offs_nc, smm, smn, spm, spn, SCALE,
                   HAS_MB, MB_QB, HAS_PB, PB_QB, DOT_PREC, INTERP)
    m = tl.load(STATS + offs_mc)
    il = tl.load(STATS + STAT_STRIDE + offs_mc)
    # s <= m in exact arithmetic; a recomputed logit may still round above the forward's max
    # (_LOGIT_FLOOR keeps that to real logits' ulps): p <= 1/l, whatever the rounding
    pT = tl.exp2(tl.minimum(sT - m[None, :], 0.0)) * il[None, :]
    if MASK_M:  # clamped duplicate rows must not contribute
        pT = tl.where(offs_m[None, :] < NQ, pT, 0.0)
    if FOLD_PRE:
        dout = _load_rows(DO, offs_mc, offs_c, sdm, sdc, C, CP)
        o = _load_rows(ORAW, offs_mc, offs_c, som, soc, C, CP)
        gl = o
        if HAS_GATE:
            gl = _load_rows(G, offs_mc, offs_c, sgm, sgc, C, CP)
        do, dg, delta = _gate_bwd(dout, o, gl, Q.dtype.element_ty, HAS_GATE, INTERP)
        if HAS_GATE:
            tl.store(DG + offs_m[:, None] * som + offs_c[None, :] * soc,
                     cast_rne(dg, DG.dtype.element_ty, INTERP),
                     mask=(offs_m[:, None] < NQ) & (offs_c[None, :] < C) & first_kb)
    else:
        do = _load_rows(DO, offs_mc, offs_c, sdm, sdc, C, CP)
        delta = tl.load(DELTA + offs_mc)
    dv = _mma(cast_rne(pT, do.dtype, INTERP), do, dv, DOT_PREC, INTERP)
    dpT = _mm(v, tl.trans(do), DOT_PREC, INTERP)
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
        dq = _mm(tl.trans(dsT), kq, DOT_PREC, INTERP) * SCALE
        pq = DQA + offs_m[:, None] * sdqm + offs_c[None, :] * sdqc
        if MASK_M:
            tl.atomic_add(pq, dq, mask=(offs_m[:, None] < NQ) & (offs_c[None, :] < C),
                          sem="relaxed")
        elif C == CP:
            tl.atomic_add(pq, dq, sem="relaxed")
        else:
            tl.atomic_add(pq, dq, mask=offs_c[None, :] < C, sem="relaxed")
    return dk, dv


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, MB, PB, DO, STATS, DELTA, DK, DV, DQA, DB, ORAW, G, DG,
    sq0, sq1, sqh, sqm, sqc,
    sk0, sk1, skh, skn, skc,
    sv0, sv1, svh, svn, svc,
    sm0, sm1, smh, smm, smn,
    sp0, sp1, sph, spm, spn,
    sd0, sd1, sdh, sdm, sdc,
    sdk0, sdk1, sdkh, sdkn, sdkc,
    sdv0, sdv1, sdvh, sdvn, sdvc,
    sb0, sb1, sbh, sbm, sbn,
    sdq0, sdq1, sdqh, sdqm, sdqc,
    so0, so1, soh, som, soc,
    sg0, sg1, sgh, sgm, sgc,
    Z1, H, NQ, NK, STAT_STRIDE, Q_BUCKET, K_BUCKET, SCALE,
    C: tl.constexpr, CP: tl.constexpr,
    HAS_MB: tl.constexpr, MB_QB: tl.constexpr, HAS_PB: tl.constexpr, PB_QB: tl.constexpr,
    FUSE_DQ: tl.constexpr, FUSE_DB: tl.constexpr, FOLD_PRE: tl.constexpr,
    HAS_GATE: tl.constexpr,
    DOT_PREC: tl.constexpr, INTERP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV for one (batch, head, key block); loops over query blocks (transposed tiles).
    With FUSE_DQ, dQ too, accumulated with fp32 atomics in DQA (a zeroed fp32 [*, H, Q, C]
    buffer laid out like dq); with FUSE_DB, the pair-bias gradient, accumulated with fp32 atomics
    in DB (strides 0 on the dims it is broadcast on). DO is the gated dO and DELTA its row sums
    (from the preprocess kernel), or with FOLD_PRE the upstream gradient, from which dO, delta
    and the gate gradient DG are computed here (ORAW: the ungated output; ORAW and DG share strides)."""
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
    if FOLD_PRE:
        ORAW += z0 * so0 + z1 * so1 + h * soh
        if HAS_GATE:
            G += z0 * sg0 + z1 * sg1 + h * sgh
            DG += z0 * so0 + z1 * so1 + h * soh
    else:
        DELTA += zh.to(tl.int64) * NQ
    if FUSE_DQ:
        DQA += z0 * sdq0 + z1 * sdq1 + h * sdqh
    if FUSE_DB:
        DB += z0 * sb0 + z1 * sb1 + h * sbh
    kq = k
    if FUSE_DQ:  # keys past NK are clamped duplicates: no dQ from them
        kq = tl.where(offs_n[:, None] < NK, k, 0.0).to(k.dtype)
    first_kb = kb == 0

    dk = tl.zeros([BLOCK_N, CP], tl.float32)
    dv = tl.zeros([BLOCK_N, CP], tl.float32)
    m_full = (NQ // BLOCK_M) * BLOCK_M
    for start_m in range(0, m_full, BLOCK_M):
        dk, dv = _attention_bwd_dkdv_block(
            dk, dv, k, kq, v, Q, DO, MB, PB, STATS, DELTA, DQA, DB, ORAW, G, DG, offs_n, offs_nc,
            offs_c, start_m, sqm, sqc, sdm, sdc, smm, smn, spm, spn, sbm, sbn, sdqm, sdqc,
            som, soc, sgm, sgc, NQ, NK, STAT_STRIDE, first_kb, SCALE, C, CP, HAS_MB, MB_QB, HAS_PB,
            PB_QB, False, FUSE_DQ, FUSE_DB, FOLD_PRE, HAS_GATE, DOT_PREC, INTERP, BLOCK_M)
    if m_full < NQ:
        dk, dv = _attention_bwd_dkdv_block(
            dk, dv, k, kq, v, Q, DO, MB, PB, STATS, DELTA, DQA, DB, ORAW, G, DG, offs_n, offs_nc,
            offs_c, m_full, sqm, sqc, sdm, sdc, smm, smn, spm, spn, sbm, sbn, sdqm, sdqc,
            som, soc, sgm, sgc, NQ, NK, STAT_STRIDE, first_kb, SCALE, C, CP, HAS_MB, MB_QB, HAS_PB,
            PB_QB, True, FUSE_DQ, FUSE_DB, FOLD_PRE, HAS_GATE, DOT_PREC, INTERP, BLOCK_M)

    st_mask = (offs_n[:, None] < NK) & (offs_c[None, :] < C)
    tl.store(DK + z0 * sdk0 + z1 * sdk1 + h * sdkh + offs_n[:, None] * sdkn
             + offs_c[None, :] * sdkc, cast_rne(dk * SCALE, DK.dtype.element_ty, INTERP),
             mask=st_mask)
    tl.store(DV + z0 * sdv0 + z1 * sdv1 + h * sdvh + offs_n[:, None] * sdvn
             + offs_c[None, :] * sdvc, cast_rne(dv, DV.dtype.element_ty, INTERP), mask=st_mask)


@triton.jit
def _attention_bwd_dq_block(dq, q, do, m, il, delta, K, V, MB, PB, offs_mc, offs_c, start_n,
                            skn, skc, svn, svc, smm, smn, spm, spn, NK, SCALE,
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
    s = _logits(q, kT, MB, PB, offs_mc, offs_n, offs_nc, smm, smn, spm, spn, NK, SCALE,
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
    Z1, H, NQ, NK, STAT_STRIDE, Q_BUCKET, K_BUCKET, SCALE,
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
            skn, skc, svn, svc, smm, smn, spm, spn, NK, SCALE, C, CP,
            HAS_MB, MB_QB, HAS_PB, PB_QB, False, DOT_PREC, INTERP, BLOCK_N)
    if n_full < NK:
        dq = _attention_bwd_dq_block(
            dq, q, do, m, il, delta, K, V, MB, PB, offs_mc, offs_c, n_full,
            skn, skc, svn, svc, smm, smn, spm, spn, NK, SCALE, C, CP,
            HAS_MB, MB_QB, HAS_PB, PB_QB, True, DOT_PREC, INTERP, BLOCK_N)

    st_mask = (offs_m[:, None] < NQ) & (offs_c[None, :] < C)
    tl.store(DQ + z0 * sdq0 + z1 * sdq1 + h * sdqh + offs_m[:, None] * sdqm
             + offs_c[None, :] * sdqc, cast_rne(dq * SCALE, DQ.dtype.element_ty, INTERP),
             mask=st_mask)


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
    Z0, Z1, H, NQ, NK, STAT_STRIDE, Q_BUCKET, K_BUCKET, R_PER, SCALE,
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
                    offs_mc, offs_n, offs_nc, smm, smn, spm, spn, NK, SCALE,
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


@triton.jit
def _cast_rows_kernel(SRC, DST, R, s_dst, W: tl.constexpr, BLOCK_W: tl.constexpr,
                      BLOCK_R: tl.constexpr, INTERP: tl.constexpr):
    """DST[r, :W] = SRC[r, :W] rounded to DST's dtype: SRC contiguous fp32 [R, W] (``attention_
    packed``'s dQ sums), DST rows of stride `s_dst` (q's part of the packed gradient)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_W)
    ok = (rows[:, None] < R) & (cols[None, :] < W)
    x = tl.load(SRC + rows[:, None] * W + cols[None, :], mask=ok)
    tl.store(DST + rows[:, None] * s_dst + cols[None, :],
             cast_rne(x, DST.dtype.element_ty, INTERP), mask=ok)


def _cast_rows(src: torch.Tensor, dst: torch.Tensor, interp: bool) -> None:
    """dst [R, W] (unit column stride) = src [R, W] (contiguous), in dst's dtype: one pass at
    memory speed where torch's copy into a strided low-precision destination is not
    vectorised."""
    r, w = src.shape
    if r == 0:
        return
    bw = next_power_of_2(w)
    br = max(1, min(64, 4096 // bw))
    _cast_rows_kernel[(triton.cdiv(r, br),)](src, dst, r, dst.stride(0), W=w, BLOCK_W=bw,
                                             BLOCK_R=br, INTERP=interp, num_warps=4)


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
               (128, 32, 4, 3), (128, 128, 4, 3), (64, 128, 4, 3), (128, 64, 8, 3),
               (256, 64, 8, 2), (16, 64, 2, 2), (16, 16, 1, 2)]
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
# Up to this many logits (Z * H * Q * K) the backward's preprocess (gate gradient, gated dO,
# delta) is redone inside the dK/dV kernel for every key block (FOLD_PRE) instead of run once
# by its own kernel. The fold saves a launch, 60-80 us of host time per fwd+bwd, which counts
# while the op is host-bound (about 0.6 ms of host time per fwd+bwd on an H100); it costs GPU
# time in proportion to the dK/dV kernel's (a dO, O and gate tile more per step), which counts
# once it is GPU-bound. Measured on an H100 (bf16, untuned first configuration): ungated, the
# kernels take the same time either way at 2^26-2^28 logits and 3% longer folded at 2^32
# (triangle N_res 1024); gated, 0.40 -> 0.46 ms at 2^26 (MSA row 128 x 256, still host-bound)
# and 0.75 -> 0.87 ms at 2^27 (256 x 256, GPU-bound: the fold loses), 2.8 -> 3.4 ms at 2^29.
_FOLD_PRE_MAX_LOGITS = 1 << 26

_INTERP_BLOCK_M, _INTERP_BLOCK_N = 16, 32  # under the interpreter: uneven, small tiles

_fwd_tuned = autotune(_configs(_FWD_BLOCKS), key=_TUNE_KEY + ["HAS_GATE", "STORE_O"],
                      prune=_prune)(_attention_fwd_kernel)
_dkdv_tuned = autotune(_configs(_DKDV_BLOCKS),
                       key=_TUNE_KEY + ["FUSE_DQ", "FUSE_DB", "FOLD_PRE", "HAS_GATE"], prune=_prune,
                       reset_to_zero=["DQA", "DB"])(_attention_bwd_dkdv_kernel)
_dq_tuned = autotune(_configs(_DQ_BLOCKS), key=_TUNE_KEY, prune=_prune)(_attention_bwd_dq_kernel)
_dbias_tuned = autotune(
    [triton.Config({}, num_warps=w, num_stages=s) for w, s in _DBIAS_WARPS],
    key=_TUNE_KEY + ["RED_Z0", "RED_Z1", "RED_H", "RED_Q"])(_attention_bwd_dbias_kernel)


class _Launch:
    """One launch of a kernel as a cached plan makes it, less the tensors that lead its
    arguments: the strides and sizes after them, the constexpr flags and the grid (a function
    of the block sizes). `key`, the autotuner's key (``Tuned.key``), is taken at the first
    launch: it depends only on what the plan fixes (argument values, tensor dtypes)."""
    __slots__ = ("grid", "args", "kwargs", "key")

    def __init__(self, grid, args: tuple, kwargs: dict):
        self.grid, self.args, self.kwargs, self.key = grid, args, kwargs, None


def _launch(jit_fn, tuned, launch: _Launch, tensors: tuple, interp: bool) -> None:
    """`launch` with its leading `tensors`: the autotuned kernel on the GPU; one fixed small
    configuration under the interpreter (`interp`: ``is_interpreter()``)."""
    args = (*tensors, *launch.args)
    if interp:
        kw = dict(launch.kwargs)
        if "BLOCK_M" not in kw:
            kw.update(BLOCK_M=_INTERP_BLOCK_M, BLOCK_N=_INTERP_BLOCK_N)
        jit_fn[launch.grid(kw)](*args, **kw, num_warps=4)
        return
    if launch.key is None:
        launch.key = tuned.key(args, launch.kwargs)
    tuned.launch(launch.key, launch.grid, args, launch.kwargs)


def _target_programs(device: torch.device) -> int:
    """About two waves of programs on the card (a fixed small number under the interpreter)."""
    if device.type != "cuda":
        return 8
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


# --------------------------------------------------------------------------------------------
# Layout planning
# --------------------------------------------------------------------------------------------
class _Plan(NamedTuple):
    """Batch dims folded to (Z0, Z1); `strides[name]` = (s_z0, s_z1, s_a, s_b, s_c) for each
    tensor: its folded batch strides, then its last three dims' strides in the kernels' order
    (q / k / v: head, row, channel; gate / out / dout, [*, Q, H, C]: the same; a bias broadcast
    to [*, H, Q, K]: head, query, key, 0 on broadcast dims). An absent tensor has all zeros."""
    Z0: int
    Z1: int
    strides: dict


_BIASES = ("mask_bias", "pair_bias")


def _make_plan(batch: Sequence[int], tail: Tuple[int, int, int, int], out_stride: tuple,
               **tensors) -> Optional[_Plan]:
    """Fold the batch dims for all `tensors` and the [*, Q, H, C] output (strides `out_stride`)
    at once; None if more than two dims remain. tail = (H, NQ, NK, C); q / k / v / gate / dout
    already have the full batch dims, the biases broadcast to [*batch, H, NQ, NK]."""
    nb = len(batch)
    H, NQ, NK, C = tail
    full = {}
    for name, t in tensors.items():
        if t is None:
            continue
        if name in _BIASES:
            st = t.expand(*batch, H, NQ, NK).stride()
            full[name] = (st[:nb], st[nb:])
        else:
            st = t.stride()
            full[name] = (st[:nb], tuple(st[nb + d] for d in _DIMS[name]))
    full["out"] = (out_stride[:nb], tuple(out_stride[nb + d] for d in _QHC))
    sizes, folded = collapse_dims(batch, [z for z, _ in full.values()])
    if len(sizes) > 2:
        return None
    pad = (0,) * (2 - len(sizes))
    sizes = [1] * len(pad) + sizes
    strides = dict.fromkeys(("q", "k", "v", "gate", *_BIASES), (0,) * 5)
    for (name, (_, inner)), z in zip(full.items(), folded, strict=True):
        strides[name] = pad + tuple(z) + inner
    return _Plan(sizes[0], sizes[1], strides)


def _bias_view(b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A bias with at least 3 dims ([..., H, Q, K]) whose key dim is contiguous.

    The kernels read bias tiles along K: a key stride other than 1 (OpenFold's pair bias is a
    permuted [*, Q, K, H] view) turns every tile load into a gather and made triangle attention
    several times slower at N_res 1024. Such a bias is copied once into [..., H, Q, K] order;
    broadcast (stride 0) dims stay broadcast, so the copy is never larger than the bias itself.

    A bias whose gradient is wanted and that is an expanded view (stride 0 on a dim of size
    above 1) is copied whole: its elements along such a dim are distinct inputs, each with its
    own gradient, whereas the kernels sum the gradient over every stride-0 dim (right for the
    size-1 dims the op broadcasts, and only for those).
    """
    if b is None:
        return b
    if b.dim() < 3:
        b = b.view((1,) * (3 - b.dim()) + tuple(b.shape))
    if (b.requires_grad and torch.is_grad_enabled()
            and any(s == 0 and n > 1 for n, s in zip(b.shape, b.stride(), strict=True))):
        return b.contiguous()
    if b.shape[-1] > 1 and b.stride(-1) != 1:
        base = b
        for d in range(b.dim()):
            if b.stride(d) == 0 and b.shape[d] > 1:
                base = base.narrow(d, 0, 1)
        b = base.contiguous().expand(b.shape)
    return b


def _dense(t: Optional[torch.Tensor]) -> bool:
    """Whether `t` is a permuted dense tensor (no gaps, no overlaps): ``empty_like`` keeps its
    strides, and so does a buffer laid out like it."""
    return t is not None and torch.empty_like(t, device="meta").stride() == t.stride()


def _dense_in_order(t: Optional[torch.Tensor]) -> Optional[tuple]:
    """The strides of a dense tensor of `t`'s shape whose dims lie in memory in `t`'s order
    (sorted by `t`'s strides); None for no tensor or one broadcast along a dim (stride 0)."""
    if t is None or any(s == 0 and n > 1 for n, s in zip(t.shape, t.stride(), strict=True)):
        return None
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    dense = contiguous_strides([t.shape[d] for d in order])
    out = [0] * t.dim()
    for d, s in zip(order, dense, strict=True):
        out[d] = s
    return tuple(out)


_QKV = (0, 1, 2)   # [*, H, Q, C]: (h, row, c)
_QHC = (1, 0, 2)   # [*, Q, H, C]: (h, row, c)
_DIMS = dict(q=_QKV, k=_QKV, v=_QKV, gate=_QHC, dout=_QHC)


# --------------------------------------------------------------------------------------------
# Autograd Function
# --------------------------------------------------------------------------------------------
def _attention_forward(lay, q, k, v, mask_bias, pair_bias, gate):
    """The forward kernel on inputs laid out as `lay` plans: (out, o, stats), o the fp32
    ungated output where the backward needs it (else `out`), stats the rows' max and 1/sum."""
    out = q.new_empty_strided(lay.out_shape, lay.out_stride, dtype=lay.out_dtype)
    # the backward needs the ungated output too when there is a gate, kept in fp32: delta =
    # rowsum(dO * O) from a bf16-rounded O no longer equals sum_j P dP, so every row's dS
    # sums to a rounding residue instead of 0, and gradients that are zero by symmetry (the
    # LayerNorm bias before a pair-bias projection) came out ~3x noisier than stock's
    o = (q.new_empty_strided(lay.out_shape, lay.out_stride, dtype=torch.float32)
         if lay.store_o else out)
    stats = q.new_empty(lay.stats_shape, dtype=torch.float32)
    _launch(_attention_fwd_kernel, _fwd_tuned, lay.fwd,
            (q, k, v,
             mask_bias if mask_bias is not None else q,
             pair_bias if pair_bias is not None else q,
             gate if gate is not None else q,
             out, o, stats),
            lay.interp)
    return out, o, stats


def _attention_backward(lay, saved, o, stats, dout, needs, dest=None):
    """(dq, dk, dv, d mask_bias, d pair_bias, dgate) of the forward `lay` on the inputs `saved`
    (q, k, v, mask_bias, pair_bias, gate), None where `needs` does not ask. With `dest`
    (``attention_packed``): (dq, dk, dv, dgate) buffers laid out like q, k, v and the gate,
    views of one gradient buffer, which the kernels write in place, and that buffer's [rows, P]
    view (q's part first) or None where it has none."""
    q, k, v, mask_bias, pair_bias, gate = saved
    if any(t is not None and t.stride() != m.stride() for t, m in zip(saved, lay.inputs)):
        # a saved-tensor hook (e.g. torch's save_on_cpu) gave the inputs back with other
        # strides than the forward's plan reads: plan for the layouts they have now
        lay = _relayout(lay, saved)
    if lay.store_o and o.stride() != lay.out_stride:
        # (the same hook gave the ungated output back in another layout than the plan's)
        o = o.new_empty_strided(lay.out_shape, lay.out_stride).copy_(o)
    # the module's switches are read per call (benchmarks and tests flip them), and so is
    # the dot precision, as torch's matmuls read it
    key = (needs, dout.stride(), dot_precision(q.dtype), _FUSE_DQ, _FUSE_DB,
           _FOLD_PRE_MAX_LOGITS, dest is not None)
    bw = lay.backward.get(key)
    if bw is None:
        bw = lay.backward[key] = _backward_plan(lay, *key)
    if bw.dout_copy:
        dout = dout.contiguous()
    interp = lay.interp

    dgate = None
    if gate is not None:  # (the kernels store it whether asked for or not)
        dgate = dest[3] if dest is not None else gate.new_empty_strided(lay.out_shape,
                                                                         lay.out_stride)
    if bw.pre is None:
        do, delta = dout, stats  # folded into the dK/dV kernel; delta: not read
    else:
        # 1. preprocess: gate gradient, gated dO, delta
        delta = stats.new_empty(lay.stats_shape[1:])  # [Z, H, NQ]
        do = (q.new_empty_strided(lay.out_shape, lay.out_stride) if gate is not None
              else dout)  # q's dtype
        _attention_bwd_preprocess_kernel[bw.pre.grid](
            dout, o, gate if gate is not None else o, do,
            dgate if dgate is not None else o, delta, *bw.pre.args, **bw.pre.kwargs)

    common = (
        q, k, v,
        mask_bias if mask_bias is not None else q,
        pair_bias if pair_bias is not None else q,
        do, stats, delta,
    )
    dq = dk = dv = dpb = None
    if bw.dkdv is not None:
        if dest is not None:
            dk, dv = dest[1], dest[2]
        else:
            dk, dv = k.new_empty_strided(*bw.dk), v.new_empty_strided(*bw.dv)
        buf, dqa, dba = _grad_accumulators(q, bw.acc)
        _launch(_attention_bwd_dkdv_kernel, _dkdv_tuned, bw.dkdv,
                (*common, dk, dv, dqa, dba, o, gate if gate is not None else o,
                 dgate if dgate is not None else o),
                interp)
        if dest is not None and bw.acc.dq is not None:
            # the fp32 sums converted into their place: rows of H * C, in the packed rows' order
            dq, rows = dest[0], dest[4]
            if rows is not None:
                hc = dq.shape[-3] * dq.shape[-1]
                _cast_rows(buf[:dq.numel()].view(-1, hc), rows[:, :hc], interp)
            else:
                dq.copy_(dqa)
            if bw.acc.db is not None:
                dpb = dba.reshape(pair_bias.shape).to(pair_bias.dtype)
        else:
            dq, dpb = _accumulated_grads(buf, dqa, dba, q, pair_bias, bw.acc)
    if bw.dq is not None:
        dq = dest[0] if dest is not None else q.new_empty_strided(*bw.dq_layout)
        _launch(_attention_bwd_dq_kernel, _dq_tuned, bw.dq, (*common, dq), interp)
    need_mb, need_pb = needs[3:5]
    full_tail = lay.tail[:3]
    dmb = _bias_grad(bw.plan, mask_bias, "mask_bias", common, bw.common_strides, bw.kwargs,
                     full_tail, lay.scale) if need_mb else None
    if need_pb and not bw.fuse_db:
        dpb = _bias_grad(bw.plan, pair_bias, "pair_bias", common, bw.common_strides,
                         bw.kwargs, full_tail, lay.scale)
    return dq, dk, dv, dmb, dpb, (dgate if needs[5] else None)


class _AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lay, q, k, v, mask_bias, pair_bias, gate):
        out, o, stats = _attention_forward(lay, q, k, v, mask_bias, pair_bias, gate)
        ctx.layout = lay
        ctx.save_for_backward(q, k, v, mask_bias, pair_bias, gate, o, stats)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, mask_bias, pair_bias, gate, o, stats = ctx.saved_tensors
        grads = _attention_backward(ctx.layout, (q, k, v, mask_bias, pair_bias, gate), o, stats,
                                    dout, ctx.needs_input_grad[1:])
        return (None, *grads)


class _PackedAttentionFunction(torch.autograd.Function):
    """``attention`` of the q, k, v (and gate) parts of one packed projection `y`; its gradient
    is one buffer laid out like `y`, which the backward kernels write part by part."""

    @staticmethod
    def forward(ctx, lay, pack, y, mask_bias, pair_bias):
        q, k, v, gate = _packed_views(y, *pack)
        out, o, stats = _attention_forward(lay, q, k, v, mask_bias, pair_bias, gate)
        ctx.layout, ctx.pack, ctx.y_stride = lay, pack, y.stride()
        ctx.save_for_backward(y, mask_bias, pair_bias, o, stats)
        return out

    @staticmethod
    def backward(ctx, dout):
        y, mask_bias, pair_bias, o, stats = ctx.saved_tensors
        if y.stride() != ctx.y_stride:  # (a saved-tensor hook gave it back in another layout)
            y = y.new_empty_strided(y.shape, ctx.y_stride).copy_(y)
        q, k, v, gate = _packed_views(y, *ctx.pack)
        need_y, need_mb, need_pb = ctx.needs_input_grad[2:]
        dy = dest = None
        if need_y:
            dy = torch.empty_like(y)  # y is dense: dy has its strides, the parts q's, k's, ...
            rows = dy.view(-1, dy.shape[-1]) if dy.is_contiguous() else None
            dest = (*_packed_views(dy, *ctx.pack), rows)
        needs = (need_y, need_y, need_y, need_mb, need_pb, need_y and gate is not None)
        grads = _attention_backward(ctx.layout, (q, k, v, mask_bias, pair_bias, gate), o, stats,
                                    dout, needs, dest)
        return None, None, dy, grads[3], grads[4]


class _Accumulators(NamedTuple):
    """Where the dK/dV kernel's fp32 atomic sums live: one zeroed buffer of `numel` elements
    holding dQ, laid out like q's gradient (``_grad_like``, so that the conversion to q's dtype
    is a plain copy), then the pair-bias gradient summed over the bias's broadcast dims. Each is
    a view (size, stride, offset) of the buffer, None where not asked for; with `one_copy` both
    are converted by one copy of the buffer, the bias gradient then viewed as `db_out`."""
    numel: int                   # 0: nothing accumulated, a placeholder stands in
    dq: Optional[tuple]
    dq_strides: Tuple[int, ...]  # the kernel's (s_z0, s_z1, s_h, s_q, s_c); 0s without dq
    db: Optional[tuple]
    db_strides: Tuple[int, ...]  # (s_z0, s_z1, s_h, s_q, s_k), 0 on the summed dims
    one_copy: bool
    db_out: Optional[tuple]


class _Backward(NamedTuple):
    """What a backward needs that depends only on the call's ``_Layout``, the gradients asked
    for, dout's strides and the switches (see ``_backward_plan``)."""
    plan: _Plan                    # the batch fold with dout
    dout_copy: bool                # dout's strides break the fold: it is copied contiguous
    pre: Optional[_Launch]         # the preprocess kernel; None where folded into dK/dV
    dkdv: Optional[_Launch]
    dk: Optional[tuple]            # (size, stride) of the dk / dv buffers (``_grad_like``)
    dv: Optional[tuple]
    acc: Optional[_Accumulators]
    fuse_db: bool                  # the pair-bias gradient comes from the dK/dV kernel
    dq: Optional[_Launch]          # dQ by its own kernel
    dq_layout: Optional[tuple]
    common_strides: tuple          # the strides of q, k, v, the biases and dO, for _bias_grad
    kwargs: dict                   # the constexprs every backward kernel takes


def _backward_plan(lay, needs, dout_stride, dot_prec, fuse_dq_on, fuse_db_on, fold_max,
                   packed=False):
    """The ``_Backward`` of a call: which kernels run (see the module docstring), their
    arguments less the tensors, and the layouts of the buffers, worked out on `lay`'s meta
    tensors once per key of ``_attention_backward``. `packed`: the gradients of q, k, v and
    the gate are written into given buffers laid out like those inputs (``attention_packed``);
    the preprocess is then never folded (its folded form stores the gate gradient laid out
    like the output)."""
    q, k, v, mask_bias, pair_bias, gate = lay.inputs
    H, NQ, NK, C, CP = lay.tail
    need_q, need_k, need_v, need_mb, need_pb, _ = needs
    Z = lay.plan.Z0 * lay.plan.Z1
    interp = lay.interp

    # dout may come with any strides (e.g. expanded from a sum): fold it together with the
    # inputs; if that changes the fold, a contiguous copy folds like `out` always does.
    dout = torch.empty_strided(lay.out_shape, dout_stride, dtype=lay.out_dtype, device="meta")
    plan, dout_copy = lay.plan, False
    if tuple(dout_stride) == lay.out_stride:  # the usual case: it folds like `out`
        dout_s = plan.strides["out"]
    else:
        tensors = dict(q=q, k=k, v=v, gate=gate, mask_bias=mask_bias, pair_bias=pair_bias)
        plan = _make_plan(lay.batch, (H, NQ, NK, C), lay.out_stride, dout=dout, **tensors)
        if plan is None or (plan.Z0, plan.Z1) != (lay.plan.Z0, lay.plan.Z1):
            dout_copy = True
            plan = _make_plan(lay.batch, (H, NQ, NK, C), lay.out_stride,
                              dout=dout.contiguous(), **tensors)
        dout_s = plan.strides["dout"]
    st = plan.strides

    run_dkdv = need_k or need_v
    fuse_dq = need_q and run_dkdv and fuse_dq_on
    # the pair-bias gradient with atomics inside the dK/dV kernel (unless constant along K:
    # then it is zero, see _bias_grad)
    fuse_db = need_pb and run_dkdv and fuse_db_on and not _const_along_k(pair_bias, NK)
    # the preprocess is folded into the dK/dV kernel when no other kernel needs dO / delta
    fold = (run_dkdv and not (need_q and not fuse_dq)
            and not (need_mb and not _const_along_k(mask_bias, NK))
            and not (need_pb and not fuse_db and not _const_along_k(pair_bias, NK))
            and Z * H * NQ * NK <= fold_max and not packed)

    o_s = st["out"]  # o and dgate: laid out as out
    g_s = st["gate"]
    pre = None
    if fold:
        do_s = dout_s
    else:
        # 1. preprocess: gate gradient, gated dO (q's dtype, laid out as out), delta
        do_s = st["out"] if gate is not None else dout_s
        block = 32 if interp else 64
        pre = _Launch((triton.cdiv(NQ, block) * Z * H,),
                      (*dout_s, *o_s, *g_s, *do_s,
                       *((g_s if packed else o_s) if gate is not None else (0,) * 5),
                       plan.Z1, H, NQ),
                      dict(C=C, CP=CP, HAS_GATE=gate is not None, INTERP=interp, BLOCK_M=block,
                           num_warps=4))

    common_strides = (*st["q"], *st["k"], *st["v"], *st["mask_bias"], *st["pair_bias"], *do_s)
    kwargs = dict(C=C, CP=CP, **_bias_flags(mask_bias, pair_bias), DOT_PREC=dot_prec,
                  INTERP=interp)
    tail = (plan.Z1, H, NQ, NK, Z * H * NQ, next_power_of_2(NQ),  # Z * H * NQ: stats.stride(0)
            next_power_of_2(NK), lay.scale)

    dkdv = dk = dv = acc = None
    if run_dkdv:
        gk, gv = (k, v) if packed else (_grad_like(k), _grad_like(v))
        dk, dv = (tuple(gk.shape), gk.stride()), (tuple(gv.shape), gv.stride())
        acc = _accumulator_layout(plan, q, pair_bias, fuse_dq, fuse_db, (H, NQ, NK),
                                  (lay.out_shape, lay.out_stride) if packed else None)
        dkdv = _Launch(lambda m: (triton.cdiv(NK, m["BLOCK_N"]) * Z * H,),
                       (*common_strides, *_grad_strides(plan, gk, k, "k"),
                        *_grad_strides(plan, gv, v, "v"), *acc.db_strides, *acc.dq_strides,
                        *o_s, *g_s, *tail),
                       dict(kwargs, FUSE_DQ=fuse_dq, FUSE_DB=fuse_db, FOLD_PRE=fold,
                            HAS_GATE=fold and gate is not None))  # read only with FOLD_PRE
    dq = dq_layout = None
    if need_q and not fuse_dq:
        g = q if packed else _grad_like(q)
        dq = _Launch(lambda m: (triton.cdiv(NQ, m["BLOCK_M"]) * Z * H,),
                     (*common_strides, *_grad_strides(plan, g, q, "q"), *tail), kwargs)
        dq_layout = (tuple(g.shape), g.stride())
    return _Backward(plan, dout_copy, pre, dkdv, dk, dv, acc, fuse_db, dq, dq_layout,
                     common_strides, kwargs)


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


def _grad_strides(plan: _Plan, g: torch.Tensor, t: torch.Tensor, name: str) -> Tuple[int, ...]:
    """The kernels' strides of `g`, the gradient buffer (``_grad_like``) of input `name` `t`."""
    if g.stride() == t.stride():
        return plan.strides[name]  # laid out like t: folded like t
    return _contig_strides(plan, g, _QKV)


def _grad_like(t: torch.Tensor, buf: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Gradient buffer for q/k/v (or a view of the flat `buf`, in its dtype), laid out like `t`
    where `t` is a permuted dense tensor (OpenFold's q/k/v are [*, Q, H, C] buffers seen as
    [*, H, Q, C], and the column attention's an [*, S, N, H, C] buffer seen as [*, N, H, S, C]:
    the Linear backward that follows needs no copy). Otherwise batch dims contiguous and the
    [H, Q, C] block laid out like `t`'s."""
    if _dense(t):
        return (torch.empty_like(t) if buf is None
                else buf.as_strided(t.shape, t.stride(), buf.storage_offset()))
    shape = t.shape
    transposed = t.stride(-3) < t.stride(-2)
    if transposed:
        shape = (*shape[:-3], shape[-2], shape[-3], shape[-1])
    g = t.new_empty(shape) if buf is None else buf.view(shape)
    return g.transpose(-2, -3) if transposed else g


def _const_along_k(bias: Optional[torch.Tensor], NK: int) -> bool:
    """A bias constant along K shifts each softmax row by a constant: its gradient is zero."""
    return bias is not None and NK > 1 and (bias.shape[-1] == 1 or bias.stride(-1) == 0)


def _accumulator_layout(plan, q, bias, fuse_dq, fuse_db, full_tail,
                        out_layout=None) -> _Accumulators:
    """The ``_Accumulators`` for meta tensors `q` and `bias` (the pair bias). With `out_layout`
    (``attention_packed``: dq has its own place in the packed gradient), dQ is summed laid out
    as the output (size, stride of [*, Q, H, C]: rows of H * C in the packed projection's row
    order, since the output follows the gate's memory order, or without a gate q's; one pass
    of ``_cast_rows`` converts it into place) and never converted together with the bias
    gradient."""
    n_dq = q.numel() if fuse_dq else 0
    db_dims, db_flags = _bias_grad_dims(plan, "pair_bias", full_tail) if fuse_db else ((), ())
    n_db = math.prod(db_dims) if fuse_db else 0
    buf = torch.empty(n_dq + n_db, dtype=torch.float32, device="meta")

    def view(t):
        return tuple(t.shape), t.stride(), t.storage_offset()

    dq = db = db_out = None
    dq_s, db_s = (0,) * 5, (0,) * 5
    if fuse_dq and out_layout is not None:
        dqa = buf[:n_dq].as_strided(*out_layout).transpose(-2, -3)
        dq, dq_s = view(dqa), plan.strides["out"]  # (z0, z1, h, row, c), as q's
    elif fuse_dq:
        dqa = _grad_like(q, buf[:n_dq])
        dq, dq_s = view(dqa), _grad_strides(plan, dqa, q, "q")
    if fuse_db:
        dba = buf[n_dq:].view(db_dims)
        db = view(dba)
        db_s = tuple(0 if f else s for s, f in zip(dba.stride(), (*db_flags, False), strict=True))
    one_copy = (out_layout is None and fuse_dq and fuse_db
                and q.dtype == bias.dtype != torch.float32)
    if one_copy:
        db_out = view(buf[n_dq:].view(bias.shape))
    return _Accumulators(n_dq + n_db, dq, dq_s, db, db_s, one_copy, db_out)


def _grad_accumulators(q, acc: _Accumulators):
    """The buffer of `acc` zeroed, and its dQ and pair-bias-gradient views (the buffer itself
    stands in for one not asked for, a tiny placeholder for both)."""
    if acc.numel == 0:
        dummy = q.new_empty(1, dtype=torch.float32)
        return dummy, dummy, dummy
    buf = torch.zeros(acc.numel, device=q.device, dtype=torch.float32)
    dqa = buf if acc.dq is None else buf.as_strided(*acc.dq)
    dba = buf if acc.db is None else buf.as_strided(*acc.db)
    return buf, dqa, dba


def _accumulated_grads(buf, dqa, dba, q, bias, acc: _Accumulators):
    """dq and the pair-bias gradient from ``_grad_accumulators``' fp32 sums, in their inputs'
    dtypes: no conversion in fp32, one for both when they share a low-precision dtype (views of
    the converted buffer keep the accumulators' layouts), else one each."""
    if acc.one_copy:
        buf = buf.to(q.dtype)
        return buf.as_strided(*acc.dq), buf.as_strided(*acc.db_out)
    dq = dqa.to(q.dtype) if acc.dq is not None else None
    dpb = dba.reshape(bias.shape).to(bias.dtype) if acc.db is not None else None
    return dq, dpb


def _bias_grad_dims(plan, name, full_tail):
    """The dims of a bias gradient summed over the bias's broadcast dims, [Z0, Z1, H, Q, K] with
    1 on those dims, and the flags (z0, z1, h, q) of the summed dims."""
    H, NQ, NK = full_tail
    s0, s1, sh, sq, _ = plan.strides[name]
    flags = (plan.Z0 > 1 and s0 == 0, plan.Z1 > 1 and s1 == 0, H > 1 and sh == 0,
             NQ > 1 and sq == 0)
    dims = tuple(1 if f else n for n, f in zip((plan.Z0, plan.Z1, H, NQ), flags, strict=True))
    return (*dims, NK), flags


def _bias_grad(plan, bias, name, common, common_strides, kwargs, full_tail, scale):
    """Gradient of one bias, summed over its broadcast dims inside the kernel."""
    H, NQ, NK = full_tail
    if _const_along_k(bias, NK):
        # constant along K: a per-row shift of the logits, which the softmax ignores
        return torch.zeros_like(bias)
    dims, flags = _bias_grad_dims(plan, name, full_tail)
    red = dict(zip(("RED_Z0", "RED_Z1", "RED_H", "RED_Q"), flags, strict=True))
    interp = kwargs["INTERP"]
    if interp:
        bm, bn = _INTERP_BLOCK_M, _INTERP_BLOCK_N
    else:
        bm, bn = _DBIAS_BLOCK_M, _DBIAS_BLOCK_N
    n_qb, n_kb = triton.cdiv(NQ, bm), triton.cdiv(NK, bn)
    owned = [plan.Z0, plan.Z1, H, n_qb]
    tiles = n_kb * math.prod(n for n, f in zip(owned, flags, strict=True) if not f)
    reduce_len = math.prod(n for n, f in zip(owned, flags, strict=True) if f)
    split = max(1, min(reduce_len, triton.cdiv(_target_programs(bias.device), tiles)))
    r_per = triton.cdiv(reduce_len, split)
    split = triton.cdiv(reduce_len, r_per)
    buf = torch.empty((split, *dims), device=bias.device, dtype=torch.float32)
    sb = list(buf.stride())
    for i, f in enumerate(flags):
        if f:
            sb[1 + i] = 0
    grid = (tiles * split,)
    stats = common[6]
    args = (*common, buf, *common_strides, *sb, plan.Z0, plan.Z1, H, NQ, NK, stats.stride(0),
            next_power_of_2(NQ), next_power_of_2(NK), r_per, scale)
    kw = dict(kwargs, **red)
    if interp:
        _attention_bwd_dbias_kernel[grid](*args, **kw, BLOCK_M=bm, BLOCK_N=bn, num_warps=4)
    else:
        _dbias_tuned[grid](*args, **kw, BLOCK_M=bm, BLOCK_N=bn)
    g = buf.sum(0) if split > 1 else buf[0]
    return g.reshape(bias.shape).to(bias.dtype)


# --------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------
def _logit_scale(q_div: Optional[float]) -> float:
    """The factor on q @ k^T for the caller's divisor of q (None: 1)."""
    if q_div is not None and not (math.isfinite(q_div) and q_div > 0):
        raise ValueError(f"q_div must be a positive finite number, got {q_div}")
    return 1.0 if q_div is None else 1.0 / q_div


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_bias: Optional[torch.Tensor] = None,
    pair_bias: Optional[torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
    q_div: Optional[float] = None,
) -> torch.Tensor:
    """Flash-style ``attention_reference`` (see the module docstring for the contract).

    Args:
        q: [*, H, Q, C] queries (scaled by 1/sqrt(C), or divided here: `q_div`); any strides
        k, v: [*, H, K, C]
        mask_bias, pair_bias: broadcast to [*, H, Q, K] (stride 0 on broadcast dims is fine);
            their gradients are summed over the broadcast dims
        gate: [*, Q, H, C] gate logits; the output is multiplied by sigmoid(gate)
        q_div: q's divisor (OpenFold's sqrt(C)), None for 1. The kernels apply 1 / q_div to
            the fp32 logits q @ k^T (and to dQ, dK), instead of rounding q / q_div first
    Returns:
        [*, Q, H, C] in q's dtype (promoted with gate's)
    """
    scale = _logit_scale(q_div)
    ac = autocast_dtype(q.device.type)
    if ac is not None and q.dtype == torch.float32:
        q, k, v = q.to(ac), k.to(ac), v.to(ac)  # as torch.matmul does under autocast
    mask_bias, pair_bias = _bias_view(mask_bias), _bias_view(pair_bias)
    inputs = (q, k, v, mask_bias, pair_bias, gate)
    # the ungated output is kept for the backward only when one will run
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    lay = _layout(tuple(None if t is None else (t.shape, t.stride(), t.dtype, t.device)
                        for t in inputs),
                  needs_grad, is_interpreter(), dot_precision(q.dtype), scale)
    if lay.expand is not None:
        # an expand that changes nothing would still add a node to the autograd graph: skipped
        q, k, v, gate = (t if shape is None else t.expand(shape)
                         for t, shape in zip((q, k, v, gate), lay.expand, strict=True))
    if lay.empty:
        return attention_reference(q, k, v, mask_bias, pair_bias, gate, q_div)
    if lay.plan is None:
        # More than two batch dims that no stride merge folds: loop over the first one.
        n_batch = len(lay.batch)
        return torch.stack([
            attention(*(_select(t, i, n_batch) for t in (q, k, v, mask_bias, pair_bias, gate)),
                      q_div=q_div)
            for i in range(lay.batch[0])
        ])
    return _AttentionFunction.apply(lay, q, k, v, mask_bias, pair_bias, gate)


def _packed_views(y: torch.Tensor, heads: int, gated: bool, columns: bool) -> tuple:
    """(q, k, v, gate or None): views of the packed projection y [*, Q, P], P = n * heads * C
    (q, k, v, then the gate; n = 4 gated, 3 not). q, k, v as [*, H, Q, C], the gate [*, Q, H, C];
    with `columns`, y is [*, Q, B, P] and the attention runs along Q for each b: q, k, v as
    [*, B, H, Q, C], the gate [*, B, Q, H, C]."""
    n = 4 if gated else 3
    if y.shape[-1] % (n * heads) != 0:
        raise ValueError(f"attention_packed: the last dim of y {tuple(y.shape)} is not "
                         f"{n} parts (q, k, v{', gate' if gated else ''}) of {heads} heads")
    if columns and y.dim() < 3:
        raise ValueError(f"attention_packed: columns needs y [*, Q, B, P], got {tuple(y.shape)}")
    parts = y.unflatten(-1, (n, heads, -1)).unbind(-3)  # each [*, Q, H, C]
    if columns:  # [*, Q, B, H, C] -> [*, B, H, Q, C]; the gate [*, B, Q, H, C]
        qkv = tuple(t.movedim(-4, -2) for t in parts[:3])
        gate = parts[3].transpose(-3, -4) if gated else None
    else:
        qkv = tuple(t.transpose(-2, -3) for t in parts[:3])
        gate = parts[3] if gated else None
    return (*qkv, gate)


def attention_packed_reference(y: torch.Tensor, heads: int,
                               mask_bias: Optional[torch.Tensor] = None,
                               pair_bias: Optional[torch.Tensor] = None,
                               q_div: Optional[float] = None, gated: bool = True,
                               columns: bool = False) -> torch.Tensor:
    """``attention_reference`` of the parts of y (see ``attention_packed``)."""
    q, k, v, gate = _packed_views(y, heads, gated, columns)
    return attention_reference(q, k, v, mask_bias, pair_bias, gate, q_div)


def attention_packed(y: torch.Tensor, heads: int, mask_bias: Optional[torch.Tensor] = None,
                     pair_bias: Optional[torch.Tensor] = None, q_div: Optional[float] = None,
                     gated: bool = True, columns: bool = False) -> torch.Tensor:
    """Self-attention on one packed projection: ``attention(q, k, v, ..., gate)`` where q, k,
    v and the gate are the parts of y [*, Q, P] along its last dim (P = 4 * heads * C, or 3
    parts without the gate), each [*, Q, heads * C] as a Linear hands them out.

    One Linear with the four weights stacked makes y (``linear_packed``): one GEMM reads the
    input once, and its backward is one GEMM over y's gradient, which the kernels here write
    part by part into one buffer laid out like y (``attention`` would hand back four gradients,
    which autograd would copy into one). With `columns`, y is [*, Q, B, P] and the attention
    runs along Q for each b (the MSA column attention on the MSA as it lies). The output is
    ``attention``'s for those views: [*, Q, H, C] ([*, B, Q, H, C] with `columns`), laid out in
    the gate's memory order ([*, Q, B, H, C] rows with `columns`). Under autocast an fp32 y is
    rounded to the autocast dtype (what the Linears would have handed out)."""
    ac = autocast_dtype(y.device.type)
    if ac is not None and y.dtype == torch.float32:
        y = y.to(ac)
    if not _dense(y):
        y = y.contiguous()  # (the gradient buffer is laid out like y: no gaps, no overlaps)
    q, k, v, gate = _packed_views(y, heads, gated, columns)
    scale = _logit_scale(q_div)
    mask_bias, pair_bias = _bias_view(mask_bias), _bias_view(pair_bias)
    inputs = (q, k, v, mask_bias, pair_bias, gate)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (y, mask_bias, pair_bias))
    lay = _layout(tuple(None if t is None else (t.shape, t.stride(), t.dtype, t.device)
                        for t in inputs),
                  needs_grad, is_interpreter(), dot_precision(q.dtype), scale)
    if lay.expand is not None or lay.empty or lay.plan is None:
        # (biases with batch dims y lacks, empty or unfoldable shapes: the views as they are)
        return attention(q, k, v, mask_bias, pair_bias, gate, q_div)
    return _PackedAttentionFunction.apply(lay, (heads, gated, columns), y, mask_bias,
                                          pair_bias)


class _Layout(NamedTuple):
    """What a call needs that depends only on its inputs' layouts (see ``_layout``)."""
    batch: Tuple[int, ...]   # the broadcast batch dims
    expand: Optional[tuple]  # per q, k, v, gate: the shape to expand it to or None (all: None)
    empty: bool              # no query, key, head or channel: the reference computes it
    plan: Optional[_Plan]    # None: more than two batch dims that no stride merge folds
    # the rest only with a plan
    inputs: Optional[tuple] = None   # meta q, k, v, mask_bias, pair_bias, gate (expanded)
    tail: Optional[tuple] = None     # (H, NQ, NK, C, CP)
    out_shape: Optional[tuple] = None
    out_stride: Optional[tuple] = None  # the gate's, if a permuted dense tensor; else contiguous
    out_dtype: Optional[torch.dtype] = None
    store_o: bool = False            # the fp32 ungated output is stored for the backward
    stats_shape: Optional[tuple] = None
    interp: bool = False
    scale: float = 1.0               # the logits' factor on q @ k^T (1 / the caller's q_div)
    fwd: Optional[_Launch] = None
    backward: Optional[dict] = None  # ``_AttentionFunction.backward``'s key -> _Backward


@functools.lru_cache(maxsize=64)
def _layout(key, needs_grad: bool, interp: bool, dot_prec: str, scale: float = 1.0) -> _Layout:
    """The ``_Layout`` of inputs with `key` = ((shape, strides, dtype, device) or None per q,
    k, v, mask_bias, pair_bias, gate), for a call that may (`needs_grad`) run a backward or not,
    under the interpreter (`interp`) or not, with dot precision `dot_prec` (``dot_precision``)
    and the factor `scale` on q @ k^T,
    worked out on meta tensors of that layout once: a model calls the same few layouts every
    step, and the checks, broadcasts, batch fold, buffer shapes and launch arguments took about
    half the Python time of a small fwd+bwd. (The backward's share is cached in its
    ``backward`` dict, see ``_backward_plan``.) Keyed on layouts, dtypes and devices only, never
    on data (each launch reads the data pointers afresh). Raises on inputs that do not fit
    (nothing is cached then)."""
    q, k, v, mask_bias, pair_bias, gate = (
        None if ss is None else torch.empty_strided(ss[0], ss[1], dtype=ss[2], device="meta")
        for ss in key)
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
    check_devices(*(ss[3] for ss in key if ss is not None))
    H, NQ, NK = q.shape[-3], q.shape[-2], k.shape[-2]
    lead = [q.shape[:-3], k.shape[:-3], v.shape[:-3]]
    lead += [b.shape[:-3] for b in (mask_bias, pair_bias, gate) if b is not None]
    try:
        batch = broadcast_shapes(*lead)
    except ValueError:
        raise ValueError(f"the batch dims of q, k, v and the biases / gate, {[tuple(t) for t in lead]}, "
                         f"do not broadcast (q {tuple(q.shape)}, k {tuple(k.shape)})") from None
    # expand also checks the head and channel dims (or broadcasts size-1 ones)
    targets = [(*batch, H, NQ, C), (*batch, H, NK, C), (*batch, H, NK, C), (*batch, NQ, H, C)]
    expand = tuple(None if t is None or t.shape == shape else shape
                   for t, shape in zip((q, k, v, gate), targets, strict=True))
    q, k, v, gate = (t if shape is None else t.expand(shape)
                     for t, shape in zip((q, k, v, gate), expand, strict=True))
    if expand == (None,) * 4:
        expand = None
    for name, b in (("mask_bias", mask_bias), ("pair_bias", pair_bias)):
        if b is not None:
            try:
                broadcast_shapes(b.shape, (*batch, H, NQ, NK))
            except ValueError:
                raise ValueError(f"{name} {tuple(b.shape)} does not broadcast to the logits "
                                 f"[*, H, Q, K] = {(*batch, H, NQ, NK)}") from None
    if q.numel() == 0 or NK == 0:
        return _Layout(batch, expand, True, None)
    # the output laid out like the gate where it is a permuted dense tensor, dense in the
    # gate's memory order where it is a view with gaps (one part of ``attention_packed``'s
    # projections), without a gate dense in q's memory order where q is such a view; else
    # batch-contiguous (an expanded gate or q, a dense q without a gate)
    if _dense(gate):
        out_stride = gate.stride()
    elif gate is not None:
        out_stride = _dense_in_order(gate)
    else:
        out_stride = None if _dense(q) else _dense_in_order(q.transpose(-2, -3))
    out_stride = out_stride or contiguous_strides((*batch, NQ, H, C))
    plan = _make_plan(batch, (H, NQ, NK, C), tuple(out_stride), q=q, k=k, v=v, gate=gate,
                      mask_bias=mask_bias, pair_bias=pair_bias)
    if plan is None:
        return _Layout(batch, expand, False, None)

    CP = max(16, next_power_of_2(C))
    Z = plan.Z0 * plan.Z1
    store_o = gate is not None and needs_grad
    st = plan.strides
    fwd = _Launch(lambda m: (triton.cdiv(NQ, m["BLOCK_M"]) * Z * H,),
                  (*st["q"], *st["k"], *st["v"], *st["mask_bias"], *st["pair_bias"], *st["gate"],
                   *st["out"],
                   plan.Z1, H, NQ, NK, Z * H * NQ,  # Z * H * NQ: stats.stride(0)
                   next_power_of_2(NQ), next_power_of_2(NK), scale),
                  dict(C=C, CP=CP, **_bias_flags(mask_bias, pair_bias), HAS_GATE=gate is not None,
                       STORE_O=store_o, DOT_PREC=dot_prec, INTERP=interp))
    return _Layout(
        batch, expand, False, plan,
        inputs=(q, k, v, mask_bias, pair_bias, gate),
        tail=(H, NQ, NK, C, CP),
        out_shape=(*batch, NQ, H, C),
        out_stride=tuple(out_stride),
        out_dtype=q.dtype if gate is None else torch.promote_types(q.dtype, gate.dtype),
        store_o=store_o,
        stats_shape=(2, Z, H, NQ),
        interp=interp,
        scale=scale,
        fwd=fwd,
        backward={},
    )


def _relayout(lay: _Layout, saved: tuple) -> _Layout:
    """The ``_Layout`` of the backward's inputs `saved` (q, k, v, mask_bias, pair_bias, gate:
    the forward's, already expanded) in the strides they came back with, for the forward `lay`."""
    new = _layout(tuple(None if t is None else (t.shape, t.stride(), t.dtype, t.device)
                        for t in saved),
                  True, lay.interp, dot_precision(saved[0].dtype), lay.scale)
    if new.plan is None or new.expand is not None or new.out_shape != lay.out_shape:
        raise RuntimeError("attention backward: the saved inputs came back in layouts it cannot "
                           "read (from a saved-tensor hook?); make the hook return them with "
                           "their original strides, or dense")
    return new


def _select(t: Optional[torch.Tensor], i: int, n_batch: int) -> Optional[torch.Tensor]:
    """Entry i of the first batch dim (entry 0 where `t` is broadcast along it)."""
    if t is None:
        return None
    t = t.view((1,) * (n_batch + 3 - t.dim()) + tuple(t.shape))
    return t[i if t.shape[0] > 1 else 0]
