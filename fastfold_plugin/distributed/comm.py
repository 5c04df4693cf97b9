"""Communication primitives of Dynamic Axial Parallelism, as paired autograd Functions.

Every primitive takes its process group explicitly. ``group=None`` stands for a group of one
process (no DAP) - never for torch's default group - and every primitive is then a no-op, as it is
on any group of size 1.

Gradient convention. A tensor is *replicated* (every rank of the group holds the same full value:
a stack's inputs and outputs) or *sharded* (rank r holds block r of one dim). A replicated
tensor's gradient is its full gradient on every rank; a sharded tensor's gradient is the gradient
of the local block. Under this convention each primitive's backward is the exact adjoint of its
forward, and each pair below is a pair of adjoints:

=========================================  ==============================  ===================
forward                                    backward                        use
=========================================  ==============================  ===================
``scatter``: replicated -> own block       all-gather (= ``gather``)       enter the DAP region
``gather``: blocks -> replicated           own block (= ``scatter``)       leave the DAP region
``all_gather``: blocks -> full, read by    reduce-scatter (sum)            b in triangle mult.,
sharded computation                                                        pair / triangle bias
``reduce_scatter``: partial sums -> block  all-gather                      (adjoint of the above)
``all_to_all`` (``row_to_col``)            ``all_to_all`` back             switch the split axis
``sum_grads``: identity                    all-reduce (sum)                replicated weights
=========================================  ==============================  ===================

``gather``'s backward keeps the local block because every rank holds the same full gradient of a
replicated tensor; ``all_gather``'s backward must *sum* the blocks over ranks (reduce-scatter),
because each rank's gradient of the gathered tensor is only its own shard's contribution. Using the
local block there is wrong (a classic DAP bug).

Async variants (the duality async operation): ``all_gather_start`` / ``all_to_all_start`` /
``reduce_scatter_start`` launch the collective and return a :class:`Pending`; ``Pending.wait()``
(after independent compute) completes it. In backward the order is mirrored: the wait's backward
launches the dual collective asynchronously, and the start's backward waits for it, so the dual
runs while autograd computes the gradients of the work that sat between start and wait.

A failed or timed-out collective raises :class:`DAPCommError` naming the collective and the group.
"""
import math
from functools import partial
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch.autograd import Function

from .peer import PeerAllToAll

ProcessGroup = Optional["dist.ProcessGroup"]


class DAPCommError(RuntimeError):
    """A DAP collective failed: a peer process exited, or did not reach the collective within the
    process group's timeout."""


def group_size(group) -> int:
    """Number of processes in `group` (1 for None)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    """This process's rank inside `group` (0 for None)."""
    return 0 if group is None else dist.get_rank(group)


def _guard(op: str, group, fn):
    try:
        return fn()
    except RuntimeError as e:  # DistBackendError, gloo/NCCL timeouts and closed connections
        if isinstance(e, DAPCommError):
            raise
        raise DAPCommError(
            f"DAP {op} on a group of {group_size(group)} processes failed on group rank "
            f"{group_rank(group)} (global rank {dist.get_rank()}): {e}. (A peer process that "
            f"exited, or did not reach this collective within the process group's timeout, makes "
            f"the collectives of the other ranks fail this way.)"
        ) from e


def _wait(op: str, group, work) -> None:
    if work is not None:
        _guard(op, group, work.wait)


def _norm(dim: int, nd: int) -> int:
    if not -nd <= dim < nd:
        raise IndexError(f"dim {dim} out of range for a {nd}-d tensor")
    return dim % nd


def _check_divisible(x: torch.Tensor, dim: int, p: int, op: str) -> None:
    if x.shape[dim] % p != 0:
        raise ValueError(
            f"DAP {op}: dim {dim} of shape {tuple(x.shape)} is not a multiple of the group size "
            f"{p}; pad it first (fastfold_plugin.distributed.pad_to_multiple)")


# ----------------------------------------------------------------------------------------------
# Raw collectives (no autograd). Each launcher returns (output buffer, work, keep-alive input);
# work is None when the call was synchronous. The finishers turn the buffer into the result.

def _run_kernel_ok(*tensors: torch.Tensor) -> bool:
    """Whether the run kernel may do a copy or add: CUDA tensors, with grad mode off (the kernel
    has no backward and its writes do not count as in-place ops for autograd's version checks;
    torch's ops do both)."""
    return tensors[-1].is_cuda and not torch.is_grad_enabled()


def dense(x: torch.Tensor) -> torch.Tensor:
    """`x` itself when contiguous, else a contiguous copy; on a GPU with the plugin's run-copy
    kernel (``fastfold_plugin.kernels.layout``: the packs and unpacks around the collectives
    are views made of long contiguous runs, which torch copies element by element)."""
    if x.is_contiguous():
        return x
    if _run_kernel_ok(x):
        from fastfold_plugin.kernels.layout import contiguous
        return contiguous(x)
    return x.contiguous()


def copy_runs(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst.copy_(src)``, on a GPU with the run-copy kernel (see :func:`dense`)."""
    if _run_kernel_ok(dst, src):
        from fastfold_plugin.kernels.layout import copy_
        return copy_(dst, src)
    return dst.copy_(src)


def add_runs(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst.add_(src)``; on a GPU, when the two have one shape, with the run kernel (an update
    that arrives in a switched layout, added into the residual stream: see :func:`dense`)."""
    if _run_kernel_ok(dst, src) and src.shape == dst.shape:
        from fastfold_plugin.kernels.layout import add_
        return add_(dst, src)
    return dst.add_(src)


def _local_block(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    p = group_size(group)
    _check_divisible(x, dim, p, "scatter")
    c = x.shape[dim] // p
    return x.narrow(dim, group_rank(group) * c, c).clone(memory_format=torch.contiguous_format)


def _launch_all_gather(x: torch.Tensor, group, async_op: bool):
    inp = x.contiguous()
    p = group_size(group)
    # the output as the concatenation along dim 0 (the form every backend accepts)
    buf = inp.new_empty((p * inp.shape[0],) + tuple(inp.shape[1:]))
    work = _guard("all-gather", group, lambda: dist.all_gather_into_tensor(
        buf, inp, group=group, async_op=async_op))
    return buf.unflatten(0, (p, -1)), work, inp


def _finish_all_gather(buf: torch.Tensor, dim: int) -> torch.Tensor:
    # [P, *block] -> blocks concatenated along dim (dim of the block, non-negative)
    if dim == 0:
        return buf.flatten(0, 1)
    return dense(buf.movedim(0, dim)).flatten(dim, dim + 1)


def _launch_reduce_scatter(x: torch.Tensor, dim: int, group, async_op: bool):
    p = group_size(group)
    _check_divisible(x, dim, p, "reduce-scatter")
    # [..., P * c, ...] -> [P, ..., c, ...]: block q of dim goes to rank q
    inp = dense(x.unflatten(dim, (p, -1)).movedim(dim, 0))
    out = inp.new_empty(inp.shape[1:])
    flat_in = inp.flatten(0, 1)  # the concatenation form every backend accepts
    work = _guard("reduce-scatter", group, lambda: dist.reduce_scatter_tensor(
        out, flat_in, op=dist.ReduceOp.SUM, group=group, async_op=async_op))
    return out, work, inp


def _launch_all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group,
                       async_op: bool, copy_engine: bool = True):
    p = group_size(group)
    _check_divisible(x, scatter_dim, p, "all-to-all")
    # by copy engines on GPUs where it applies (``peer``)
    ce = PeerAllToAll.launch(x, scatter_dim, gather_dim, group) if copy_engine else None
    if ce is not None:
        if not async_op:
            ce.work.wait()
        return ce, (ce.work if async_op else None), None
    inp = dense(x.unflatten(scatter_dim, (p, -1)).movedim(scatter_dim, 0))
    out = torch.empty_like(inp)
    work = _guard("all-to-all", group, lambda: dist.all_to_all_single(
        out, inp, group=group, async_op=async_op))
    return out, work, inp


def _finish_all_to_all(buf, gather_dim: int) -> torch.Tensor:
    if isinstance(buf, PeerAllToAll):
        return buf.finish()
    # buf[q] is rank q's block for this rank; concatenate them along gather_dim
    return dense(buf.movedim(0, gather_dim)).flatten(gather_dim, gather_dim + 1)


def _all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    buf, _, _ = _launch_all_gather(x, group, False)
    return _finish_all_gather(buf, dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    out, _, _ = _launch_reduce_scatter(x, dim, group, False)
    return out


def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group,
                copy_engine: bool = True) -> torch.Tensor:
    buf, _, _ = _launch_all_to_all(x, scatter_dim, gather_dim, group, False, copy_engine)
    return _finish_all_to_all(buf, gather_dim)


# ----------------------------------------------------------------------------------------------
# Synchronous autograd Functions

class _Scatter(Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _local_block(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, ctx.dim, ctx.group), None, None


class _Gather(Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return _local_block(g, ctx.dim, ctx.group), None, None


class _AllGather(Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter(g, ctx.dim, ctx.group), None, None


class _ReduceScatter(Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, ctx.dim, ctx.group), None, None


class _AllToAll(Function):
    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group, copy_engine):
        ctx.dims, ctx.group, ctx.copy_engine = (scatter_dim, gather_dim), group, copy_engine
        return _all_to_all(x, scatter_dim, gather_dim, group, copy_engine)

    @staticmethod
    def backward(ctx, g):
        s, gd = ctx.dims
        return _all_to_all(g, gd, s, ctx.group, ctx.copy_engine), None, None, None, None


class _SumGrads(Function):
    @staticmethod
    def forward(ctx, group, *tensors):
        ctx.group = group
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        out: List[Optional[torch.Tensor]] = list(grads)
        buckets = {}
        for i, g in enumerate(grads):
            if g is not None:
                buckets.setdefault((g.dtype, g.device), []).append(i)
        for idx in buckets.values():
            flat = torch.cat([grads[i].reshape(-1) for i in idx])
            _guard("gradient all-reduce", ctx.group,
                   partial(dist.all_reduce, flat, op=dist.ReduceOp.SUM, group=ctx.group))
            for i, part in zip(idx, flat.split([grads[i].numel() for i in idx])):
                out[i] = part.view_as(grads[i])
        return (None,) + tuple(out)


def scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Replicated `x` -> this rank's block along `dim` (a contiguous copy). Backward: all-gather.

    `x.shape[dim]` must be a multiple of the group size (see :func:`pad_to_multiple`)."""
    if group_size(group) == 1:
        return x
    return _Scatter.apply(x, _norm(dim, x.dim()), group)


def gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Blocks along `dim` -> the full, replicated tensor. Backward: this rank's block of the
    (replicated) gradient. For a result read by sharded computation use :func:`all_gather`."""
    if group_size(group) == 1:
        return x
    return _Gather.apply(x, _norm(dim, x.dim()), group)


def all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Blocks along `dim` -> the full tensor, read by sharded computation. Backward:
    reduce-scatter (the sum over ranks of the gradient, block by block)."""
    if group_size(group) == 1:
        return x
    return _AllGather.apply(x, _norm(dim, x.dim()), group)


def reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Per-rank full-size partial sums -> this rank's block (along `dim`) of their sum.
    Backward: all-gather."""
    if group_size(group) == 1:
        return x
    return _ReduceScatter.apply(x, _norm(dim, x.dim()), group)


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group,
               copy_engine: bool = True) -> torch.Tensor:
    """Re-shard: split `x` along `scatter_dim` into group-size blocks, send block q to rank q, and
    concatenate the blocks received along `gather_dim` (in rank order). Backward: the all-to-all
    with the two dims swapped. On GPUs it goes by copy engines where it can (``peer``);
    `copy_engine` False keeps it on NCCL."""
    if group_size(group) == 1:
        return x
    nd = x.dim()
    s, g = _norm(scatter_dim, nd), _norm(gather_dim, nd)
    if s == g:
        raise ValueError("all_to_all: scatter_dim and gather_dim must differ")
    return _AllToAll.apply(x, s, g, group, copy_engine)


def row_to_col(x: torch.Tensor, group) -> torch.Tensor:
    """[*, I/P, J, C] (split along rows) -> [*, I, J/P, C] (split along columns).

    Also the MSA switch [*, S/P, N, C] -> [*, S, N/P, C]."""
    return all_to_all(x, -2, -3, group)


def col_to_row(x: torch.Tensor, group, copy_engine: bool = True) -> torch.Tensor:
    """[*, I, J/P, C] (split along columns) -> [*, I/P, J, C] (split along rows)."""
    return all_to_all(x, -3, -2, group, copy_engine)


class _RowToColFanout(Function):
    """x [*, I/P, J, C] -> `n` aliases of [*, J/P, I, C] (this rank's columns, transposed:
    the rows of x^T's shard), rounded to `dtype` (None: not rounded) before the all-to-all.
    Backward: the consumers' gradients summed (rounded: in fp32, ``sum_fp32``), moved back."""

    @staticmethod
    def forward(ctx, x, n, dtype, group):
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None
        ctx.group, ctx.rounded = group, dtype is not None
        nd = x.dim()
        y = x if dtype is None else x.to(dtype)
        if group_size(group) > 1:
            y = _all_to_all(y, nd - 2, nd - 3, group)  # [*, I, J/P, C]
        yt = dense(y.transpose(-2, -3))
        return tuple(yt.view_as(yt) for _ in range(n))

    @staticmethod
    def backward(ctx, *grads):
        from fastfold_plugin.kernels.cast_fanout import sum_fp32
        if torch.is_grad_enabled():
            raise RuntimeError("row_to_col_fanout has no double backward (create_graph=True)")
        present = [g for g in grads if g is not None]
        if not present:
            return None, None, None, None
        if ctx.rounded:  # the gradients of the rounded copies, summed in fp32 (x's dtype)
            g = sum_fp32(present)
        else:  # x's own dtype, as autograd sums them
            g = present[0]
            for t in present[1:]:
                g = g + t
        g = g.transpose(-2, -3)  # [*, I, J/P, C]
        if group_size(ctx.group) == 1:
            return g, None, None, None
        nd = g.dim()
        return _all_to_all(g, nd - 3, nd - 2, ctx.group), None, None, None


def row_to_col_fanout(x: torch.Tensor, n: int, group) -> Tuple[torch.Tensor, ...]:
    """The rows x [*, I/P, J, C] (an fp32 activation, e.g. a LayerNorm output) switched to this
    rank's columns and transposed, [*, J/P, I, C] (contiguous: the rows of x^T's shard), as `n`
    aliases for `n` consumers (Linears) that autocast would each round x for.

    Under autocast (x fp32, a lower autocast dtype) x is rounded once before the all-to-all,
    which then moves half the bytes of fp32 (bf16 / fp16), and the consumers read the values
    autocast would give them; backward sums their gradients in fp32
    (``kernels.cast_fanout.sum_fp32``) and moves that sum back to rows: x's gradient is the fp32
    sum autograd forms, up to the order of the additions. Otherwise x moves as it is. Backward
    is the exact adjoint (the all-to-all back). At group size 1: x^T's rows locally."""
    if n < 1:
        raise ValueError(f"row_to_col_fanout needs n >= 1 consumers, got {n}")
    if x.dim() < 3:
        raise ValueError(f"row_to_col_fanout: x must be [*, I/P, J, C], got {tuple(x.shape)}")
    if group_size(group) > 1:
        _check_divisible(x, x.dim() - 2, group_size(group), "row_to_col_fanout")
    from fastfold_plugin.kernels.cast_fanout import fan_dtype
    return _RowToColFanout.apply(x, n, fan_dtype(x), group)


def sum_grads(tensors: Sequence[torch.Tensor], group) -> Tuple[torch.Tensor, ...]:
    """Identity on `tensors`; in backward, their gradients are summed over the group (one
    flattened all-reduce per dtype). Wrap replicated weights with it where they are applied to
    shards: each rank's gradient is then the full one."""
    tensors = tuple(tensors)
    if group_size(group) == 1 or not tensors:
        return tensors
    return _SumGrads.apply(group, *tensors)


# ----------------------------------------------------------------------------------------------
# Async (start / wait) variants

class _Handle:
    """State shared by one start/wait pair, forward and backward."""

    def __init__(self, kind: str, group, dims: Tuple[int, ...], copy_engine: bool = True):
        self.kind, self.group, self.dims, self.copy_engine = kind, group, dims, copy_engine
        self.work = self.buf = self.keep = None
        self.bwd_work = self.bwd_buf = self.bwd_keep = None


_OP_NAMES = {"all_gather": "all-gather", "reduce_scatter": "reduce-scatter", "all_to_all": "all-to-all"}


def _launch(kind: str, x: torch.Tensor, dims, group, copy_engine: bool = True):
    if kind == "all_gather":
        return _launch_all_gather(x, group, True)
    if kind == "reduce_scatter":
        return _launch_reduce_scatter(x, dims[0], group, True)
    return _launch_all_to_all(x, dims[0], dims[1], group, True, copy_engine)


def _finish(kind: str, buf: torch.Tensor, dims) -> torch.Tensor:
    if kind == "all_gather":
        return _finish_all_gather(buf, dims[0])
    if kind == "reduce_scatter":
        return buf
    return _finish_all_to_all(buf, dims[1])


_DUAL = {"all_gather": "reduce_scatter", "reduce_scatter": "all_gather", "all_to_all": "all_to_all"}


def _dual_dims(kind: str, dims):
    return (dims[1], dims[0]) if kind == "all_to_all" else dims


class _Start(Function):
    """Launches the collective; returns an empty token that links the graph to the wait."""

    @staticmethod
    def forward(ctx, x, handle):
        ctx.handle = handle
        handle.buf, handle.work, handle.keep = _launch(handle.kind, x, handle.dims, handle.group,
                                                       handle.copy_engine)
        return x.new_empty(0)

    @staticmethod
    def backward(ctx, _token_grad):
        h = ctx.handle
        dual = _DUAL[h.kind]
        _wait(_OP_NAMES[dual], h.group, h.bwd_work)
        grad = _finish(dual, h.bwd_buf, _dual_dims(h.kind, h.dims))
        h.bwd_work = h.bwd_buf = h.bwd_keep = None
        return grad, None


class _Wait(Function):
    """Completes the collective. Its backward launches the dual collective (async)."""

    @staticmethod
    def forward(ctx, token, handle):
        ctx.handle = handle
        _wait(_OP_NAMES[handle.kind], handle.group, handle.work)
        out = _finish(handle.kind, handle.buf, handle.dims)
        handle.work = handle.buf = handle.keep = None
        return out

    @staticmethod
    def backward(ctx, g):
        h = ctx.handle
        dual = _DUAL[h.kind]
        h.bwd_buf, h.bwd_work, h.bwd_keep = _launch(dual, g, _dual_dims(h.kind, h.dims), h.group,
                                                    h.copy_engine)
        return g.new_empty(0), None


class Pending:
    """An in-flight collective: call :meth:`wait` once the independent compute is issued.

    Do not modify the input in place before the wait (the collective may still be reading it)."""

    def __init__(self, token: Optional[torch.Tensor], handle: Optional[_Handle],
                 result: Optional[torch.Tensor] = None):
        self._token, self._handle, self._result = token, handle, result

    def wait(self) -> torch.Tensor:
        if self._result is None:
            self._result = _Wait.apply(self._token, self._handle)
            self._token = self._handle = None
        return self._result


def _start(kind: str, x: torch.Tensor, dims: Tuple[int, ...], group,
           copy_engine: bool = True) -> Pending:
    if group_size(group) == 1:
        return Pending(None, None, x)
    handle = _Handle(kind, group, dims, copy_engine)
    return Pending(_Start.apply(x, handle), handle)


def all_gather_start(x: torch.Tensor, dim: int, group) -> Pending:
    """Async :func:`all_gather` (backward: async reduce-scatter)."""
    return _start("all_gather", x, (_norm(dim, x.dim()),), group)


def reduce_scatter_start(x: torch.Tensor, dim: int, group) -> Pending:
    """Async :func:`reduce_scatter` (backward: async all-gather)."""
    d = _norm(dim, x.dim())
    if group_size(group) > 1:
        _check_divisible(x, d, group_size(group), "reduce-scatter")
    return _start("reduce_scatter", x, (d,), group)


def all_to_all_start(x: torch.Tensor, scatter_dim: int, gather_dim: int, group,
                     copy_engine: bool = True) -> Pending:
    """Async :func:`all_to_all` (backward: the async all-to-all back). `copy_engine` False
    keeps it on NCCL (no symmetric-memory slot: ``peer``)."""
    nd = x.dim()
    s, g = _norm(scatter_dim, nd), _norm(gather_dim, nd)
    if s == g:
        raise ValueError("all_to_all_start: scatter_dim and gather_dim must differ")
    return _start("all_to_all", x, (s, g), group, copy_engine)


def row_to_col_start(x: torch.Tensor, group) -> Pending:
    """Async :func:`row_to_col`."""
    return all_to_all_start(x, -2, -3, group)


def col_to_row_start(x: torch.Tensor, group, copy_engine: bool = True) -> Pending:
    """Async :func:`col_to_row` (see :func:`all_to_all_start` for `copy_engine`)."""
    return all_to_all_start(x, -3, -2, group, copy_engine)


# ----------------------------------------------------------------------------------------------
# Inference variants (no autograd) that reuse memory the caller gives up

def _check_no_grad(name: str, alternative: str, *tensors: torch.Tensor) -> None:
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError(
            f"DAP {name}: reuses memory and has no backward; call it under torch.no_grad() "
            f"(with gradients, use {alternative})")


def _byte_range(t: torch.Tensor) -> Tuple[int, int]:
    return t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()


def all_to_all_(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    """:func:`all_to_all` for inference that consumes `x`: the result is written into x's memory
    (x's values are lost), so a switch of the split axis holds two buffers of x's size (x and
    the packed send or the receive buffer) instead of three. A non-contiguous `x` falls back to
    :func:`all_to_all`. No backward: raises if `x` needs a gradient."""
    _check_no_grad("all_to_all_", "all_to_all", x)
    p = group_size(group)
    if p == 1:
        return x
    nd = x.dim()
    s, g = _norm(scatter_dim, nd), _norm(gather_dim, nd)
    if s == g:
        raise ValueError("all_to_all_: scatter_dim and gather_dim must differ")
    _check_divisible(x, s, p, "all-to-all")
    if not x.is_contiguous():
        return _all_to_all(x, s, g, group, copy_engine=False)  # (inference: no slot held)
    blocks = x.unflatten(s, (p, -1)).movedim(s, 0)  # block q goes to rank q
    if blocks.is_contiguous():
        # x already holds the blocks in send order: receive elsewhere, unpack into x
        recv = torch.empty_like(blocks)
        _guard("all-to-all", group, lambda: dist.all_to_all_single(recv, blocks, group=group))
        res = recv.movedim(0, g)
        return copy_runs(x.view(res.shape), res).flatten(g, g + 1)
    send = dense(blocks)
    recv = x.view(send.shape)
    _guard("all-to-all", group, lambda: dist.all_to_all_single(recv, send, group=group))
    send = None  # noqa: F841 - freed before the result is formed
    return _finish_all_to_all(recv, g)


def row_to_col_(x: torch.Tensor, group) -> torch.Tensor:
    """:func:`row_to_col` consuming `x` (inference; see :func:`all_to_all_`)."""
    return all_to_all_(x, -2, -3, group)


def col_to_row_(x: torch.Tensor, group) -> torch.Tensor:
    """:func:`col_to_row` consuming `x` (inference; see :func:`all_to_all_`)."""
    return all_to_all_(x, -3, -2, group)


def exchange_blocks(send: torch.Tensor, group) -> torch.Tensor:
    """The all-to-all of blocks already in send order, for inference: block q of `send`
    [P, ...] goes to rank q; returns [P, ...] whose block q came from rank q. No unpacking (the
    caller reads the blocks through a view). No backward: raises if `send` needs a gradient."""
    _check_no_grad("exchange_blocks", "all_to_all", send)
    p = group_size(group)
    if send.dim() == 0 or send.shape[0] != p:
        raise ValueError(f"exchange_blocks: send {tuple(send.shape)} needs one block per process "
                         f"along dim 0 ({p})")
    if p == 1:
        return send
    send = send.contiguous()
    recv = torch.empty_like(send)
    _guard("all-to-all", group, lambda: dist.all_to_all_single(recv, send, group=group))
    return recv


def gather_into_(out: torch.Tensor, x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """:func:`gather` for inference, into `out` (the full tensor; e.g. the caller's input, which
    OpenFold's in-place inference returns updated). When the blocks along `dim` are contiguous
    pieces of `out` (`out` contiguous, every dim before `dim` of size 1) they are gathered
    straight into it, in place if `x` already is this rank's block of `out`; otherwise through
    one temporary full-size buffer. Returns `out`. No backward."""
    p = group_size(group)
    d = _norm(dim, x.dim())
    full = list(x.shape)
    full[d] *= p
    if list(out.shape) != full or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"gather_into_: out {tuple(out.shape)} {out.dtype} cannot hold the "
                         f"blocks of {tuple(x.shape)} {x.dtype} along dim {dim} on {p} processes")
    _check_no_grad("gather_into_", "gather", x, out)
    if p == 1:
        same = x.data_ptr() == out.data_ptr() and x.stride() == out.stride()
        return out if same else out.copy_(x)
    if not out.is_contiguous():
        return out.copy_(_all_gather(x, d, group))
    if math.prod(out.shape[:d]) != 1:
        buf, _, _ = _launch_all_gather(x, group, False)  # [P, *x.shape]
        copy_runs(out.view(x.shape[:d] + (p,) + x.shape[d:]), buf.movedim(0, d))
        return out
    flat = out.view((p * x.shape[d],) + tuple(x.shape[d + 1:]))
    inp = x.reshape(x.shape[d:])
    x0, x1 = _byte_range(inp)
    o0, o1 = _byte_range(out)
    own_block = o0 + group_rank(group) * (x1 - x0)
    if not inp.is_contiguous() or (x0 < o1 and o0 < x1 and x0 != own_block):
        inp = inp.clone(memory_format=torch.contiguous_format)  # misplaced inside out
    _guard("all-gather", group, lambda: dist.all_gather_into_tensor(flat, inp, group=group))
    return out
