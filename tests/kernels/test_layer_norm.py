"""layer_norm / layer_norm_torch: Triton op vs reference, and reference vs OpenFold's modules."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from fastfold_plugin.kernels.layer_norm import (
    layer_norm,
    layer_norm_fwd_rows,
    layer_norm_reference,
    layer_norm_torch,
    layer_norm_torch_reference,
)
from fastfold_plugin.testing import assert_close, randomize_parameters_, rel_err

OPS = {
    "openfold": (layer_norm, layer_norm_reference),
    "torch": (layer_norm_torch, layer_norm_torch_reference),
}

# fp32: op vs reference, elementwise rtol (atol scaled by the tensor's size).
# bf16/fp16: op's error vs an fp64 truth <= factor x the reference's own error in that dtype.
# The CPU interpreter truncates fp32 -> bf16 on store (a GPU rounds to nearest), which doubles
# the op's bf16 rounding error: hence 3 for bf16 here and 2 in the GPU tests.
DTYPES = [
    pytest.param(torch.float32, 2e-5, id="fp32"),
    pytest.param(torch.bfloat16, 3.0, id="bf16"),
    pytest.param(torch.float16, 2.0, id="fp16"),
]
SHAPES = [(37, 64), (2, 3, 5, 24), (1, 1, 128), (3, 1, 7, 256)]


def _autocast(device_type: str, on: bool):
    return torch.autocast(device_type, dtype=torch.bfloat16) if on else contextlib.nullcontext()


def _inputs(shape, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    c = shape[-1]
    x = (torch.randn(shape, generator=gen) * 2.0 + 0.5).to(device=device, dtype=dtype)
    w = (1.0 + 0.1 * torch.randn(c, generator=gen)).to(device)
    b = (0.1 * torch.randn(c, generator=gen)).to(device)
    return [t.requires_grad_() for t in (x, w, b)]


def _run(fn, args, g=None):
    """Output and the grads of all args for upstream grad g (drawn if None)."""
    out = fn(*args)
    if g is None:
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    grads = torch.autograd.grad(out, args, g)
    return out, grads, g


def _truth(contract, x, w, b, eps, g):
    """fp64 LayerNorm with the parameter rounding of the contract (bf16 x, OpenFold: bf16 params)."""
    if contract == "openfold" and x.dtype == torch.bfloat16:
        w_t, b_t = w.detach().to(torch.bfloat16), b.detach().to(torch.bfloat16)
    else:
        w_t, b_t = w.detach(), b.detach()
    args = [t.double().requires_grad_() for t in (x.detach(), w_t, b_t)]
    fn = lambda x_, w_, b_: F.layer_norm(x_, (x_.shape[-1],), w_, b_, eps)  # noqa: E731
    return _run(fn, args, g.double())


def _compare(actual, expected, truth, dtype, tol, name):
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    if dtype == torch.float32:  # fp32 arithmetic on both sides
        scale = expected.detach().abs().max().item()
        assert_close(actual, expected, rtol=2e-5, atol=2e-5 * scale, name=name)
        return
    e_op, e_ref = rel_err(actual, truth), rel_err(expected, truth)
    assert e_op <= tol * e_ref + 1e-6, (
        f"{name}: op error {e_op:.3e} > {tol} x reference error {e_ref:.3e}")


def check_layer_norm(contract, shape, dtype, tol, autocast, device, eps=1e-5):
    op, ref = OPS[contract]
    args = _inputs(shape, dtype, device)
    if device == "cuda" and not autocast and dtype != torch.float32:
        # CUDA's layer_norm takes no fp32 weight with a half-precision input (the CPU's does):
        # without autocast, test what a model converted to `dtype` holds, weights in `dtype` too.
        args = [args[0]] + [t.detach().to(dtype).requires_grad_() for t in args[1:]]
    with _autocast(device, autocast):
        out, grads, g = _run(lambda *a: op(*a, eps), args)
        out_ref, grads_ref, _ = _run(lambda *a: ref(*a, eps), args, g)
    out_t, grads_t, _ = _truth(contract, *args, eps, g)
    _compare(out, out_ref, out_t, dtype, tol, "out")
    for name, a, e, t in zip(("dx", "dweight", "dbias"), grads, grads_ref, grads_t, strict=True):
        assert a.dtype == e.dtype, f"{name}: dtype {a.dtype} != {e.dtype}"
        _compare(a, e, t, dtype, tol, name)


@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
@pytest.mark.parametrize("contract", ["openfold", "torch"])
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_layer_norm_matches_reference(shape, dtype, tol, contract, autocast):
    check_layer_norm(contract, shape, dtype, tol, autocast, "cpu")


@pytest.mark.parametrize("contract", ["openfold", "torch"])
def test_output_dtype_contract(contract):
    """bf16/fp16/fp32 in, with and without autocast: the op returns the reference's dtype."""
    op, ref = OPS[contract]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x, w, b = _inputs((3, 16), dtype, "cpu")
        for ac in (False, True):
            with _autocast("cpu", ac):
                assert op(x, w, b).dtype == ref(x, w, b).dtype, (dtype, ac)
    with _autocast("cpu", True):
        x, w, b = _inputs((3, 16), torch.bfloat16, "cpu")
        assert layer_norm(x, w, b).dtype == torch.bfloat16
        assert layer_norm_torch(x, w, b).dtype == torch.float32


def test_non_contiguous_input_and_grad():
    x, w, b = _inputs((5, 6, 32), torch.float32, "cpu")
    xt = x.transpose(0, 1)  # rows not in memory order
    out, grads, g = _run(lambda *a: layer_norm(*a), [xt, w, b])
    out_r, grads_r, _ = _run(lambda *a: layer_norm_reference(*a), [xt, w, b], g.transpose(0, 1).contiguous().transpose(0, 1))
    assert_close(out, out_r, rtol=1e-5, atol=1e-5)
    for a, e in zip(grads, grads_r, strict=True):
        assert_close(a, e, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=str)
@pytest.mark.parametrize("make", [
    lambda t: t.transpose(-2, -3),                       # OpenFold's m / z transposed: two levels
    lambda t: t.transpose(-2, -3)[..., 1:, :, :],        # a slice of it: not dense, dx contiguous
    lambda t: t.unsqueeze(0).transpose(-2, -3),          # a leading dim of one
    lambda t: t.permute(1, 0, 2)[:, ::2],                # rows of strided steps
], ids=["transposed", "sliced", "batch-of-one", "stepped"])
def test_strided_rows_are_read_in_place(make, dtype, tol):
    """Rows that collapse to at most two strided dims are normalised where they lie (no copy of
    x), and x's gradient comes back in x's layout when x is a permuted dense tensor (transposed
    back, contiguous: autograd then adds it to the residual's other gradients contiguously)."""
    from fastfold_plugin.kernels import layer_norm as ln_mod

    x, w, b = _inputs((6, 5, 48), dtype, "cpu", seed=3)
    xv = make(x)
    assert ln_mod._row_layout(xv) is not None
    copies = []
    orig = ln_mod._rows
    ln_mod._rows = lambda t, c: copies.append(t.shape) or orig(t, c)
    try:
        out, grads, g = _run(layer_norm, [xv, w, b])
    finally:
        ln_mod._rows = orig
    assert copies == [out.shape]  # only the (contiguous) output gradient goes through _rows
    out_r, grads_r, _ = _run(layer_norm_reference, [xv, w, b], g)
    assert out.is_contiguous() and out.dtype == out_r.dtype
    assert_close(out.float(), out_r.float(), rtol=tol, atol=tol)
    for a, e in zip(grads, grads_r, strict=True):
        assert_close(a.float(), e.float(), rtol=tol, atol=tol * 10)
    # the gradient of the transposed view, in its layout: x's own gradient is contiguous
    if xv.is_contiguous() is False and xv.numel() == x.numel():
        (gx,) = torch.autograd.grad(layer_norm(xv, w, b), x, g)
        assert gx.is_contiguous()


@pytest.mark.parametrize("make", [
    lambda t: t.transpose(-2, -3),
    lambda t: t[:1].expand(t.shape),
    lambda t: t,
], ids=["transposed", "expanded", "contiguous"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_saved_x_returned_in_another_layout(make, device):
    """A saved-tensor hook (as torch's save_on_cpu) may give the saved x back with other strides
    than the forward read (here: made contiguous): the backward reads it as it comes back."""
    x, w, b = _inputs((4, 3, 16), torch.float32, device, seed=5)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t.contiguous()):
        _check_fp32_against_reference(make(x), w, b)


def _check_fp32_against_reference(xv, w, b):
    """layer_norm(xv) vs the reference: output and every gradient, fp32 (under any hooks or
    contexts the caller has entered: both runs' backwards happen inside them)."""
    out, grads, g = _run(layer_norm, [xv, w, b])
    out_r, grads_r, _ = _run(layer_norm_reference, [xv, w, b], g)
    assert_close(out, out_r, rtol=1e-5, atol=1e-5)
    for a, e in zip(grads, grads_r, strict=True):
        assert_close(a, e, rtol=1e-5, atol=1e-4)


def test_three_strided_levels_are_copied():
    from fastfold_plugin.kernels import layer_norm as ln_mod

    x, w, b = _inputs((2, 3, 4, 16), torch.float32, "cpu")
    xv = x.permute(1, 0, 2, 3)[:, :, ::2]  # rows over three strided dims
    assert ln_mod._row_layout(xv) is None
    _check_fp32_against_reference(xv, w, b)


def test_empty_input():
    x, w, b = _inputs((0, 3, 16), torch.float32, "cpu")
    out = layer_norm(x, w, b)
    assert out.shape == x.shape
    gx, gw, gb = torch.autograd.grad(out.sum(), (x, w, b), allow_unused=True)
    assert gx.shape == x.shape and float(gw.abs().sum()) == 0.0 and float(gb.abs().sum()) == 0.0


def test_cached_plans_are_keyed_on_everything_they_fix():
    """Calls on the same rows and channels that differ in one thing a cached launch plan fixes
    or leaves to the call, made in turn, each match the reference: the input's row stride (rows
    of a wider tensor, then contiguous), its dtype and the parameters' (fp32, bf16 under both
    contracts, fp16 parameters), autocast, eps, the grad mode, the gradients asked for, dout's
    strides and the row count; then the rows kernel with and without its statistics stored."""
    shape = (3, 7, 24)
    for contract, dtype, tol, autocast, eps in (
            ("openfold", torch.float32, 2e-5, False, 1e-5),
            ("openfold", torch.bfloat16, 3.0, False, 1e-5),
            ("torch", torch.bfloat16, 3.0, True, 1e-5),
            ("openfold", torch.float32, 2e-5, False, 1e-3),
            ("torch", torch.float16, 2.0, False, 1e-5)):
        check_layer_norm(contract, shape, dtype, tol, autocast, "cpu", eps=eps)
    x, w, b = _inputs(shape, torch.float32, "cpu")
    wide = torch.randn(3, 7, 40, generator=torch.Generator().manual_seed(5))[..., 8:32]
    x16 = x.detach().half().requires_grad_()
    w16, b16 = (t.detach().half().requires_grad_() for t in (w, b))
    g = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    g_rows = torch.randn(24, generator=torch.Generator().manual_seed(7)).expand(shape)  # as from a sum
    for args, dout in (([wide.requires_grad_(), w, b], g), ([x, w, b], g_rows),
                       ([x16, w16, b16], g.half()), ([x[:2], w, b], g[:2]), ([x, w, b], g),
                       # more rows than one program of the first call's plan covers
                       (_inputs((10, 20, 24), torch.float32, "cpu", seed=8),
                        torch.randn(10, 20, 24, generator=torch.Generator().manual_seed(9)))):
        with torch.no_grad():
            assert_close(layer_norm(*args), layer_norm_reference(*args), rtol=1e-3, atol=1e-3)
        out, grads, _ = _run(layer_norm, args, dout)
        out_ref, grads_ref, _ = _run(layer_norm_reference, args, dout)
        assert out.dtype == out_ref.dtype
        assert_close(out, out_ref, rtol=1e-3, atol=1e-3, name="out")
        for name, a, e in zip(("dx", "dweight", "dbias"), grads, grads_ref, strict=True):
            assert a.dtype == e.dtype
            assert_close(a, e, rtol=1e-3, atol=1e-3 * e.abs().max().item(), name=name)
    only_x = torch.autograd.grad(layer_norm(x, w.detach(), b.detach()), x, g)[0]
    assert_close(only_x, torch.autograd.grad(layer_norm_reference(x, w, b), x, g)[0],
                 rtol=1e-4, atol=1e-4, name="dx (no parameter gradients)")

    x2 = x.detach().reshape(-1, 24)
    for store_stats in (False, True, False):
        y, mean, rstd = layer_norm_fwd_rows(x2, w.detach(), b.detach(), 1e-5, torch.float32,
                                            store_stats=store_stats)
        assert_close(y, layer_norm_reference(x2, w, b), rtol=1e-5, atol=1e-5, name="y")
        assert (mean is None) == (rstd is None) == (not store_stats)
        if store_stats:
            var, mu = torch.var_mean(x2, dim=-1, unbiased=False)
            assert_close(mean, mu, rtol=1e-5, atol=1e-6, name="mean")
            assert_close(rstd, (var + 1e-5).rsqrt(), rtol=1e-5, atol=1e-6, name="rstd")


# ---- the references against OpenFold's own modules (exact) ----------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_reference_matches_openfold_layer_norm(dtype):
    from openfold.model.primitives import LayerNorm

    mod = randomize_parameters_(LayerNorm(48, eps=1e-5), seed=3)
    x = (torch.randn(2, 7, 48) * 3 + 1).to(dtype).requires_grad_()
    g = torch.randn(2, 7, 48).to(dtype)
    out_mod = mod(x)
    grads_mod = torch.autograd.grad(out_mod, (x, mod.weight, mod.bias), g)
    out_ref = layer_norm_reference(x, mod.weight, mod.bias, mod.eps)
    grads_ref = torch.autograd.grad(out_ref, (x, mod.weight, mod.bias), g)
    assert out_ref.dtype == out_mod.dtype and torch.equal(out_ref, out_mod)
    for a, e in zip(grads_ref, grads_mod, strict=True):
        assert torch.equal(a, e)


def test_reference_matches_torch_layer_norm():
    mod = randomize_parameters_(torch.nn.LayerNorm(40, eps=1e-5), seed=4)
    x = (torch.randn(3, 5, 40) * 2).requires_grad_()
    g = torch.randn(3, 5, 40)
    out_mod = mod(x)
    grads_mod = torch.autograd.grad(out_mod, (x, mod.weight, mod.bias), g)
    out_ref = layer_norm_torch_reference(x, mod.weight, mod.bias, mod.eps)
    grads_ref = torch.autograd.grad(out_ref, (x, mod.weight, mod.bias), g)
    assert torch.equal(out_ref, out_mod)
    for a, e in zip(grads_ref, grads_mod, strict=True):
        assert torch.equal(a, e)


# ---- GPU: real sizes, CUDA autocast ------------------------------------------------------------
GPU_DTYPES = [
    pytest.param(torch.float32, 2e-5, id="fp32"),
    pytest.param(torch.bfloat16, 2.0, id="bf16"),
    pytest.param(torch.float16, 2.0, id="fp16"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
@pytest.mark.parametrize("contract", ["openfold", "torch"])
@pytest.mark.parametrize("dtype,tol", GPU_DTYPES)
@pytest.mark.parametrize("shape", [(1, 128, 256, 256), (1, 256, 256, 128), (1, 1024, 37, 64), (7, 129)], ids=str)
def test_layer_norm_gpu(shape, dtype, tol, contract, autocast):
    check_layer_norm(contract, shape, dtype, tol, autocast, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_reference_matches_openfold_under_cuda_autocast(dtype):
    from openfold.model.primitives import LayerNorm

    mod = randomize_parameters_(LayerNorm(64), seed=5).cuda()
    tmod = randomize_parameters_(torch.nn.LayerNorm(64), seed=6).cuda()
    x = torch.randn(4, 33, 64, device="cuda").to(dtype)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_mod, out_ref = mod(x), layer_norm_reference(x, mod.weight, mod.bias, mod.eps)
        tout_mod, tout_ref = tmod(x), layer_norm_torch_reference(x, tmod.weight, tmod.bias, tmod.eps)
    assert out_mod.dtype == out_ref.dtype and torch.equal(out_mod, out_ref)
    assert tout_mod.dtype == tout_ref.dtype and torch.equal(tout_mod, tout_ref)


# ----------------------------------------------------------------------------------------------
# layer_norm_fanout: one LayerNorm for several Linears (and the residual that carries x)
# ----------------------------------------------------------------------------------------------
def _fanout_run(backend, x0, w0, b0, ws, douts, used, carry, dres, transpose, device="cpu"):
    """layer_norm_fanout of x (a transposed view of a non-leaf with `transpose`), each used
    output through its Linear under bf16 autocast, the carried x (with `carry`) into a residual
    add; backward from random gradients. Returns (Linear outputs, residual output, grads of the
    leaf x, w, b)."""
    from fastfold_plugin.kernels import get_ops

    leaf, w, b = (t.clone().to(device).requires_grad_() for t in (x0, w0, b0))
    x = leaf * 1.0  # not a leaf, as a block's residual stream
    if transpose:
        x = x.transpose(-2, -3)
    dev = torch.device(device).type
    with torch.autocast(dev, dtype=torch.bfloat16):
        outs = get_ops(backend).layer_norm_fanout(x, w, b, 1e-5, len(ws), carry)
        ys = [F.linear(outs[i], wi.to(device)) for i, wi in enumerate(ws) if i in used]
    tensors = ys + [d.to(device=device, dtype=y.dtype) for d, y in
                    zip([douts[i] for i in used], ys)]
    res = None
    if carry:
        res = outs[-1] + 1.0
        torch.autograd.backward(ys + [res], tensors[len(ys):] + [dres.to(device)])
    else:
        torch.autograd.backward(ys, tensors[len(ys):])
    return [y.detach() for y in ys], res, leaf.grad, w.grad, b.grad


@pytest.mark.parametrize("transpose", [False, True], ids=["rows", "transposed"])
@pytest.mark.parametrize("n,used,carry", [(4, (0, 1, 2, 3), True), (5, (0, 1, 2, 3, 4), True),
                                          (4, (0, 2), False), (1, (0,), True),
                                          (7, tuple(range(7)), False)],
                         ids=["4-carry", "5-carry", "unused", "1-carry", "7-presum"])
def test_layer_norm_fanout_matches_reference(n, used, carry, transpose):
    g = torch.Generator().manual_seed(n)
    shape = (2, 5, 7, 24)  # [*, N_seq, N_res, C]: 70 rows, the last program partial
    x0 = torch.randn(shape, generator=g) * 2.0 + 0.5
    w0 = 1.0 + 0.1 * torch.randn(24, generator=g)
    b0 = 0.1 * torch.randn(24, generator=g)
    ws = [torch.randn(16, 24, generator=g) / 24 ** 0.5 for _ in range(n)]
    rows = (2, 7, 5) if transpose else (2, 5, 7)
    douts = [torch.randn(*rows, 16, generator=g) for _ in range(n)]
    dres = torch.randn(*rows, 24, generator=g)
    ref = _fanout_run("reference", x0, w0, b0, ws, douts, used, carry, dres, transpose)
    got = _fanout_run("triton", x0, w0, b0, ws, douts, used, carry, dres, transpose)
    for a, e in zip(got[0], ref[0]):  # the Linears read the same bf16 values (up to a rounding
        assert a.dtype == e.dtype == torch.bfloat16  # flip where the fp32 LayerNorms differ)
        assert_close(a.float(), e.float(), rtol=1e-2, atol=1e-2, name="linear out")
    if carry:
        assert torch.equal(got[1], ref[1])  # the carried x is x
    for a, e, name in zip(got[2:], ref[2:], ("dx", "dweight", "dbias")):
        assert a.dtype == e.dtype == torch.float32
        scale = e.abs().max().item()
        assert_close(a, e, rtol=1e-4, atol=1e-5 * scale, name=name)


def test_layer_norm_fanout_rounds_once_and_sums_in_fp32():
    """Under autocast the outputs are the fp32 LayerNorm rounded to bf16 once (to nearest even,
    under the interpreter too), one tensor for all readers; dx is the LayerNorm backward of the
    readers' gradients summed in fp32, plus the carried x's gradient."""
    from fastfold_plugin.kernels.layer_norm import layer_norm_fanout

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(6, 40, generator=g) * 3.0).requires_grad_()
    w = (1.0 + 0.1 * torch.randn(40, generator=g)).requires_grad_()
    b = (0.1 * torch.randn(40, generator=g)).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = layer_norm_fanout(x, w, b, 1e-5, 3, carry=True)
    y32 = F.layer_norm(x.detach(), (40,), w.detach(), b.detach(), 1e-5)
    assert len(outs) == 4 and outs[-1] is not x and torch.equal(outs[-1], x)
    for y in outs[:3]:
        assert y.dtype == torch.bfloat16 and y.data_ptr() == outs[0].data_ptr()
        assert (y.float() - y32).abs().max() <= 2 ** -8 * y32.abs().max()
    grads = [torch.randn(6, 40, generator=g).to(torch.bfloat16) for _ in range(3)]
    dres = torch.randn(6, 40, generator=g)
    torch.autograd.backward(list(outs), grads + [dres])
    dy = grads[0].float() + grads[1].float() + grads[2].float()
    xr = x.detach().clone().requires_grad_()
    F.layer_norm(xr, (40,), w.detach(), b.detach(), 1e-5).backward(dy)
    assert_close(x.grad, xr.grad + dres, rtol=1e-5, atol=1e-5, name="dx")
    assert_close(b.grad, dy.sum(0), rtol=1e-5, atol=1e-5, name="dbias")


@pytest.mark.parametrize("bcast", ["row", "scalar"])
def test_broadcast_gradients_are_read_in_place(bcast):
    """Gradients broadcast over every row, as a sum's backward hands them out (one row expanded,
    or one scalar expanded to all elements), reach the kernel unmaterialised (no copy of a
    broadcast tensor but its one row: the row is read with stride 0) and give the gradients of
    their dense copies, for the readers' outputs and for the carried x alike."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastfold_plugin.kernels.layer_norm import layer_norm_fanout

    g = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 9, 40, generator=g) * 2.0).requires_grad_()
    w = (1.0 + 0.1 * torch.randn(40, generator=g)).requires_grad_()
    b = (0.1 * torch.randn(40, generator=g)).requires_grad_()

    def cotangent(seed):
        v = torch.randn(40 if bcast == "row" else (), generator=torch.Generator().manual_seed(seed))
        return v.expand(x.shape)

    grads = [cotangent(6), cotangent(7), cotangent(8)]  # two readers and the carried x
    assert all(not any(t.stride()[:-1]) for t in grads)

    class Copies(TorchDispatchMode):
        """Records the copies made of a broadcast tensor of more than one row."""
        big = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            copies = {torch.ops.aten.clone: 0, torch.ops.aten._to_copy: 0,
                      torch.ops.aten.copy_: 1}
            src = args[copies[func.overloadpacket]] if func.overloadpacket in copies else None
            if isinstance(src, torch.Tensor) and src.numel() > x.shape[-1] and any(
                    st == 0 and n > 1 for n, st in zip(src.shape, src.stride(), strict=True)):
                self.big.append((func, tuple(src.shape)))
            return func(*args, **(kwargs or {}))

    results = []
    for dense in (False, True):
        for t in (x, w, b):
            t.grad = None
        outs = layer_norm_fanout(x, w, b, 1e-5, 2, carry=True)
        gs = [gr.contiguous() if dense else gr for gr in grads]
        with Copies() as mode:
            torch.autograd.backward(list(outs), gs)
        if not dense:
            assert mode.big == [], mode.big
        results.append([t.grad.clone() for t in (x, w, b)])
    for a, e, name in zip(*results, ("dx", "dweight", "dbias")):
        assert torch.equal(a, e), name


def test_layer_norm_fanout_without_grad_or_autocast():
    """No gradients: one forward kernel, no saved statistics, aliases. No autocast: the
    ``layer_norm`` contract's dtype (nothing to round), same values as ``layer_norm``."""
    from fastfold_plugin.kernels.layer_norm import layer_norm_fanout

    g = torch.Generator().manual_seed(4)
    x, w, b = (torch.randn(9, 32, generator=g), torch.randn(32, generator=g),
               torch.randn(32, generator=g))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ys = layer_norm_fanout(x, w, b, 1e-5, 2, carry=True)
    assert ys[0].dtype == torch.bfloat16 and ys[0] is ys[1] and ys[2] is x
    plain = layer_norm_fanout(x.requires_grad_(), w, b, 1e-5, 2)
    assert plain[0].dtype == torch.float32
    assert_close(plain[0], layer_norm(x, w, b, 1e-5), rtol=1e-6, atol=1e-6, name="y")
    with pytest.raises(ValueError, match="n >= 1"):
        layer_norm_fanout(x, w, b, 1e-5, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("transpose", [False, True], ids=["rows", "transposed"])
@pytest.mark.parametrize("shape,n", [((1, 128, 256, 256), 4), ((1, 256, 256, 128), 5)], ids=str)
def test_layer_norm_fanout_gpu(shape, n, transpose):
    g = torch.Generator().manual_seed(n)
    c = shape[-1]
    x0 = torch.randn(shape, generator=g) * 2.0 + 0.5
    w0, b0 = 1.0 + 0.1 * torch.randn(c, generator=g), 0.1 * torch.randn(c, generator=g)
    ws = [torch.randn(32, c, generator=g) / c ** 0.5 for _ in range(n)]
    rows = shape[:-3] + ((shape[-2], shape[-3]) if transpose else shape[-3:-1])
    douts = [torch.randn(*rows, 32, generator=g) for _ in range(n)]
    dres = torch.randn(*rows, c, generator=g)
    args = (x0, w0, b0, ws, douts, tuple(range(n)), True, dres, transpose, "cuda")
    ref, got = _fanout_run("reference", *args), _fanout_run("triton", *args)
    for a, e in zip(got[0], ref[0]):
        assert_close(a.float(), e.float(), rtol=2e-2, atol=2e-2, max_rel=5e-3, name="linear out")
    assert torch.equal(got[1], ref[1])
    for a, e, name in zip(got[2:], ref[2:], ("dx", "dweight", "dbias")):
        scale = e.abs().max().item()
        assert_close(a, e, rtol=1e-3, atol=1e-4 * scale, max_rel=1e-4, name=name)


@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_layer_norm_fanout_dtypes(dtype, tol, autocast):
    """Every input dtype, with and without autocast: the outputs (the ``layer_norm`` contract's
    dtype, or the autocast dtype where each Linear would round an fp32 output), the carried x,
    and the gradients of x, weight and bias (three readers and the residual) against the
    reference, as ``check_layer_norm`` compares them."""
    from fastfold_plugin.kernels import get_ops

    shape = (3, 1, 7, 24)
    res = {}
    for backend in ("reference", "triton"):
        x, w, b = _inputs(shape, dtype, "cpu")
        with _autocast("cpu", autocast):
            outs = get_ops(backend).layer_norm_fanout(x, w, b, 1e-5, 3, carry=True)
        assert outs[-1].dtype == dtype
        ys = [o.to(torch.bfloat16 if autocast else o.dtype) for o in outs[:3]]  # as a Linear reads
        gen = torch.Generator().manual_seed(2)
        gs = [torch.randn(shape, generator=gen).to(y.dtype) for y in ys]
        dres = torch.randn(shape, generator=gen).to(dtype)
        grads = torch.autograd.grad(ys + [outs[-1]], (x, w, b), gs + [dres])
        res[backend] = (ys[0].detach(), grads, gs, dres)
    (y_r, g_r, gs, dres), (y_t, g_t, _, _) = res["reference"], res["triton"]
    x, w, b = _inputs(shape, dtype, "cpu")
    g_sum = sum(g.double() for g in gs)
    y_truth, g_truth, _ = _truth("openfold", x, w, b, 1e-5, g_sum)
    g_truth = (g_truth[0] + dres.double(),) + tuple(g_truth[1:])
    _compare(y_t, y_r, y_truth.to(y_r.dtype), dtype if not autocast else torch.bfloat16,
             tol if not autocast else 3.0, "y")
    for a, e, t, name in zip(g_t, g_r, g_truth, ("dx", "dweight", "dbias")):
        _compare(a, e, t, dtype, tol, name)
