"""A Linear with a bias whose gradient is a fused column sum: ``linear(x, weight, bias)``.

The attentions' gate and output projections (``linear_g``, ``linear_o``) are Linears with a bias
over every row of the MSA or the pair tensor (up to N_seq * N_res or N_res^2 rows). Autograd
forms the bias gradient as torch's sum over those rows of the output gradient, a reduction that
on an H200 ran at ~0.8 TB/s (0.12 ms for the MSA's [512 * 384, 256] bf16 gradient; eight of
them per Evoformer block step, 4% of the plugin's captured step). Here the forward is the same
``F.linear`` (the same GEMM with the bias in its epilogue), and the backward is autograd's
formulas, ``dx = g @ W`` and ``dW = g^T @ x``, with the bias gradient summed by a Triton kernel:
per-program fp32 partial sums over slices of rows, then one sum of the partials.

Precision contract: forward exactly ``F.linear`` in the dtype autocast would run it (x, weight
and bias rounded to the autocast dtype first, as autocast does); dx and dW as autograd computes
them; the bias gradient summed in fp32 and rounded once to the bias's compute dtype, as torch's
sum does (only the order of the fp32 additions differs). ``linear_reference`` is ``F.linear``.
Without gradients, without a trainable bias, for fp64, or on a CPU without the interpreter,
``linear`` is ``F.linear``.

When: on a GPU, ``linear`` takes the column sum only while the current stream is being captured
into a CUDA graph, and is ``F.linear`` in eager mode (``linear_fused`` always takes it). The
kernel saves GPU time (on an H100, the backward of the MSA's [512 * 384, 256] projection 0.45 ->
0.41 ms of kernel time; the captured block step 27.14 -> 26.60 ms at 512 x 384), but an autograd
Function in Python costs more host time per call than autograd's own ``F.linear`` (the same
backward timed eagerly, alone: 0.46 -> 0.60 ms, and 0.32 -> 0.58 ms for a pair projection at
N_res 256; ``benchmarks/profile_linear.py``), and the plugin's eager block step is host-bound
at training crops such as 128 x 256 (on an H100, 28.5 ms of wall for ~8.8 ms of GPU kernel time:
``docs/benchmarks.md``): there the kernel would cost more than it saves. In a replayed graph
the host drops out. A kernel's first launch loads it into the device, which CUDA forbids
inside a capture: eager calls launch, once per shape class, the kernel their backward would take
in a capture (``_prepare_capture``: the warm-up steps before a capture do it), and a captured
backward whose kernel was never launched sums the bias gradient with torch instead.

Differences from autograd's F.linear: under autocast with its cache on, a leaf weight used by
several calls in one autocast region is rounded once by autocast and its gradients summed in
bf16; here each call rounds it and the gradients are summed in fp32 by the accumulation (only
when the same Linear runs on several chunks in training, which OpenFold's training configs do
not do). The backward is once-differentiable (double backward raises), and forward-mode AD and
``torch.func`` transforms are not supported.

Host time: the launch geometry is worked out once per (rows, channels, device, interpreter).
"""
import functools
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._triton_utils import (
    autocast_dtype,
    cdiv,
    check_devices,
    is_interpreter,
    max_programs,
    next_power_of_2,
)


@triton.jit
def _column_sum_kernel(G, PART, M, C, stride_g, rows_per_program,
                       BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """PART[c, pid] = sum of G[r, c] (fp32) over this program's `rows_per_program` rows (the
    partials of a column along contiguous memory: the caller's sum of them reads it so). The
    tiles are added elementwise and reduced over their rows once, at the end: a reduction
    across the rows of each tile would cross warps (shared memory and a barrier) every step."""
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    row0 = pid.to(tl.int64) * rows_per_program
    for i in range(0, rows_per_program, BLOCK_M):
        rows = row0 + i + tl.arange(0, BLOCK_M)
        ok = (rows < M)[:, None] & col_ok[None, :]
        acc += tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=ok,
                       other=0.0).to(tl.float32)
    tl.store(PART + cols * tl.num_programs(0) + pid, tl.sum(acc, axis=0), mask=col_ok)


class _Plan(NamedTuple):
    grid: tuple
    rows_per_program: int
    kwargs: dict  # BLOCK_M, BLOCK_C, num_warps


# programs per SM of the column sum (``benchmarks/sweep_row_passes.py`` times the choices):
# each loops over its share of the rows, whose loads it waits for one tile at a time
_PROGRAMS_PER_SM = 4


@functools.lru_cache(maxsize=256)
def _plan(m: int, c: int, device: torch.device, interp: bool) -> _Plan:
    """The launch geometry of the column sum of `m` (> 0) rows of `c` channels on `device`."""
    check_devices(device)
    block_c = min(next_power_of_2(c), 128)
    block_m = max(1, min(64, (32768 if interp else 4096) // block_c))
    col_blocks = cdiv(c, block_c)
    n_tiles = cdiv(m, block_m)
    # about max_programs() programs in all, each over whole tiles of rows
    n_row_prog = max(1, min(n_tiles, max_programs(device, _PROGRAMS_PER_SM) // col_blocks))
    rows_per_program = cdiv(n_tiles, n_row_prog) * block_m
    return _Plan((cdiv(m, rows_per_program), col_blocks), rows_per_program,
                 dict(BLOCK_M=block_m, BLOCK_C=block_c, num_warps=4))


# The launches of the column-sum kernel made so far in this process, by what Triton compiles a
# binary for (``_launch_key``). A first launch loads the binary into the device (a module load),
# which CUDA forbids while a stream is being captured into a graph; inside a capture
# ``column_sum`` therefore launches only what has been launched before (``linear`` launches
# its likely backward's kernel once, eagerly, for that: ``_prepare_capture``) and otherwise
# sums with torch.
_LAUNCHED: set = set()


def _int_class(v: int) -> tuple:
    """What Triton may specialise an integer argument on: the value 1, divisibility (by 16,
    and by 8 to stay finer than any version's rule) and the 32-bit range."""
    return (v == 1, v % 16 == 0, v % 8 == 0, -2 ** 31 <= v < 2 ** 31)


def _launch_key(g2: torch.Tensor, m: int, c: int, plan: _Plan) -> tuple:
    return (g2.device, g2.dtype, g2.data_ptr() % 16 == 0, _int_class(m), _int_class(c),
            _int_class(g2.stride(0)), _int_class(plan.rows_per_program),
            tuple(sorted(plan.kwargs.items())))


def _launch(g2: torch.Tensor, m: int, plan: _Plan) -> torch.Tensor:
    """The fp32 partial sums [C, programs] of g2's first `m` rows (`plan`: ``_plan``'s)."""
    c = g2.shape[1]
    part = torch.empty((c, plan.grid[0]), dtype=torch.float32, device=g2.device)
    _column_sum_kernel[plan.grid](g2, part, m, c, g2.stride(0), plan.rows_per_program,
                                  **plan.kwargs)
    return part


def column_sum(g2: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """g2 [M, C] (unit column stride) summed over its rows in fp32, rounded to `out_dtype`."""
    m, c = g2.shape
    if m == 0:
        return g2.new_zeros((c,), dtype=out_dtype)
    if g2.stride(1) != 1 and c > 1:
        raise ValueError(f"column_sum: g2 needs a unit column stride, got strides {g2.stride()}")
    plan = _plan(m, c, g2.device, is_interpreter())
    key = _launch_key(g2, m, c, plan)
    if key not in _LAUNCHED and _capturing(g2):
        # never launched before: its first launch cannot be captured (see _LAUNCHED)
        return torch.sum(g2, 0, dtype=torch.float32).to(out_dtype)
    part = _launch(g2, m, plan)
    _LAUNCHED.add(key)
    return part.sum(1).to(out_dtype)


def _capturing(t: torch.Tensor) -> bool:
    """Whether `t`'s device's current stream is being captured into a CUDA graph."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _class_representative(v: int) -> Optional[int]:
    """The smallest positive int of `v`'s ``_int_class`` (None beyond the 32-bit range)."""
    if v >= 2 ** 31:
        return None
    return 1 if v == 1 else 16 if v % 16 == 0 else 8 if v % 8 == 0 else 3


@functools.lru_cache(maxsize=256)
def _prepare_capture(m: int, c: int, dtype: torch.dtype, device: torch.device) -> None:
    """Launch, once, the column-sum kernel that the backward of a `linear` call over `m` rows of
    `c` output channels in `dtype` would launch in a captured graph (a contiguous gradient), on
    a few rows of zeros with the same specialisation, so that a capture finds it loaded."""
    rows = _class_representative(m)
    if rows is None:
        return
    plan = _plan(m, c, device, is_interpreter())
    g2 = torch.zeros((rows, c), dtype=dtype, device=device)
    _launch(g2, rows, plan)
    _LAUNCHED.add(_launch_key(g2, m, c, plan))  # (rows has m's class: the key of m's launch)


class _LinearFn(torch.autograd.Function):
    """F.linear(x, weight, bias) on tensors already in their compute dtype (autocast off)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        # what the backward reads, as autograd's addmm saves it: x for dW, the weight for dx
        ctx.save_for_backward(x if weight.requires_grad else None,
                              weight if x.requires_grad else None)
        ctx.x_shape = x.shape
        return F.linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        if g2.stride(-1) != 1:
            g2 = g2.contiguous()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = (g2 @ weight).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dw = g2.t() @ x.reshape(-1, x.shape[-1])
        if ctx.needs_input_grad[2]:
            db = column_sum(g2, g.dtype)
        return dx, dw, db


def linear_reference(x: torch.Tensor, weight: torch.Tensor,
                     bias: Optional[torch.Tensor]) -> torch.Tensor:
    """OpenFold's Linear: ``F.linear``."""
    return F.linear(x, weight, bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; on a GPU while a CUDA graph is being captured (and on a
    CPU under the interpreter), ``linear_fused``: the bias gradient by the column-sum kernel
    (see the module docstring, "When")."""
    if x.is_cuda and not torch.cuda.is_current_stream_capturing():
        if _takes_kernel(x, weight, bias) and x.numel() > 0:
            # (the eager steps before a capture: the backward's kernel loaded now, not in it)
            out_dtype = autocast_dtype("cuda") or torch.promote_types(x.dtype, weight.dtype)
            _prepare_capture(x.numel() // x.shape[-1], weight.shape[0], out_dtype, x.device)
        return F.linear(x, weight, bias)
    return linear_fused(x, weight, bias)


def _takes_kernel(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether ``linear_fused`` forms this call's bias gradient with the kernel."""
    return not (bias is None or not bias.requires_grad or not torch.is_grad_enabled()
                or not (x.is_cuda or is_interpreter()) or weight.shape[0] == 0
                or torch.float64 in (x.dtype, weight.dtype, bias.dtype))


def linear_fused(x: torch.Tensor, weight: torch.Tensor,
                 bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; when the bias needs a gradient, that gradient by the
    column-sum kernel (see the module docstring). ``F.linear`` itself without gradients, without
    a trainable bias, for fp64 or empty tensors, and on a CPU without the interpreter."""
    if not _takes_kernel(x, weight, bias):
        return F.linear(x, weight, bias)
    dt = autocast_dtype(x.device.type)
    if dt is None:
        return _LinearFn.apply(x, weight, bias)
    # as autocast: the inputs rounded to its dtype (no-ops where they are already), each call
    # (autocast would reuse one cached cast of a leaf weight across calls in one region)
    x, weight, bias = x.to(dt), weight.to(dt), bias.to(dt)
    with torch.autocast(x.device.type, enabled=False):
        return _LinearFn.apply(x, weight, bias)


def _stack(weights, biases, dt: Optional[torch.dtype] = None):
    """(the weights stacked, the biases stacked with zeros where a Linear has none, or None
    without any), rounded to `dt` if given: a cat and a cast, and a zero fill and one copy per
    bias (q, k, v and a gated attention's one bias: two launches)."""
    w = torch.cat(list(weights))
    if dt is not None:
        w = w.to(dt)
    b = None
    if any(t is not None for t in biases):
        b = w.new_zeros(w.shape[0])
        row = 0
        for w_, t in zip(weights, biases, strict=True):
            if t is not None:
                b[row:row + w_.shape[0]].copy_(t)
            row += w_.shape[0]
    return w, b


class _PackedLinearFn(torch.autograd.Function):
    """``linear_packed`` on x already in its compute dtype `dt` (autocast off); the weights and
    biases in their own dtypes, stacked and rounded to `dt` here."""

    @staticmethod
    def forward(ctx, x, dt, n, *params):
        weights, biases = params[:n], params[n:]
        w, b = _stack(weights, biases, dt)
        ctx.save_for_backward(x if any(t.requires_grad for t in weights) else None,
                              w if x.requires_grad else None)
        ctx.x_shape, ctx.dt = x.shape, dt
        ctx.rows = [t.shape[0] for t in weights]
        ctx.dtypes = [None if t is None else t.dtype for t in params]
        return F.linear(x, w, b)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        n = len(ctx.rows)
        g2 = g.reshape(-1, g.shape[-1])
        if g2.stride(-1) != 1:
            g2 = g2.contiguous()
        needs = ctx.needs_input_grad[3:]
        dx = None
        if ctx.needs_input_grad[0]:
            dx = (g2 @ w).view(ctx.x_shape)
        grads = [None] * (2 * n)
        bounds = [0]
        for r in ctx.rows:
            bounds.append(bounds[-1] + r)
        if any(needs[:n]):
            dw = g2.t() @ x.reshape(-1, x.shape[-1])  # one GEMM; each weight its rows
            if len(set(ctx.dtypes[:n])) == 1:
                dw = dw.to(ctx.dtypes[0])  # one conversion; each gradient a view of its rows
            for i in range(n):
                if needs[i]:
                    grads[i] = dw[bounds[i]:bounds[i + 1]].to(ctx.dtypes[i])
        for i in range(n):
            if needs[n + i]:
                db = column_sum(g2[:, bounds[i]:bounds[i + 1]], ctx.dt)
                grads[n + i] = db.to(ctx.dtypes[n + i])
        return (dx, None, None, *grads)


def linear_packed_reference(x: torch.Tensor, weights: Sequence[torch.Tensor],
                            biases: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
    """OpenFold's Linears that read one input, their outputs side by side:
    ``torch.cat([F.linear(x, w, b) for w, b in zip(weights, biases)], -1)``."""
    return torch.cat([F.linear(x, w, b) for w, b in zip(weights, biases, strict=True)], -1)


def linear_packed(x: torch.Tensor, weights: Sequence[torch.Tensor],
                  biases: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
    """``linear_packed_reference`` as one GEMM: the weights stacked (and rounded to the autocast
    dtype under autocast, as autocast rounds each), missing biases zeros. Its backward is one
    GEMM for dx (the readers' gradients summed in the GEMM's fp32 accumulator, rounded once,
    where autograd rounds each reader's and sums them), one for the stacked weight gradient
    (converted once to the weights' dtype; each weight's gradient is a view of its rows, which
    autograd's accumulation takes as the parameter's ``.grad`` or adds into it), and each bias
    gradient summed by the column-sum kernel over its own columns. Outside autograd (no
    gradient asked for, fp64, or on a CPU without the interpreter) it is ``F.linear`` of the
    stacked weights.

    Every output column is the same dot product as its own Linear's; cuBLAS may order the fp32
    accumulation differently for the wider GEMM."""
    if len(weights) != len(biases) or not weights:
        raise ValueError(f"linear_packed needs one bias (or None) per weight, got "
                         f"{len(weights)} weights and {len(biases)} biases")
    params = (*weights, *biases)
    grad = torch.is_grad_enabled() and (x.requires_grad or any(
        t is not None and t.requires_grad for t in params))
    dt = autocast_dtype(x.device.type)
    if (not grad or not (x.is_cuda or is_interpreter())
            or any(t is not None and t.dtype == torch.float64 for t in (x, *params))):
        return F.linear(x, *_stack(weights, biases))
    if dt is None:
        bad = [t.dtype for t in params if t is not None and t.dtype != x.dtype]
        if bad:  # (as F.linear: no implicit casts outside autocast)
            raise TypeError(f"linear_packed: x is {x.dtype} but weights / biases are {bad}; "
                            "cast them or run under autocast")
        return _PackedLinearFn.apply(x, x.dtype, len(weights), *params)
    x = x.to(dt)
    with torch.autocast(x.device.type, enabled=False):
        return _PackedLinearFn.apply(x, dt, len(weights), *params)
