"""Worker processes for the DAP tests: ``python workers.py <scenario> <json args>``.

Started by ``conftest.launch`` with torchrun's environment variables. Each scenario raises on the
first mismatch (the launcher then shows every rank's output) and prints ``RESULT {json}`` lines
that the test may read.
"""
import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

import fastfold_plugin.distributed as fd
from fastfold_plugin.testing import assert_close, rel_err

SCENARIOS = {}


def scenario(fn):
    SCENARIOS[fn.__name__] = fn
    return fn


def result(**kw):
    print("RESULT " + json.dumps(kw), flush=True)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape, seed, dtype=torch.float64):
    return torch.randn(shape, generator=gen(seed), dtype=dtype)


def inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.double() * b.double()).sum()


def global_sum(x: torch.Tensor, group) -> torch.Tensor:
    x = x.clone()
    if group is not None:
        dist.all_reduce(x, group=group)
    return x


# ----------------------------------------------------------------------------------------------
# Primitives

def _check_primitives(ctx, shape, dim, use_async):
    g, p, r = ctx.group, ctx.size, ctx.rank
    exact = dict(rtol=0.0, atol=0.0)
    d = dim % len(shape)
    blk = list(shape)
    blk[d] //= p
    tag = f"shape {shape} dim {dim} async {use_async}"

    # scatter: replicated X -> block r; backward = gather of the blocks' cotangents
    X = randn(shape, 1).requires_grad_()
    ys = [randn(blk, 100 + q) for q in range(p)]
    xs = fd.scatter(X, dim, g)
    assert_close(xs, X.detach().chunk(p, d)[r], **exact, name=f"scatter fwd {tag}")
    xs.backward(ys[r])
    assert_close(X.grad, torch.cat(ys, d), **exact, name=f"scatter bwd {tag}")
    # <scatter(X), y>_global == <X, gather(y)>
    lhs = global_sum(inner(fd.scatter(X.detach(), dim, g), ys[r]), g)
    rhs = inner(X.detach(), fd.gather(ys[r], dim, g))
    assert_close(lhs, rhs, rtol=1e-12, name=f"<scatter x, y> == <x, gather y> {tag}")

    # gather: blocks -> replicated; backward = own block of the replicated cotangent
    xb = [randn(blk, 200 + q) for q in range(p)]
    x = xb[r].clone().requires_grad_()
    Y = randn(shape, 2)
    full = fd.gather(x, dim, g)
    assert_close(full, torch.cat(xb, d), **exact, name=f"gather fwd {tag}")
    full.backward(Y)
    assert_close(x.grad, Y.chunk(p, d)[r], **exact, name=f"gather bwd {tag}")

    # all_gather: backward = reduce-scatter of per-rank cotangents
    x = xb[r].clone().requires_grad_()
    Ys = [randn(shape, 300 + q) for q in range(p)]
    if use_async:
        pend = fd.all_gather_start(x, dim, g)
        filler = (x.detach() * 2).sum()  # independent work between start and wait
        full = pend.wait()
        assert torch.isfinite(filler)
    else:
        full = fd.all_gather(x, dim, g)
    assert_close(full, torch.cat(xb, d), **exact, name=f"all_gather fwd {tag}")
    full.backward(Ys[r])
    assert_close(x.grad, sum(Ys).chunk(p, d)[r], rtol=1e-12, name=f"all_gather bwd {tag}")
    # <all_gather(x), y>_global == <x, reduce_scatter(y)>_global
    lhs = global_sum(inner(fd.all_gather(xb[r], dim, g), Ys[r]), g)
    rhs = global_sum(inner(xb[r], fd.reduce_scatter(Ys[r], dim, g)), g)
    assert_close(lhs, rhs, rtol=1e-12, name=f"<all_gather x, y> == <x, reduce_scatter y> {tag}")

    # reduce_scatter: per-rank partial sums -> own block of the sum; backward = all-gather
    xf = [randn(shape, 400 + q) for q in range(p)]
    x = xf[r].clone().requires_grad_()
    yb = [randn(blk, 500 + q) for q in range(p)]
    if use_async:
        pend = fd.reduce_scatter_start(x, dim, g)
        out = pend.wait()
    else:
        out = fd.reduce_scatter(x, dim, g)
    assert_close(out, sum(xf).chunk(p, d)[r], rtol=1e-12, name=f"reduce_scatter fwd {tag}")
    out.backward(yb[r])
    assert_close(x.grad, torch.cat(yb, d), **exact, name=f"reduce_scatter bwd {tag}")


def _check_all_to_all(ctx, shape, sdim, gdim, use_async):
    g, p, r = ctx.group, ctx.size, ctx.rank
    exact = dict(rtol=0.0, atol=0.0)
    nd = len(shape)
    s, gd = sdim % nd, gdim % nd
    tag = f"shape {shape} scatter {sdim} gather {gdim} async {use_async}"
    F = randn(shape, 7)
    G = randn(shape, 8)
    x = F.chunk(p, gd)[r].clone().requires_grad_()  # split along the gather dim
    if use_async:
        pend = fd.all_to_all_start(x, sdim, gdim, g)
        _ = (x.detach() ** 2).sum()
        y = pend.wait()
    else:
        y = fd.all_to_all(x, sdim, gdim, g)
    assert_close(y, F.chunk(p, s)[r], **exact, name=f"all_to_all fwd {tag}")
    y.backward(G.chunk(p, s)[r])
    assert_close(x.grad, G.chunk(p, gd)[r], **exact, name=f"all_to_all bwd {tag}")
    # <A x, y>_global == <x, A^T y>_global with A^T the swapped all-to-all
    lhs = global_sum(inner(fd.all_to_all(x.detach(), sdim, gdim, g), G.chunk(p, s)[r]), g)
    rhs = global_sum(inner(x.detach(), fd.all_to_all(G.chunk(p, s)[r], gdim, sdim, g)), g)
    assert_close(lhs, rhs, rtol=1e-12, name=f"all_to_all adjoint {tag}")


def _check_consuming(ctx):
    """The inference variants: all_to_all_ equals all_to_all and, for the pair / MSA switches,
    returns its input's memory; gather_into_ equals gather, in place when the input is this
    rank's block of `out`, right when the input sits elsewhere inside `out`; both refuse a
    tensor that needs a gradient."""
    g, p, r = ctx.group, ctx.size, ctx.rank
    # (shape, scatter dim, gather dim, result in x's memory when p > 1)
    cases = [((2 * p, 3 * p, 4), -2, -3, True), ((2 * p, 3 * p, 4), -3, -2, True),
             ((2, 3, 2 * p, p, 5), -2, -3, False), ((3 * p, 2, 2 * p), 0, 2, True),
             ((2, 2 * p, 3 * p, 4), -3, -2, False), ((1, 2 * p, 3 * p, 4), -2, -3, True)]
    for shape, sdim, gdim, reuses in cases:
        x = randn(shape, 21).chunk(p, gdim)[r].contiguous()
        exp = fd.all_to_all(x, sdim, gdim, g)
        with torch.no_grad():
            y = x.clone()
            got = fd.all_to_all_(y, sdim, gdim, g)
            assert torch.equal(got, exp), (shape, sdim, gdim)
            if reuses:
                assert got.data_ptr() == y.data_ptr(), f"all_to_all_ {shape} did not reuse x"
            t = x.transpose(-1, -2).contiguous().transpose(-1, -2)  # non-contiguous: falls back
            assert torch.equal(fd.all_to_all_(t, sdim, gdim, g), exp)
    full = randn((2 * p, 3 * p, 4), 22)
    with torch.no_grad():
        assert torch.equal(fd.row_to_col_(full.chunk(p, -3)[r].clone(), g), full.chunk(p, -2)[r])
        assert torch.equal(fd.col_to_row_(full.chunk(p, -2)[r].clone(), g), full.chunk(p, -3)[r])
    for dim, shape in [(0, (2 * p, 3, 4)), (-3, (1, 2 * p, 3, 4)), (1, (2, 3 * p, 4)),
                       (-1, (3, 2 * p))]:
        full = randn(shape, 23)
        blk = full.chunk(p, dim)[r].contiguous()
        with torch.no_grad():
            out = torch.full_like(full, float("nan"))
            assert fd.gather_into_(out, blk, dim, g) is out and torch.equal(out, full), (shape, dim)
            out = torch.full_like(full, float("nan"))
            view = out.chunk(p, dim)[r]  # in place: the block already sits at its place
            view.copy_(blk)
            assert torch.equal(fd.gather_into_(out, view, dim, g), full), (shape, dim)
            if p > 1:
                out = torch.full_like(full, float("nan"))
                wrong = out.view(-1)[1:1 + blk.numel()].view(blk.shape)  # misplaced inside out
                wrong.copy_(blk)
                assert torch.equal(fd.gather_into_(out, wrong, dim, g), full), (shape, dim)
            out_t = torch.full_like(full.transpose(0, -1).contiguous(), float("nan")).transpose(0, -1)
            assert torch.equal(fd.gather_into_(out_t, blk, dim, g), full), (shape, dim)
    with torch.no_grad():
        try:
            fd.gather_into_(torch.empty(p + 1, 3), torch.zeros(1, 3), 0, g)
        except ValueError as e:
            assert "cannot hold" in str(e), e
        else:
            raise AssertionError("gather_into_ accepted a wrong out shape")
    # exchange_blocks: block q of [P, ...] to rank q, equal to the all-to-all of those blocks
    x = randn((p, 2, 3, 4), 25 + r)
    exp = fd.all_to_all(x.flatten(0, 1), 0, 1, g)  # [2, 3 P, 4]: block q from rank q
    with torch.no_grad():
        got = fd.exchange_blocks(x, g)
    assert torch.equal(got.movedim(0, 1).flatten(1, 2), exp)
    try:
        fd.exchange_blocks(torch.zeros(p + 1, 2), g)
    except ValueError as e:
        assert "one block per process" in str(e), e
    else:
        raise AssertionError("exchange_blocks accepted a send without a block per process")
    needs = randn((2 * p, 3 * p, 4), 24).chunk(p, -3)[r].contiguous().requires_grad_()
    for name, call in (("row_to_col_", lambda: fd.row_to_col_(needs, g)),
                       ("exchange_blocks", lambda: fd.exchange_blocks(needs[:p], g)),
                       ("gather_into_", lambda: fd.gather_into_(torch.empty(2 * p, 3 * p, 4, dtype=needs.dtype),
                                                                needs, 0, g))):
        try:
            call()
        except RuntimeError as e:
            assert "no_grad" in str(e), e
        else:
            raise AssertionError(f"{name} accepted a tensor that needs a gradient")


def _check_row_to_col_fanout(ctx):
    """fd.row_to_col_fanout: this rank's columns of x, transposed, handed to n consumers; under
    autocast rounded once (the consumers read what autocast would give each of them) and the
    consumers' gradients summed in fp32; unused outputs contribute nothing."""
    g, p, r = ctx.group, ctx.size, ctx.rank
    full = randn((2, 3 * p, 2 * p, 8), 21, torch.float32)  # [*, I, J, C]
    exp = full.transpose(-2, -3).chunk(p, -3)[r]  # the rows of x^T's shard: [*, J/P, I, C]
    ups = [randn((2, 2 * p, 3 * p, 8), 22 + k, torch.float32) for k in range(3)]  # x^T frame
    x = full.chunk(p, -3)[r].clone().requires_grad_()
    outs = fd.row_to_col_fanout(x, 3, g)
    assert len(outs) == 3 and all(o.is_contiguous() for o in outs)
    for o in outs:
        assert torch.equal(o, exp), "row_to_col_fanout fwd (fp32)"
    # outs[1] unused: x's gradient is the adjoint of the other two's
    torch.autograd.backward([outs[0], outs[2]], [ups[0].chunk(p, -3)[r], ups[2].chunk(p, -3)[r]])
    want = (ups[0] + ups[2]).transpose(-2, -3).chunk(p, -3)[r]
    assert torch.equal(x.grad, want), "row_to_col_fanout bwd (fp32)"

    # bf16 autocast: two Linears read the output; stock: each rounds the fp32 switch
    w0, w1 = randn((5, 8), 30, torch.float32), randn((5, 8), 31, torch.float32)
    up0, up1 = randn((2, 2 * p, 3 * p, 5), 32, torch.float32), randn((2, 2 * p, 3 * p, 5), 33,
                                                                      torch.float32)
    res = {}
    for kind in ("fanout", "stock"):
        xk = full.chunk(p, -3)[r].clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if kind == "fanout":
                a, b = fd.row_to_col_fanout(xk, 2, g)
                assert a.dtype == torch.bfloat16, a.dtype
            else:
                a = b = fd.row_to_col(xk, g).transpose(-2, -3)
            y0, y1 = torch.nn.functional.linear(a, w0), torch.nn.functional.linear(b, w1)
        torch.autograd.backward([y0, y1], [up0.chunk(p, -3)[r].to(y0.dtype),
                                           up1.chunk(p, -3)[r].to(y1.dtype)])
        res[kind] = (y0.detach(), y1.detach(), xk.grad)
    for name, got, want in zip(("y0", "y1", "dx"), res["fanout"], res["stock"], strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want), f"row_to_col_fanout bf16 {name}"
    for bad in (lambda: fd.row_to_col_fanout(x, 0, g),
                lambda: fd.row_to_col_fanout(x[0, 0], 2, g)):
        try:
            bad()
        except ValueError:
            pass
        else:
            raise AssertionError("row_to_col_fanout accepted a bad argument")


@scenario
def primitives(args):
    ctx = fd.init(dap_size=int(os.environ["WORLD_SIZE"]), timeout=60)
    p = ctx.size
    assert ctx.dp_size == 1 and (ctx.group is None) == (p == 1)
    for use_async in (False, True):
        for shape, dim in [((2 * p, 3, 4), 0), ((2, 3 * p, 5), 1), ((2, 3, 2 * p), -1),
                           ((3, 2, 2 * p, 3 * p, 4), -3)]:
            _check_primitives(ctx, shape, dim, use_async)
        # pair row <-> column and MSA row <-> column, with leading batch dims
        for shape, sdim, gdim in [((2 * p, 3 * p, 4), -2, -3), ((2 * p, 3 * p, 4), -3, -2),
                                  ((2, 3, 2 * p, p, 5), -2, -3), ((3 * p, 2, 2 * p), 0, 2)]:
            _check_all_to_all(ctx, shape, sdim, gdim, use_async)
    # row_to_col / col_to_row helpers are the pair switches
    F = randn((2, 3 * p, 2 * p, 4), 9)
    rows = F.chunk(p, -3)[ctx.rank]
    cols = fd.row_to_col(rows, ctx.group)
    assert torch.equal(cols, F.chunk(p, -2)[ctx.rank])
    assert torch.equal(fd.col_to_row(cols, ctx.group), rows)
    assert torch.equal(fd.col_to_row_start(cols, ctx.group).wait(), rows)
    assert torch.equal(fd.row_to_col_start(rows, ctx.group).wait(), cols)
    _check_consuming(ctx)
    _check_row_to_col_fanout(ctx)

    # sum_grads: identity forward, gradient summed over the group
    w = randn((3, 4), 11).requires_grad_()
    b = randn((4,), 12).requires_grad_()
    w2, b2 = fd.sum_grads([w, b], ctx.group)
    assert torch.equal(w2, w) and torch.equal(b2, b)
    ((w2 * (ctx.rank + 1)).sum() + (b2 * (ctx.rank + 1)).sum()).backward()
    total = p * (p + 1) / 2
    assert_close(w.grad, torch.full_like(w, total), rtol=0, name="sum_grads weight")
    assert_close(b.grad, torch.full_like(b, total), rtol=0, name="sum_grads bias")

    # a length that is not a multiple of the group size is rejected with a pointer to padding
    if p > 1:
        try:
            fd.scatter(torch.zeros(p + 1, 2), 0, ctx.group)
        except ValueError as e:
            assert "pad_to_multiple" in str(e), e
        else:
            raise AssertionError("scatter accepted a length that is not a multiple of the size")
    # a DAP size that disagrees with the groups is a clear error
    assert fd.dap_context_for(p) is ctx
    try:
        fd.dap_context_for(p + 1)
    except ValueError as e:
        assert "does not match" in str(e), e
    else:
        raise AssertionError("dap_context_for accepted a mismatched size")
    fd.shutdown()
    result(ok=True, size=p)


@scenario
def peer_all_to_all(args):
    """GPUs: the all-to-alls that copy engines take (push: the MSA / pair columns -> rows; pull:
    rows -> columns), sync and async, two in flight at once, forward and backward, and inside a
    captured CUDA graph, give exactly the blocks (compared with the full tensors' chunks)."""
    from fastfold_plugin.distributed import peer

    ctx = fd.init(dap_size=int(os.environ["WORLD_SIZE"]), timeout=120)
    g, p, r = ctx.group, ctx.size, ctx.rank
    dev = torch.device("cuda", torch.cuda.current_device())
    launched = []
    launch = peer.PeerAllToAll.launch.__func__

    def counting(cls, *a):
        ex = launch(cls, *a)
        launched.append(ex is not None)
        return ex
    peer.PeerAllToAll.launch = classmethod(counting)
    try:
        _check_peer_all_to_all(g, p, r, dev, launched)
    finally:
        peer.PeerAllToAll.launch = classmethod(launch)
    fd.shutdown()
    result(ok=True, size=p)


def _check_peer_all_to_all(g, p, r, dev, launched):
    exact = dict(rtol=0.0, atol=0.0)
    for dtype in (torch.float32, torch.bfloat16):
        F = randn((64 * p, 48 * p, 128), 1, torch.float32).to(dev, dtype)  # [S, N, C]
        G = randn((64 * p, 48 * p, 128), 2, torch.float32).to(dev, dtype)
        rows, cols = F.chunk(p, 0)[r], F.chunk(p, 1)[r]
        for use_async in (False, True):
            tag = f"{dtype} async {use_async}"
            launched.clear()
            x = rows.clone().requires_grad_()
            xc = cols.clone().requires_grad_()
            if use_async:  # two in flight at once: different slots
                pend_c = fd.row_to_col_start(x, g)
                pend_r = fd.col_to_row_start(xc, g)
                y, yr = pend_c.wait(), pend_r.wait()
            else:
                y, yr = fd.row_to_col(x, g), fd.col_to_row(xc, g)
            assert_close(y, cols, **exact, name=f"rows -> cols {tag}")
            assert_close(yr, rows, **exact, name=f"cols -> rows {tag}")
            torch.autograd.backward([y, yr], [G.chunk(p, 1)[r], G.chunk(p, 0)[r]])
            assert_close(x.grad, G.chunk(p, 0)[r], **exact, name=f"rows -> cols bwd {tag}")
            assert_close(xc.grad, G.chunk(p, 1)[r], **exact, name=f"cols -> rows bwd {tag}")
            assert launched == [True] * 4, (tag, launched)  # every one by copy engines
    # captured: the warm-up made the slots; the replay reads the static inputs' new values
    xs = F.chunk(p, 0)[r].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            out = fd.col_to_row(fd.row_to_col(xs, g), g)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    launched.clear()
    with torch.cuda.graph(graph):
        mid = fd.row_to_col(xs, g)
        out = fd.col_to_row(mid, g)
    assert launched == [True, True], launched
    xs.copy_(G.chunk(p, 0)[r])
    graph.replay()
    torch.cuda.synchronize()
    assert_close(mid, G.chunk(p, 1)[r], **exact, name="captured rows -> cols")
    assert_close(out, G.chunk(p, 0)[r], **exact, name="captured cols -> rows")


# ----------------------------------------------------------------------------------------------
# Model helpers

def bind_dap(module, ctx, ops=None):
    """DAP forwards on `module`'s tree. Size > 1 without a custom op table: the real enable();
    otherwise (DAP size 1, or a recording op table) bound directly, as enable() would."""
    import types
    from types import SimpleNamespace

    import fastfold_plugin
    from fastfold_plugin.kernels import get_ops
    from fastfold_plugin.patches.dap import DAP_FORWARDS

    if ctx.size > 1 and ops is None:
        return fastfold_plugin.enable(module, backend="reference", dap=ctx)
    ops = ops or get_ops("reference")
    for m in module.modules():
        for cls in type(m).__mro__:
            if cls in DAP_FORWARDS:
                m._fastfold_patch = SimpleNamespace(ops=ops, dap=ctx)
                m.forward = types.MethodType(DAP_FORWARDS[cls], m)
                break
    return None


def assert_dap_bound(module, ctx):
    """The module runs the DAP forward with `ctx`'s group (a copied module keeps its patch)."""
    from fastfold_plugin.patches.dap import DAP_FORWARDS

    fn = getattr(module.forward, "__func__", None)
    assert fn in DAP_FORWARDS.values(), f"{type(module).__name__} runs {fn}, not a DAP forward"
    assert module._fastfold_patch.dap.group is ctx.group


class RecordingOps:
    """An op table that records the shape of each op's first argument."""

    def __init__(self, ops):
        self._ops, self.calls = ops, []

    def __getattr__(self, name):
        fn = getattr(self._ops, name)

        def wrapped(*a, **kw):
            self.calls.append((name, tuple(a[0].shape)))
            return fn(*a, **kw)
        return wrapped


TOLS = {torch.float32: (2e-4, 2e-5, 1e-5), torch.float64: (1e-9, 1e-10, 1e-12)}


def tol_check(name, got, exp, dtype=torch.float32, floor=0.0):
    """Elementwise |got - exp| <= rtol * (|exp| + max|exp|) + floor, and the norm ratio.

    `floor` is an absolute tolerance for entries that are mathematically zero (e.g. the gradient
    of a bias that shifts a softmax row), whose values are rounding noise: callers pass the
    dtype's noise level times the largest gradient of the module."""
    rtol, max_rel, _ = TOLS[dtype]
    scale = exp.detach().abs().max().item() if exp.numel() else 0.0
    significant = scale > 100 * floor
    assert_close(got, exp, rtol=rtol, atol=rtol * scale + floor + 1e-30,
                 max_rel=max_rel if significant else None, name=name)


def msa_inputs(n_seq, n_res, c_m, c_z, seed, dtype=torch.float32):
    """Random m, z and masks with zeros, a fully masked MSA row and a fully masked residue; the
    pair mask is not symmetric (one pair (i, j) masked with (j, i) kept), so a mask used in the
    wrong orientation shows."""
    g = gen(seed)
    m = torch.randn(n_seq, n_res, c_m, generator=g, dtype=dtype)
    z = torch.randn(n_res, n_res, c_z, generator=g, dtype=dtype)
    msa_mask = (torch.rand(n_seq, n_res, generator=g) > 0.2).to(dtype)
    seq_mask = torch.ones(n_res, dtype=dtype)
    if n_seq > 2:
        msa_mask[1] = 0.0
    if n_res > 3:
        seq_mask[2] = 0.0
        msa_mask[:, 2] = 0.0
    pair_mask = seq_mask[:, None] * seq_mask[None, :]
    if n_res > 1:
        pair_mask[0, n_res - 1] = 0.0
    return m, z, msa_mask, pair_mask


def evoformer_stack(no_blocks=2, blocks_per_ckpt=None, dropout=(0.15, 0.25), seed=0):
    from openfold.model.evoformer import EvoformerStack

    from fastfold_plugin.testing import randomize_parameters_

    stack = EvoformerStack(
        c_m=16, c_z=8, c_hidden_msa_att=4, c_hidden_opm=4, c_hidden_mul=8, c_hidden_pair_att=4,
        c_s=12, no_heads_msa=2, no_heads_pair=2, no_blocks=no_blocks, transition_n=2,
        msa_dropout=dropout[0], pair_dropout=dropout[1], blocks_per_ckpt=blocks_per_ckpt,
        inf=1e9, eps=1e-10)
    return randomize_parameters_(stack, seed=seed, scale=1.0)


def run_and_grads(module, call, inputs, out_weights, n_grad=2):
    """outputs, {param name: grad}, [input grads] and the loss of sum_k <out_k, w_k> (the first
    `n_grad` inputs require gradients). The loss is returned as [value, sum of |terms|]: the
    sum cancels (random-sign weights), so its rounding error is relative to the second."""
    module.zero_grad(set_to_none=True)
    ins = [x.detach().clone().requires_grad_(x.is_floating_point() and i < n_grad)
           for i, x in enumerate(inputs)]
    outs = call(*ins)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o * w).sum() for o, w in zip(outs, out_weights))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
    in_grads = [x.grad.detach().clone() for x in ins[:n_grad] if x.grad is not None]
    terms = sum((o * w).abs().sum() for o, w in zip(outs, out_weights))
    return [o.detach() for o in outs], grads, in_grads, torch.stack([loss, terms]).detach()


def compare_runs(tag, got, exp, exact=False, dtype=torch.float32):
    outs_g, grads_g, in_g, loss_g = got
    outs_e, grads_e, in_e, loss_e = exp
    g_max = max([g.abs().max().item() for g in grads_e.values()] + [0.0])
    floor = TOLS[dtype][2] * g_max

    def check(n, a, b, fl=0.0):
        if exact:
            assert_close(a, b, rtol=0, atol=0, name=n)
        else:
            tol_check(n, a, b, dtype, fl)

    check(f"{tag} loss", loss_g[0], loss_e[0], TOLS[dtype][1] * loss_e[1].item())
    for i, (a, b) in enumerate(zip(outs_g, outs_e)):
        check(f"{tag} output {i}", a, b)
    assert set(grads_g) == set(grads_e), (tag, set(grads_g) ^ set(grads_e))
    nonzero = sum(bool(g.abs().sum() > 0) for g in grads_e.values())
    assert nonzero >= len(grads_e) // 2, f"{tag}: only {nonzero}/{len(grads_e)} nonzero gradients"
    try:
        for n in grads_e:
            check(f"{tag} grad {n}", grads_g[n], grads_e[n], floor)
    except AssertionError as e:
        errs = {n: (grads_g[n] - grads_e[n]).double().norm().item()
                / max(grads_e[n].double().norm().item(), floor) for n in grads_e}
        worst = sorted(errs.items(), key=lambda kv: -kv[1] if kv[1] == kv[1] else -float("inf"))
        nan = [n for n, v in errs.items() if v != v]
        raise AssertionError(f"{e}\n{len([v for v in errs.values() if not v <= 2e-4])}/{len(errs)} "
                             f"gradients off; NaN: {nan[:10]}; worst: "
                             + "; ".join(f"{n} {v:.2e}" for n, v in worst[:25])) from None
    assert len(in_g) == len(in_e)
    for i, (a, b) in enumerate(zip(in_g, in_e)):
        check(f"{tag} input grad {i}", a, b)


def assert_sharded_shapes(calls, p, n_seq_p, n_res_p, c_m, c_z):
    """Every op saw a shard: attention queries are [rows/P, H, keys, c] and the transitions and
    layer norms never see a whole padded MSA or pair tensor."""
    full_m, full_z = n_seq_p * n_res_p * c_m, n_res_p * n_res_p * c_z
    assert calls, "no op was called"
    for name, shape in calls:
        numel = 1
        for d in shape:
            numel *= d
        if name == "attention":
            assert shape[-4] in (n_seq_p // p, n_res_p // p), (name, shape)
        if name in ("transition", "layer_norm", "layer_norm_torch", "dropout_add"):
            assert numel <= max(full_m, full_z) // p, (name, shape, full_m, full_z)


def check_stack(ctx, stock, inputs, ws, call_stock, call_dap, n_grad, shape_check, tag,
                in_place=()):
    """Stock `stock` (one process) vs its DAP copy: eval forward (no grad, in place), chunked eval,
    training forward + every gradient in fp32 and fp64 with dropout, async == sync, and the shapes
    every op saw. Returns the number of recorded op calls.

    `in_place`: (output index, input index) pairs: in the in-place eval, when that input's two
    split dims (-3, -2) need no padding, the output comes back in the input's memory (gathered
    into it, as OpenFold's in-place inference returns its inputs updated)."""
    import copy

    from fastfold_plugin.kernels import get_ops

    stock.eval()
    dap = copy.deepcopy(stock)
    bind_dap(dap, ctx)
    assert_dap_bound(dap, ctx)
    with torch.no_grad():
        exp = call_stock(stock)(*[x.clone() for x in inputs])
        exp = exp if isinstance(exp, tuple) else (exp,)
        for chunk in (None, 2):
            ins = [x.clone() for x in inputs]
            got = call_dap(dap, inplace=True, chunk_size=chunk)(*ins)
            got = got if isinstance(got, tuple) else (got,)
            for i, (a, b) in enumerate(zip(got, exp)):
                tol_check(f"{tag} eval (chunk {chunk}) output {i}", a, b)
            for o, i in in_place:
                if ctx.size > 1 and all(n % ctx.size == 0 for n in ins[i].shape[-3:-1]):
                    assert got[o].data_ptr() == ins[i].data_ptr(), \
                        f"{tag} eval: output {o} is not in input {i}'s memory"
        # bf16 autocast: DAP's error against the fp32 result stays at stock bf16's own level,
        # out of place and in OpenFold's in-place inference (chunked: its own layouts)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            s16 = call_stock(stock)(*[x.clone() for x in inputs])
            d16 = {"": call_dap(dap)(*[x.clone() for x in inputs]),
                   " in place": call_dap(dap, inplace=True, chunk_size=2)(
                       *[x.clone() for x in inputs])}
        s16 = s16 if isinstance(s16, tuple) else (s16,)
        for how, d in d16.items():
            d = d if isinstance(d, tuple) else (d,)
            for i, (a, b, ref) in enumerate(zip(d, s16, exp)):
                e_dap, e_stock = rel_err(a, ref), rel_err(b, ref)
                assert e_stock > 0 and e_dap <= 2.0 * e_stock + 1e-6, \
                    f"{tag} bf16{how} output {i}: DAP error {e_dap:.2e} vs stock bf16 error {e_stock:.2e}"

    stock.train()
    dap.train()
    torch.manual_seed(7)
    exp = run_and_grads(stock, call_stock(stock), inputs, ws, n_grad)
    torch.manual_seed(7)
    got_async = run_and_grads(dap, call_dap(dap), inputs, ws, n_grad)
    compare_runs(f"{tag} train fp32", got_async, exp)
    stock64, dap64 = copy.deepcopy(stock).double(), copy.deepcopy(dap).double()
    in64 = [x.double() if x.is_floating_point() else x for x in inputs]
    ws64 = [w.double() for w in ws]
    assert_dap_bound(dap64, ctx)
    torch.manual_seed(7)
    exp64 = run_and_grads(stock64, call_stock(stock64), in64, ws64, n_grad)
    torch.manual_seed(7)
    compare_runs(f"{tag} train fp64", run_and_grads(dap64, call_dap(dap64), in64, ws64, n_grad),
                 exp64, dtype=torch.float64)
    dap_sync = copy.deepcopy(stock)
    bind_dap(dap_sync, ctx.with_async(False))
    torch.manual_seed(7)
    got_sync = run_and_grads(dap_sync, call_dap(dap_sync), inputs, ws, n_grad)
    compare_runs(f"{tag} async vs sync", got_async, got_sync, exact=True)

    rec = RecordingOps(get_ops("reference"))
    shaped = copy.deepcopy(stock)
    bind_dap(shaped, ctx, ops=rec)
    torch.manual_seed(7)
    got_rec = run_and_grads(shaped, call_dap(shaped), inputs, ws, n_grad)
    compare_runs(f"{tag} recorded", got_rec, got_async, exact=True)
    shape_check(rec.calls)
    return len(rec.calls)


def msa_stack_call(use_lma=False):
    def factory(mod, inplace=False, chunk_size=None):
        return lambda m, z, mm, pm: mod(m, z, msa_mask=mm, pair_mask=pm, chunk_size=chunk_size,
                                        use_lma=use_lma, inplace_safe=inplace)
    return factory


def evoformer_case(ctx, args):
    """A whole (small) Evoformer stack under DAP equals one process (stock OpenFold)."""
    p = ctx.size
    n_seq, n_res = args["n_seq"], args["n_res"]
    stock = evoformer_stack(blocks_per_ckpt=args.get("blocks_per_ckpt"))
    inputs = msa_inputs(n_seq, n_res, 16, 8, seed=1)
    ws = [randn(s, 50 + i, torch.float32) for i, s in
          enumerate([(n_seq, n_res, 16), (n_res, n_res, 8), (n_res, 12)])]
    calls = check_stack(
        ctx, stock, inputs, ws, msa_stack_call(), msa_stack_call(), 2,
        lambda c: assert_sharded_shapes(c, p, fd.padded_length(n_seq, p),
                                        fd.padded_length(n_res, p), 16, 8), "evoformer",
        in_place=[(0, 0), (1, 1)])
    return calls


def extra_template_case(ctx, args):
    """The extra-MSA stack (global column attention, checkpointed blocks) and the template pair
    stack under DAP equal one process (stock OpenFold)."""
    from openfold.model.evoformer import ExtraMSAStack
    from openfold.model.template import TemplatePairStack

    from fastfold_plugin.testing import randomize_parameters_

    p = ctx.size
    n_seq, n_res = args["n_seq"], args["n_res"]
    n_seq_p, n_res_p = fd.padded_length(n_seq, p), fd.padded_length(n_res, p)

    extra = randomize_parameters_(ExtraMSAStack(
        c_m=8, c_z=8, c_hidden_msa_att=4, c_hidden_opm=4, c_hidden_mul=8, c_hidden_pair_att=4,
        no_heads_msa=2, no_heads_pair=2, no_blocks=2, transition_n=2, msa_dropout=0.15,
        pair_dropout=0.25, inf=1e9, eps=1e-10, ckpt=True), seed=3)
    inputs = msa_inputs(n_seq, n_res, 8, 8, seed=2)
    ws = [randn((n_res, n_res, 8), 60, torch.float32)]
    # stock's extra-MSA attention calls OpenFold's CUDA-only kernel unless use_lma is set (same
    # math, chunked); the DAP forward ignores use_lma
    calls = check_stack(
        ctx, extra, inputs, ws, msa_stack_call(use_lma=True), msa_stack_call(), 2,
        lambda c: assert_sharded_shapes(c, p, n_seq_p, n_res_p, 8, 8), "extra MSA",
        in_place=[(0, 1)])
    # the global column attention ran on the local columns, over the real sequences only
    assert calls > 0

    n_templ = 2
    templ = randomize_parameters_(TemplatePairStack(
        c_t=8, c_hidden_tri_att=4, c_hidden_tri_mul=8, no_blocks=2, no_heads=2,
        pair_transition_n=2, dropout_rate=0.25, blocks_per_ckpt=args.get("blocks_per_ckpt"),
        inf=1e9), seed=4)
    _, _, _, pair_mask = msa_inputs(2, n_res, 8, 8, seed=5)
    t = randn((n_templ, n_res, n_res, 8), 6, torch.float32)
    ws = [randn((n_templ, n_res, n_res, 8), 61, torch.float32)]

    def templ_call(mod, inplace=False, chunk_size=None):
        return lambda t, mask: mod(t, mask, chunk_size=chunk_size, inplace_safe=inplace)

    def templ_shapes(c):
        for name, shape in c:
            if name == "attention":
                assert shape[-4] == n_res_p // p, (name, shape)
            if name in ("transition", "layer_norm", "dropout_add"):
                assert shape[-3] * shape[-2] <= n_res_p * n_res_p // p, (name, shape)

    calls += check_stack(ctx, templ, [t, pair_mask.unsqueeze(-3)], ws, templ_call, templ_call, 1,
                         templ_shapes, "template", in_place=[(0, 0)])
    return calls


def blocks_case(ctx, args):
    """Single blocks called on their own (the block-level DAP forwards: pad, scatter, block,
    gather, unpad): Evoformer, extra-MSA and template pair blocks vs stock OpenFold."""
    from openfold.model.evoformer import ExtraMSABlock
    from openfold.model.template import TemplatePairStackBlock

    from fastfold_plugin.testing import randomize_parameters_

    p = ctx.size
    n_seq, n_res = args["n_seq"], args["n_res"]
    n_seq_p, n_res_p = fd.padded_length(n_seq, p), fd.padded_length(n_res, p)
    ws = [randn(s, 80 + i, torch.float32) for i, s in
          enumerate([(n_seq, n_res, 16), (n_res, n_res, 8)])]
    inputs = msa_inputs(n_seq, n_res, 16, 8, seed=7)
    calls = check_stack(ctx, evoformer_stack(no_blocks=1).blocks[0], inputs, ws, msa_stack_call(),
                        msa_stack_call(), 2,
                        lambda c: assert_sharded_shapes(c, p, n_seq_p, n_res_p, 16, 8),
                        "evoformer block", in_place=[(0, 0), (1, 1)])
    extra = randomize_parameters_(ExtraMSABlock(
        c_m=16, c_z=8, c_hidden_msa_att=4, c_hidden_opm=4, c_hidden_mul=8, c_hidden_pair_att=4,
        no_heads_msa=2, no_heads_pair=2, transition_n=2, msa_dropout=0.15, pair_dropout=0.25,
        inf=1e9, eps=1e-10, ckpt=False), seed=8)
    calls += check_stack(ctx, extra, inputs, ws, msa_stack_call(use_lma=True), msa_stack_call(), 2,
                         lambda c: assert_sharded_shapes(c, p, n_seq_p, n_res_p, 16, 8),
                         "extra MSA block")
    templ = randomize_parameters_(TemplatePairStackBlock(
        c_t=8, c_hidden_tri_att=4, c_hidden_tri_mul=8, no_heads=2, pair_transition_n=2,
        dropout_rate=0.25, inf=1e9), seed=9)
    pair_mask = inputs[3]
    t = randn((2, n_res, n_res, 8), 10, torch.float32)

    def templ_call(mod, inplace=False, chunk_size=None):
        return lambda t, mask: mod(t, mask, chunk_size=chunk_size, inplace_safe=inplace)

    calls += check_stack(ctx, templ, [t, pair_mask.expand(2, n_res, n_res).clone()],
                         [randn((2, n_res, n_res, 8), 81, torch.float32)], templ_call, templ_call,
                         1, lambda c: None, "template block")
    return calls


@scenario
def stacks(args):
    """Each case of args["cases"] ({"stack": "evoformer" | "extra_template", sizes}) in turn."""
    ctx = fd.init(dap_size=int(os.environ["WORLD_SIZE"]), timeout=60)
    cases = {"evoformer": evoformer_case, "extra_template": extra_template_case,
             "blocks": blocks_case}
    for case in args["cases"]:
        calls = cases[case["stack"]](ctx, case)
        result(ok=True, size=ctx.size, ops=calls, **case)
    fd.shutdown()


def _cpu_softmax_kernel_works() -> bool:
    """OpenFold's in-place inference path calls attn_core_inplace_cuda, which runs on the CPU only
    once the project's OpenFold install has given it a CPU implementation."""
    try:
        import attn_core_inplace_cuda

        attn_core_inplace_cuda.forward_(torch.randn(1, 2, 3), 2, 3)
        return True
    except Exception:
        return False


@scenario
def alphafold_eval(args):
    """The whole AlphaFold (model_1_ptm, reduced depth) in eval mode on real cropped features:
    a model built under register() with config.globals.dap_size = world size equals stock."""
    import copy

    from openfold.config import model_config
    from openfold.model.model import AlphaFold

    import fastfold_plugin
    from fastfold_plugin.testing import load_sample_batch, randomize_parameters_

    ctx = fd.init(dap_size=int(os.environ["WORLD_SIZE"]), timeout=120)
    config = model_config("model_1_ptm")
    config.model.evoformer_stack.no_blocks = 2
    config.model.extra_msa.extra_msa_stack.no_blocks = 1
    config.model.template.template_pair_stack.no_blocks = 1
    config.model.structure_module.no_blocks = 2
    no_grad = _cpu_softmax_kernel_works()
    # without OpenFold's in-place kernel on the CPU: run eval with gradients on (OpenFold's
    # out-of-place path), and let stock's extra-MSA attention take its chunked (LMA) branch
    config.globals.use_lma = not no_grad
    stock = randomize_parameters_(AlphaFold(config), seed=11).eval()
    flagged = copy.deepcopy(config)
    flagged.globals.use_fastfold = True
    flagged.globals.fastfold_backend = "reference"
    flagged.globals.dap_size = ctx.size
    fastfold_plugin.register()
    try:
        dap = AlphaFold(flagged)
    finally:
        fastfold_plugin.unregister()
    dap.load_state_dict(stock.state_dict())
    dap.eval()
    for name in ("evoformer", "extra_msa_stack", "template_pair_stack"):
        if ctx.size > 1:
            assert_dap_bound(getattr(dap, name), ctx)

    batch = load_sample_batch(args["feats"], n_res=args["n_res"], n_msa=args["n_msa"],
                              n_extra=args["n_extra"], n_templ=2,
                              n_recycle=2 if no_grad else 1)  # recycles run under no_grad
    with torch.set_grad_enabled(not no_grad):
        out_s = stock({k: v.clone() for k, v in batch.items()})
        out_d = dap({k: v.clone() for k, v in batch.items()})
    for k in ("msa", "pair", "single"):
        tol_check(f"alphafold {k}", out_d[k], out_s[k])
    mask = out_s["final_atom_mask"].bool()
    pos_s, pos_d = out_s["final_atom_positions"], out_d["final_atom_positions"]
    assert pos_s[mask].abs().max() > 1.0, "degenerate structure: the comparison would be vacuous"
    dpos = (pos_d - pos_s).norm(dim=-1)[mask].max().item()
    assert dpos <= 1e-3, f"atom positions deviate by {dpos:.3e} A"
    dplddt = (out_d["plddt"] - out_s["plddt"]).abs().max().item()
    assert dplddt <= 1e-2, f"pLDDT deviates by {dplddt:.3e}"
    fd.shutdown()
    result(ok=True, size=ctx.size, no_grad=no_grad, dpos=dpos, dplddt=dplddt)


@scenario
def dp_x_dap(args):
    """World = data-parallel groups x DAP args["dap_size"] (2 x 2 on 4 processes, 2 x 4 on 8): the
    mesh layout, the sampler, and one training step whose outputs and input gradients equal the
    group's sample in one process, whose parameter gradients equal the mean of the samples'
    single-process gradients, and whose ops all ran on shards."""
    import copy

    import fastfold_plugin
    from fastfold_plugin.kernels import get_ops

    ctx = fd.init(dap_size=args["dap_size"], timeout=60, seed=1000)
    world, rank = dist.get_world_size(), dist.get_rank()
    dp = world // args["dap_size"]
    assert (ctx.size, ctx.dp_size) == (args["dap_size"], dp)
    # DAP groups are consecutive ranks; data-parallel groups stride over them
    assert ctx.rank == rank % ctx.size and ctx.dp_rank == rank // ctx.size
    assert ctx.mesh.get_ranks_in_group(ctx.group) == list(range(rank - ctx.rank,
                                                               rank - ctx.rank + ctx.size))
    assert ctx.mesh.get_ranks_in_group(ctx.dp_group) == list(range(ctx.rank, world, ctx.size))
    assert fd.dap_context_for(ctx.size) is ctx

    # one sample per DAP group: all ranks of a group read the same indices, groups are disjoint
    lengths = [5, 6, 7, 4]
    sampler = fd.DAPSampler(lengths, ctx, shuffle=True, seed=3)
    sampler.set_epoch(1)
    mine = torch.tensor(list(sampler))
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    groups = [everyone[g * ctx.size:(g + 1) * ctx.size] for g in range(dp)]
    for g in groups:
        assert all(torch.equal(g[0], x) for x in g), "ranks of one DAP group read different samples"
    flat = torch.cat([g[0] for g in groups])
    assert len(set(flat.tolist())) == len(lengths), f"groups overlap: {flat.tolist()}"

    stock = evoformer_stack(no_blocks=2, blocks_per_ckpt=1)
    stock.train()
    model = copy.deepcopy(stock)
    handle = fastfold_plugin.enable(model, backend="reference", dap=ctx)
    assert handle.num_patched > 0
    hooks = fd.register_data_parallel_hooks(model, ctx)
    assert len(hooks) == len(list(model.parameters()))

    def sample(i):
        n_res = lengths[i]
        inputs = msa_inputs(3, n_res, 16, 8, seed=20 + i)
        ws = [randn(s, 70 + i, torch.float32) for s in [(3, n_res, 16), (n_res, n_res, 8),
                                                         (n_res, 12)]]
        return inputs, ws

    call = msa_stack_call()
    # this group's sample under DAP x DP; torch is seeded with 1000 + dp_rank by init()
    idx = [int(g[0][0]) for g in groups]
    inputs, ws = sample(idx[ctx.dp_rank])
    torch.manual_seed(1000 + ctx.dp_rank)
    outs, grads, in_grads, loss = run_and_grads(model, call(model), inputs, ws)
    # reference: each sample in one process with its group's seed, gradients averaged
    refs = []
    for g, i in enumerate(idx):
        torch.manual_seed(1000 + g)
        refs.append(run_and_grads(stock, call(stock), *sample(i)))
    mean = {n: sum(r[1][n] for r in refs) / dp for n in refs[0][1]}
    own = refs[ctx.dp_rank]
    compare_runs("dp x dap", (outs, grads, in_grads, loss), (own[0], mean, own[2], own[3]))

    # the same step with a recording op table (no data-parallel hooks): every op saw a shard
    rec = RecordingOps(get_ops("reference"))
    shaped = copy.deepcopy(stock)
    bind_dap(shaped, ctx, ops=rec)
    torch.manual_seed(1000 + ctx.dp_rank)
    outs_rec = run_and_grads(shaped, call(shaped), inputs, ws)[0]
    for j, (a, b) in enumerate(zip(outs_rec, outs)):
        assert_close(a, b, rtol=0, atol=0, name=f"dp x dap recorded output {j}")
    n_res = lengths[idx[ctx.dp_rank]]
    assert_sharded_shapes(rec.calls, ctx.size, fd.padded_length(3, ctx.size),
                          fd.padded_length(n_res, ctx.size), 16, 8)
    hooks.remove()
    handle.disable()
    fd.shutdown()
    result(ok=True, rank=rank, dp_rank=ctx.dp_rank, dap_rank=ctx.rank, n_res=n_res,
           ops=len(rec.calls))


@scenario
def never_joins(args):
    """Rank 1 never calls init: rank 0 must fail within the timeout with a clear error."""
    if dist_rank() != 0:
        return
    t0 = time.monotonic()
    try:
        fd.init(dap_size=2, timeout=args["timeout"])
    except fd.DAPInitError as e:
        result(error=type(e).__name__, message=str(e), elapsed=time.monotonic() - t0)
        return
    raise AssertionError("init returned although a rank never joined")


@scenario
def peer_fails(args):
    """All ranks join; then the last rank exits (or stalls) instead of running the DAP stack:
    the others must fail within the timeout with DAPCommError, never hang."""
    ctx = fd.init(dap_size=int(os.environ["WORLD_SIZE"]), timeout=args["timeout"])
    stack = evoformer_stack(no_blocks=1)
    inputs = msa_inputs(4, 6, 16, 8, seed=1)
    if ctx.rank == ctx.size - 1:
        if args["mode"] == "exit":
            os._exit(0)
        time.sleep(args["stall"])  # alive but never reaches the collective
        os._exit(0)
    bind_dap(stack, ctx)
    t0 = time.monotonic()
    try:
        with torch.no_grad():
            stack(*inputs[:2], msa_mask=inputs[2], pair_mask=inputs[3], chunk_size=None)
    except fd.DAPCommError as e:
        result(error=type(e).__name__, message=str(e)[:500], elapsed=time.monotonic() - t0)
        os._exit(0)  # skip process-group teardown: the peer is gone
    raise AssertionError("the DAP forward returned although a peer was gone")


@scenario
def triton_stacks(args):
    """With the Triton ops on every shard: a DAP Evoformer stack and template pair stack vs stock
    OpenFold in one process: fp32 eval and training gradients, bf16 autocast eval. On GPUs
    (args["device"] == "cuda": NCCL, one GPU per rank) or on the CPU (gloo, Triton's
    interpreter, tiny sizes). With args["poison"], torch.empty & co. return NaN-filled memory,
    as a GPU's caching allocator returns stale data: a kernel that reads memory it never wrote
    shows up on the CPU too. args "backend" (default "triton"), "async_comm" (default True) and
    "blocks_per_ckpt" (default 1) narrow down a failure."""
    import copy

    from openfold.model.template import TemplatePairStack

    import fastfold_plugin
    from fastfold_plugin.testing import randomize_parameters_

    on_gpu = args.get("device", "cuda") == "cuda"
    if args.get("poison"):
        poison_empty()
    if args.get("gather_chunk_bytes"):  # the sharded trimul's inference gathers in many chunks
        from fastfold_plugin.kernels import triangle_multiplication as trimul_module
        trimul_module._GATHER_CHUNK_BYTES = args["gather_chunk_bytes"]
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ctx = fd.init(dap_size=int(os.environ["WORLD_SIZE"]), timeout=120,
                  backend="nccl" if on_gpu else "gloo", async_comm=args.get("async_comm", True))
    ops_backend = args.get("backend", "triton")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if on_gpu else torch.device("cpu")
    assert dist.get_backend() == ("nccl" if on_gpu else "gloo")
    n_seq, n_res = args["n_seq"], args["n_res"]
    models = {
        "evoformer": (evoformer_stack(blocks_per_ckpt=args.get("blocks_per_ckpt", 1)).to(device),
                      [x.to(device) for x in msa_inputs(n_seq, n_res, 16, 8, seed=1)],
                      [(n_seq, n_res, 16), (n_res, n_res, 8), (n_res, 12)], msa_stack_call(), 2),
    }
    templ = randomize_parameters_(TemplatePairStack(
        c_t=8, c_hidden_tri_att=4, c_hidden_tri_mul=8, no_blocks=2, no_heads=2,
        pair_transition_n=2, dropout_rate=0.25, blocks_per_ckpt=None, inf=1e9), seed=4).to(device)
    pm = msa_inputs(2, n_res, 8, 8, seed=5)[3]
    t = randn((2, n_res, n_res, 8), 6, torch.float32)

    def templ_call(mod, inplace=False, chunk_size=None):
        return lambda t, mask: mod(t, mask, chunk_size=chunk_size, inplace_safe=inplace)

    models["template"] = (templ, [t.to(device), pm.unsqueeze(-3).to(device)],
                          [(2, n_res, n_res, 8)], templ_call, 1)
    for tag, (stock, ins, w_shapes, call, n_grad) in models.items():
        ws = [randn(sh, 50 + i, torch.float32).to(device) for i, sh in enumerate(w_shapes)]
        stock.eval()
        dap = copy.deepcopy(stock)
        fastfold_plugin.enable(dap, backend=ops_backend, dap=ctx)
        assert_dap_bound(dap, ctx)
        with torch.no_grad():
            exp = call(stock)(*[x.clone() for x in ins])
            got = call(dap, inplace=True)(*[x.clone() for x in ins])
            exp, got = [e if isinstance(e, tuple) else (e,) for e in (exp, got)]
            for i, (a, b) in enumerate(zip(got, exp)):
                tol_check(f"{device.type} {tag} eval output {i}", a, b)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                s16 = call(stock)(*[x.clone() for x in ins])
                d16 = {"": call(dap)(*[x.clone() for x in ins]),
                       " in place": call(dap, inplace=True, chunk_size=4)(*[x.clone() for x in ins])}
            s16 = s16 if isinstance(s16, tuple) else (s16,)
            for how, d in d16.items():
                d = d if isinstance(d, tuple) else (d,)
                for i, (a, b, ref) in enumerate(zip(d, s16, exp)):
                    e_dap, e_stock = rel_err(a, ref), rel_err(b, ref)
                    assert e_dap <= 2.0 * e_stock + 1e-6, \
                        f"{device.type} {tag} bf16{how} output {i}: DAP {e_dap:.2e} vs stock bf16 {e_stock:.2e}"
        stock.train()
        dap.train()
        torch.manual_seed(7)
        exp = run_and_grads(stock, call(stock), ins, ws, n_grad)
        torch.manual_seed(7)
        compare_runs(f"{device.type} {tag} train", run_and_grads(dap, call(dap), ins, ws, n_grad), exp)
        result(ok=True, stack=tag, size=ctx.size)
    fd.shutdown()


def poison_empty() -> None:
    """Make torch.empty, empty_like, empty_strided and Tensor.new_empty return NaN-filled
    floating-point tensors in this process."""
    import functools

    def poisoned(fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            t = fn(*a, **k)
            if t.is_floating_point() and t.numel():
                t.fill_(float("nan"))
            return t
        return wrapper

    for name in ("empty", "empty_like", "empty_strided"):
        setattr(torch, name, poisoned(getattr(torch, name)))
    torch.Tensor.new_empty = poisoned(torch.Tensor.new_empty)


def dist_rank() -> int:
    return int(os.environ["RANK"])


def main():
    name, args = sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    torch.set_num_threads(1)
    try:
        SCENARIOS[name](args)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()


if __name__ == "__main__":
    main()
