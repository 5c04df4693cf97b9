"""Softmax over the last dim with two additive biases, no upcast (OpenFold's softmax_no_cast).

Math::

    y = softmax((x + mask_bias) + pair_bias, dim=-1)          x [*, K]; biases broadcast to x

OpenFold computes the sums in x's dtype (``a += bias`` on the bf16 logits under autocast) and
the softmax in x's dtype (``softmax_no_cast``). The output has x's dtype.

Precision contract: x and the biases are read in their own dtypes and every operation (sums,
max, exp, normalisation, and the whole backward) runs in fp32; results are cast on store, so the
fp16/bf16 path is at least as accurate as OpenFold's.

Kernels. Forward: one program owns BLOCK_R rows; a row that fits in one tile (K <= 8192) is read
once, longer rows take two passes (online max/sum, then normalise). Backward:
``dx = y * (dy - rowsum(y * dy))`` from the saved output. A bias gradient is dx summed over the
dims the bias is broadcast on; ``_softmax_bwd_dbias_kernel`` does that sum in fp32 registers:
each program owns BLOCK_R rows of the bias gradient and loops over the broadcast rows (split over
a few programs writing fp32 partials when the bias has too few rows to fill the card), so dx is
never materialised for a bias. Rows longer than one tile take an explicit fallback: dx from the
row kernel, summed with ``Tensor.sum_to_size``. A bias constant along K (a per-row shift) has an
exactly zero gradient.

Leading dims of all tensors are folded (``collapse_dims``) to at most four (size, stride) pairs,
with no copies; a layout needing more loops over its first dim.
"""
import math
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._triton_utils import (
    cast_rne,
    check_launchable,
    collapse_dims,
    is_interpreter,
    next_power_of_2,
)

_MAX_SINGLE_K = 8192   # longest row held in one tile
_LOOP_BLOCK_K = 4096   # tile width for longer rows
_NDIM = 4              # folded row dims the kernels take


def softmax_reference(
    x: torch.Tensor,
    mask_bias: Optional[torch.Tensor] = None,
    pair_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``softmax((x + mask_bias) + pair_bias, -1)`` with each sum and the softmax in x's dtype.

    Args:
        x: [*, K] logits
        mask_bias, pair_bias: broadcast to x's shape
    Returns:
        [*, K] in x's dtype
    """
    dtype = x.dtype
    for b in (mask_bias, pair_bias):
        if b is not None:
            x = (x + b).to(dtype)  # OpenFold's in-place `a += b` keeps a's dtype
    if dtype is torch.bfloat16:
        with torch.autocast(x.device.type, enabled=False):
            return torch.nn.functional.softmax(x, dim=-1)
    return torch.nn.functional.softmax(x, dim=-1)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _row_offsets(rows, R1, R2, R3, s0, s1, s2, s3):
    """64-bit offsets of flat row indices over four folded dims (sizes R0 implied, R1..R3)."""
    i3 = rows % R3
    t = rows // R3
    i2 = t % R2
    t = t // R2
    i1 = t % R1
    i0 = t // R1
    return (i0.to(tl.int64) * s0 + i1.to(tl.int64) * s1 + i2.to(tl.int64) * s2
            + i3.to(tl.int64) * s3)


@triton.jit
def _load_logits(X, MB, PB, ox, om, op, cols, sxk, smk, spk, K,
                 HAS_MB: tl.constexpr, HAS_PB: tl.constexpr):
    """fp32 (x + mask_bias) + pair_bias for a [BLOCK_R, BLOCK_K] tile; -inf past K."""
    cm = cols[None, :] < K
    x = tl.load(X + ox[:, None] + cols[None, :] * sxk, mask=cm, other=0.0).to(tl.float32)
    if HAS_MB:
        x += tl.load(MB + om[:, None] + cols[None, :] * smk, mask=cm, other=0.0).to(tl.float32)
    if HAS_PB:
        x += tl.load(PB + op[:, None] + cols[None, :] * spk, mask=cm, other=0.0).to(tl.float32)
    return tl.where(cm, x, float("-inf"))


@triton.jit
def _softmax_fwd_kernel(
    X, MB, PB, Y,
    sx0, sx1, sx2, sx3, sxk,
    sm0, sm1, sm2, sm3, smk,
    sp0, sp1, sp2, sp3, spk,
    sy0, sy1, sy2, sy3, syk,
    R1, R2, R3, NROWS, K,
    HAS_MB: tl.constexpr, HAS_PB: tl.constexpr, SINGLE: tl.constexpr, INTERP: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < NROWS
    rows = tl.minimum(rows, NROWS - 1)
    ox = _row_offsets(rows, R1, R2, R3, sx0, sx1, sx2, sx3)
    om = _row_offsets(rows, R1, R2, R3, sm0, sm1, sm2, sm3)
    op = _row_offsets(rows, R1, R2, R3, sp0, sp1, sp2, sp3)
    oy = _row_offsets(rows, R1, R2, R3, sy0, sy1, sy2, sy3)
    cols = tl.arange(0, BLOCK_K)
    if SINGLE:
        x = _load_logits(X, MB, PB, ox, om, op, cols, sxk, smk, spk, K, HAS_MB, HAS_PB)
        e = tl.exp(x - tl.max(x, 1)[:, None])
        y = e / tl.sum(e, 1)[:, None]
        tl.store(Y + oy[:, None] + cols[None, :] * syk, cast_rne(y, Y.dtype.element_ty, INTERP),
                 mask=row_ok[:, None] & (cols[None, :] < K))
    else:
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_R], tl.float32)
        for start in range(0, K, BLOCK_K):
            x = _load_logits(X, MB, PB, ox, om, op, start + cols, sxk, smk, spk, K,
                             HAS_MB, HAS_PB)
            m_new = tl.maximum(m, tl.max(x, 1))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), 1)
            m = m_new
        for start in range(0, K, BLOCK_K):
            c = start + cols
            x = _load_logits(X, MB, PB, ox, om, op, c, sxk, smk, spk, K, HAS_MB, HAS_PB)
            y = tl.exp(x - m[:, None]) / s[:, None]
            tl.store(Y + oy[:, None] + c[None, :] * syk, cast_rne(y, Y.dtype.element_ty, INTERP),
                     mask=row_ok[:, None] & (c[None, :] < K))


@triton.jit
def _softmax_bwd_dx_kernel(
    Y, DY, DX,
    sy0, sy1, sy2, sy3, syk,
    sd0, sd1, sd2, sd3, sdk,
    sx0, sx1, sx2, sx3, sxk,
    R1, R2, R3, NROWS, K,
    SINGLE: tl.constexpr, INTERP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dx = y * (dy - rowsum(y * dy)), fp32."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < NROWS
    rows = tl.minimum(rows, NROWS - 1)
    oy = _row_offsets(rows, R1, R2, R3, sy0, sy1, sy2, sy3)
    od = _row_offsets(rows, R1, R2, R3, sd0, sd1, sd2, sd3)
    ox = _row_offsets(rows, R1, R2, R3, sx0, sx1, sx2, sx3)
    cols = tl.arange(0, BLOCK_K)
    if SINGLE:
        cm = cols[None, :] < K
        y = tl.load(Y + oy[:, None] + cols[None, :] * syk, mask=cm, other=0.0).to(tl.float32)
        dy = tl.load(DY + od[:, None] + cols[None, :] * sdk, mask=cm, other=0.0).to(tl.float32)
        dx = y * (dy - tl.sum(y * dy, 1)[:, None])
        tl.store(DX + ox[:, None] + cols[None, :] * sxk, cast_rne(dx, DX.dtype.element_ty, INTERP),
                 mask=row_ok[:, None] & cm)
    else:
        delta = tl.zeros([BLOCK_R], tl.float32)
        for start in range(0, K, BLOCK_K):
            c = start + cols
            cm = c[None, :] < K
            y = tl.load(Y + oy[:, None] + c[None, :] * syk, mask=cm, other=0.0).to(tl.float32)
            dy = tl.load(DY + od[:, None] + c[None, :] * sdk, mask=cm, other=0.0).to(tl.float32)
            delta += tl.sum(y * dy, 1)
        for start in range(0, K, BLOCK_K):
            c = start + cols
            cm = c[None, :] < K
            y = tl.load(Y + oy[:, None] + c[None, :] * syk, mask=cm, other=0.0).to(tl.float32)
            dy = tl.load(DY + od[:, None] + c[None, :] * sdk, mask=cm, other=0.0).to(tl.float32)
            dx = y * (dy - delta[:, None])
            tl.store(DX + ox[:, None] + c[None, :] * sxk, cast_rne(dx, DX.dtype.element_ty, INTERP),
                     mask=row_ok[:, None] & cm)


@triton.jit
def _softmax_bwd_dbias_kernel(
    Y, DY, DB,
    sy0, sy1, sy2, sy3, syk,
    sd0, sd1, sd2, sd3, sdk,
    sbs, sb0, sb1, sb2, sb3,
    R0, R1, R2, R3, N_OWNED, R_PER, K,
    RED0: tl.constexpr, RED1: tl.constexpr, RED2: tl.constexpr, RED3: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """BLOCK_R rows of a bias gradient: dx summed over the folded dims flagged RED*.

    Program id: owned row block fastest, then the split of the reduction range. Owned rows and
    the reduction index are both decomposed innermost dim first.
    """
    n_rb = tl.cdiv(N_OWNED, BLOCK_R)
    pid = tl.program_id(0)
    rb = pid % n_rb
    split = pid // n_rb
    orow = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = orow < N_OWNED
    t = tl.minimum(orow, N_OWNED - 1)
    zero = t * 0
    red = 1
    if RED3:
        red = red * R3
        o3 = zero
    else:
        o3 = t % R3
        t = t // R3
    if RED2:
        red = red * R2
        o2 = zero
    else:
        o2 = t % R2
        t = t // R2
    if RED1:
        red = red * R1
        o1 = zero
    else:
        o1 = t % R1
        t = t // R1
    if RED0:
        red = red * R0
        o0 = zero
    else:
        o0 = t
    oy = (o0.to(tl.int64) * sy0 + o1.to(tl.int64) * sy1 + o2.to(tl.int64) * sy2
          + o3.to(tl.int64) * sy3)
    od = (o0.to(tl.int64) * sd0 + o1.to(tl.int64) * sd1 + o2.to(tl.int64) * sd2
          + o3.to(tl.int64) * sd3)
    cols = tl.arange(0, BLOCK_K)
    cm = cols[None, :] < K
    r_start = split * R_PER
    r_end = tl.minimum(r_start + R_PER, red)
    acc = tl.zeros([BLOCK_R, BLOCK_K], tl.float32)
    for r in range(r_start, r_end):
        rr = r
        ry = 0
        rd = 0
        if RED3:
            i = (rr % R3).to(tl.int64)
            rr = rr // R3
            ry += i * sy3
            rd += i * sd3
        if RED2:
            i = (rr % R2).to(tl.int64)
            rr = rr // R2
            ry += i * sy2
            rd += i * sd2
        if RED1:
            i = (rr % R1).to(tl.int64)
            rr = rr // R1
            ry += i * sy1
            rd += i * sd1
        if RED0:
            i = rr.to(tl.int64)
            ry += i * sy0
            rd += i * sd0
        y = tl.load(Y + ry + oy[:, None] + cols[None, :] * syk, mask=cm, other=0.0)
        dy = tl.load(DY + rd + od[:, None] + cols[None, :] * sdk, mask=cm, other=0.0)
        y = y.to(tl.float32)
        dy = dy.to(tl.float32)
        acc += y * (dy - tl.sum(y * dy, 1)[:, None])
    ob = (split.to(tl.int64) * sbs + o0.to(tl.int64) * sb0 + o1.to(tl.int64) * sb1
          + o2.to(tl.int64) * sb2 + o3.to(tl.int64) * sb3)
    tl.store(DB + ob[:, None] + cols[None, :], acc, mask=row_ok[:, None] & cm)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
def _row_blocks(K: int) -> Tuple[int, int, bool, int]:
    """(BLOCK_R, BLOCK_K, SINGLE, num_warps) for rows of length K."""
    bk = next_power_of_2(K)
    if bk <= _MAX_SINGLE_K:
        br = max(1, min(64, 4096 // bk)) if not is_interpreter() else max(1, min(16, 256 // bk))
        return br, bk, True, 4 if br * bk <= 4096 else 8
    return 1, _LOOP_BLOCK_K, False, 8


def _fold(shape: Sequence[int], tensors: dict) -> Optional[Tuple[list, dict]]:
    """Fold the row dims (all but the last) of `tensors` broadcast to `shape`; pad to 4."""
    lead = tuple(shape[:-1])
    names = [n for n, t in tensors.items() if t is not None]
    strides = [tuple(tensors[n].expand(shape).stride()[:-1]) for n in names]
    sizes, folded = collapse_dims(lead, strides)
    if len(sizes) > _NDIM:
        return None
    pad = _NDIM - len(sizes)
    return [1] * pad + sizes, {n: [0] * pad + s for n, s in zip(names, folded, strict=True)}


def _row_strides(fold, name, t, shape) -> list:
    if t is None:
        return [0] * (_NDIM + 1)
    return fold[1][name] + [t.expand(shape).stride()[-1]]


def _target_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


class _SoftmaxFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fold, x, mask_bias, pair_bias):
        shape = x.shape
        K = shape[-1]
        y = torch.empty(shape, device=x.device, dtype=x.dtype)
        sizes = fold[0]
        nrows = math.prod(sizes)
        br, bk, single, warps = _row_blocks(K)
        _softmax_fwd_kernel[(triton.cdiv(nrows, br),)](
            x, mask_bias if mask_bias is not None else x, pair_bias if pair_bias is not None else x,
            y,
            *_row_strides(fold, "x", x, shape), *_row_strides(fold, "mask_bias", mask_bias, shape),
            *_row_strides(fold, "pair_bias", pair_bias, shape), *_row_strides(fold, "y", y, shape),
            sizes[1], sizes[2], sizes[3], nrows, K,
            HAS_MB=mask_bias is not None, HAS_PB=pair_bias is not None, SINGLE=single,
            INTERP=is_interpreter(), BLOCK_R=br, BLOCK_K=bk, num_warps=warps)
        ctx.bias_meta = [(None, None) if b is None else (b.shape, b.dtype)
                         for b in (mask_bias, pair_bias)]
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        shape = y.shape
        K = shape[-1]
        fold = _fold(shape, {"y": y, "dy": dy})
        if fold is None:
            dy = dy.contiguous()  # y is contiguous: the two then fold to one dim
            fold = _fold(shape, {"y": y, "dy": dy})
        br, bk, single, warps = _row_blocks(K)
        need_x, need_mb, need_pb = ctx.needs_input_grad[1:]
        dx = _dx(y, dy, fold, br, bk, single, warps) if need_x else None
        grads = []
        for need, (bshape, bdtype) in zip((need_mb, need_pb), ctx.bias_meta, strict=True):
            g = None
            if need and K > 1 and bshape[-1] == 1:
                # constant along K: a per-row shift, which the softmax ignores
                g = torch.zeros(bshape, device=y.device, dtype=bdtype)
            elif need:
                if single:
                    g = _bias_grad(y, dy, shape, bshape, bdtype, br, bk, warps)
                if g is None:
                    # rows longer than one tile, or more than four folded dims: reduce a
                    # materialised dx (explicit fallback)
                    if dx is None:
                        dx = _dx(y, dy, fold, br, bk, single, warps)
                    g = dx.float().sum_to_size(bshape).to(bdtype)
            grads.append(g)
        return None, (dx if need_x else None), grads[0], grads[1]


def _dx(y, dy, fold, br, bk, single, warps) -> torch.Tensor:
    """dx = y * (dy - rowsum(y * dy)) in y's dtype."""
    shape = y.shape
    sizes = fold[0]
    nrows = math.prod(sizes)
    dx = torch.empty(shape, device=y.device, dtype=y.dtype)
    _softmax_bwd_dx_kernel[(triton.cdiv(nrows, br),)](
        y, dy, dx, *_row_strides(fold, "y", y, shape), *_row_strides(fold, "dy", dy, shape),
        *_row_strides(fold, "y", dx, shape), sizes[1], sizes[2], sizes[3], nrows, shape[-1],
        SINGLE=single, INTERP=is_interpreter(), BLOCK_R=br, BLOCK_K=bk, num_warps=warps)
    return dx


def _bias_grad(y, dy, shape, bshape, bdtype, br, bk, warps) -> Optional[torch.Tensor]:
    """dx summed to `bshape` inside the kernel (rows of one tile); None if the layout needs
    more than four folded dims."""
    # fold y, dy and the (contiguous) gradient buffer together; the buffer's broadcast dims
    # get stride 0, which marks the dims to sum over
    fold = _fold(shape, {"y": y, "dy": dy, "b": torch.empty(bshape, device="meta")})
    if fold is None:
        return None
    sizes = fold[0]
    sb = fold[1]["b"]
    red = [n > 1 and s == 0 for n, s in zip(sizes, sb, strict=True)]
    own_sizes = [1 if r else n for n, r in zip(sizes, red, strict=True)]
    n_owned = math.prod(own_sizes)
    reduce_len = math.prod(n for n, r in zip(sizes, red, strict=True) if r)
    n_rb = triton.cdiv(n_owned, br)
    split = max(1, min(reduce_len, triton.cdiv(_target_programs(y.device), n_rb)))
    r_per = triton.cdiv(reduce_len, split)
    split = triton.cdiv(reduce_len, r_per)
    buf = torch.empty((split, n_owned, bshape[-1]), device=y.device, dtype=torch.float32)
    own_strides, acc = [], bshape[-1]
    for n in reversed(own_sizes):
        own_strides.append(acc)
        acc *= n
    own_strides = list(reversed(own_strides))
    _softmax_bwd_dbias_kernel[(n_rb * split,)](
        y, dy, buf, *_row_strides(fold, "y", y, shape), *_row_strides(fold, "dy", dy, shape),
        buf.stride(0), *own_strides, sizes[0], sizes[1], sizes[2], sizes[3], n_owned, r_per,
        shape[-1], RED0=red[0], RED1=red[1], RED2=red[2], RED3=red[3],
        BLOCK_R=br, BLOCK_K=bk, num_warps=warps)
    g = buf.sum(0) if split > 1 else buf[0]
    return g.reshape(bshape).to(bdtype)


# --------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------
def softmax(
    x: torch.Tensor,
    mask_bias: Optional[torch.Tensor] = None,
    pair_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Triton ``softmax_reference`` (see the module docstring for the contract).

    Args:
        x: [*, K] logits, any strides
        mask_bias, pair_bias: broadcast to x's shape (stride 0 on broadcast dims is fine);
            their gradients are summed over the broadcast dims
    Returns:
        [*, K] in x's dtype
    """
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"unsupported dtype {x.dtype}")
    shape = x.shape
    for b in (mask_bias, pair_bias):
        if b is not None and torch.broadcast_shapes(b.shape, shape) != shape:
            raise ValueError(f"bias of shape {tuple(b.shape)} does not broadcast to x's "
                             f"shape {tuple(shape)}")
    check_launchable(x, mask_bias, pair_bias)
    if x.numel() == 0:
        return softmax_reference(x, mask_bias, pair_bias)
    fold = _fold(shape, {"x": x, "mask_bias": mask_bias, "pair_bias": pair_bias,
                         "y": torch.empty(shape, device="meta")})
    if fold is None:
        # More than four leading dims that no stride merge folds: loop over the first one.
        return torch.stack([softmax(x[i], _select(mask_bias, i, x.dim()),
                                    _select(pair_bias, i, x.dim())) for i in range(shape[0])])
    return _SoftmaxFunction.apply(fold, x, mask_bias, pair_bias)


def _select(b: Optional[torch.Tensor], i: int, ndim: int) -> Optional[torch.Tensor]:
    """Entry i of a bias along x's first dim (entry 0 where the bias is broadcast on it)."""
    if b is None:
        return None
    b = b.view((1,) * (ndim - b.dim()) + tuple(b.shape))
    return b[i if b.shape[0] > 1 else 0]
