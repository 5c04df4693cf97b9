"""softmax: Triton op vs reference (forward and every gradient), and reference vs OpenFold."""
import pytest
import torch

from fastfold_plugin.kernels.softmax import softmax, softmax_reference
from fastfold_plugin.testing import assert_close
from fastfold_plugin.testing import assert_matches_truth as compare

# fp32: the op vs an fp64 truth, as tight as fp32 arithmetic (relative norm error).
# bf16/fp16: the op's error vs the fp64 truth <= factor x the reference's own error in that dtype.
DTYPES = [
    pytest.param(torch.float32, 1e-5, id="fp32"),
    pytest.param(torch.bfloat16, 2.0, id="bf16"),
    pytest.param(torch.float16, 2.0, id="fp16"),
]
INF = 1e9


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _mask_bias(shape, gen, p_masked=0.3):
    """OpenFold's INF * (mask - 1) in fp32; key 0 never masked."""
    mask = (torch.rand(shape, generator=gen) > p_masked).float()
    mask[..., 0] = 1.0
    return INF * (mask - 1)


def make_case(case, k, dtype, seed=0):
    """Logits and biases as OpenFold's softmax users lay them out.

    global:   GlobalAttention, a [B, N_res, H, N_seq] + mask bias [B, N_res, 1, N_seq]
    row:      attention logits [B, S, H, Q, K] + mask [B, S, 1, 1, K] + pair bias [B, 1, H, Q, K]
    ipa:      structure-module logits [B, H, N, N] + pair term [B, H, N, N] + mask [B, 1, N, N]
    """
    g = _gen(seed)
    if case == "global":
        x = torch.randn(2, 5, 3, k, generator=g).to(dtype)
        return dict(x=x, mask_bias=_mask_bias((2, 5, 1, k), g), pair_bias=None)
    if case == "row":
        x = torch.randn(2, 3, 2, 4, k, generator=g).to(dtype)
        pb = torch.randn(2, 1, 2, 4, k, generator=g).to(dtype)
        return dict(x=x, mask_bias=_mask_bias((2, 3, 1, 1, k), g), pair_bias=pb)
    if case == "ipa":
        x = torch.randn(2, 3, 6, k, generator=g).to(dtype)
        pb = torch.randn(2, 3, 6, k, generator=g).to(dtype)
        return dict(x=x, mask_bias=_mask_bias((2, 1, 6, k), g), pair_bias=pb)
    raise ValueError(case)


def _requires_grad(inputs, names=("x", "pair_bias")):
    return {n: (t.detach().requires_grad_(n in names) if t is not None else None)
            for n, t in inputs.items()}


def run(fn, inputs, dy=None, seed=1):
    y = fn(**inputs)
    if dy is None:
        dy = torch.randn(y.shape, generator=_gen(seed)).to(y)
    names = [n for n, t in inputs.items() if t is not None and t.requires_grad]
    grads = torch.autograd.grad(y, [inputs[n] for n in names], dy) if names else ()
    return y, dict(zip(names, grads, strict=True)), dy


def _double(inputs):
    return {n: (t.detach().double().requires_grad_(t.requires_grad) if t is not None else None)
            for n, t in inputs.items()}


def check(inputs, dtype, tol):
    y, grads, dy = run(softmax, inputs)
    y_ref, grads_ref, _ = run(softmax_reference, inputs, dy)
    y_t, grads_t, _ = run(softmax_reference, _double(inputs), dy.double())
    compare(y, y_ref, y_t, dtype, tol, "y")
    assert set(grads) == set(grads_ref)
    for name in grads:
        assert grads[name].dtype == inputs[name].dtype, name
        compare(grads[name], grads_ref[name], grads_t[name], dtype, tol, "d" + name)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("k", [1, 5, 33, 129])
@pytest.mark.parametrize("case", ["global", "row", "ipa"])
def test_softmax_matches_reference(case, k, dtype, tol):
    check(_requires_grad(make_case(case, k, dtype)), dtype, tol)


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_long_rows_take_the_two_pass_path(dtype, tol):
    """K > one tile (8192): online max/sum, then normalise; bias gradients via the fallback."""
    g = _gen(3)
    x = torch.randn(2, 9001, generator=g).to(dtype)
    inputs = dict(x=x, mask_bias=_mask_bias((1, 9001), g), pair_bias=torch.randn(2, 1, 9001)
                  .to(dtype)[:, 0])
    check(_requires_grad(inputs, ("x", "mask_bias", "pair_bias")), dtype, tol)


BIAS_SHAPES = {
    "per_row_group[B,S,1,1,K]": (2, 3, 1, 1, 17),
    "shared[B,1,H,Q,K]": (2, 1, 2, 4, 17),
    "no_batch[H,Q,K]": (2, 4, 17),
    "key_only[K]": (17,),
    "full[B,S,H,Q,K]": (2, 3, 2, 4, 17),
    "const_along_K[B,S,H,Q,1]": (2, 3, 2, 4, 1),
}


@pytest.mark.parametrize("slot", ["mask_bias", "pair_bias"])
@pytest.mark.parametrize("pattern", list(BIAS_SHAPES))
def test_bias_gradients_reduce_to_broadcast_shape(pattern, slot):
    g = _gen(4)
    inputs = dict(x=torch.randn(2, 3, 2, 4, 17, generator=g), mask_bias=None, pair_bias=None)
    inputs[slot] = torch.randn(BIAS_SHAPES[pattern], generator=g)
    check(_requires_grad(inputs, ("x", slot)), torch.float32, 1e-5)


def test_bias_gradient_without_x_gradient():
    """Only the bias needs a gradient: dx is never materialised."""
    inputs = make_case("row", 33, torch.float32)
    inputs["pair_bias"] = inputs["pair_bias"].requires_grad_()
    check(inputs, torch.float32, 1e-5)


def test_non_contiguous_and_unfoldable_layouts():
    """x transposed in memory; biases whose broadcast pattern leaves five row dims unfolded
    (the explicit loop over the first one)."""
    g = _gen(5)
    x = torch.randn(2, 3, 2, 3, 4, 9, generator=g).transpose(0, 1).contiguous().transpose(0, 1)
    mb = torch.randn(1, 3, 1, 3, 1, 9, generator=g)
    pb = torch.randn(2, 1, 2, 1, 4, 9, generator=g)
    inputs = dict(x=x, mask_bias=mb, pair_bias=pb)
    check(_requires_grad(inputs, ("x", "mask_bias", "pair_bias")), torch.float32, 1e-5)


def test_upstream_gradient_with_zero_strides():
    inputs = _requires_grad(make_case("row", 5, torch.float32))
    y = softmax(**inputs)
    gx, gp = torch.autograd.grad((y * torch.arange(5.0)).sum(), [inputs["x"], inputs["pair_bias"]])
    y_r = softmax_reference(**inputs)
    gx_r, gp_r = torch.autograd.grad((y_r * torch.arange(5.0)).sum(),
                                     [inputs["x"], inputs["pair_bias"]])
    assert_close(gx, gx_r, rtol=1e-4, atol=1e-6, max_rel=1e-5, name="dx")
    assert_close(gp, gp_r, rtol=1e-4, atol=1e-6, max_rel=1e-5, name="dpair_bias")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fully_masked_rows_are_uniform(dtype):
    inputs = make_case("global", 7, dtype)
    inputs["mask_bias"][1, 2] = -INF
    y = softmax(**inputs)
    assert_close(y[1, 2].double(), torch.full((3, 7), 1 / 7, dtype=torch.float64),
                 rtol=1e-6 if dtype == torch.float32 else 1e-2, name="masked rows")
    assert torch.isfinite(y).all()


def test_shape_and_dtype_checks():
    with pytest.raises(ValueError, match="does not broadcast"):
        softmax(torch.randn(3, 4), pair_bias=torch.randn(2, 3, 4))
    with pytest.raises(TypeError):
        softmax(torch.randn(3, 4).double())


# ---- the reference against OpenFold's own code (exact) -------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reference_matches_openfold_softmax_no_cast(dtype):
    """GlobalAttention's `a += bias; a = softmax_no_cast(a)` (bias fp32, a in dtype)."""
    from openfold.model.primitives import softmax_no_cast

    inputs = make_case("row", 17, dtype)
    x = inputs["x"].clone().requires_grad_()
    a = x.clone()
    a += inputs["mask_bias"]
    a += inputs["pair_bias"]
    theirs = softmax_no_cast(a)
    ours = softmax_reference(x, inputs["mask_bias"], inputs["pair_bias"])
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
    dy = torch.randn(ours.shape, generator=_gen(2)).to(dtype)
    assert torch.equal(torch.autograd.grad(ours, x, dy)[0], torch.autograd.grad(theirs, x, dy)[0])


# ---- GPU: real sizes -----------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [pytest.param(torch.float32, 1e-5, id="fp32"),
                                       pytest.param(torch.bfloat16, 2.0, id="bf16")])
@pytest.mark.parametrize("shape,mb_shape,pb_shape", [
    ((1, 256, 8, 128), (1, 256, 1, 128), None),                        # global attention
    ((1, 64, 8, 256, 256), (1, 64, 1, 1, 256), (1, 1, 8, 256, 256)),  # row attention logits
    ((1, 12, 384, 384), (1, 1, 384, 384), (1, 12, 384, 384)),          # IPA
    ((4, 20000), (1, 20000), None),                                    # two-pass rows
], ids=str)
def test_softmax_gpu(shape, mb_shape, pb_shape, dtype, tol):
    g = _gen(0)
    inputs = dict(
        x=torch.randn(shape, generator=g).to(device="cuda", dtype=dtype),
        mask_bias=_mask_bias(mb_shape, g).cuda(),
        pair_bias=(torch.randn(pb_shape, generator=g).to(device="cuda", dtype=dtype)
                   if pb_shape else None),
    )
    check(_requires_grad(inputs, ("x", "pair_bias")), dtype, tol)
