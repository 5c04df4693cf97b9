"""DAP replacement forwards: OpenFold's Evoformer, extra-MSA and template pair stacks with one
protein's MSA and pair tensors split across the processes of a DAP group.

Entry points (:data:`DAP_FORWARDS`, OpenFold class -> replacement forward with the stock
signature, bound by ``fastfold_plugin.enable(model, dap=ctx)``):

- stacks (``EvoformerStack``, ``ExtraMSAStack``, ``TemplatePairStack``): pad N_res (and N_seq)
  once to a multiple of the DAP size, scatter, run every block on shards, gather, unpad;
- blocks (``EvoformerBlock``, ``ExtraMSABlock``, ``TemplatePairStackBlock``): the same around one
  block, for blocks called on their own.

Contract: every rank of the group passes the full inputs and gets the full outputs; the loss and
every parameter gradient equal the single-process ones. Each rank holds and computes only its
shard. Layouts (P = DAP size, S/N the padded N_seq/N_res):

==========================  =======================================  ===========================
sub-module                  split                                    communication
==========================  =======================================  ===========================
MSA row attention + bias    MSA [*, S/P, N, C_m] (rows); the         all-gather the [*, N/P, N,
                            residual in columns [*, S, N/P, C_m]     H] projected pair bias;
                            (the stack carries both, see below)      all-to-all of the update
                                                                     (autocast dtype) to columns
MSA column attention /      MSA columns (all sequences local)        none
global attention
MSA transition              MSA columns                              none
column -> row switch        -> MSA rows for the next block           async all-to-all, in flight
                                                                     during OPM + pair stack
outer product mean          a local [*, S, N/P, c], b all-gathered   all-gather b (N_res)
                            -> [*, N/P, N, C_z] (pair rows)
triangle mult. outgoing     pair rows [*, N/P, N, C_z]               all-gather b (rows);
                                                                     bwd: reduce-scatter db
triangle mult. incoming     pair rows (no switch before or after)    all-to-all a (its columns),
                                                                     all-gather b (rows); bwd:
                                                                     the all-to-all back,
                                                                     reduce-scatter db
triangle att. starting      pair rows                                all-gather the H-channel
                                                                     triangle bias
triangle att. ending        z stays in rows: its LayerNorm output    all-to-all of that output
                            (rounded to the autocast dtype) goes to  and of the update; the
                            columns (the rows of z^T), the update    bias all-gathered; bwd:
                            comes back to rows                       the adjoints (the output's
                                                                     gradient in fp32)
pair transition             pair rows                                none
==========================  =======================================  ===========================

m is carried from block to block in both layouts (training without activation checkpointing,
and inference outside OpenFold's in-place mode): the row attention reads the rows, and the
residual stream goes on in columns, so within a block only the row attention's update switches
axis (in the autocast dtype: half the bytes of the fp32 MSA under bf16), and the MSA goes back
to rows once, async, for the next block's row attention. In-place inference (no second shard)
and checkpointed training (a checkpoint keeps its inputs: one more MSA shard each) switch the
MSA itself to columns after the row attention (``run.to_cols``).

Padded positions have mask 0 and are left out of every key set (keys are cut to the real length),
so results at real positions - including fully masked rows - are the single-process ones.
Weights are replicated and applied to shards: their gradients are summed over the DAP group by
construction (``sum_grads`` around each block's parameters, one all-reduce per block).
Dropout masks are drawn full-size from torch's RNG in OpenFold's order on every rank (the ranks
of a group share one RNG stream; checked once per training forward) and cut to the shard, so
training under DAP draws exactly the masks one process would.

The single-process math on each shard is the op table's (``ops.attention``,
``ops.layer_norm``, ``ops.transition``, ``ops.global_attention``, ``ops.dropout_add``). The
triangle multiplication is the sharded op ``ops.triangle_multiplication_sharded`` (Triton: the
fused kernels on the shard around the all-gather). The outer product mean runs its LayerNorm
and projections on the local residues (``ops.outer_product_mean_projections``), all-gathers b,
and forms this rank's pair rows with ``ops.outer_product_mean_rows`` (Triton: a cuBLAS GEMM per
chunk of rows and the fused linear_out kernel, forward and backward). OpenFold's chunk-size tuner
is off under DAP: ``chunk_size`` (the config's value, the same on every rank) chunks the
row-wise computations as given.
"""
import math
from functools import partial
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from openfold.model.evoformer import EvoformerBlock, EvoformerStack, ExtraMSABlock, ExtraMSAStack
from openfold.model.template import TemplatePairStack, TemplatePairStackBlock
from openfold.utils.checkpointing import get_checkpoint_fn
from openfold.utils.precision_utils import is_fp16_enabled

import fastfold_plugin.distributed as fd
from fastfold_plugin.kernels.dropout_add import keep_mask_shape
from fastfold_plugin.kernels.triangle_multiplication import TriMulWeights

from .forwards import TRI_MUL_PARAMS, UnsupportedOption, cast_once, head_bias

# ----------------------------------------------------------------------------------------------
# Per-forward state

class _Run:
    """One stack forward under DAP: the group, the op table, real and padded lengths, the masks
    in each layout, and the call options."""

    def __init__(self, ctx, ops, n_res: int, n_seq: Optional[int], chunk_size: Optional[int],
                 inplace_safe: bool, mask_trans: bool):
        self.ctx, self.ops = ctx, ops
        self.group, self.p, self.rank = ctx.group, ctx.size, ctx.rank
        self.async_comm = ctx.async_comm and self.p > 1
        self.n_res = n_res
        self.np_res = fd.padded_length(n_res, self.p)
        self.n_seq = n_seq
        self.np_seq = None if n_seq is None else fd.padded_length(n_seq, self.p)
        self.chunk_size = chunk_size
        self.inplace_safe = inplace_safe
        self.mask_trans = mask_trans
        timeout = getattr(ctx, "timeout", None)
        self.timeout_s = None if timeout is None else timeout.total_seconds()

    def block(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's block of a replicated tensor that needs no gradient (masks)."""
        c = t.shape[dim] // self.p
        return t.narrow(dim, self.rank * c, c)

    def set_msa_mask(self, msa_mask: torch.Tensor) -> None:
        # [*, S, N] -> padded; rows [*, S/P, N]; columns [*, S, N/P]
        full = fd.pad_to(msa_mask, {-2: self.np_seq, -1: self.np_res})
        self.msa_mask_full = full
        self.msa_mask_row = self.block(full, -2)
        self.msa_mask_col = self.block(full, -1)

    def set_pair_mask(self, pair_mask: torch.Tensor) -> None:
        # [*, N, N] -> padded; rows [*, N/P, N]; columns [*, N, N/P]
        full = fd.pad_to(pair_mask, {-2: self.np_res, -1: self.np_res})
        self.pair_mask_row = self.block(full, -2)
        self.pair_mask_col = self.block(full, -1)

    # communication, sync or async per the context
    def all_gather(self, x: torch.Tensor, dim: int) -> fd.Pending:
        if self.async_comm:
            return fd.all_gather_start(x, dim, self.group)
        return fd.Pending(None, None, fd.all_gather(x, dim, self.group))

    def col_to_row(self, x: torch.Tensor) -> fd.Pending:
        # (in-place inference keeps NCCL: a copy-engine slot would hold one more MSA shard of
        # symmetric memory for the whole run, where inference works to a few shard buffers)
        if self.async_comm:
            return fd.col_to_row_start(x, self.group, copy_engine=not self.consume)
        return fd.Pending(None, None, fd.col_to_row(x, self.group, copy_engine=not self.consume))

    def add(self, x: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        if self.inplace_safe:
            return fd.add_runs(x, update)  # (an update in a switched layout: in whole runs)
        return x + update

    def gathered_bias(self, x: torch.Tensor, weight: torch.Tensor) -> Callable:
        """The per-head bias of the rows x [*, R, N, C] (``head_bias``: [*, R, H, N]), its
        all-gather over the rows launched now; returns pair_bias() -> the attention's
        [*, 1, H, N, N_keys] bias (waits for the gather). The gathered [*, N, H, N] needs no
        copy: its transpose has contiguous keys."""
        pend = self.all_gather(head_bias(x, weight), -3)
        return lambda: pend.wait().transpose(-2, -3).unsqueeze(-4)[..., :self.n_res]

    def into(self, x: torch.Tensor, keep: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """`x` when a row-chunked update may be added straight into it (OpenFold's in-place
        inference, no dropout mask), else None (the update is formed whole, then added)."""
        return x if self.inplace_safe and keep is None else None

    # OpenFold's in-place inference (inplace_safe, no gradients) gives its inputs up: shards are
    # views of them, axis switches write into the tensor they switch, outputs are gathered into
    # the caller's tensors (see docs/dap.md, "Memory in inference")
    @property
    def inference(self) -> bool:
        """Forward-only kernel paths (fused, chunked) may run: OpenFold's inference. Not
        merely "no gradients": a reentrant checkpoint's first pass has none either, and its
        recompute must compute the same numbers."""
        return self.inplace_safe and not torch.is_grad_enabled()

    @property
    def consume(self) -> bool:
        return self.p > 1 and self.inference

    def to_cols(self, x: torch.Tensor) -> torch.Tensor:
        """Rows -> columns of the MSA, synchronously (the pair tensor stays in rows)."""
        return fd.row_to_col_(x, self.group) if self.consume else fd.row_to_col(x, self.group)

    def shard(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's block along `dim` of a replicated (padded) input: a view of it when
        consuming and the block is contiguous, else a copy (``fd.scatter``)."""
        if self.consume:
            blk = self.block(x, dim)
            return blk if blk.is_contiguous() else blk.clone(memory_format=torch.contiguous_format)
        return fd.scatter(x, dim, self.group)

    def leave(self, x: torch.Tensor, dim: int, unpad: Dict[int, int],
              dest: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The full tensor of blocks `x` along `dim`, unpadded: into `dest` (the caller's input)
        when consuming and nothing was padded, else a new tensor."""
        full = list(x.shape)
        full[dim] *= self.p
        if self.consume and dest is not None and list(dest.shape) == full and dest.dtype == x.dtype:
            return fd.gather_into_(dest, x, dim, self.group)  # nothing was padded
        return fd.unpad(fd.gather(x, dim, self.group), unpad)


def _ops(module: nn.Module, x: torch.Tensor):
    state = module._fastfold_patch
    ops_for = getattr(state, "ops_for", None)
    return ops_for(x) if ops_for is not None else state.ops


def _dap(module: nn.Module):
    ctx = getattr(module._fastfold_patch, "dap", None)
    if ctx is None:
        raise RuntimeError(f"{type(module).__name__} has a DAP forward but no DAP context; enable "
                           f"it with fastfold_plugin.enable(model, dap=ctx)")
    return ctx


def _weights(module: nn.Module, run: _Run) -> Dict[str, torch.Tensor]:
    """`module`'s parameters by name; under DAP with gradients on, wrapped so that their
    gradients are summed over the group in backward (they are applied to shards)."""
    named = [(n, p) for n, p in module.named_parameters()]
    if run.p == 1 or not torch.is_grad_enabled():
        return dict(named)
    train = [(n, p) for n, p in named if p.requires_grad]
    synced = fd.sum_grads([p for _, p in train], run.group)
    out = dict(named)
    out.update(zip([n for n, _ in train], synced))
    return out


def _mask_bias(mask: torch.Tensor, inf: float, n_keys: int) -> torch.Tensor:
    """OpenFold's key mask bias for the real keys: [*, R, K] -> [*, R, 1, 1, n_keys]."""
    return (inf * (mask - 1))[..., :, None, None, :n_keys]


def _chunked(fn: Callable, chunk_size: Optional[int], n: int, *args,
             into: Optional[torch.Tensor] = None, sink: Optional[Callable] = None):
    """fn over chunks of `n` rows (dim -3 of its output): each arg is (tensor, dim) to slice, or a
    plain value. The chunks' outputs are concatenated; or, with `into`, added into its rows as
    they come (no full-size output: OpenFold's in-place inference adds the update to the
    residual stream anyway); or, with `sink`, handed to ``sink(start, end, output)`` one by one
    (returns None)."""
    def cut(t, dim, s, e):
        # (the whole tensor as it is: autograd builds a full-length narrow's gradient by
        # zero-filling a tensor of its input's size and copying into it; a full Python slice
        # would be an alias, narrow is not)
        return t if s == 0 and e == t.shape[dim] else t.narrow(dim, s, e - s)

    def piece(s, e):
        return [cut(a[0], a[1], s, e) if isinstance(a, tuple) else a for a in args]

    spans = ([(0, n)] if chunk_size is None or chunk_size >= n
             else [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)])
    if into is not None:
        for s, e in spans:
            fd.add_runs(into.narrow(-3, s, e - s), fn(*piece(s, e)))
        return into
    if sink is not None:
        for s, e in spans:
            sink(s, e, fn(*piece(s, e)))
        return None
    if len(spans) == 1:
        return fn(*piece(0, n))
    return torch.cat([fn(*piece(s, e)) for s, e in spans], dim=-3)


class _Switch:
    """Inference: the row -> column switch of a tensor [*, R, N, C] that is formed a chunk of
    rows at a time. Each chunk is written straight into the all-to-all's send layout
    [P, *, R, N/P, C] (block q: the columns of rank q) by :meth:`put`, so the switch needs no
    packing pass; :meth:`columns` exchanges the blocks and returns the columns
    [*, N (every rank's rows, in order), N/P (this rank's columns), C]."""

    def __init__(self, run: _Run, rows: int):
        self.run, self.rows, self.send = run, rows, None

    def put(self, s: int, e: int, chunk: torch.Tensor) -> None:
        p = self.run.p
        if self.send is None:
            self.send = chunk.new_empty((p, *chunk.shape[:-3], self.rows, chunk.shape[-2] // p,
                                         chunk.shape[-1]))
        fd.copy_runs(self.send.narrow(-3, s, e - s), chunk.unflatten(-2, (p, -1)).movedim(-3, 0))

    def columns(self) -> torch.Tensor:
        recv = fd.exchange_blocks(self.send, self.run.group)  # recv[q]: rank q's rows
        self.send = None
        return fd.dense(recv.movedim(0, -4)).flatten(-4, -3)  # a copy only with batch dims


def _draw_keep(drop: nn.Module, shape, like: torch.Tensor) -> Optional[torch.Tensor]:
    """The keep-mask OpenFold's Dropout would draw for an update of the full, unpadded `shape`
    (None when not dropping)."""
    if not (drop.training and drop.r > 0.0):
        return None
    return F.dropout(like.new_ones(keep_mask_shape(list(shape), drop.batch_dim)), drop.r, True)


def _residual(run: _Run, drop: nn.Module, x: torch.Tensor, update: torch.Tensor,
              keep: Optional[torch.Tensor]) -> torch.Tensor:
    if keep is None:
        return run.add(x, update)
    return run.ops.dropout_add(x, update, drop.r, True, drop.batch_dim, mask=keep)


# ----------------------------------------------------------------------------------------------
# Sub-modules on shards

def _attend(run: _Run, W, pfx: str, mha: nn.Module, x, n_keys: int,
            mask_bias: torch.Tensor, pair_bias: Optional[Callable], chunk_size: Optional[int],
            into: Optional[torch.Tensor] = None, sink: Optional[Callable] = None):
    """OpenFold's gated multi-head attention of each row of `x` [*, R, Q, C] over its first
    `n_keys` entries. mask_bias [*, R, 1, 1, n_keys]; pair_bias() -> [*, 1, H, Q, n_keys] is
    called after the projections (it may wait for a collective). Returns the update, or, with
    `into` (the residual stream, `x`'s shape), adds it into `into` chunk by chunk and returns
    `into`; with `sink`, hands it over chunk by chunk (see ``_chunked``). `x` may also be the
    projections' inputs already fanned out (q, k, v and, when gated, the gate's: aliases of one
    rounded tensor, e.g. from ``fd.row_to_col_fanout``)."""
    h = mha.no_heads
    wq, wk, wv = W[f"{pfx}.linear_q.weight"], W[f"{pfx}.linear_k.weight"], W[f"{pfx}.linear_v.weight"]
    wo, bo = W[f"{pfx}.linear_o.weight"], W[f"{pfx}.linear_o.bias"]
    gw = W.get(f"{pfx}.linear_g.weight")
    gb = W.get(f"{pfx}.linear_g.bias")
    scale = math.sqrt(mha.c_hidden)

    def heads(t):
        return t.view(t.shape[:-1] + (h, -1)).transpose(-2, -3)

    def attend(mbc, pb, *xs):
        if len(xs) == 1:
            xc = fd.dense(cast_once(xs[0]))  # (a view's copy made once, not by every projection)
            # q, k, v (and the gate) read xc: rounded once under autocast (``cast_fanout``)
            xs = run.ops.cast_fanout(xc, 3 if gw is None else 4)
        q = heads(F.linear(xs[0], wq))
        k = heads(F.linear(xs[1][..., :n_keys, :], wk))
        v = heads(F.linear(xs[2][..., :n_keys, :], wv))
        gate = None
        if gw is not None:
            g = run.ops.linear(xs[3], gw, gb)
            gate = g.view(g.shape[:-1] + (h, -1))
        xc = xs = None  # the rounded copies are not needed past the projections
        if callable(pb):
            pb = pb()
        # OpenFold's q / sqrt(c_hidden): inside the op (the kernels scale the fp32 logits)
        o = run.ops.attention(q, k, v, mask_bias=mbc, pair_bias=pb, gate=gate, q_div=scale)
        return run.ops.linear(o.flatten(-2), wo, bo)

    xs = (x,) if isinstance(x, torch.Tensor) else tuple(x)
    if len(xs) not in (1, 3 if gw is None else 4):
        raise ValueError(f"_attend: {len(xs)} fanned-out inputs for {pfx}")
    n = xs[0].shape[-3]
    if chunk_size is not None and chunk_size < n and callable(pair_bias):
        pair_bias = pair_bias()  # shared by the chunks: waited for before the first one
    return _chunked(attend, chunk_size, n, (mask_bias, -4), pair_bias, *[(t, -3) for t in xs],
                    into=into, sink=sink)


def _msa_row_attention(block, W, run: _Run, m: torch.Tensor, z: torch.Tensor,
                       m_cols: Optional[torch.Tensor] = None) -> torch.Tensor:
    """m [*, S/P, N, C_m] (rows), z [*, N/P, N, C_z] (rows) -> m + dropout(row attention), in
    rows; or, given `m_cols` (the same m in columns [*, S, N/P, C_m]), in columns: the update,
    in the output projection's dtype, switches axis instead of the fp32 sum (under bf16 half
    the bytes; its backward switches the update's gradient, also in that dtype), and is added
    to the columns, the sum OpenFold forms."""
    mod = block.msa_att_row
    lnz, lnm = mod.layer_norm_z, mod.layer_norm_m
    # the pair bias of the local pair rows, gathered: H channels, not z
    zb = run.ops.layer_norm(z, W["msa_att_row.layer_norm_z.weight"],
                            W["msa_att_row.layer_norm_z.bias"], lnz.eps)
    pair_bias = run.gathered_bias(zb, W["msa_att_row.linear_z.weight"])
    del zb
    ml = run.ops.layer_norm(m, W["msa_att_row.layer_norm_m.weight"],
                            W["msa_att_row.layer_norm_m.bias"], lnm.eps)

    # (the attention draws no random numbers: drawing the mask first keeps OpenFold's order)
    drop = block.msa_dropout_layer
    keep = _draw_keep(drop, (*m.shape[:-3], run.n_seq, run.n_res, m.shape[-1]), m)
    if keep is not None:  # row-wise: [*, 1, N, C_m], shared by the rows
        keep = fd.pad_to(keep, {-2: run.np_res})
    into = None if m_cols is not None else run.into(m, keep)
    upd = _attend(run, W, "msa_att_row.mha", mod.mha, ml, run.n_res,
                  _mask_bias(run.msa_mask_row, mod.inf, run.n_res), pair_bias, run.chunk_size,
                  into)
    if m_cols is None:
        return m if into is not None else _residual(run, drop, m, upd, keep)
    del ml
    return _residual(run, drop, m_cols, run.to_cols(upd),
                     None if keep is None else run.block(keep, -2))


def _msa_column_attention(block, W, run: _Run, m: torch.Tensor) -> torch.Tensor:
    """m [*, S, N/P, C_m] (columns; every sequence local) -> m + column attention."""
    mod = block.msa_att_col._msa_att
    pfx = "msa_att_col._msa_att"
    mt = m.transpose(-2, -3)
    ml = run.ops.layer_norm(mt, W[f"{pfx}.layer_norm_m.weight"], W[f"{pfx}.layer_norm_m.bias"],
                            mod.layer_norm_m.eps)
    mask_bias = _mask_bias(run.msa_mask_col.transpose(-1, -2), mod.inf, run.n_seq)
    into = run.into(mt, None)
    upd = _attend(run, W, f"{pfx}.mha", mod.mha, ml, run.n_seq, mask_bias, None, run.chunk_size,
                  into)
    return m if into is not None else run.add(m, upd.transpose(-2, -3))


def _msa_column_global_attention(block, W, run: _Run, m: torch.Tensor) -> torch.Tensor:
    """Extra MSA: m [*, S, N/P, C_e] (columns) -> m + global column attention over the real
    sequences."""
    mod = block.msa_att_col
    ga = mod.global_attention
    pfx = "msa_att_col"
    s = run.n_seq
    # [*, N/P, S_real, C]
    mt = m[..., :s, :, :].transpose(-2, -3)
    mask = run.msa_mask_col[..., :s, :].transpose(-1, -2)

    def fn(mc, maskc):
        mc = run.ops.layer_norm_torch(mc, W[f"{pfx}.layer_norm_m.weight"],
                                      W[f"{pfx}.layer_norm_m.bias"], mod.layer_norm_m.eps)
        g = f"{pfx}.global_attention"
        return run.ops.global_attention(
            mc, maskc, W[f"{g}.linear_q.weight"], W[f"{g}.linear_k.weight"],
            W[f"{g}.linear_v.weight"], W[f"{g}.linear_g.weight"], W[f"{g}.linear_g.bias"],
            W[f"{g}.linear_o.weight"], W[f"{g}.linear_o.bias"], ga.no_heads, ga.inf, ga.eps)

    upd = _chunked(fn, run.chunk_size, mt.shape[-3], (mt, -3), (mask, -2))
    upd = fd.pad_to(upd.transpose(-2, -3), {-3: run.np_seq})
    return run.add(m, upd)


def _transition(run: _Run, W, pfx: str, mod: nn.Module, x: torch.Tensor,
                mask: Optional[torch.Tensor]) -> torch.Tensor:
    """MSA / pair transition on a shard (pointwise over rows), chunked along dim -3."""
    if mask is None:
        mask = x.new_ones(x.shape[:-1])
    mask = mask.unsqueeze(-1)

    def fn(xc, mc):
        return run.ops.transition(xc, mc, W[f"{pfx}.layer_norm.weight"],
                                  W[f"{pfx}.layer_norm.bias"], W[f"{pfx}.linear_1.weight"],
                                  W[f"{pfx}.linear_1.bias"], W[f"{pfx}.linear_2.weight"],
                                  W[f"{pfx}.linear_2.bias"], mod.layer_norm.eps)

    return _chunked(fn, run.chunk_size, x.shape[-3], (x, -3), (mask, -3))


def _outer_product_mean(block, W, run: _Run, m: torch.Tensor) -> torch.Tensor:
    """m [*, S, N/P, C_m] (columns) -> the pair rows [*, N/P, N, C_z] of the outer product mean:
    a from the local residues, b all-gathered along N_res."""
    if is_fp16_enabled():
        with torch.autocast(device_type=m.device.type, enabled=False):
            return _outer_product_mean_impl(block, W, run, m.float())
    return _outer_product_mean_impl(block, W, run, m)


def _outer_product_mean_impl(block, W, run: _Run, m: torch.Tensor) -> torch.Tensor:
    mod = block.core.outer_product_mean
    pfx = "core.outer_product_mean"
    # LayerNorm, both projections and the mask on the local residues (fused on GPUs: a and b
    # in the compute dtype, so b's all-gather moves bf16 under bf16 autocast)
    a, b = run.ops.outer_product_mean_projections(
        m, run.msa_mask_col, W[f"{pfx}.layer_norm.weight"], W[f"{pfx}.layer_norm.bias"],
        W[f"{pfx}.linear_1.weight"], W[f"{pfx}.linear_1.bias"], W[f"{pfx}.linear_2.weight"],
        W[f"{pfx}.linear_2.bias"], mod.layer_norm.eps)
    pend = run.all_gather(b, -2)  # -> [*, S, N, c]
    # pair counts [*, N/P, N]
    norm = torch.einsum("...ab,...ac->...bc", run.msa_mask_col,
                        run.msa_mask_full.to(run.msa_mask_col.dtype))
    return run.ops.outer_product_mean_rows(a, pend.wait(), norm, W[f"{pfx}.linear_out.weight"],
                                           W[f"{pfx}.linear_out.bias"], mod.eps, run.chunk_size,
                                           inference=run.inference)


def _triangle_multiplication(mod, W, pfx: str, run: _Run, z: torch.Tensor, mask: torch.Tensor,
                             outgoing: bool, shard: Optional[str] = None) -> torch.Tensor:
    """Outgoing: z [*, N/P, N, C] (rows), b all-gathered along rows. Incoming: z [*, N, N/P, C]
    (columns), a all-gathered along columns; or, with `shard` "rows" (the blocks' choice), z's
    rows, with this rank's columns of a by an all-to-all and b all-gathered along rows (no
    switch of z). Returns the update in z's layout.

    The op table's ``triangle_multiplication_sharded``: fused kernels on the shard (Triton; the
    all-gather overlaps the local block's contraction, the backward reduce-scatter the local
    operand's gradient, when the context is async) or OpenFold's decomposed maths (reference,
    synchronous). The weights' per-rank partial gradients are summed by `W`'s ``sum_grads``."""
    w = TriMulWeights(*(W[f"{pfx}.{name}"] for name in TRI_MUL_PARAMS))
    return run.ops.triangle_multiplication_sharded(z, mask, w, outgoing, mod.layer_norm_in.eps,
                                                   run.group, overlap=run.async_comm,
                                                   comm_error=fd.DAPCommError,
                                                   inference=run.inference, shard=shard,
                                                   timeout=run.timeout_s)


def _triangle_attention_rows(mod, W, pfx: str, run: _Run, x: torch.Tensor,
                             mask: torch.Tensor, into: Optional[torch.Tensor] = None):
    """Starting-node triangle attention of the rows `x` [*, N/P, N, C] (mask [*, N/P, N]); the
    H-channel triangle bias is all-gathered. (The ending-node attention is the same on the rows
    of z^T, which it reaches by switching z's LayerNorm output: ``_ending_node_attention_*``.)
    With `into` (x itself: ``run.into``), the update is added into it (see ``_attend``)."""
    # (rounded to the autocast dtype once: the bias and every chunk's projections read it)
    xl = cast_once(run.ops.layer_norm(x, W[f"{pfx}.layer_norm.weight"],
                                      W[f"{pfx}.layer_norm.bias"], mod.layer_norm.eps))
    tri_bias = run.gathered_bias(xl, W[f"{pfx}.linear.weight"])
    return _attend(run, W, f"{pfx}.mha", mod.mha, xl, run.n_res,
                   _mask_bias(mask, mod.inf, run.n_res), tri_bias, run.chunk_size, into)


def _ending_node_attention_on_rows(mod, W, pfx: str, run: _Run, z: torch.Tensor) -> torch.Tensor:
    """Inference on shards: the ending-node triangle attention of the row shard z [*, R, N, C]
    added into z, which keeps its layout. What the attention reads of z is its LayerNorm output
    rounded to the autocast dtype (every projection casts it so) and what it returns is the
    output projection's update in that dtype, so those two switch axis instead of z: under bf16
    autocast this step moves half the bytes of switching the fp32 z to columns and back. Both
    are written chunk by chunk straight into their all-to-all's send layout (``_Switch``); the
    attention runs on the rows of the normalised columns' transpose, as
    ``_triangle_attention_rows`` does on z's columns, and the update is added into z's rows:
    the sums OpenFold forms."""
    ln_w, ln_b = W[f"{pfx}.layer_norm.weight"], W[f"{pfx}.layer_norm.bias"]

    def norm(zc):
        return cast_once(run.ops.layer_norm(zc, ln_w, ln_b, mod.layer_norm.eps))

    rows = z.shape[-3]
    sw = _Switch(run, rows)
    _chunked(norm, run.chunk_size, rows, (z, -3), sink=sw.put)
    xt = sw.columns().transpose(-2, -3)  # [*, R (local columns j), N (i), C]
    tri_bias = run.gathered_bias(xt, W[f"{pfx}.linear.weight"])
    # (keys contiguous once, not copied by every chunk's attention call)
    mask_bias = _mask_bias(run.pair_mask_col.transpose(-1, -2), mod.inf, run.n_res).contiguous()
    sw = _Switch(run, rows)
    _attend(run, W, f"{pfx}.mha", mod.mha, xt, run.n_res, mask_bias, tri_bias, run.chunk_size,
            sink=sw.put)  # the update's rows j
    xt = tri_bias = None  # the normalised columns and the gathered bias, before the exchange
    # [*, N (j), R (local rows i), C]: the update's transpose
    return run.add(z, sw.columns().transpose(-2, -3))


def _ending_node_attention_switched(mod, W, pfx: str, run: _Run, z: torch.Tensor,
                                    drop: nn.Module, keep: Optional[torch.Tensor]) -> torch.Tensor:
    """The ending-node triangle attention of the row shard z [*, R, N, C] plus its (dropped-out)
    residual, z keeping its layout (training, and inference outside OpenFold's in-place mode;
    the update is formed whole, then added).
    The attention reads z's columns only through their LayerNorm output, which every projection
    and the bias Linear round to the autocast dtype, so that output switches axis instead of z:
    ``fd.row_to_col_fanout`` rounds it once and moves half the bytes of fp32 under bf16 (its
    backward moves the consumers' fp32 gradient sum). The attention runs on the rows of its
    transpose (OpenFold: a starting-node attention on z^T, whose rows are z's columns), and its
    update, in the output projection's dtype, comes back to rows (``fd.col_to_row``) for the
    residual: the values OpenFold forms, for two switches of half-size tensors where switching
    the fp32 z to columns and back moves twice the bytes. `keep`: the dropout mask in z's frame,
    shared along columns ([*, N, 1, C]), padded; None when not dropping."""
    ln = run.ops.layer_norm(z, W[f"{pfx}.layer_norm.weight"], W[f"{pfx}.layer_norm.bias"],
                            mod.layer_norm.eps)
    n_proj = 4 if f"{pfx}.mha.linear_g.weight" in W else 3  # q, k, v (and the gate)
    xs = fd.row_to_col_fanout(ln, n_proj + 1, run.group)  # [*, R (local j), N (i), C]
    del ln
    tri_bias = run.gathered_bias(xs[-1], W[f"{pfx}.linear.weight"])
    mask_bias = _mask_bias(run.pair_mask_col.transpose(-1, -2), mod.inf, run.n_res)
    upd = _attend(run, W, f"{pfx}.mha", mod.mha, xs[:-1], run.n_res, mask_bias, tri_bias,
                  run.chunk_size)  # the update's rows j
    xs = tri_bias = None
    upd = fd.col_to_row(upd.transpose(-2, -3), run.group)  # [*, R (local i), N (j), C]
    if keep is not None and keep.shape[-3] != 1:
        keep = run.block(keep, -3)
    return _residual(run, drop, z, upd, keep)


def _pair_keep(run: _Run, drop: nn.Module, like: torch.Tensor, lead) -> Optional[torch.Tensor]:
    """A pair dropout mask drawn for the full [*lead, N, N, C] update (OpenFold's shape), padded.
    (The row-wise masks of the updates added in rows are shared along the rows, so each rank
    uses them whole; the ending-node attention's mask varies along z's rows and is cut to the
    shard by ``_ending_node_attention_switched``.)"""
    keep = _draw_keep(drop, (*lead, run.n_res, run.n_res, like.shape[-1]), like)
    if keep is None:
        return None
    return fd.pad_to(keep, {d: run.np_res for d in (-3, -2) if keep.shape[d] != 1})


# ----------------------------------------------------------------------------------------------
# Blocks on shards

def _msa_block_sharded(block, run: _Run, m: torch.Tensor, z: torch.Tensor,
                       m_cols: Optional[torch.Tensor] = None, final: bool = False):
    """One Evoformer / extra-MSA block on shards: m [*, S/P, N, C_m] (rows), z [*, N/P, N, C_z]
    (rows) and m_cols, the same m in columns [*, S, N/P, C_m], or None. Given m_cols (the stack
    carries m in both layouts: ``_enter_msa``), the row attention reads the rows, the residual
    stream goes on in columns, and only the row attention's update switches axis within the
    block (``_msa_row_attention``); without it (OpenFold's in-place inference, activation
    checkpointing), m itself switches to columns after the row attention. Returns (m rows for
    the next block, z rows, m columns): m rows is None when `final`; m columns is None when
    neither carried nor `final`."""
    W = _weights(block, run)
    core = block.core
    lead = z.shape[:-3]
    drop = core.ps_dropout_row_layer
    carry = m_cols is not None

    m = _msa_row_attention(block, W, run, m, z, m_cols)
    m_cols = None
    if not carry:
        m = run.to_cols(m)  # [*, S, N/P, C_m]
    if isinstance(block, ExtraMSABlock):
        m = _msa_column_global_attention(block, W, run, m)
    else:
        m = _msa_column_attention(block, W, run, m)
    m = run.add(m, _transition(run, W, "core.msa_transition", core.msa_transition, m,
                               run.msa_mask_col if run.mask_trans else None))
    # the MSA switch back to rows runs during the outer product mean and the pair stack
    m_next = None if final else run.col_to_row(m)

    z = run.add(z, _outer_product_mean(block, W, run, m))

    # pair stack: z stays in rows
    upd = _triangle_multiplication(core.tri_mul_out, W, "core.tri_mul_out", run, z,
                                   run.pair_mask_row, True)
    z = _residual(run, drop, z, upd, _pair_keep(run, drop, z, lead))
    # the incoming update on the row shard: no switch of z
    upd = _triangle_multiplication(core.tri_mul_in, W, "core.tri_mul_in", run, z,
                                   run.pair_mask_row, False, shard="rows")
    z = _residual(run, drop, z, upd, _pair_keep(run, drop, z, lead))
    # (the attentions draw no random numbers: drawing their masks first keeps OpenFold's order)
    keep = _pair_keep(run, drop, z, lead)
    into = run.into(z, keep)
    upd = _triangle_attention_rows(core.tri_att_start, W, "core.tri_att_start", run, z,
                                   run.pair_mask_row, into)
    if into is None:
        z = _residual(run, drop, z, upd, keep)
    # ending node: OpenFold runs a starting-node attention and its dropout on z^T (the mask is
    # drawn in that frame: transposed, it is z's)
    keep = _pair_keep(run, drop, z, lead)
    if run.consume and keep is None:  # in-place inference: switched chunk by chunk
        z = _ending_node_attention_on_rows(core.tri_att_end, W, "core.tri_att_end", run, z)
    else:
        z = _ending_node_attention_switched(core.tri_att_end, W, "core.tri_att_end", run, z, drop,
                                            None if keep is None else keep.transpose(-2, -3))
    z = run.add(z, _transition(run, W, "core.pair_transition", core.pair_transition, z,
                               run.pair_mask_row if run.mask_trans else None))
    return (None if final else m_next.wait()), z, (m if carry or final else None)


def _template_block_sharded(block, run: _Run, t: torch.Tensor) -> torch.Tensor:
    """One template pair block on t [*, T, N/P, N, C_t] (rows), all templates at once, in
    OpenFold's order (triangle attention, then the triangle updates, then the transition)."""
    W = _weights(block, run)
    lead = t.shape[:-3]
    n_templ = t.shape[-4]
    # OpenFold draws each template's masks in turn (start, end, out, in); draw them in that
    # order, then batch the templates
    keeps = {"start": [], "end": [], "out": [], "in": []}
    if block.dropout_row.training and block.dropout_row.r > 0.0:
        one = (*lead[:-1], 1)
        for _ in range(n_templ):
            keeps["start"].append(_pair_keep(run, block.dropout_row, t, one))
            keeps["end"].append(_pair_keep(run, block.dropout_col, t, one))
            keeps["out"].append(_pair_keep(run, block.dropout_row, t, one))
            keeps["in"].append(_pair_keep(run, block.dropout_row, t, one))
    keep = {k: (torch.cat(v, dim=-4) if v else None) for k, v in keeps.items()}

    into = run.into(t, keep["start"])
    upd = _triangle_attention_rows(block.tri_att_start, W, "tri_att_start", run, t,
                                   run.pair_mask_row, into)
    if into is None:
        t = _residual(run, block.dropout_row, t, upd, keep["start"])
    if run.consume and keep["end"] is None:  # in-place inference: switched chunk by chunk
        t = _ending_node_attention_on_rows(block.tri_att_end, W, "tri_att_end", run, t)
    else:  # (OpenFold's column-wise dropout: the mask is drawn in t's frame)
        t = _ending_node_attention_switched(block.tri_att_end, W, "tri_att_end", run, t,
                                            block.dropout_col, keep["end"])
    upd = _triangle_multiplication(block.tri_mul_out, W, "tri_mul_out", run, t,
                                   run.pair_mask_row, True)
    t = _residual(run, block.dropout_row, t, upd, keep["out"])
    # the incoming update and the transition on the row shard: no switch of t
    upd = _triangle_multiplication(block.tri_mul_in, W, "tri_mul_in", run, t, run.pair_mask_row,
                                   False, shard="rows")
    t = _residual(run, block.dropout_row, t, upd, keep["in"])
    return run.add(t, _transition(run, W, "pair_transition", block.pair_transition, t,
                                  run.pair_mask_row if run.mask_trans else None))


# ----------------------------------------------------------------------------------------------
# Entering and leaving the DAP region

def _enter_msa(run: _Run, m, z, msa_mask, pair_mask, carry: bool = True):
    """Pad once, keep the local shards: m rows [*, S/P, N, C_m], z rows [*, N/P, N, C_z] and,
    when `carry` and outside OpenFold's in-place inference, m columns [*, S, N/P, C_m] (else
    None): the blocks then carry m in both layouts (``_msa_block_sharded``)."""
    if msa_mask is None:
        msa_mask = m.new_ones(m.shape[:-1])
    if pair_mask is None:
        pair_mask = z.new_ones(z.shape[:-1])
    run.set_msa_mask(msa_mask)
    run.set_pair_mask(pair_mask)
    m = fd.pad_to(m, {-3: run.np_seq, -2: run.np_res})
    m_cols = run.shard(m, -2) if carry and not run.consume else None
    m = run.shard(m, -3)
    z = run.shard(fd.pad_to(z, {-3: run.np_res, -2: run.np_res}), -3)
    return m, z, m_cols


def _leave_pair(run: _Run, z: torch.Tensor, dest: Optional[torch.Tensor] = None) -> torch.Tensor:
    return run.leave(z, -3, {-3: run.n_res, -2: run.n_res}, dest)


def _leave_msa_cols(run: _Run, m: torch.Tensor, dest: Optional[torch.Tensor] = None) -> torch.Tensor:
    return run.leave(m, -2, {-3: run.n_seq, -2: run.n_res}, dest)


def _check_dropout_rng(run: _Run, modules, device) -> None:
    """Once per training forward with dropout: the group's ranks must share one RNG stream."""
    if run.p > 1 and any(getattr(d, "training", False) and getattr(d, "r", 0.0) > 0.0
                         for d in modules):
        fd.check_rng_synced(run.ctx, device)


def _checkpoint(fn, *args):
    ckpt = get_checkpoint_fn()
    if ckpt is torch.utils.checkpoint.checkpoint:
        # reentrant: the whole block (and every collective in it) is recomputed on every rank
        return ckpt(fn, *args, use_reentrant=True)
    return ckpt(fn, *args)


def _run_blocks(blocks, args, blocks_per_ckpt: Optional[int]):
    if blocks_per_ckpt is None or not torch.is_grad_enabled():
        for b in blocks:
            args = b(*args)
        return args
    if not 1 <= blocks_per_ckpt <= len(blocks):
        raise ValueError("blocks_per_ckpt must be between 1 and len(blocks)")

    def segment(bs):
        def run(*a):
            for b in bs:
                a = b(*a)
            return a
        return run

    for s in range(0, len(blocks), blocks_per_ckpt):
        args = _checkpoint(segment(blocks[s:s + blocks_per_ckpt]), *args)
    return args


def _reject(use_flash: bool = False, offload: bool = False) -> None:
    if use_flash:
        raise UnsupportedOption("use_flash cannot be combined with fastfold-plugin; unset "
                                "config.globals.use_flash (the plugin's attention is flash-style).")
    if offload:
        raise UnsupportedOption("DAP does not implement OpenFold's offload_inference; set "
                                "config.globals.offload_inference = False.")


def _dropouts(blocks):
    for b in blocks:
        for mod in b.modules():
            if hasattr(mod, "r") and hasattr(mod, "batch_dim"):
                yield mod


# ----------------------------------------------------------------------------------------------
# Replacement forwards (stock signatures)

def evoformer_stack_forward(self: EvoformerStack, m, z, msa_mask, pair_mask, chunk_size,
                            use_lma=False, use_flash=False, inplace_safe=False, _mask_trans=True):
    """EvoformerStack.forward under DAP: full m [*, N_seq, N_res, C_m], z [*, N_res, N_res, C_z]
    in, full (m, z, s) out on every rank."""
    _reject(use_flash)
    run = _Run(_dap(self), _ops(self, m), z.shape[-2], m.shape[-3], chunk_size, inplace_safe,
               _mask_trans)
    _check_dropout_rng(run, _dropouts(self.blocks), m.device)
    m_in, z_in = m, z
    # (activation checkpoints keep their inputs: carrying m in both layouts would keep one more
    # MSA shard per checkpoint, so checkpointed blocks get m in rows only)
    carry = self.blocks_per_ckpt is None or not torch.is_grad_enabled()
    m, z, m_cols = _enter_msa(run, m, z, msa_mask, pair_mask, carry)
    last = len(self.blocks) - 1
    blocks = [partial(_msa_block_sharded, b, run, final=(i == last))
              for i, b in enumerate(self.blocks)]
    m, z, m_cols = _run_blocks(blocks, (m, z, m_cols), self.blocks_per_ckpt)
    m = m_cols if m_cols is not None else run.to_cols(m)  # (no blocks: m rows as it came in)
    # single representation from the local residues of the first row
    W = _weights(self.linear, run)
    s = F.linear(m[..., 0, :, :], W["weight"], W["bias"])
    s = fd.unpad(fd.gather(s, -2, run.group), {-2: run.n_res})
    return _leave_msa_cols(run, m, m_in), _leave_pair(run, z, z_in), s


def extra_msa_stack_forward(self: ExtraMSAStack, m, z, msa_mask, pair_mask, chunk_size,
                            use_lma=False, inplace_safe=False, _mask_trans=True):
    """ExtraMSAStack.forward under DAP: returns the full pair update on every rank."""
    run = _Run(_dap(self), _ops(self, m), z.shape[-2], m.shape[-3], chunk_size, inplace_safe,
               _mask_trans)
    _check_dropout_rng(run, _dropouts(self.blocks), m.device)
    z_in = z
    args = _enter_msa(run, m, z, msa_mask, pair_mask,
                      carry=not (self.ckpt and torch.is_grad_enabled()))  # (as the Evoformer's)
    last = len(self.blocks) - 1
    for i, b in enumerate(self.blocks):
        fn = partial(_msa_block_sharded, b, run, final=(i == last))
        if self.ckpt and torch.is_grad_enabled():
            args = _checkpoint(fn, *args)
        else:
            args = fn(*args)
    return _leave_pair(run, args[1], z_in)


def template_pair_stack_forward(self: TemplatePairStack, t, mask, chunk_size, use_lma=False,
                                inplace_safe=False, _mask_trans=True):
    """TemplatePairStack.forward under DAP: t [*, N_templ, N_res, N_res, C_t] in and out."""
    if mask.shape[-3] == 1:
        expand_idx = list(mask.shape)
        expand_idx[-3] = t.shape[-4]
        mask = mask.expand(*expand_idx)
    run = _Run(_dap(self), _ops(self, t), t.shape[-2], None, chunk_size, inplace_safe,
               _mask_trans)
    _check_dropout_rng(run, _dropouts(self.blocks), t.device)
    run.set_pair_mask(mask)
    t_in = t
    t = run.shard(fd.pad_to(t, {-3: run.np_res, -2: run.np_res}), -3)
    blocks = [partial(_template_block_sharded, b, run) for b in self.blocks]
    (t,) = _run_blocks([lambda x, f=f: (f(x),) for f in blocks], (t,),
                       self.blocks_per_ckpt if self.training else None)
    W = _weights(self.layer_norm, run)
    t = run.ops.layer_norm(t, W["weight"], W["bias"], self.layer_norm.eps)
    return _leave_pair(run, t, t_in)


def evoformer_block_forward(self: EvoformerBlock, m, z, msa_mask, pair_mask, chunk_size=None,
                            use_lma=False, use_flash=False, inplace_safe=False, _mask_trans=True,
                            _attn_chunk_size=None, _offload_inference=False,
                            _offloadable_inputs=None):
    """EvoformerBlock.forward under DAP (one block: pad, scatter, block, gather, unpad)."""
    _reject(use_flash, _offload_inference)
    run = _Run(_dap(self), _ops(self, m), z.shape[-2], m.shape[-3], chunk_size, inplace_safe,
               _mask_trans)
    _check_dropout_rng(run, _dropouts([self]), m.device)
    m_in, z_in = m, z
    _, z, m = _msa_block_sharded(self, run, *_enter_msa(run, m, z, msa_mask, pair_mask),
                                 final=True)
    return _leave_msa_cols(run, m, m_in), _leave_pair(run, z, z_in)


def extra_msa_block_forward(self: ExtraMSABlock, m, z, msa_mask, pair_mask, chunk_size=None,
                            use_lma=False, inplace_safe=False, _mask_trans=True,
                            _attn_chunk_size=None, _offload_inference=False,
                            _offloadable_inputs=None):
    """ExtraMSABlock.forward under DAP (checkpointed when `self.ckpt` and gradients are on)."""
    _reject(offload=_offload_inference)
    run = _Run(_dap(self), _ops(self, m), z.shape[-2], m.shape[-3], chunk_size, inplace_safe,
               _mask_trans)
    _check_dropout_rng(run, _dropouts([self]), m.device)
    m_in, z_in = m, z
    ckpt = self.ckpt and torch.is_grad_enabled()
    args = _enter_msa(run, m, z, msa_mask, pair_mask, carry=not ckpt)  # (as its stack's)
    fn = partial(_msa_block_sharded, self, run, final=True)
    if ckpt:
        _, z, m = _checkpoint(fn, *args)
    else:
        _, z, m = fn(*args)
    return _leave_msa_cols(run, m, m_in), _leave_pair(run, z, z_in)


def template_pair_stack_block_forward(self: TemplatePairStackBlock, z, mask, chunk_size=None,
                                      use_lma=False, inplace_safe=False, _mask_trans=True,
                                      _attn_chunk_size=None):
    """TemplatePairStackBlock.forward under DAP: z [*, N_templ, N_res, N_res, C_t]."""
    run = _Run(_dap(self), _ops(self, z), z.shape[-2], None, chunk_size, inplace_safe,
               _mask_trans)
    _check_dropout_rng(run, _dropouts([self]), z.device)
    run.set_pair_mask(mask)
    z_in = z
    z = run.shard(fd.pad_to(z, {-3: run.np_res, -2: run.np_res}), -3)
    return _leave_pair(run, _template_block_sharded(self, run, z), z_in)


# OpenFold class -> DAP replacement forward (used instead of the single-process ones when
# enable() gets a DAP context of size > 1).
DAP_FORWARDS: Dict[type, Callable] = {
    EvoformerStack: evoformer_stack_forward,
    ExtraMSAStack: extra_msa_stack_forward,
    TemplatePairStack: template_pair_stack_forward,
    EvoformerBlock: evoformer_block_forward,
    ExtraMSABlock: extra_msa_block_forward,
    TemplatePairStackBlock: template_pair_stack_block_forward,
}
