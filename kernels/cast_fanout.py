"""One activation read by several Linears under autocast, rounded once: ``cast_fanout(x, n)``.

An attention's q, k, v and gate projections all read the same LayerNorm output, which is fp32
under autocast. Stock OpenFold lets each ``Linear`` round it to the autocast dtype (four
roundings of the same tensor: autocast caches only the weights' casts), and in backward autograd
converts each projection's input gradient back to fp32 and sums the four in fp32 (three more
full-size conversions and three fp32 adds). ``cast_fanout`` rounds ``x`` once and hands the
``n`` consumers aliases of the rounded tensor; its backward sums their gradients in fp32 in one
pass (one kernel, the gradients in the order of the outputs). The values every consumer reads
are the same as under stock autocast, and the gradient of ``x`` is the same fp32 sum; only the
order of the fp32 additions may differ from autograd's.

``cast_fanout_reference(x, n)`` is ``(x,) * n``: each consumer casts as in stock OpenFold.
Both return ``(x,) * n`` when autocast is off for ``x``'s device, ``x`` is not fp32, ``n`` is 1,
or ``x`` is a leaf that requires grad while autocast's cache is on (autocast then casts it once
and sums the gradients in its dtype, as stock does). Double backward goes through a
differentiable torch sum (the kernel's output has no graph).
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._triton_utils import autocast_dtype, is_interpreter

_BLOCK = 2048
_MAX_IN = 4  # gradients summed per launch


@triton.jit
def _sum_grads_kernel(G0, G1, G2, G3, OUT, N, N_IN: tl.constexpr, ACCUMULATE: tl.constexpr,
                      BLOCK: tl.constexpr):
    """OUT[:N] (fp32) = (OUT if ACCUMULATE) + G0 + G1 + ... (the first N_IN), summed in fp32 in
    that order."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    if ACCUMULATE:
        acc = tl.load(OUT + offs, mask=ok) + tl.load(G0 + offs, mask=ok).to(tl.float32)
    else:
        acc = tl.load(G0 + offs, mask=ok).to(tl.float32)
    if N_IN > 1:
        acc += tl.load(G1 + offs, mask=ok).to(tl.float32)
    if N_IN > 2:
        acc += tl.load(G2 + offs, mask=ok).to(tl.float32)
    if N_IN > 3:
        acc += tl.load(G3 + offs, mask=ok).to(tl.float32)
    tl.store(OUT + offs, acc, mask=ok)


def _sum_in_order(grads) -> torch.Tensor:
    """sum(g.float() for g in grads), in order, with torch ops (differentiable)."""
    out = grads[0].float()
    for g in grads[1:]:
        out = out + g.float()
    return out


def sum_fp32(grads) -> torch.Tensor:
    """sum(g.float() for g in grads) of same-shape tensors, in order, in fp32: one Triton pass
    per four gradients on GPUs (and under the interpreter; a contiguous result), torch ops
    elsewhere. Not
    differentiable on the kernel path (a backward's building block)."""
    return _sum_grads(grads, grads[0].shape, grads[0].device)


def _sum_grads(grads, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """sum(g.float() for g in grads), in order, as a contiguous fp32 tensor of `shape`."""
    if not (device.type == "cuda" or is_interpreter()):
        return _sum_in_order(grads)
    out = torch.empty(shape, dtype=torch.float32, device=device)
    n = out.numel()
    if n == 0:
        return out
    flat = [g.contiguous().view(-1) for g in grads]
    grid = (triton.cdiv(n, _BLOCK),)
    for i in range(0, len(flat), _MAX_IN):
        part = flat[i:i + _MAX_IN]
        args = part + [part[0]] * (_MAX_IN - len(part))
        _sum_grads_kernel[grid](*args, out, n, N_IN=len(part), ACCUMULATE=i > 0, BLOCK=_BLOCK,
                                num_warps=4)
    return out


class _CastFanout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, n: int, dtype: torch.dtype):
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None (not summed)
        ctx.shape, ctx.device = x.shape, x.device
        y = x.to(dtype)
        return tuple(y.view_as(y) for _ in range(n))

    @staticmethod
    def backward(ctx, *grads: Optional[torch.Tensor]):
        present = [g for g in grads if g is not None]
        if not present:
            return None, None, None
        if torch.is_grad_enabled():  # double backward: the same sum, differentiable
            return _sum_in_order(present), None, None
        return _sum_grads(present, ctx.shape, ctx.device), None, None


def fan_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The autocast dtype `x` would be rounded to by each consumer, or None (no rounding)."""
    dt = autocast_dtype(x.device.type)
    if dt is None or x.dtype != torch.float32 or dt == torch.float32:
        return None
    return dt


def cast_fanout(x: torch.Tensor, n: int) -> Tuple[torch.Tensor, ...]:
    """`n` aliases of `x` rounded once to the autocast dtype (one fp32 pass summing their
    gradients in backward); ``(x,) * n`` when autocast would not round `x`."""
    if n < 1:
        raise ValueError(f"cast_fanout needs n >= 1 consumers, got {n}")
    dt = fan_dtype(x)
    if dt is None or n == 1 or (x.is_leaf and x.requires_grad
                                and torch.is_autocast_cache_enabled()):
        # (one consumer rounds once anyway; and autocast caches its cast of a leaf that
        # requires grad: one rounding already, the gradients summed at the cast's output in its
        # dtype, as stock does: left to autocast)
        return (x,) * n
    if not (torch.is_grad_enabled() and x.requires_grad):
        y = x.to(dt)
        return (y,) * n
    return _CastFanout.apply(x, n, dt)


def cast_fanout_reference(x: torch.Tensor, n: int) -> Tuple[torch.Tensor, ...]:
    """Stock OpenFold: every consumer gets `x` (and autocast rounds it in each of them)."""
    if n < 1:
        raise ValueError(f"cast_fanout needs n >= 1 consumers, got {n}")
    return (x,) * n
