"""Worker processes for the DAP tests: ``python workers.py <scenario> <json args>``.

Started by ``conftest.launch`` with torchrun's environment variables. Each scenario raises on the
first mismatch (the launcher then shows every rank's output) and prints ``RESULT {json}`` lines
that the test may read.
"""
import datetime
import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

import fastfold_plugin.distributed as fd
from fastfold_plugin.testing import assert_close

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
