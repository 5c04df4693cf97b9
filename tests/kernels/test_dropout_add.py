"""dropout_add: Triton op vs reference (same mask), both vs OpenFold's Dropout (same seed)."""
import pytest
import torch

from fastfold_plugin.kernels.dropout_add import (
    draw_keep_mask,
    dropout_add,
    dropout_add_reference,
    keep_mask_shape,
)
from fastfold_plugin.testing import assert_close

# (residual dtype, update dtype, ulps allowed between op and reference). fp32/fp16: bit-exact.
# bf16: the CPU interpreter truncates fp32 -> bf16 where torch rounds to nearest (two roundings:
# product and sum), so up to 2 bf16 ulps on CPU; the GPU tests require bit equality.
DTYPES = [
    pytest.param(torch.float32, torch.float32, 0, id="fp32"),
    pytest.param(torch.float16, torch.float16, 0, id="fp16"),
    pytest.param(torch.float32, torch.float16, 0, id="fp32+fp16"),
    pytest.param(torch.bfloat16, torch.bfloat16, 2, id="bf16"),
    pytest.param(torch.float32, torch.bfloat16, 2, id="fp32+bf16"),
]
# (shape, batch_dim): MSA row-wise [*, N_seq, N_res, C] shares along -3, pair column-wise along -2
CASES = [
    ((5, 37, 16), -3),
    ((2, 3, 1, 8), -3),
    ((1, 4, 7, 16), -2),
    ((3, 5, 9, 4), [-3, -1]),
    ((2, 6, 5, 3, 8), -2),
]


def _equal_within_ulps(actual, expected, ulps, name, scale=None):
    """Bit equality (ulps 0), or |a - e| <= ulps * (eps * |e| + scale) (the bf16 roundings)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
    if ulps == 0:
        assert torch.equal(actual, expected), f"{name}: not bit-identical"
        return
    e = expected.detach().double()
    bound = ulps * (torch.finfo(expected.dtype).eps * e.abs() + (0 if scale is None else scale))
    bad = (actual.detach().double() - e).abs() > bound
    assert not bool(bad.any()), f"{name}: {int(bad.sum())} elements more than {ulps} ulp apart"


def _inputs(shape, res_dtype, upd_dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    res = torch.randn(shape, generator=gen).to(device=device, dtype=res_dtype).requires_grad_()
    upd = torch.randn(shape, generator=gen).to(device=device, dtype=upd_dtype).requires_grad_()
    g = torch.randn(shape, generator=gen).to(device=device, dtype=torch.promote_types(res_dtype, upd_dtype))
    return res, upd, g


def check_given_mask(shape, batch_dim, res_dtype, upd_dtype, ulps, device, p=0.25):
    res, upd, g = _inputs(shape, res_dtype, upd_dtype, device)
    gen = torch.Generator().manual_seed(7)
    keep_shape = keep_mask_shape(shape, batch_dim)
    keep = ((torch.rand(keep_shape, generator=gen) > p).to(upd_dtype) / (1 - p)).to(device)
    out = dropout_add(res, upd, p, True, batch_dim, mask=keep)
    out_ref = dropout_add_reference(res, upd, p, True, batch_dim, mask=keep)
    # the product is rounded before the add: its rounding counts at its own magnitude
    product = (upd.detach().double() * keep.double()).abs()
    _equal_within_ulps(out, out_ref, ulps, "out", scale=torch.finfo(upd_dtype).eps * product)
    d = torch.autograd.grad(out, (res, upd), g)
    d_ref = torch.autograd.grad(out_ref, (res, upd), g)
    _equal_within_ulps(d[0], d_ref[0], 0, "d_residual")
    _equal_within_ulps(d[1], d_ref[1], ulps, "d_update")


@pytest.mark.parametrize("res_dtype,upd_dtype,ulps", DTYPES)
@pytest.mark.parametrize("shape,batch_dim", CASES, ids=str)
def test_matches_reference_given_mask(shape, batch_dim, res_dtype, upd_dtype, ulps):
    check_given_mask(shape, batch_dim, res_dtype, upd_dtype, ulps, "cpu")


def test_mask_of_fewer_dims_and_non_contiguous_inputs():
    res, upd, g = _inputs((4, 6, 8), torch.float32, torch.float32)
    keep = (torch.rand(6, 1) > 0.5).float() * 2.0  # broadcasts over the leading dim and C
    upd_t = upd.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    out = dropout_add(res, upd_t, 0.5, True, -3, mask=keep)
    out_ref = dropout_add_reference(res, upd_t, 0.5, True, -3, mask=keep)
    assert torch.equal(out, out_ref)
    assert torch.equal(torch.autograd.grad(out, upd, g)[0], torch.autograd.grad(out_ref, upd, g)[0])


@pytest.mark.parametrize("res_dtype,upd_dtype,ulps", DTYPES)
def test_transposed_residual_keeps_its_layout(res_dtype, upd_dtype, ulps):
    """OpenFold's ending-node attention: z transposed is the residual, the update contiguous in
    the transposed frame. The output is written in the residual's layout (no copy of it), so
    transposed back it is contiguous; the output's gradient is read in any layout (transposed,
    or the zero strides of a sum's gradient)."""
    res0, _, g = _inputs((7, 9, 2, 8), res_dtype, upd_dtype, seed=4)  # (a leading dim of 2)
    res = res0.transpose(0, 1)  # [9, 7, 2, 8], strided
    gen = torch.Generator().manual_seed(5)
    upd = torch.randn(res.shape, generator=gen).to(upd_dtype).requires_grad_()
    keep = (torch.rand(1, 7, 2, 8, generator=gen) > 0.3).to(upd_dtype) / 0.7  # row-shared
    out = dropout_add(res, upd, 0.3, True, -4, mask=keep)
    out_ref = dropout_add_reference(res, upd, 0.3, True, -4, mask=keep)
    assert out.stride() == res.stride() and out.transpose(0, 1).is_contiguous()
    product = (upd.detach().double() * keep.double()).abs()
    _equal_within_ulps(out, out_ref, ulps, "out", scale=torch.finfo(upd_dtype).eps * product)
    for name, gout in (("transposed", g.transpose(0, 1)), ("contiguous", g.transpose(0, 1).contiguous()),
                       ("zero strides", torch.ones((), dtype=g.dtype).expand(res.shape))):
        got = torch.autograd.grad(out, (res0, upd), gout, retain_graph=True)
        exp = torch.autograd.grad(out_ref, (res0, upd), gout, retain_graph=True)
        _equal_within_ulps(got[0], exp[0], 0, f"{name} d_res")
        _equal_within_ulps(got[1], exp[1], ulps, f"{name} d_upd")


def test_layouts_beyond_the_kernels_dims_are_copied():
    res0, upd, g = _inputs((2, 3, 4, 5, 8), torch.float32, torch.float32, seed=6)
    res = res0.permute(1, 0, 3, 2, 4)  # no two adjacent dims merge: four outer dims
    gen = torch.Generator().manual_seed(7)
    upd = torch.randn(res.shape, generator=gen).requires_grad_()
    keep = (torch.rand(res.shape, generator=gen) > 0.5).float() * 2.0
    out = dropout_add(res, upd, 0.5, True, [], mask=keep)
    assert torch.equal(out, dropout_add_reference(res, upd, 0.5, True, [], mask=keep))
    assert out.is_contiguous()


def test_cached_plans_are_keyed_on_everything_they_fix():
    """Calls on the same shape that differ in one thing a cached launch plan fixes or leaves to
    the call, made in turn, each match the reference bit for bit: the mask's strides (shared
    along the rows, then a full mask of other values there, then the same values as a stride-0
    expand, then a transposed layout), the dtypes, the grad mode and the gradients asked for,
    and d_out's strides; then a mask that needs the rare contiguous expansion and the same
    shape's plain mask."""
    shape = (4, 6, 8)
    gen = torch.Generator().manual_seed(3)
    shared = (torch.rand(1, 6, 8, generator=gen) > 0.5).float() * 2.0
    full = (torch.rand(shape, generator=gen) > 0.5).float() * 2.0
    masks = [shared, full, shared.expand(shape), full.transpose(0, 1).contiguous().transpose(0, 1),
             shared]
    for res_dtype, upd_dtype in ((torch.float32, torch.float32), (torch.float32, torch.float16),
                                 (torch.float16, torch.float16), (torch.float32, torch.float32)):
        res, upd, g = _inputs(shape, res_dtype, upd_dtype)
        douts = (g, g[0, 0].expand(shape), g.transpose(0, 2).contiguous().transpose(0, 2))
        for keep in masks:
            keep = keep.to(upd_dtype)
            with torch.no_grad():
                assert torch.equal(dropout_add(res, upd, 0.5, True, -3, mask=keep),
                                   dropout_add_reference(res, upd, 0.5, True, -3, mask=keep))
            for leaves, dout in (((res, upd), douts[0]), ((upd,), douts[1]), ((res, upd), douts[2])):
                out = dropout_add(res, upd, 0.5, True, -3, mask=keep)
                out_ref = dropout_add_reference(res, upd, 0.5, True, -3, mask=keep)
                assert torch.equal(out, out_ref)
                for a, e in zip(torch.autograd.grad(out, leaves, dout),
                                torch.autograd.grad(out_ref, leaves, dout), strict=True):
                    assert torch.equal(a, e)
    # dims alternating shared / not shared more than three times: the mask is expanded first
    shape = (2, 3, 2, 3, 2, 3)
    res, upd, g = _inputs(shape, torch.float32, torch.float32)
    for batch_dim in ([0, 2, 4], [0, 2], [0, 2, 4]):
        keep = (torch.rand(keep_mask_shape(shape, batch_dim), generator=gen) > 0.5).float() * 2.0
        out = dropout_add(res, upd, 0.5, True, batch_dim, mask=keep)
        out_ref = dropout_add_reference(res, upd, 0.5, True, batch_dim, mask=keep)
        assert torch.equal(out, out_ref)
        assert torch.equal(torch.autograd.grad(out, upd, g)[0],
                           torch.autograd.grad(out_ref, upd, g)[0])


@pytest.mark.parametrize("op", [dropout_add, dropout_add_reference], ids=["triton", "reference"])
@pytest.mark.parametrize("batch_dim", [-3, -2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_reproduces_openfold_dropout(op, batch_dim, dtype):
    """Same seed -> the same mask and the same output as stock OpenFold, and the same RNG state."""
    from openfold.model.dropout import DropoutColumnwise, DropoutRowwise

    res, upd, g = _inputs((3, 6, 5, 8), dtype, dtype)
    layer = (DropoutRowwise if batch_dim == -3 else DropoutColumnwise)(0.25).train()
    torch.manual_seed(11)
    upd_stock = upd.detach().clone().requires_grad_()
    out_stock = res + layer(upd_stock * 1)  # OpenFold's Dropout multiplies its input in place
    after_stock = torch.rand(3)
    torch.manual_seed(11)
    out = op(res, upd, 0.25, True, batch_dim)
    after = torch.rand(3)
    assert torch.equal(out, out_stock)
    assert torch.equal(after, after_stock), "different number of RNG draws than OpenFold"
    d = torch.autograd.grad(out, (res, upd), g)
    d_stock = torch.autograd.grad(out_stock, (res, upd_stock), g)
    assert torch.equal(d[0], d_stock[0]) and torch.equal(d[1], d_stock[1])


@pytest.mark.parametrize("op", [dropout_add, dropout_add_reference], ids=["triton", "reference"])
@pytest.mark.parametrize("training,p", [(False, 0.25), (True, 0.0)])
def test_identity_when_not_dropping(op, training, p):
    res, upd, _ = _inputs((2, 5, 7, 4), torch.float32, torch.bfloat16)
    state = torch.get_rng_state()
    out = op(res, upd, p, training, -3)
    assert torch.equal(torch.get_rng_state(), state), "drew random numbers without dropping"
    assert torch.equal(out, res + upd)


@pytest.mark.parametrize("batch_dim", [-3, -2])
def test_drawn_mask_statistics(batch_dim):
    """The Triton path's effective keep factors: 0 or 1/(1-p), rate 1-p, shared along batch_dim."""
    p, shape = 0.15, (1, 16, 24, 32)
    gen = torch.Generator().manual_seed(2)
    res = torch.randn(shape, generator=gen)
    upd = torch.rand(shape, generator=gen) + 0.5
    torch.manual_seed(5)
    out = dropout_add(res, upd, p, True, batch_dim)
    keep = (out.double() - res.double()) / upd.double()
    assert bool(((keep.abs() < 1e-5) | ((keep - 1 / (1 - p)).abs() < 1e-5)).all())
    kept = keep > 0.5
    first = kept.select(batch_dim, 0).unsqueeze(batch_dim)
    assert bool((kept == first).all()), "mask not shared along batch_dim"
    n = first.numel()
    rate = first.double().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(rate - (1 - p)) < 5 * sigma, f"keep rate {rate:.4f}, expected {1 - p} +- {sigma:.4f}"


def test_draw_keep_mask_matches_openfold_calls():
    upd = torch.randn(2, 4, 6, 8)
    torch.manual_seed(3)
    ref = torch.nn.Dropout(0.3)(upd.new_ones(2, 1, 6, 8))
    torch.manual_seed(3)
    assert torch.equal(draw_keep_mask(upd, 0.3, -3), ref)


def test_reference_vs_float64_math():
    """The reference's product is rounded to the update's dtype, the sum to the promoted dtype."""
    res, upd, _ = _inputs((3, 4, 8), torch.float32, torch.bfloat16)
    keep = (torch.rand(1, 4, 8) > 0.2).to(torch.bfloat16) / 0.8
    out = dropout_add_reference(res, upd, 0.2, True, -3, mask=keep)
    expect = res.double() + (upd.double() * keep.double()).to(torch.bfloat16).double()
    assert out.dtype == torch.float32
    assert_close(out, expect, rtol=1e-6, atol=1e-6)


# ---- GPU ------------------------------------------------------------------------------------
GPU_DTYPES = [pytest.param(r, u, 0, id=i) for r, u, i in (
    (torch.float32, torch.float32, "fp32"), (torch.bfloat16, torch.bfloat16, "bf16"),
    (torch.float16, torch.float16, "fp16"), (torch.float32, torch.bfloat16, "fp32+bf16"))]


@pytest.mark.gpu
@pytest.mark.parametrize("res_dtype,upd_dtype,ulps", GPU_DTYPES)
@pytest.mark.parametrize("shape,batch_dim", [((1, 128, 256, 256), -3), ((1, 256, 256, 128), -2),
                                             ((1, 1024, 37, 64), -3), ((3, 5, 9, 4), [-3, -1])], ids=str)
def test_matches_reference_given_mask_gpu(shape, batch_dim, res_dtype, upd_dtype, ulps):
    check_given_mask(shape, batch_dim, res_dtype, upd_dtype, ulps, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("batch_dim", [-3, -2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reproduces_openfold_dropout_gpu(batch_dim, dtype):
    from openfold.model.dropout import DropoutColumnwise, DropoutRowwise

    res, upd, _ = _inputs((1, 64, 96, 128), dtype, dtype, device="cuda")
    layer = (DropoutRowwise if batch_dim == -3 else DropoutColumnwise)(0.15).train()
    torch.manual_seed(11)
    out_stock = res + layer(upd.detach().clone())
    torch.manual_seed(11)
    out = dropout_add(res, upd, 0.15, True, batch_dim)
    assert torch.equal(out, out_stock)
