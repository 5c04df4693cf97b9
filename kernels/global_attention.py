"""OpenFold's ``GlobalAttention.forward`` (non-LMA): the extra-MSA stack's column attention.

On the already layer-normed, column-major m [*, N_res, N_seq, C] with mask [*, N_res, N_seq]
(one "row" r below = one (batch, residue) pair; s runs over N_seq; H heads of width D):

    q_bar = sum_s mask_s m_s / (sum_s mask_s + eps)                    [*, N_res, C]
    q     = (q_bar Wq^T) D^-1/2,  viewed [H, D];   k_s = Wk m_s,  v_s = Wv m_s   [D]
    a     = softmax_s(q_h . k_s + inf (mask_s - 1))                     [*, N_res, H, N_seq]
    o_h   = sum_s a_hs v_s                                              [*, N_res, H, D]
    g_s   = sigmoid(Wg m_s + bg)                                        [*, N_res, N_seq, H*D]
    out_s = Wo (g_s * o) + bo                                           [*, N_res, N_seq, C]

k and v are shared by the heads and enter only through dot products with m, so the Triton path
never forms them: with Qk_h = Wk^T q_h [C], the logits are m_s . Qk_h, and o_h = Wv a_bar_h
with a_bar_h = sum_s a_hs m_s [C]. Forward: three passes over m, each a Triton kernel:
  1. the masked mean (fp32 partial sums over N_seq splits);
  2. the attention, an online softmax over N_seq splits producing a_bar_h per head
     (flash-decoding style partials, combined in torch);
  3. the gated output: g, g * o and the Wo projection fused per [BLOCK_S, C] tile, so neither
     g nor g * o is written.
The per-row work between passes ([*, N_res, C]-sized: Wq, Wk, Wv products, the combine) is torch.
Backward (the softmax statistics, q_bar, a_bar and o are kept: all [*, N_res, H, C] or smaller):
  1. one Triton pass over m and d_out: recomputes g, writes g * o and the gate's pre-activation
     gradient (for the Wo / Wg gradients, cuBLAS) and partial sums of d_o;
  2. one Triton pass over m: the softmax backward's sum_s dlogits_hs m_s (-> dWk, dWq, d q_bar);
  3. one Triton pass writing d_m: all four paths (gate, logits, attention weights, mean).

Precision contract: the compute dtype is the autocast dtype under autocast, else m's dtype. Tile
dots run on operands rounded to the compute dtype (m, the small per-row vectors, weights,
softmax weights) with fp32 accumulation (fp32: IEEE unless
``torch.backends.cuda.matmul.allow_tf32``); the mean, logits + mask bias, softmax, sigmoid,
gating and every reduction are fp32; the per-row products (Wq, Wk, Wv) are fp32. The output is
in the compute dtype (as OpenFold's linear_o). Stock OpenFold rounds q, k, v, the logits, the
softmax weights, g and g * o to the compute dtype in between, so this path is at least as
accurate. Masked logits: stock adds inf * (mask - 1) in the logits' dtype (fp16: -inf, a fully
masked column then gives NaN); here it is added in fp32, where a fully masked column gives
uniform weights as in stock fp32/bf16. Gradients: d_m in m's dtype; weight gradients in each
weight's dtype (Wo and Wg from cuBLAS GEMMs in the compute dtype, the rest fp32); the mask gets
no gradient. Sizes: C and H*D up to 128 (the fused tiles hold Wg and Wo in registers); larger
sizes take the reference path (explicit branch).
"""
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ._triton_utils import (
    autocast_dtype,
    check_launchable,
    dot_precision,
    is_interpreter,
    max_programs,
    next_power_of_2,
)
from .softmax import softmax_reference

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_MAX_TILE_DIM = 128  # C and H*D held whole in one tile


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
# Every tile dot: operands rounded to DOT_DTYPE (the compute dtype), multiplied as OP_DTYPE
# (DOT_DTYPE itself, except fp32 for bf16 under Triton's CPU interpreter, which mis-multiplies
# bf16: products of bf16 values are exact in fp32, so the numbers are the GPU's), fp32 accumulation.
# Logits are floored here, as in attention.py (its _LOGIT_FLOOR says why): with the -1e9 mask
# bias a column whose every sequence is masked (padding) has logits where one fp32 ulp is 64,
# and the forward and backward kernels' differently rounded copies would disagree by up to e^64.
_LOGIT_FLOOR = tl.constexpr(-1048576.0)


@triton.jit
def _floored(lg):
    return tl.maximum(lg, _LOGIT_FLOOR)


@triton.jit
def _ga_mean_kernel(
    M, MASK, SUM_PART, DEN_PART,
    S, C, stride_mr, stride_ms, stride_kr, s_per_split,
    BLOCK_S: tl.constexpr, CP: tl.constexpr,
):
    """Partial sums over one N_seq split: sum_s mask_s m_s [C] and sum_s mask_s."""
    r = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1)
    n_split = tl.num_programs(1)
    offs_c = tl.arange(0, CP)
    c_ok = offs_c < C
    acc = tl.zeros((CP,), dtype=tl.float32)
    den = tl.zeros((BLOCK_S,), dtype=tl.float32)
    for i in range(0, s_per_split, BLOCK_S):
        offs_s = sp * s_per_split + i + tl.arange(0, BLOCK_S)
        s_ok = offs_s < S
        mt = tl.load(M + r * stride_mr + offs_s[:, None] * stride_ms + offs_c[None, :],
                     mask=s_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        mu = tl.load(MASK + r * stride_kr + offs_s, mask=s_ok, other=0.0).to(tl.float32)
        acc += tl.sum(mt * mu[:, None], axis=0)
        den += mu
    tl.store(SUM_PART + (r * n_split + sp) * C + offs_c, acc, mask=c_ok)
    tl.store(DEN_PART + r * n_split + sp, tl.sum(den, axis=0))


@triton.jit
def _ga_attn_fwd_kernel(
    M, MASK, QK, MX_PART, L_PART, ACC_PART,
    S, C, H, stride_mr, stride_ms, stride_kr, s_per_split, inf,
    BLOCK_S: tl.constexpr, CP: tl.constexpr, HP: tl.constexpr,
    DOT_DTYPE: tl.constexpr, OP_DTYPE: tl.constexpr, PREC: tl.constexpr,
):
    """Online softmax over one N_seq split: running max, sum and sum_s p_hs m_s per head."""
    r = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1)
    n_split = tl.num_programs(1)
    offs_c = tl.arange(0, CP)
    offs_h = tl.arange(0, HP)
    c_ok = offs_c < C
    h_ok = offs_h < H
    qkT = tl.load(QK + r * H * C + offs_h[None, :] * C + offs_c[:, None],
                  mask=c_ok[:, None] & h_ok[None, :], other=0.0)  # [CP, HP]
    qkT = qkT.to(DOT_DTYPE).to(OP_DTYPE)
    m_i = tl.full((HP,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((HP,), dtype=tl.float32)
    acc = tl.zeros((HP, CP), dtype=tl.float32)
    for i in range(0, s_per_split, BLOCK_S):
        offs_s = sp * s_per_split + i + tl.arange(0, BLOCK_S)
        s_ok = offs_s < S
        mt = tl.load(M + r * stride_mr + offs_s[:, None] * stride_ms + offs_c[None, :],
                     mask=s_ok[:, None] & c_ok[None, :], other=0.0).to(DOT_DTYPE).to(OP_DTYPE)
        mu = tl.load(MASK + r * stride_kr + offs_s, mask=s_ok, other=0.0).to(tl.float32)
        lg = _floored(tl.dot(mt, qkT, input_precision=PREC) + (inf * (mu - 1.0))[:, None])
        lg = tl.where(s_ok[:, None], lg, float("-inf"))  # [BLOCK_S, HP]
        m_new = tl.maximum(m_i, tl.max(lg, axis=0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a tile wholly past N_seq
        alpha = tl.exp(m_i - m_use)
        p = tl.exp(lg - m_use[None, :])
        l_i = l_i * alpha + tl.sum(p, axis=0)
        pT = tl.trans(p).to(DOT_DTYPE).to(OP_DTYPE)
        acc = acc * alpha[:, None] + tl.dot(pT, mt, input_precision=PREC)
        m_i = m_new
    base = r * n_split + sp
    tl.store(MX_PART + base * H + offs_h, m_i, mask=h_ok)
    tl.store(L_PART + base * H + offs_h, l_i, mask=h_ok)
    tl.store(ACC_PART + base * H * C + offs_h[:, None] * C + offs_c[None, :], acc,
             mask=h_ok[:, None] & c_ok[None, :])


@triton.jit
def _ga_out_fwd_kernel(
    M, O_ROWS, WG, BG, WO, BO, OUT,
    S, C, HD, stride_mr, stride_ms,
    BLOCK_S: tl.constexpr, CP: tl.constexpr, HDP: tl.constexpr,
    DOT_DTYPE: tl.constexpr, OP_DTYPE: tl.constexpr, PREC: tl.constexpr,
):
    """out_s = Wo (sigmoid(Wg m_s + bg) * o) + bo for a [BLOCK_S, C] tile of one row r."""
    r = tl.program_id(0).to(tl.int64)
    offs_s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_c = tl.arange(0, CP)
    offs_j = tl.arange(0, HDP)
    s_ok = offs_s < S
    c_ok = offs_c < C
    j_ok = offs_j < HD
    cj_ok = c_ok[:, None] & j_ok[None, :]
    mt = tl.load(M + r * stride_mr + offs_s[:, None] * stride_ms + offs_c[None, :],
                 mask=s_ok[:, None] & c_ok[None, :], other=0.0).to(DOT_DTYPE).to(OP_DTYPE)
    wgT = tl.load(WG + offs_j[None, :] * C + offs_c[:, None], mask=cj_ok, other=0.0).to(OP_DTYPE)
    bg = tl.load(BG + offs_j, mask=j_ok, other=0.0).to(tl.float32)
    g = tl.sigmoid(tl.dot(mt, wgT, input_precision=PREC) + bg[None, :])  # [BLOCK_S, HDP]
    o = tl.load(O_ROWS + r * HD + offs_j, mask=j_ok, other=0.0)
    y = (g * o[None, :]).to(DOT_DTYPE).to(OP_DTYPE)
    woT = tl.load(WO + offs_c[None, :] * HD + offs_j[:, None], mask=j_ok[:, None] & c_ok[None, :], other=0.0).to(OP_DTYPE)
    bo = tl.load(BO + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    out = tl.dot(y, woT, input_precision=PREC) + bo[None, :]
    tl.store(OUT + (r * S + offs_s[:, None]) * C + offs_c[None, :], out.to(OUT.dtype.element_ty),
             mask=s_ok[:, None] & c_ok[None, :])


@triton.jit
def _ga_out_bwd_kernel(
    M, O_ROWS, WG, BG, WO, DOUT, Y, DGPRE, DO_PART,
    S, C, HD, stride_mr, stride_ms,
    BLOCK_S: tl.constexpr, CP: tl.constexpr, HDP: tl.constexpr,
    DOT_DTYPE: tl.constexpr, OP_DTYPE: tl.constexpr, PREC: tl.constexpr,
):
    """Gated output backward for a tile: Y = g * o, DGPRE = dy * o * g (1 - g), partial d_o.

    dy = d_out Wo; d_o = sum_s dy_s * g_s (this tile's part, reduced by the caller).
    """
    r = tl.program_id(0).to(tl.int64)
    st = tl.program_id(1)
    offs_s = st * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_c = tl.arange(0, CP)
    offs_j = tl.arange(0, HDP)
    s_ok = offs_s < S
    c_ok = offs_c < C
    j_ok = offs_j < HD
    cj_ok = c_ok[:, None] & j_ok[None, :]
    mt = tl.load(M + r * stride_mr + offs_s[:, None] * stride_ms + offs_c[None, :],
                 mask=s_ok[:, None] & c_ok[None, :], other=0.0).to(DOT_DTYPE).to(OP_DTYPE)
    wgT = tl.load(WG + offs_j[None, :] * C + offs_c[:, None], mask=cj_ok, other=0.0).to(OP_DTYPE)
    bg = tl.load(BG + offs_j, mask=j_ok, other=0.0).to(tl.float32)
    g = tl.sigmoid(tl.dot(mt, wgT, input_precision=PREC) + bg[None, :])
    o = tl.load(O_ROWS + r * HD + offs_j, mask=j_ok, other=0.0)
    dout = tl.load(DOUT + (r * S + offs_s[:, None]) * C + offs_c[None, :],
                   mask=s_ok[:, None] & c_ok[None, :], other=0.0).to(DOT_DTYPE).to(OP_DTYPE)
    wo = tl.load(WO + offs_c[:, None] * HD + offs_j[None, :], mask=cj_ok, other=0.0).to(OP_DTYPE)
    dy = tl.dot(dout, wo, input_precision=PREC)  # [BLOCK_S, HDP]
    ok = s_ok[:, None] & j_ok[None, :]
    rows = (r * S + offs_s[:, None]) * HD + offs_j[None, :]
    tl.store(Y + rows, (g * o[None, :]).to(Y.dtype.element_ty), mask=ok)
    tl.store(DGPRE + rows, (dy * o[None, :] * g * (1.0 - g)).to(DGPRE.dtype.element_ty), mask=ok)
    n_tiles = tl.num_programs(1)
    tl.store(DO_PART + (r * n_tiles + st) * HD + offs_j, tl.sum(dy * g, axis=0), mask=j_ok)


@triton.jit
def _ga_attn_bwd_kernel(
    M, MASK, QK, DA, MX, INV_L, DELTA, DQK_PART,
    S, C, H, stride_mr, stride_ms, stride_kr, s_per_split, inf,
    BLOCK_S: tl.constexpr, CP: tl.constexpr, HP: tl.constexpr,
    DOT_DTYPE: tl.constexpr, OP_DTYPE: tl.constexpr, PREC: tl.constexpr,
):
    """sum_s dl_hs m_s over one N_seq split (the logits' gradient into Qk).

    a = exp(logits - max) / sum (max and 1/sum kept apart: for masked logits near -1e9,
    max + log(sum) would lose log(sum) in fp32); da_hs = d_abar_h . m_s;
    dl = a (da - delta_h), delta_h = d_o_h . o_h.
    """
    r = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1)
    n_split = tl.num_programs(1)
    offs_c = tl.arange(0, CP)
    offs_h = tl.arange(0, HP)
    c_ok = offs_c < C
    h_ok = offs_h < H
    ch_ok = c_ok[:, None] & h_ok[None, :]
    qkT = tl.load(QK + r * H * C + offs_h[None, :] * C + offs_c[:, None], mask=ch_ok, other=0.0)
    qkT = qkT.to(DOT_DTYPE).to(OP_DTYPE)
    daT = tl.load(DA + r * H * C + offs_h[None, :] * C + offs_c[:, None], mask=ch_ok, other=0.0)
    daT = daT.to(DOT_DTYPE).to(OP_DTYPE)
    mx = tl.load(MX + r * H + offs_h, mask=h_ok, other=0.0)
    inv_l = tl.load(INV_L + r * H + offs_h, mask=h_ok, other=0.0)
    delta = tl.load(DELTA + r * H + offs_h, mask=h_ok, other=0.0)
    acc = tl.zeros((HP, CP), dtype=tl.float32)
    for i in range(0, s_per_split, BLOCK_S):
        offs_s = sp * s_per_split + i + tl.arange(0, BLOCK_S)
        s_ok = offs_s < S
        mt = tl.load(M + r * stride_mr + offs_s[:, None] * stride_ms + offs_c[None, :],
                     mask=s_ok[:, None] & c_ok[None, :], other=0.0).to(DOT_DTYPE).to(OP_DTYPE)
        mu = tl.load(MASK + r * stride_kr + offs_s, mask=s_ok, other=0.0).to(tl.float32)
        lg = _floored(tl.dot(mt, qkT, input_precision=PREC) + (inf * (mu - 1.0))[:, None])
        lg = tl.where(s_ok[:, None], lg, float("-inf"))
        a = tl.exp(lg - mx[None, :]) * inv_l[None, :]
        dl = a * (tl.dot(mt, daT, input_precision=PREC) - delta[None, :])
        acc += tl.dot(tl.trans(dl).to(DOT_DTYPE).to(OP_DTYPE), mt, input_precision=PREC)
    tl.store(DQK_PART + ((r * n_split + sp) * H + offs_h[:, None]) * C + offs_c[None, :], acc,
             mask=h_ok[:, None] & c_ok[None, :])


@triton.jit
def _ga_dm_kernel(
    M, MASK, QK, DA, MX, INV_L, DELTA, DGPRE, WG, DQBAR, DM,
    S, C, H, HD, stride_mr, stride_ms, stride_kr, inf,
    BLOCK_S: tl.constexpr, CP: tl.constexpr, HP: tl.constexpr, HDP: tl.constexpr,
    DOT_DTYPE: tl.constexpr, OP_DTYPE: tl.constexpr, PREC: tl.constexpr,
):
    """d_m for a tile: dl Qk + a d_abar + DGPRE Wg + mask_s d_qbar / (sum mask + eps)."""
    r = tl.program_id(0).to(tl.int64)
    offs_s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_c = tl.arange(0, CP)
    offs_h = tl.arange(0, HP)
    offs_j = tl.arange(0, HDP)
    s_ok = offs_s < S
    c_ok = offs_c < C
    h_ok = offs_h < H
    j_ok = offs_j < HD
    ch_ok = c_ok[:, None] & h_ok[None, :]
    qkT = tl.load(QK + r * H * C + offs_h[None, :] * C + offs_c[:, None], mask=ch_ok, other=0.0)
    qkT = qkT.to(DOT_DTYPE).to(OP_DTYPE)
    daT = tl.load(DA + r * H * C + offs_h[None, :] * C + offs_c[:, None], mask=ch_ok, other=0.0)
    daT = daT.to(DOT_DTYPE).to(OP_DTYPE)
    mx = tl.load(MX + r * H + offs_h, mask=h_ok, other=0.0)
    inv_l = tl.load(INV_L + r * H + offs_h, mask=h_ok, other=0.0)
    delta = tl.load(DELTA + r * H + offs_h, mask=h_ok, other=0.0)
    mt = tl.load(M + r * stride_mr + offs_s[:, None] * stride_ms + offs_c[None, :],
                 mask=s_ok[:, None] & c_ok[None, :], other=0.0).to(DOT_DTYPE).to(OP_DTYPE)
    mu = tl.load(MASK + r * stride_kr + offs_s, mask=s_ok, other=0.0).to(tl.float32)
    lg = _floored(tl.dot(mt, qkT, input_precision=PREC) + (inf * (mu - 1.0))[:, None])
    lg = tl.where(s_ok[:, None], lg, float("-inf"))
    a = tl.exp(lg - mx[None, :]) * inv_l[None, :]
    dl = a * (tl.dot(mt, daT, input_precision=PREC) - delta[None, :])
    dm = tl.dot(dl.to(DOT_DTYPE).to(OP_DTYPE), tl.trans(qkT), input_precision=PREC)
    dm += tl.dot(a.to(DOT_DTYPE).to(OP_DTYPE), tl.trans(daT), input_precision=PREC)
    dgpre = tl.load(DGPRE + (r * S + offs_s[:, None]) * HD + offs_j[None, :],
                    mask=s_ok[:, None] & j_ok[None, :], other=0.0).to(OP_DTYPE)
    wg = tl.load(WG + offs_j[:, None] * C + offs_c[None, :], mask=j_ok[:, None] & c_ok[None, :],
                 other=0.0).to(OP_DTYPE)
    dm += tl.dot(dgpre, wg, input_precision=PREC)
    dqbar = tl.load(DQBAR + r * C + offs_c, mask=c_ok, other=0.0)
    dm += mu[:, None] * dqbar[None, :]
    tl.store(DM + (r * S + offs_s[:, None]) * C + offs_c[None, :], dm.to(DM.dtype.element_ty),
             mask=s_ok[:, None] & c_ok[None, :])


# ----------------------------------------------------------------------------------------------
# launch geometry
# ----------------------------------------------------------------------------------------------
class _Geom:
    """Tile sizes, N_seq splits and the constexprs every kernel takes."""

    def __init__(self, n_rows: int, s: int, c: int, h: int, hd: int, cdt: torch.dtype, device):
        interp = is_interpreter()
        # 8 warps: the tile kernels hold [BLOCK_S, C] and [C, H*D] tiles (no register spills at
        # C = H*D = 64 for sm_90); fp32 dots (FMA, not tensor cores) need the smaller tile
        self.block_s = 32 if interp or cdt == torch.float32 else 64
        self.num_warps = 8
        self.cp = max(16, next_power_of_2(c))
        self.hp = max(16, next_power_of_2(h))
        self.hdp = max(16, next_power_of_2(hd))
        self.n_tiles = triton.cdiv(s, self.block_s)
        # programs per pass: about 4 per SM on a GPU; two N_seq splits per row in the interpreter
        # (so that the split combine runs at test sizes)
        target = 2 * n_rows if interp else max_programs(device)
        n_split = max(1, min(self.n_tiles, triton.cdiv(target, max(n_rows, 1))))
        self.s_per_split = triton.cdiv(self.n_tiles, n_split) * self.block_s
        self.n_split = triton.cdiv(s, self.s_per_split)
        self.dots = dict(
            DOT_DTYPE=_TL_DTYPES[cdt],
            # Triton's CPU interpreter mis-multiplies bf16 operands: multiply the bf16-rounded
            # values in fp32 there (products of bf16 values are exact in fp32: the GPU's numbers)
            OP_DTYPE=tl.float32 if interp and cdt == torch.bfloat16 else _TL_DTYPES[cdt],
            PREC=dot_precision(cdt),
        )


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------
class _GlobalAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, m, mask, wq, wk, wv, wg, bg, wo, bo, no_heads, inf, eps, cdt):
        *lead, s, c = m.shape
        n_rows = math.prod(lead)
        hd = wq.shape[0]
        h, d = no_heads, hd // no_heads
        m3 = m.reshape(n_rows, s, c)
        if m3.stride(-1) != 1:
            m3 = m3.contiguous()
        mask2 = mask.reshape(n_rows, s)
        if mask2.stride(-1) != 1:
            mask2 = mask2.contiguous()
        check_launchable(m3, mask2)
        with torch.autocast(m.device.type, enabled=False):
            return _GlobalAttentionFn._forward(ctx, m3, mask2, wq, wk, wv, wg, bg, wo, bo, h, d, inf, eps, cdt,
                                               m.shape, m.dtype)

    @staticmethod
    def _forward(ctx, m3, mask2, wq, wk, wv, wg, bg, wo, bo, h, d, inf, eps, cdt, shape, m_dtype):
        n_rows, s, c = m3.shape
        hd = h * d
        geo = _Geom(n_rows, s, c, h, hd, cdt, m3.device)
        dev = m3.device
        f32 = dict(dtype=torch.float32, device=dev)
        strides = (m3.stride(0), m3.stride(1), mask2.stride(0))

        # 1. masked mean over N_seq
        sum_part = torch.empty((n_rows, geo.n_split, c), **f32)
        den_part = torch.empty((n_rows, geo.n_split), **f32)
        _ga_mean_kernel[(n_rows, geo.n_split)](
            m3, mask2, sum_part, den_part, s, c, *strides, geo.s_per_split,
            BLOCK_S=geo.block_s, CP=geo.cp, num_warps=geo.num_warps)
        den = den_part.sum(1) + eps  # [R]
        q_bar = sum_part.sum(1) / den[:, None]  # [R, C]
        wq32, wk32, wv32 = wq.float(), wk.float(), wv.float()
        q = (q_bar @ wq32.t()).mul_(d ** -0.5).view(n_rows, h, d)
        qk = (q @ wk32).contiguous()  # [R, H, C]: logits = m_s . qk_h

        # 2. attention over N_seq (online softmax per split, combined here)
        mx = torch.empty((n_rows, geo.n_split, h), **f32)
        lsum = torch.empty((n_rows, geo.n_split, h), **f32)
        acc = torch.empty((n_rows, geo.n_split, h, c), **f32)
        _ga_attn_fwd_kernel[(n_rows, geo.n_split)](
            m3, mask2, qk, mx, lsum, acc, s, c, h, *strides, geo.s_per_split, float(inf),
            BLOCK_S=geo.block_s, CP=geo.cp, HP=geo.hp, **geo.dots, num_warps=geo.num_warps)
        mx_all = mx.amax(1)  # [R, H]
        w = torch.exp(mx - mx_all[:, None])
        l_all = (w * lsum).sum(1)
        a_bar = (w[..., None] * acc).sum(1) / l_all[..., None]  # [R, H, C]
        inv_l = 1.0 / l_all
        o = a_bar @ wv32.t()  # [R, H, D]

        # 3. gated output
        wg_c, bg_c, wo_c, bo_c = (t.to(cdt).contiguous() for t in (wg, bg, wo, bo))
        out = torch.empty((n_rows, s, c), dtype=cdt, device=dev)
        _ga_out_fwd_kernel[(n_rows, geo.n_tiles)](
            m3, o.reshape(n_rows, hd), wg_c, bg_c, wo_c, bo_c, out, s, c, hd, *strides[:2],
            BLOCK_S=geo.block_s, CP=geo.cp, HDP=geo.hdp, **geo.dots, num_warps=geo.num_warps)

        ctx.save_for_backward(m3, mask2, q_bar, den, q, qk, a_bar, mx_all, inv_l, o, wq32, wk32, wv32, wg_c, bg_c, wo_c)
        ctx.geo = geo
        ctx.meta = (shape, m_dtype, float(inf), d, wq.dtype, wk.dtype, wv.dtype, wg.dtype, bg.dtype,
                    wo.dtype, bo.dtype)
        return out.view(shape)

    @staticmethod
    def backward(ctx, dout):
        with torch.autocast(dout.device.type, enabled=False):
            return _GlobalAttentionFn._backward(ctx, dout)

    @staticmethod
    def _backward(ctx, dout):
        m3, mask2, q_bar, den, q, qk, a_bar, mx_all, inv_l, o, wq32, wk32, wv32, wg_c, bg_c, wo_c = ctx.saved_tensors
        geo = ctx.geo
        shape, m_dtype, inf, d, *w_dtypes = ctx.meta
        n_rows, s, c = m3.shape
        h = q.shape[1]
        hd = h * d
        cdt = wg_c.dtype
        strides = (m3.stride(0), m3.stride(1), mask2.stride(0))
        dout = dout.reshape(n_rows, s, c).to(cdt).contiguous()
        dev = m3.device

        # 1. gated output: Y = g * o, DGPRE, partial d_o
        y = torch.empty((n_rows * s, hd), dtype=cdt, device=dev)
        dgpre = torch.empty((n_rows * s, hd), dtype=cdt, device=dev)
        do_part = torch.empty((n_rows, geo.n_tiles, hd), dtype=torch.float32, device=dev)
        _ga_out_bwd_kernel[(n_rows, geo.n_tiles)](
            m3, o.reshape(n_rows, hd), wg_c, bg_c, wo_c, dout, y, dgpre, do_part, s, c, hd, *strides[:2],
            BLOCK_S=geo.block_s, CP=geo.cp, HDP=geo.hdp, **geo.dots, num_warps=geo.num_warps)
        dout2 = dout.view(n_rows * s, c)
        dwo = dout2.t().mm(y)  # [C, HD]
        dbo = dout2.sum(0, dtype=torch.float32)
        del y
        dwg = dgpre.t().mm(m3.reshape(n_rows * s, c).to(cdt))  # [HD, C]
        dbg = dgpre.sum(0, dtype=torch.float32)

        # attention, per row: o = a_bar Wv^T
        do = do_part.sum(1).view(n_rows, h, d)
        dwv = torch.einsum("rhd,rhc->dc", do, a_bar)
        da_bar = (do @ wv32).contiguous()  # [R, H, C]
        delta = (do * o).sum(-1).contiguous()  # [R, H]

        # 2. sum_s dlogits_hs m_s
        dqk_part = torch.empty((n_rows, geo.n_split, h, c), dtype=torch.float32, device=dev)
        _ga_attn_bwd_kernel[(n_rows, geo.n_split)](
            m3, mask2, qk, da_bar, mx_all, inv_l, delta, dqk_part, s, c, h, *strides, geo.s_per_split, inf,
            BLOCK_S=geo.block_s, CP=geo.cp, HP=geo.hp, **geo.dots, num_warps=geo.num_warps)
        dqk = dqk_part.sum(1)  # [R, H, C]
        dwk = torch.einsum("rhd,rhc->dc", q, dqk)
        dq = (dqk @ wk32.t()).reshape(n_rows, hd).mul_(d ** -0.5)
        dwq = dq.t() @ q_bar
        dq_bar_scaled = ((dq @ wq32) / den[:, None]).contiguous()

        # 3. d_m
        dm = torch.empty((n_rows, s, c), dtype=m_dtype, device=dev)
        _ga_dm_kernel[(n_rows, geo.n_tiles)](
            m3, mask2, qk, da_bar, mx_all, inv_l, delta, dgpre, wg_c, dq_bar_scaled, dm,
            s, c, h, hd, *strides, inf,
            BLOCK_S=geo.block_s, CP=geo.cp, HP=geo.hp, HDP=geo.hdp, **geo.dots, num_warps=geo.num_warps)
        grads = (dwq, dwk, dwv, dwg, dbg, dwo, dbo)
        grads = tuple(gr.to(dt) for gr, dt in zip(grads, w_dtypes, strict=True))
        return (dm.view(shape), None) + grads + (None, None, None, None)


# ----------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------
def global_attention(
    m: torch.Tensor, mask: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor,
    wg: torch.Tensor, bg: torch.Tensor, wo: torch.Tensor, bo: torch.Tensor,
    no_heads: int, inf: float, eps: float,
) -> torch.Tensor:
    """OpenFold's GlobalAttention.forward (non-LMA), Triton kernels (see the module docstring).

    m [*, N_res, N_seq, C] (layer-normed), mask [*, N_res, N_seq]; wq [H*D, C], wk, wv [D, C],
    wg [H*D, C], bg [H*D], wo [C, H*D], bo [C]. Returns [*, N_res, N_seq, C] in the compute
    dtype. Gradients for m and every weight; none for the mask.
    """
    c = m.shape[-1]
    hd = wq.shape[0]
    if (max(c, hd) > _MAX_TILE_DIM or m.numel() == 0 or m.dtype not in _TL_DTYPES
            or hd % no_heads != 0):
        # explicit fallback: sizes the fused tiles do not hold, empty or fp64 inputs
        return global_attention_reference(m, mask, wq, wk, wv, wg, bg, wo, bo, no_heads, inf, eps)
    cdt = autocast_dtype(m.device.type) or m.dtype
    mask = mask.expand(m.shape[:-1])
    return _GlobalAttentionFn.apply(m, mask.detach(), wq, wk, wv, wg, bg, wo, bo, no_heads, inf, eps, cdt)


def global_attention_reference(
    m: torch.Tensor, mask: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor,
    wg: torch.Tensor, bg: Optional[torch.Tensor], wo: torch.Tensor, bo: Optional[torch.Tensor],
    no_heads: int, inf: float, eps: float,
) -> torch.Tensor:
    """OpenFold's ``GlobalAttention.forward`` (use_lma=False) in plain PyTorch, OpenFold's order.

    Reductions and softmax follow CUDA autocast's policy explicitly (sum and, outside
    ``softmax_no_cast``'s bf16 branch, softmax produce fp32 under autocast), so the CPU follows
    the same contract as CUDA.
    """
    f = torch.nn.functional
    autocast = autocast_dtype(m.device.type) is not None
    red = dict(dtype=torch.float32) if autocast else {}
    c_hidden = wk.shape[0]
    # [*, N_res, C_in]
    q = torch.sum(m * mask.unsqueeze(-1), dim=-2, **red) / (torch.sum(mask, dim=-1, **red)[..., None] + eps)
    q = f.linear(q, wq)
    q *= c_hidden ** (-0.5)
    q = q.view(q.shape[:-1] + (no_heads, -1))  # [*, N_res, H, C_hidden]
    k = f.linear(m, wk)  # [*, N_res, N_seq, C_hidden]
    v = f.linear(m, wv)
    bias = (inf * (mask - 1))[..., :, None, :]
    a = torch.matmul(q, k.transpose(-1, -2))  # [*, N_res, H, N_seq]
    if autocast and a.dtype != torch.bfloat16:
        a = (a + bias).to(a.dtype)  # OpenFold's in-place `a += bias`
        a = torch.softmax(a, dim=-1, dtype=torch.float32)
    else:
        a = softmax_reference(a, bias)
    o = torch.matmul(a, v)  # [*, N_res, H, C_hidden]
    g = torch.sigmoid(f.linear(m, wg, bg))  # [*, N_res, N_seq, H * C_hidden]
    g = g.view(g.shape[:-1] + (no_heads, -1))
    o = o.unsqueeze(-3) * g  # [*, N_res, N_seq, H, C_hidden]
    o = o.reshape(o.shape[:-2] + (-1,))
    return f.linear(o, wo, bo)
