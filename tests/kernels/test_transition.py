"""transition: Triton op vs reference (forward, every gradient), reference vs OpenFold's modules."""
import contextlib

import pytest
import torch

from fastfold_plugin.kernels.transition import transition, transition_reference
from fastfold_plugin.testing import assert_close, randomize_parameters_, rel_err

GRAD_NAMES = ("dx", "dln_w", "dln_b", "dw1", "db1", "dw2", "db2")

# (x dtype, parameter dtype, autocast dtype or None, tolerance). fp32: op vs reference rtol.
# Otherwise the op's error against an fp64 truth must stay within `tol` x the reference's own
# error in that precision (the CPU interpreter truncates on bf16 stores: 3 for bf16 on CPU).
PRECISIONS = [
    pytest.param(torch.float32, torch.float32, None, 1e-5, id="fp32"),
    pytest.param(torch.bfloat16, torch.bfloat16, None, 3.0, id="bf16"),
    pytest.param(torch.float16, torch.float16, None, 2.0, id="fp16"),
    pytest.param(torch.float32, torch.float32, torch.bfloat16, 3.0, id="fp32-autocast-bf16"),
    pytest.param(torch.bfloat16, torch.float32, torch.bfloat16, 3.0, id="bf16-autocast-bf16"),
    pytest.param(torch.float32, torch.float32, torch.float16, 2.0, id="fp32-autocast-fp16"),
]
# (x shape [*, C], expansion n): awkward row counts, N_res 1, C not a power of two
SHAPES = [((3, 37, 16), 4), ((2, 1, 5, 24), 4), ((1, 7, 3, 64), 2)]


def _autocast(device, dtype):
    return contextlib.nullcontext() if dtype is None else torch.autocast(device, dtype=dtype)


def make_inputs(shape, n, x_dtype, p_dtype, device, mask_dtype=torch.float32, seed=0, relu_margin=False):
    """x, mask and the six weights. relu_margin: linear_1's pre-activations stay 0.5 away from 0
    (|b1| >= 0.5, small w1), so that no rounding can flip a ReLU. On a few hundred rows one
    flipped ReLU moves a bf16 gradient by percents, which would make the op-vs-reference error
    ratio a coin toss; the CPU fp32 tests and the GPU low-precision tests (many rows) use
    unconstrained weights."""
    gen = torch.Generator().manual_seed(seed)
    c = shape[-1]

    def r(*s, scale=1.0, shift=0.0):
        return torch.randn(*s, generator=gen) * scale + shift

    x = r(*shape, scale=2.0, shift=0.3).to(device=device, dtype=x_dtype)
    mask = (torch.rand(*shape[:-1], 1, generator=gen) > 0.25).to(device=device, dtype=mask_dtype)
    params = [r(c, scale=0.1, shift=1.0), r(c, scale=0.1),
              r(n * c, c, scale=c ** -0.5), r(n * c, scale=0.1),
              r(c, n * c, scale=(n * c) ** -0.5), r(c, scale=0.1)]
    if relu_margin:
        params[2] = params[2] * 0.1
        params[3] = torch.sign(params[3]) * (0.5 + params[3].abs())
    params = [p.to(device=device, dtype=p_dtype) for p in params]
    return [x.requires_grad_(), mask] + [p.requires_grad_() for p in params]


def run(fn, args, g=None):
    """Output and the gradients of x and the six weights (upstream grad g, drawn if None)."""
    out = fn(*args)
    if g is None:
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    grads = torch.autograd.grad(out, [args[0]] + args[2:], g)
    return out, grads, g


def truth(args, g):
    """fp64 reference, with the LayerNorm parameters rounded to bf16 for a bf16 x (OpenFold)."""
    x = args[0]
    d = [None if a is None else a.detach().double() for a in args]
    if x.dtype == torch.bfloat16:
        d[2], d[3] = (args[i].detach().to(torch.bfloat16).double() for i in (2, 3))
    d = [d[0].requires_grad_(), d[1]] + [t.requires_grad_() for t in d[2:]]
    return run(transition_reference, d, g.double())


def check_transition(shape, n, x_dtype, p_dtype, ac_dtype, tol, device, args=None):
    if args is None:
        low = x_dtype != torch.float32 or ac_dtype is not None
        # the fp32 comparison is elementwise: on the GPU the op's fused linear_1 + ReLU epilogue
        # (cuBLASLt) and the reference's separate GEMM round pre-activations near 0 differently,
        # and each flipped ReLU moves a whole row of dx (measured on an H100: 252 of 8.4M
        # elements at 128 x 256 x 256); keep pre-activations away from the kink there too
        margin = (low and device == "cpu") or (not low and device == "cuda")
        args = make_inputs(shape, n, x_dtype, p_dtype, device, relu_margin=margin)
    with _autocast(device, ac_dtype):
        out, grads, g = run(transition, args)
        out_ref, grads_ref, _ = run(transition_reference, args, g)
    assert out.dtype == out_ref.dtype and out.shape == out_ref.shape
    for name, a, e in zip(GRAD_NAMES, grads, grads_ref, strict=True):
        assert a.dtype == e.dtype, f"{name}: dtype {a.dtype} != {e.dtype}"
    if x_dtype == torch.float32 and ac_dtype is None:
        assert_close(out, out_ref, rtol=tol, atol=tol * out_ref.abs().max().item(), name="out")
        for name, a, e in zip(GRAD_NAMES, grads, grads_ref, strict=True):
            assert_close(a, e, rtol=tol, atol=tol * e.abs().max().item(), max_rel=tol, name=name)
        return
    out_t, grads_t, _ = truth(args, g)
    for name, a, e, t in zip(("out",) + GRAD_NAMES, (out,) + grads, (out_ref,) + grads_ref, (out_t,) + grads_t, strict=True):
        e_op, e_ref = rel_err(a, t), rel_err(e, t)
        assert e_op <= tol * e_ref + 1e-6, f"{name}: op error {e_op:.3e} > {tol} x reference error {e_ref:.3e}"


@pytest.mark.parametrize("x_dtype,p_dtype,ac_dtype,tol", PRECISIONS)
@pytest.mark.parametrize("shape,n", SHAPES, ids=str)
def test_transition_matches_reference(shape, n, x_dtype, p_dtype, ac_dtype, tol):
    check_transition(shape, n, x_dtype, p_dtype, ac_dtype, tol, "cpu")


@pytest.mark.parametrize("mask_kind", ["x-dtype", "bool", "none"])
def test_mask_dtypes_and_default(mask_kind):
    """The mask decides the output dtype (stock multiplies after linear_2); None means ones."""
    args = make_inputs((4, 6, 16), 4, torch.float32, torch.float32, "cpu", relu_margin=True)
    if mask_kind == "none":
        args[1] = None
    elif mask_kind == "bool":
        args[1] = args[1].bool()
    else:
        args[1] = args[1].to(torch.bfloat16)
    check_transition(None, None, torch.float32, None, torch.bfloat16, 3.0, "cpu", args=args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dtype = transition(*args).dtype
    assert dtype == (torch.float32 if mask_kind == "none" else torch.bfloat16)


def test_mask_broadcast_over_rows():
    """A mask [*, 1] shared along a leading dim (e.g. [1, N_res, 1] for [N_seq, N_res, C])."""
    args = make_inputs((3, 5, 16), 2, torch.float32, torch.float32, "cpu")
    args[1] = (torch.rand(1, 5, 1) > 0.5).float()
    out, grads, g = run(transition, args)
    out_ref, grads_ref, _ = run(transition_reference, args, g)
    for a, e in zip((out,) + grads, (out_ref,) + grads_ref, strict=True):
        assert_close(a, e, rtol=1e-5, atol=1e-5 * e.abs().max().item())


def test_strided_mask_views():
    """Masks that are strided views whose rows flatten to a strided vector (a DAP column shard's
    mask one column wide: [S, N, 1] cut to [S, 1, 1]; every other row of a mask): output and
    every gradient equal the reference's (the backward reads one mask value per row)."""
    args = make_inputs((6, 1, 16), 2, torch.float32, torch.float32, "cpu")
    full = (torch.rand(6, 4, generator=torch.Generator().manual_seed(5)) > 0.5).float()
    full[0, 1], full[1, 1] = 1.0, 0.0  # both values in the shard
    for mask in (full[:, 1:2].unsqueeze(-1), full.t().reshape(4, 6, 1)[1:2].transpose(0, 1)):
        assert not mask.is_contiguous() and mask.shape == (6, 1, 1)
        args[1] = mask
        out, grads, g = run(transition, args)
        out_ref, grads_ref, _ = run(transition_reference, args, g)
        for name, a, e in zip(("out",) + GRAD_NAMES, (out,) + grads, (out_ref,) + grads_ref,
                              strict=True):
            assert_close(a, e, rtol=1e-5, atol=1e-5 * e.abs().max().item(), name=name)


def test_non_contiguous_x_and_no_weight_grads():
    args = make_inputs((6, 4, 16), 4, torch.float32, torch.float32, "cpu")
    x = args[0].detach().transpose(0, 1).requires_grad_()  # [4, 6, 16], non-contiguous
    args[0], args[1] = x, args[1].transpose(0, 1)
    w = [a.detach() for a in args[2:]]
    out = transition(x, args[1], *w)
    out_ref = transition_reference(x, args[1], *w)
    assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(out_ref, x, g)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("transpose", [False, True], ids=["rows", "transposed"])
def test_residual_matches_reference(transpose):
    """With residual the op returns x + transition(x) (OpenFold's add(m, transition(m)): fp32 +
    the fp32 masked update under bf16 autocast); the sum's gradient reaches dx through the
    LayerNorm's backward kernel: the same values and gradients as the reference's add."""
    got, ref = [], []
    for fn, res in ((transition, got), (transition_reference, ref)):
        args = make_inputs((2, 5, 7, 16), 4, torch.float32, torch.float32, "cpu", seed=5)
        leaf = args[0]
        x = (leaf * 1.0).transpose(-2, -3) if transpose else leaf * 1.0
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(x, args[1].transpose(-2, -3) if transpose else args[1], *args[2:],
                   residual=True)
        assert y.dtype == torch.float32 and y.shape == x.shape
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
        res.extend([y.detach()] + list(torch.autograd.grad(y, [leaf] + args[2:], g)))
    for a, e, name in zip(got, ref, ("out",) + GRAD_NAMES):
        scale = e.abs().max().item()
        assert_close(a, e, rtol=2e-2, atol=2e-2 * scale, name=name)
    # dx: the residual's gradient passes exactly; the rest is bf16 Linear gradients
    assert rel_err(got[1], ref[1]) < 5e-3


@pytest.mark.parametrize("x_dtype,mask_dtype,ac", [
    (torch.float32, torch.float32, torch.bfloat16),   # the blocks' case: fp32 product and sum
    (torch.float32, torch.float32, None),
    (torch.bfloat16, torch.bfloat16, None),           # product and sum rounded to bf16
], ids=["f32-autocast", "f32", "bf16"])
def test_residual_is_the_add_of_the_update(x_dtype, mask_dtype, ac):
    """The fused pass rounds as stock's two ops do (the mask multiply in the update's promoted
    dtype, then the add): bit for bit ``x + transition(x)``, also for a mask that is not 0 / 1;
    and dx is the plain op's dx plus the sum's gradient."""
    args = make_inputs((3, 6, 16), 4, x_dtype, torch.float32, "cpu", seed=11)
    x = args[0]
    mask = torch.rand(args[1].shape, generator=torch.Generator().manual_seed(4)).to(mask_dtype)
    mask[0] = 0.0
    with _autocast("cpu", ac):
        y = transition(x, mask, *args[2:], residual=True)
        upd = transition(x, mask, *args[2:])
    assert torch.equal(y, x + upd)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(6)).to(y.dtype)
    dx, = torch.autograd.grad(y, x, g)
    dx_plain, = torch.autograd.grad(upd, x, g.to(upd.dtype))
    tol = 1e-6 if x_dtype == torch.float32 else 1e-2
    assert rel_err(dx, (dx_plain.float() + g.float()).to(x_dtype)) < tol


@pytest.mark.parametrize("x_dtype,u_dtype,ac", [
    (torch.float32, torch.bfloat16, torch.bfloat16),  # the blocks' case: fp32 m + a bf16 update
    (torch.float32, torch.float32, None),
    (torch.bfloat16, torch.bfloat16, None),           # the sum rounded to bf16
    (torch.bfloat16, torch.float32, torch.bfloat16),  # promoted: an fp32 sum
    (torch.bfloat16, torch.float32, None),            # the same without autocast: fp32 GEMMs
], ids=["f32+bf16-autocast", "f32", "bf16", "bf16+f32-autocast", "bf16+f32"])
@pytest.mark.parametrize("transpose", [False, True], ids=["rows", "transposed"])
def test_update_is_added_first(x_dtype, u_dtype, ac, transpose):
    """With `update`, the op is the plain residual op on x + update (the add done by its
    LayerNorm kernel, in the promoted dtype): bit for bit the same output and parameter
    gradients as ``transition(x + update, residual=True)``, the sum's gradient for x (in x's
    dtype) and, rounded to the update's dtype, for the update; the reference agrees."""
    # (without autocast the reference's Linears need the parameters in the sum's dtype)
    p_dtype = torch.float32 if ac is not None else torch.promote_types(x_dtype, u_dtype)
    args = make_inputs((2, 5, 6, 16), 4, x_dtype, p_dtype, "cpu", seed=21)
    gen = torch.Generator().manual_seed(22)
    x0, ws = args[0].detach(), args[2:]
    u0 = (torch.randn(x0.shape, generator=gen) * 0.5).to(u_dtype)
    if transpose:  # the update as a transposed view (read through a copy of its rows)
        u0 = u0.transpose(-2, -3).contiguous().transpose(-2, -3)
    mask = args[1]
    results = {}
    for name in ("fused", "added", "reference"):
        x, u = x0.clone().requires_grad_(), u0.clone().requires_grad_()
        with _autocast("cpu", ac):
            if name == "fused":
                y = transition(x, mask, *ws, residual=True, update=u)
            elif name == "added":
                y = transition(x + u, mask, *ws, residual=True)
            else:
                y = transition_reference(x, mask, *ws, residual=True, update=u)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(23)).to(y.dtype)
        results[name] = (y.detach(), torch.autograd.grad(y, [x, u] + ws, g))
    (y, grads), (y_add, grads_add) = results["fused"], results["added"]
    assert y.dtype == y_add.dtype and torch.equal(y, y_add)
    assert grads[0].dtype == x_dtype and grads[1].dtype == u_dtype
    assert torch.equal(grads[0], grads_add[0])
    assert torch.equal(grads[1], grads_add[1])  # autograd rounds the sum's gradient as well
    for a, e, name in zip(grads[2:], grads_add[2:], GRAD_NAMES[1:], strict=True):
        assert torch.equal(a, e), name
    y_ref, grads_ref = results["reference"]
    tol = 1e-5 if ac is None and torch.promote_types(x_dtype, u_dtype) == torch.float32 else 2e-2
    assert_close(y.float(), y_ref.float(), rtol=tol, atol=tol * y_ref.abs().max().item(),
                 name="out")
    for a, e, name in zip(grads, grads_ref, ("dx", "dupdate") + GRAD_NAMES[1:], strict=True):
        assert rel_err(a.float(), e.float()) < (1e-5 if tol == 1e-5 else 3e-2), name


def test_update_checks():
    args = make_inputs((3, 16), 4, torch.float32, torch.float32, "cpu", seed=24)
    u = torch.randn(3, 16)
    with pytest.raises(ValueError, match="residual=True"):
        transition(*args, update=u)
    with pytest.raises(ValueError, match="shape"):
        transition(*args, residual=True, update=u[:2])
    with pytest.raises(ValueError, match="device"):
        transition(*args, residual=True, update=u.to("meta"))


def test_residual_takes_a_sums_broadcast_gradient():
    """The gradient of ``y.sum()`` is one scalar broadcast to y's shape: read in place (row
    stride 0) by the backward's passes and the LayerNorm's kernel, it gives exactly the
    gradients of its dense copy."""
    args = make_inputs((3, 6, 16), 4, torch.float32, torch.float32, "cpu", seed=12)
    grads = []
    for dense in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = transition(args[0], args[1], *args[2:], residual=True)
        g = torch.full((), 0.75).expand(y.shape)
        grads.append(torch.autograd.grad(y, [args[0]] + args[2:],
                                         g.contiguous() if dense else g))
    for a, e, name in zip(*grads, GRAD_NAMES, strict=True):
        assert torch.equal(a, e), name


def test_cached_plans_are_keyed_on_everything_they_fix():
    """Calls on the same rows and channels that differ in one thing a cached launch plan fixes
    or leaves to the call, made in turn, each match the reference: x's strides, the dtypes,
    autocast, the mask (given, none, shared along a leading dim), the grad mode, the gradients
    asked for, d_out's strides, and the row count."""
    shape = (4, 6, 16)
    args = make_inputs(shape, 4, torch.float32, torch.float32, "cpu", relu_margin=True)
    x, mask, w = args[0], args[1], args[2:]
    xt = torch.randn(6, 4, 16, generator=torch.Generator().manual_seed(3)).transpose(0, 1)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    g_rows = torch.randn(16, generator=torch.Generator().manual_seed(5)).expand(shape)
    cases = [([x, mask, *w], g), ([xt.requires_grad_(), mask, *w], g), ([x, None, *w], g_rows),
             ([x, mask[:1], *w], g.transpose(0, 1).contiguous().transpose(0, 1)),
             ([x.detach().requires_grad_(), mask] + [t.detach() for t in w], g),
             ([x[:3], mask[:3], *w], g[:3]), ([x, mask, *w], g)]  # fewer rows, then all again
    # more rows than one program of the first call's plan covers (interpreter: 512 at N 64)
    big = make_inputs((40, 16, 16), 4, torch.float32, torch.float32, "cpu", relu_margin=True)
    cases.append((big[:2] + w, torch.randn(40, 16, 16, generator=torch.Generator().manual_seed(6))))
    for case, dout in cases:
        with torch.no_grad():
            assert_close(transition(*case), transition_reference(*case), rtol=1e-5, atol=1e-5)
        leaves = [t for t in case if t is not None and t.requires_grad]
        out, out_ref = transition(*case), transition_reference(*case)
        assert_close(out, out_ref, rtol=1e-5, atol=1e-5 * out_ref.abs().max().item(), name="out")
        for a, e in zip(torch.autograd.grad(out, leaves, dout),
                        torch.autograd.grad(out_ref, leaves, dout), strict=True):
            assert_close(a, e, rtol=1e-5, atol=1e-5 * e.abs().max().item())
    for x_dtype, p_dtype, ac_dtype, tol in ((torch.bfloat16, torch.bfloat16, None, 3.0),
                                            (torch.float32, torch.float32, torch.bfloat16, 3.0),
                                            (torch.float32, torch.float32, None, 1e-5)):
        check_transition(shape, 4, x_dtype, p_dtype, ac_dtype, tol, "cpu")


def test_empty_rows():
    args = make_inputs((0, 3, 16), 4, torch.float32, torch.float32, "cpu")
    out = transition(*args)
    assert out.shape == (0, 3, 16)
    grads = torch.autograd.grad(out.sum(), [args[0]] + args[2:])
    assert grads[0].shape == args[0].shape and all(float(d.abs().sum()) == 0 for d in grads[1:])


# ---- the reference against OpenFold's modules (exact in fp32) ---------------------------------
@pytest.mark.parametrize("kind", ["msa", "pair"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reference_matches_openfold_transition(kind, dtype):
    from openfold.model.evoformer import MSATransition
    from openfold.model.pair_transition import PairTransition

    c, n = (24, 4) if kind == "msa" else (16, 4)
    mod = (MSATransition if kind == "msa" else PairTransition)(c, n)
    mod = randomize_parameters_(mod, seed=7).to(dtype)
    x = (torch.randn(2, 5, 7, c) * 2).to(dtype).requires_grad_()
    mask = (torch.rand(2, 5, 7) > 0.3).to(dtype)
    g = torch.randn(2, 5, 7, c).to(dtype)
    weights = [mod.layer_norm.weight, mod.layer_norm.bias, mod.linear_1.weight, mod.linear_1.bias,
               mod.linear_2.weight, mod.linear_2.bias]
    out_mod = mod(x, mask)
    out_ref = transition_reference(x, mask.unsqueeze(-1), *weights, eps=mod.layer_norm.eps)
    assert out_mod.dtype == out_ref.dtype and torch.equal(out_mod, out_ref)
    grads_mod = torch.autograd.grad(out_mod, [x] + weights, g)
    grads_ref = torch.autograd.grad(out_ref, [x] + weights, g)
    for name, a, e in zip(GRAD_NAMES, grads_ref, grads_mod, strict=True):
        assert torch.equal(a, e), name


# ---- GPU: AF2 sizes ---------------------------------------------------------------------------
GPU_PRECISIONS = [
    pytest.param(torch.float32, torch.float32, None, 1e-4, id="fp32"),
    pytest.param(torch.float32, torch.float32, torch.bfloat16, 2.0, id="fp32-autocast-bf16"),
    pytest.param(torch.bfloat16, torch.float32, torch.bfloat16, 2.0, id="bf16-autocast-bf16"),
    pytest.param(torch.float32, torch.float32, torch.float16, 2.0, id="fp32-autocast-fp16"),
    pytest.param(torch.bfloat16, torch.bfloat16, None, 2.0, id="bf16"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("x_dtype,p_dtype,ac_dtype,tol", GPU_PRECISIONS)
@pytest.mark.parametrize("shape,n", [((1, 128, 256, 256), 4), ((1, 256, 256, 128), 4),
                                     ((1, 37, 129, 256), 4), ((2, 1, 37, 128), 4)], ids=str)
def test_transition_gpu(shape, n, x_dtype, p_dtype, ac_dtype, tol):
    check_transition(shape, n, x_dtype, p_dtype, ac_dtype, tol, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 128, 256, 256), (1, 256, 256, 128)], ids=str)
def test_residual_gpu(shape):
    """residual at AF2 sizes (the MSA and pair transitions) under bf16 autocast: x + the plain
    op's output bit for bit (fp32 product, fp32 add), dx the plain op's dx + the sum's gradient."""
    args = make_inputs(shape, 4, torch.float32, torch.float32, "cuda", seed=3)
    x = args[0]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = transition(x, args[1], *args[2:], residual=True)
        upd = transition(x, args[1], *args[2:])
    assert torch.equal(y, x + upd)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(6)).cuda()
    grads = torch.autograd.grad(y, [x] + args[2:], g)
    grads_plain = torch.autograd.grad(upd, [x] + args[2:], g)
    assert rel_err(grads[0], grads_plain[0] + g) < 1e-6
    for name, a, e in zip(GRAD_NAMES[1:], grads[1:], grads_plain[1:], strict=True):
        assert rel_err(a, e) < 1e-6, name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reference_matches_openfold_under_cuda_autocast(dtype):
    from openfold.model.pair_transition import PairTransition

    mod = randomize_parameters_(PairTransition(128, 4), seed=8).cuda()
    x = torch.randn(1, 64, 64, 128, device="cuda").to(dtype)
    mask = (torch.rand(1, 64, 64, device="cuda") > 0.2).float()
    w = [mod.layer_norm.weight, mod.layer_norm.bias, mod.linear_1.weight, mod.linear_1.bias,
         mod.linear_2.weight, mod.linear_2.bias]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_mod = mod(x, mask)
        out_ref = transition_reference(x, mask.unsqueeze(-1), *w)
    assert out_mod.dtype == out_ref.dtype and torch.equal(out_mod, out_ref)
