"""kernels/cast_fanout.py: one rounding of an activation that several Linears read under autocast,
and one fp32 pass summing their gradients, against the reference (each Linear rounds it, as in
stock OpenFold, and autograd sums the gradients in fp32)."""
import pytest
import torch
import torch.nn.functional as F

from fastfold_plugin.kernels import cast_fanout as cf
from fastfold_plugin.kernels import get_ops


def _linears(x, n, c_out, seed):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(c_out, x.shape[-1], generator=g) / x.shape[-1] ** 0.5 for _ in range(n)]
    douts = [torch.randn(*x.shape[:-1], c_out, generator=g) for _ in range(n)]
    return ws, douts


def _run(backend, x0, ws, douts, dtype, used):
    """Forward: each of the n aliases through its Linear (only the `used` ones); backward from
    random output gradients. Returns (outputs, x.grad)."""
    leaf = x0.clone().requires_grad_()
    x = leaf * 1.0  # not a leaf, as a LayerNorm output (autocast caches its casts of leaves)
    with torch.autocast("cpu", dtype=dtype):
        xs = get_ops(backend).cast_fanout(x, len(ws))
        outs = [F.linear(xi, w) for i, (xi, w) in enumerate(zip(xs, ws)) if i in used]
    torch.autograd.backward(outs, [d.to(o.dtype) for d, o in
                                   zip([douts[i] for i in used], outs)])
    return [o.detach() for o in outs], leaf.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,used", [(4, (0, 1, 2, 3)), (3, (0, 1, 2)), (6, (0, 1, 2, 3, 4, 5)),
                                    (4, (0, 2))], ids=["4", "3", "6-two-launches", "unused"])
def test_matches_reference(dtype, n, used):
    g = torch.Generator().manual_seed(n)
    x0 = torch.randn(3, 37, 24, generator=g)  # 2664 elements: two programs, the last partial
    ws, douts = _linears(x0, n, 16, seed=1)
    out_r, gx_r = _run("reference", x0, ws, douts, dtype, used)
    out_t, gx_t = _run("triton", x0, ws, douts, dtype, used)
    for a, b in zip(out_t, out_r):
        assert a.dtype == b.dtype == dtype and torch.equal(a, b)  # the same rounded inputs
    assert gx_t.dtype == torch.float32 and gx_t.shape == x0.shape
    # the same fp32 sum of the same per-Linear gradients; only the order of additions may differ
    torch.testing.assert_close(gx_t, gx_r, rtol=1e-6, atol=1e-6)


def test_sums_in_fp32_in_order():
    g = torch.Generator().manual_seed(0)
    leaf = torch.randn(5, 300, generator=g).requires_grad_()
    x = leaf * 1.0
    grads = [torch.randn(5, 300, generator=g).to(torch.bfloat16) for _ in range(5)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ys = cf.cast_fanout(x, 5)
    assert all(y.dtype == torch.bfloat16 for y in ys)
    assert all(torch.equal(y, x.detach().to(torch.bfloat16)) for y in ys)
    torch.autograd.backward(list(ys), grads)
    expected = grads[0].float()
    for gr in grads[1:]:
        expected = expected + gr.float()
    assert torch.equal(leaf.grad, expected)
    # (a bf16 sum of the same gradients, as autograd forms when the casts are shared, differs)
    assert not torch.equal(leaf.grad, sum(grads[1:], grads[0]).float())


def test_no_rounding_outside_autocast_or_for_low_precision_inputs():
    leaf = torch.randn(4, 8, requires_grad=True)
    x = leaf * 1.0
    assert all(y is x for y in cf.cast_fanout(x, 3))  # autocast off
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert all(y is leaf for y in cf.cast_fanout(leaf, 2))  # autocast's cached leaf cast
        assert cf.cast_fanout(x, 1) == (x,)  # one consumer rounds once anyway
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        ys = cf.cast_fanout(leaf, 2)  # no cache: stock rounds per consumer, so fan out
    assert ys[0].dtype == torch.bfloat16 and ys[0] is not leaf
    xb = torch.randn(4, 8).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert all(y is xb for y in cf.cast_fanout(xb, 2))  # already the autocast dtype
        with torch.no_grad():
            ys = cf.cast_fanout(x, 3)  # no gradient: one rounding, shared
    assert ys[0] is ys[1] is ys[2] and ys[0].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="n >= 1"):
        cf.cast_fanout(x, 0)


def test_double_backward_matches_reference():
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(4, 6, generator=g)
    w1, w2 = torch.randn(5, 6, generator=g), torch.randn(3, 6, generator=g)

    def second(fan):
        leaf = x0.clone().requires_grad_()
        x = leaf * 1.0
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a, b = fan(x, 2)
            y = sum((torch.nn.functional.linear(t, w).float() ** 2).sum()
                    for t, w in ((a, w1), (b, w2)))
        (gx,) = torch.autograd.grad(y, leaf, create_graph=True)
        (ggx,) = torch.autograd.grad(gx.sum(), leaf)
        return gx.detach(), ggx

    gx_r, ggx_r = second(cf.cast_fanout_reference)
    gx_t, ggx_t = second(cf.cast_fanout)
    torch.testing.assert_close(gx_t, gx_r, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ggx_t, ggx_r, rtol=1e-6, atol=1e-6)


def test_unused_outputs_get_no_gradient_buffers(monkeypatch):
    seen = []
    real = cf._sum_grads
    monkeypatch.setattr(cf, "_sum_grads", lambda grads, *a: seen.append(len(grads)) or real(grads, *a))
    x = torch.randn(3, 8, requires_grad=True) * 1.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ys = cf.cast_fanout(x, 4)
    ys[1].float().sum().backward()
    assert seen == [1]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [4, 6])
def test_gpu_kernel_sums_in_fp32_in_order(dtype, n):
    """The compiled kernel (CUDA autocast; a partial last block; n = 6 in two launches)."""
    if not torch.cuda.is_available():
        pytest.fail("this test needs a CUDA GPU")
    g = torch.Generator().manual_seed(n)
    leaf = torch.randn(3, 1000, 7, generator=g).cuda().requires_grad_()
    x = leaf * 1.0
    grads = [torch.randn(3, 1000, 7, generator=g).cuda().to(dtype) for _ in range(n)]
    with torch.autocast("cuda", dtype=dtype):
        ys = cf.cast_fanout(x, n)
    assert all(y.dtype == dtype and torch.equal(y, x.detach().to(dtype)) for y in ys)
    torch.autograd.backward(list(ys), grads)
    expected = grads[0].float()
    for gr in grads[1:]:
        expected = expected + gr.float()
    assert torch.equal(leaf.grad, expected)
