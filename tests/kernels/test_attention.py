"""attention: Triton op vs reference (forward and every gradient), and reference vs OpenFold.

CPU runs use Triton's interpreter at tiny sizes; the `gpu` tests use real AlphaFold sizes.
"""
import functools
import importlib

import pytest
import torch

from fastfold_plugin.kernels.attention import (
    attention,
    attention_packed,
    attention_packed_reference,
    attention_reference,
)
from fastfold_plugin.testing import assert_close, rel_err
from fastfold_plugin.testing import assert_matches_truth as compare

# fp32: the op vs an fp64 truth must be as tight as fp32 arithmetic (relative norm error).
# bf16/fp16: the op's error vs the fp64 truth <= factor x the reference's own error in that
# dtype. (Under the CPU interpreter the kernels round to bf16 the way the GPU does: see
# _triton_utils.cast_rne.)
DTYPES = [
    pytest.param(torch.float32, 1e-5, id="fp32"),
    pytest.param(torch.bfloat16, 2.0, id="bf16"),
    pytest.param(torch.float16, 2.0, id="fp16"),
]
GPU_DTYPES = [
    pytest.param(torch.float32, 1e-5, id="fp32"),
    pytest.param(torch.bfloat16, 2.0, id="bf16"),
]
INF = 1e9  # OpenFold's config inf: mask_bias = INF * (mask - 1)
GRAD_NAMES = ("q", "k", "v", "mask_bias", "pair_bias", "gate")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _heads(shape_qhc, dtype, device, gen, scale=1.0):
    """A [*, Q, H, C] Linear-output-like buffer seen as OpenFold's [*, H, Q, C] view."""
    x = torch.randn(shape_qhc, generator=gen) * scale
    return x.to(device=device, dtype=dtype).transpose(-2, -3)


def _mask_bias(shape, gen, device, p_masked=0.3, key_dim=-1):
    """INF * (mask - 1) in fp32 (OpenFold builds it from a fp32 mask); key 0 never masked."""
    mask = (torch.rand(shape, generator=gen) > p_masked).float()
    mask.select(key_dim, 0).fill_(1.0)
    return (INF * (mask - 1)).to(device)


def make_case(case, n, c, dtype, device="cpu", seed=0, h=2, b=2, s=3):
    """Inputs laid out as OpenFold's modules produce them. Returns a dict of the op's args.

    row:      MSA row attention, q/k/v [B, S, H, N, C], mask [B, S, 1, 1, N], pair bias
              [B, 1, H, N, N] shared over S, gate [B, S, N, H, C]
    column:   MSA column attention: the N_seq axis is attended over, no pair bias
    column_as_laid: the same on the MSA's own [B, S, N, ...] memory order
    triangle: triangle attention over I = N rows, pair bias [B, 1, H, N, N] shared over I
    template: template pointwise attention: Q = 1, K = N_templ = s, mask bias only, no gate
    plain:    contiguous [B, H, Q, C] with K != Q, no biases, no gate
    """
    g = _gen(seed)
    sc = c ** -0.5
    bias_dtype = dtype  # OpenFold's pair bias comes from a Linear: the activation dtype
    if case == "row" or case == "triangle":
        rows = s if case == "row" else n
        q = _heads((b, rows, n, h, c), dtype, device, g, sc)
        k = _heads((b, rows, n, h, c), dtype, device, g)
        v = _heads((b, rows, n, h, c), dtype, device, g)
        mb = _mask_bias((b, rows, 1, 1, n), g, device)
        pb = torch.randn((b, 1, h, n, n), generator=g).to(device=device, dtype=bias_dtype)
        gate = torch.randn((b, rows, n, h, c), generator=g).to(device=device, dtype=dtype)
        return dict(q=q, k=k, v=v, mask_bias=mb, pair_bias=pb, gate=gate)
    if case == "column":
        q = _heads((b, n, s, h, c), dtype, device, g, sc)
        k = _heads((b, n, s, h, c), dtype, device, g)
        v = _heads((b, n, s, h, c), dtype, device, g)
        mb = _mask_bias((b, n, 1, 1, s), g, device)
        gate = torch.randn((b, n, s, h, c), generator=g).to(device=device, dtype=dtype)
        return dict(q=q, k=k, v=v, mask_bias=mb, pair_bias=None, gate=gate)
    if case == "column_as_laid":
        # the MSA column attention on the MSA as it lies: [B, S, N, H, C] buffers seen as
        # [B, N, H, S, C] (attention along S), the gate as [B, N, S, H, C]
        def heads(scale=1.0):
            x = torch.randn((b, s, n, h, c), generator=g) * scale
            return x.to(device=device, dtype=dtype).movedim(-4, -2)
        q, k, v = heads(sc), heads(), heads()
        mb = _mask_bias((b, n, 1, 1, s), g, device)
        gate = torch.randn((b, s, n, h, c), generator=g).to(device=device, dtype=dtype)
        return dict(q=q, k=k, v=v, mask_bias=mb, pair_bias=None, gate=gate.transpose(-3, -4))
    if case == "template":
        q = _heads((b, n, n, 1, h, c), dtype, device, g, sc)
        k = _heads((b, n, n, s, h, c), dtype, device, g)
        v = _heads((b, n, n, s, h, c), dtype, device, g)
        mb = _mask_bias((b, 1, 1, 1, 1, s), g, device, p_masked=0.5)
        return dict(q=q, k=k, v=v, mask_bias=mb, pair_bias=None, gate=None)
    if case == "plain":
        q = (torch.randn((b, h, n, c), generator=g) * sc).to(device=device, dtype=dtype)
        k = torch.randn((b, h, n + 3, c), generator=g).to(device=device, dtype=dtype)
        v = torch.randn((b, h, n + 3, c), generator=g).to(device=device, dtype=dtype)
        return dict(q=q, k=k, v=v, mask_bias=None, pair_bias=None, gate=None)
    raise ValueError(case)


def _requires_grad(inputs, names=("q", "k", "v", "pair_bias", "gate")):
    return {n: (t.detach().requires_grad_(n in names) if t is not None else None)
            for n, t in inputs.items()}


def run(fn, inputs, dout=None, seed=1):
    """Output and the gradients of every input that requires grad (dict by name)."""
    out = fn(**inputs)
    if dout is None:
        dout = torch.randn(out.shape, generator=_gen(seed)).to(out)
    names = [n for n, t in inputs.items() if t is not None and t.requires_grad]
    grads = torch.autograd.grad(out, [inputs[n] for n in names], dout) if names else ()
    return out, dict(zip(names, grads, strict=True)), dout


def _double(inputs):
    return {n: (t.detach().double().requires_grad_(t.requires_grad) if t is not None else None)
            for n, t in inputs.items()}


def check(inputs, dtype, tol, op=attention, ref=attention_reference):
    out, grads, dout = run(op, inputs)
    out_ref, grads_ref, _ = run(ref, inputs, dout)
    out_t, grads_t, _ = run(ref, _double(inputs), dout.double())
    compare(out, out_ref, out_t, dtype, tol, "out")
    assert set(grads) == set(grads_ref)
    for name in grads:
        assert grads[name].dtype == inputs[name].dtype, name
        compare(grads[name], grads_ref[name], grads_t[name], dtype, tol, "d" + name)


# ---- OpenFold's layouts at awkward sizes ---------------------------------------------------
# (N, C): N = 1, below / across / beyond one block; C = 8 (extra MSA: below tl.dot's 16), 16, 32
SIZES = [(1, 8), (5, 16), (17, 32), (33, 8)]


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("n,c", SIZES, ids=lambda x: str(x))
@pytest.mark.parametrize("case", ["row", "column", "triangle", "plain"])
def test_attention_matches_reference(case, n, c, dtype, tol):
    if case == "triangle" and n > 17:
        n = 17  # N rows of N x N: keep the interpreter run small
    check(_requires_grad(make_case(case, n, c, dtype)), dtype, tol)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "separate"])
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("case", ["row", "triangle"])
def test_q_div_matches_reference(monkeypatch, case, dtype, tol, fused):
    """OpenFold's q / sqrt(C) done by the op (``q_div``): the kernels scale the fp32 logits, dQ
    and dK; the reference divides q first. Fused backward, and the separate dQ and bias-gradient
    kernels (the mask bias's gradient too: every kernel that recomputes the logits)."""
    from fastfold_plugin.kernels import attention as A

    monkeypatch.setattr(A, "_FUSE_DQ", fused)
    monkeypatch.setattr(A, "_FUSE_DB", fused)
    n, c = (17, 32) if case == "row" else (9, 16)
    inputs = make_case(case, n, c, dtype)
    inputs["q"] = inputs["q"] * c ** 0.5  # unscaled, as the q projection gives it
    inputs = _requires_grad(inputs, ("q", "k", "v", "mask_bias", "pair_bias", "gate"))
    div = c ** 0.5
    check(inputs, dtype, tol, op=functools.partial(attention, q_div=div),
          ref=functools.partial(attention_reference, q_div=div))
    with pytest.raises(ValueError, match="q_div"):
        attention(**inputs, q_div=0.0)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "separate"])
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("n,c", [(5, 16), (17, 8)], ids=str)
def test_output_and_gradients_follow_the_inputs_layouts(monkeypatch, n, c, dtype, tol, fused):
    """Permuted dense inputs (the column attention on the MSA as it lies): the output, and the
    gate's gradient, come laid out like the gate, dq / dk / dv like q / k / v (no transposed
    copies around the Linears), with the reference's values; fused and separate backwards."""
    from fastfold_plugin.kernels import attention as A

    monkeypatch.setattr(A, "_FUSE_DQ", fused)
    monkeypatch.setattr(A, "_FUSE_DB", fused)
    inputs = _requires_grad(make_case("column_as_laid", n, c, dtype, s=6),
                            ("q", "k", "v", "mask_bias", "gate"))
    check(inputs, dtype, tol)
    out, grads, _ = run(attention, inputs)
    assert out.stride() == inputs["gate"].stride()
    assert out.transpose(-3, -4).is_contiguous()
    for name in ("q", "k", "v", "gate"):
        assert grads[name].stride() == inputs[name].stride(), name


def make_packed(case, n, c, dtype, device="cpu", seed=0, h=2, b=2, s=3, gated=True):
    """attention_packed's tensor inputs: y [B, R, N, P] (P = 4 or 3 parts of h * c; `row` and
    `triangle` attend along N for each of the R rows, `column` along R = s for each of the N
    columns), the mask bias and, except for `column`, a pair bias shared over the rows."""
    g = _gen(seed)
    rows = n if case == "triangle" else s
    parts = 4 if gated else 3
    y = torch.randn((b, rows, n, parts * h * c), generator=g)
    y[..., :h * c] *= c ** -0.25  # q and k scaled so that the logits are O(1) after q_div
    y[..., h * c:2 * h * c] *= c ** -0.25
    y = y.to(device=device, dtype=dtype)
    if case == "column":
        mb = _mask_bias((b, n, 1, 1, rows), g, device)
        pb = None
    else:
        mb = _mask_bias((b, rows, 1, 1, n), g, device)
        pb = torch.randn((b, 1, h, n, n), generator=g).to(device=device, dtype=dtype)
    return dict(y=y, mask_bias=mb, pair_bias=pb)


def _packed_ops(h, c, gated, columns):
    kw = dict(heads=h, q_div=c ** 0.5, gated=gated, columns=columns)
    return (functools.partial(attention_packed, **kw),
            functools.partial(attention_packed_reference, **kw))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "separate"])
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("case,n,c,gated", [
    ("row", 17, 32, True), ("row", 5, 8, False), ("column", 9, 16, True), ("triangle", 9, 16, True),
    ("row", 1, 16, True), ("column", 7, 16, False),
], ids=str)
def test_attention_packed_matches_reference(monkeypatch, case, n, c, gated, dtype, tol, fused):
    """One packed projection y = [q | k | v | gate]: the output and the gradients of y (one
    buffer, laid out like y, each part written by the kernels) and of the biases match the
    reference on y's views; fused and separate dQ / bias-gradient kernels."""
    from fastfold_plugin.kernels import attention as A

    monkeypatch.setattr(A, "_FUSE_DQ", fused)
    monkeypatch.setattr(A, "_FUSE_DB", fused)
    h = 2
    inputs = _requires_grad(make_packed(case, n, c, dtype, h=h, gated=gated),
                            ("y", "mask_bias", "pair_bias"))
    op, ref = _packed_ops(h, c, gated, case == "column")
    check(inputs, dtype, tol, op=op, ref=ref)
    out, grads, _ = run(op, inputs)
    assert grads["y"].stride() == inputs["y"].stride()
    if case == "column":  # laid out as the MSA's rows: [B, S, N, H, C] once transposed back
        assert out.shape == (2, n, 3, h, c) and out.transpose(-3, -4).is_contiguous()
    else:
        assert out.is_contiguous()


def test_attention_packed_inputs():
    """The packed projection's layouts and checks: a permuted dense y, a y with gaps (copied),
    y in fp32 under autocast (rounded, as the Linears would hand it out), saved tensors given
    back in another layout, a last dim that is not the parts' and a frozen y."""
    h, c = 2, 8
    inputs = make_packed("row", 5, c, torch.float32, h=h)
    op, ref = _packed_ops(h, c, True, False)
    y = inputs["y"]
    for variant in (y.transpose(1, 2).contiguous().transpose(1, 2),  # dense, not contiguous
                    torch.cat([y, y], -1)[..., ::2]):                 # gaps: copied first
        case = _requires_grad(dict(inputs, y=variant), ("y", "pair_bias"))
        out, grads, dout = run(op, case)
        out_r, grads_r, _ = run(ref, case, dout)
        assert_close(out, out_r, rtol=1e-5, atol=1e-5)
        for name in grads:
            assert_close(grads[name], grads_r[name], rtol=1e-5, atol=1e-5)
    case = _requires_grad(dict(inputs, y=y.transpose(1, 2).contiguous().transpose(1, 2)))
    out_r, grads_r, dout = run(ref, case)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t.contiguous()):
        out, grads, _ = run(op, case, dout)
    for name in grads:
        assert_close(grads[name], grads_r[name], rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = op(**_requires_grad(inputs, ("y",)))
    assert out.dtype == torch.bfloat16
    frozen = _requires_grad(inputs, ("pair_bias",))
    out, grads, dout = run(op, frozen)
    _, grads_r, _ = run(ref, frozen, dout)
    assert set(grads) == {"pair_bias"}
    assert_close(grads["pair_bias"], grads_r["pair_bias"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="parts"):
        attention_packed(y[..., :-1], h)
    with pytest.raises(ValueError, match="columns"):
        attention_packed(y[0, 0], h, columns=True)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("n", [1, 3])
def test_template_pointwise_query_length_one(n, dtype, tol):
    """Q = 1 query per pair (template pointwise attention), K = 4 templates, C = 16."""
    inputs = make_case("template", n, 16, dtype, s=4)
    assert inputs["q"].shape[-2] == 1
    check(_requires_grad(inputs, ("q", "k", "v")), dtype, tol)


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_mixed_bias_dtypes_as_under_autocast(dtype, tol):
    """Under autocast OpenFold's mask bias is fp32 while q/k/v, the pair bias and the gate are
    low precision; each gradient keeps its input's dtype."""
    inputs = make_case("row", 17, 32, dtype)
    inputs["mask_bias"] = inputs["mask_bias"].float()
    inputs["pair_bias"] = inputs["pair_bias"].float()
    check(_requires_grad(inputs), dtype, tol)


def test_autocast_casts_fp32_inputs_like_matmul():
    """fp32 q/k/v under bf16 autocast: the op computes in bf16, as OpenFold's matmuls would."""
    inputs = _requires_grad(make_case("row", 17, 16, torch.float32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads, dout = run(attention, inputs)
        out_ref, grads_ref, _ = run(attention_reference, inputs, dout)
    assert out.dtype == out_ref.dtype  # bf16 attention, then * sigmoid(fp32 gate): fp32
    bf = {n: (t.detach().to(torch.bfloat16).double().requires_grad_(t.requires_grad)
              if t is not None and n in ("q", "k", "v") else
              (t.detach().double().requires_grad_(t.requires_grad) if t is not None else None))
          for n, t in inputs.items()}
    out_t, grads_t, _ = run(attention_reference, bf, dout.double())
    compare(out, out_ref, out_t, torch.bfloat16, 2.0, "out")
    for name in grads:
        assert grads[name].dtype == grads_ref[name].dtype == torch.float32
        compare(grads[name], grads_ref[name], grads_t[name], torch.bfloat16, 2.0, "d" + name)


# ---- fully masked rows ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_fully_masked_rows_are_uniform_and_finite(dtype):
    """With OpenFold's finite -1e9 bias a fully masked row is a uniform average over all keys
    (in fp32 and below, -1e9 + logit rounds to -1e9); outputs and gradients stay finite."""
    inputs = make_case("row", 9, 16, dtype)
    inputs["mask_bias"][0, 1] = -INF  # every key of batch row (0, 1)
    inputs = _requires_grad(inputs)
    out, grads, dout = run(attention, inputs)
    v, gate = inputs["v"].double(), inputs["gate"].double()
    uniform = v[0, 1].mean(dim=-2, keepdim=True).transpose(-2, -3) * torch.sigmoid(gate[0, 1])
    assert_close(out[0, 1].double(), uniform.expand_as(out[0, 1]),
                 rtol=1e-5 if dtype == torch.float32 else 2e-2, atol=1e-5 if dtype ==
                 torch.float32 else 2e-2, name="masked rows")
    for name, g in grads.items():
        assert torch.isfinite(g).all(), f"d{name} not finite"
    if dtype == torch.float32:  # same arithmetic as OpenFold's fp32 path: compare gradients
        out_ref, grads_ref, _ = run(attention_reference, inputs, dout)
        assert_close(out, out_ref, rtol=1e-4, atol=1e-5)
        for name in grads:
            scale = grads_ref[name].abs().max().item()
            assert_close(grads[name], grads_ref[name], rtol=1e-3, atol=1e-5 * scale,
                         max_rel=1e-5, name="d" + name)


# ---- bias broadcast patterns and their reduced gradients -----------------------------------
# bias shapes against q [B=2, S=3, H=2, Q, C]; each reduces its gradient over other dims
BIAS_SHAPES = {
    "per_batch_row[B,S,1,1,K]": (2, 3, 1, 1, "K"),
    "shared[B,1,H,Q,K]": (2, 1, 2, "Q", "K"),
    "all_batch[1,1,H,Q,K]": (1, 1, 2, "Q", "K"),
    "no_batch_dims[H,Q,K]": (2, "Q", "K"),
    "head_shared[B,S,1,Q,K]": (2, 3, 1, "Q", "K"),
    "full[B,S,H,Q,K]": (2, 3, 2, "Q", "K"),
    "key_only[K]": ("K",),
    "const_along_K[B,S,H,Q,1]": (2, 3, 2, "Q", 1),
}


@pytest.mark.parametrize("slot", ["mask_bias", "pair_bias"])
@pytest.mark.parametrize("pattern", list(BIAS_SHAPES))
def test_bias_gradients_reduce_to_broadcast_shape(pattern, slot):
    nq, nk = 17, 33
    g = _gen(5)
    q = torch.randn(2, 3, 2, nq, 16, generator=g) * 0.25
    k = torch.randn(2, 3, 2, nk, 16, generator=g)
    v = torch.randn(2, 3, 2, nk, 16, generator=g)
    shape = tuple(nq if d == "Q" else nk if d == "K" else d for d in BIAS_SHAPES[pattern])
    bias = torch.randn(shape, generator=g)
    inputs = dict(q=q, k=k, v=v, mask_bias=None, pair_bias=None, gate=None)
    inputs[slot] = bias
    if slot == "pair_bias":  # a second, fixed bias in the other slot
        inputs["mask_bias"] = _mask_bias((2, 3, 1, 1, nk), g, "cpu")
    check(_requires_grad(inputs, ("q", "k", "v", slot)), torch.float32, 1e-5)


@pytest.mark.parametrize("slot", ["mask_bias", "pair_bias"])
@pytest.mark.parametrize("key_strided", [False, True], ids=["key_contiguous", "key_strided"])
def test_expanded_bias_views_get_per_element_gradients(slot, key_strided):
    """A bias that needs a gradient and is an expanded view (stride 0 on a dim of size 3): its
    elements along that dim are distinct inputs with their own gradients (the kernels sum only
    over the size-1 dims the op broadcasts). Used to fail in backward with a shape error."""
    nq, nk = 9, 13
    g = _gen(11)
    q = torch.randn(2, 3, 2, nq, 16, generator=g) * 0.25
    k = torch.randn(2, 3, 2, nk, 16, generator=g)
    v = torch.randn(2, 3, 2, nk, 16, generator=g)
    base = (torch.randn(2, 1, 2, nk, nq, generator=g).transpose(-1, -2) if key_strided
            else torch.randn(2, 1, 2, nq, nk, generator=g))
    bias = base.expand(2, 3, 2, nq, nk)
    assert bias.stride(1) == 0
    inputs = dict(q=q, k=k, v=v, mask_bias=None, pair_bias=None, gate=None)
    inputs[slot] = bias
    check(_requires_grad(inputs, ("q", "k", "v", slot)), torch.float32, 1e-5)


def test_more_than_two_unfoldable_batch_dims():
    """Batch dims no stride merge folds to two (the explicit loop over the first one)."""
    g = _gen(7)
    q = torch.randn(2, 3, 2, 2, 5, 16, generator=g) * 0.25
    k = torch.randn(2, 3, 2, 2, 7, 16, generator=g)
    v = torch.randn(2, 3, 2, 2, 7, 16, generator=g)
    mb = torch.randn(1, 3, 2, 1, 1, 7, generator=g)   # stride 0 on dim 0 only
    pb = torch.randn(2, 1, 2, 2, 5, 7, generator=g)   # stride 0 on dim 1 only
    gate = torch.randn(2, 3, 2, 5, 2, 16, generator=g)
    inputs = dict(q=q, k=k, v=v, mask_bias=mb, pair_bias=pb, gate=gate)
    check(_requires_grad(inputs, GRAD_NAMES), torch.float32, 1e-5)


def test_non_contiguous_and_broadcast_inputs():
    """Channel-strided q (a slice), k/v expanded over a batch dim (stride 0): gradients of the
    expanded tensors are summed by autograd; nothing is copied on the way in."""
    g = _gen(8)
    qbuf = torch.randn(2, 3, 9, 2, 32, generator=g) * 0.25
    q = qbuf.transpose(-2, -3)[..., ::2]  # [2, 3, 2, 9, 16], channel stride 2
    k = torch.randn(2, 1, 2, 11, 16, generator=g).expand(2, 3, 2, 11, 16)
    v = torch.randn(2, 1, 11, 2, 16, generator=g).transpose(-2, -3).expand(2, 3, 2, 11, 16)
    pb = torch.randn(2, 1, 2, 11, 9, generator=g).transpose(-1, -2)  # key dim not innermost
    gate = torch.randn(2, 3, 9, 2, 16, generator=g)
    inputs = dict(q=q, k=k, v=v, mask_bias=None, pair_bias=pb, gate=gate)
    check(_requires_grad(inputs), torch.float32, 1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("case", ["row", "column"])
def test_saved_inputs_returned_in_other_layouts(case, device):
    """A saved-tensor hook (as torch's save_on_cpu) may give q, k, v, the biases and the gate back
    with other strides than the forward's plan read (here: made contiguous; OpenFold's q, k, v
    are transposed views): the backward plans for the layouts they come back in."""
    inputs = _requires_grad(make_case(case, 6, 8, torch.float32, device=device))
    assert not inputs["q"].is_contiguous()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t.contiguous()):
        out, grads, dout = run(attention, inputs)
    out_r, grads_r, _ = run(attention_reference, inputs, dout)
    assert_close(out, out_r, rtol=1e-5, atol=1e-6, name="out")
    for n in grads:
        assert_close(grads[n], grads_r[n], rtol=1e-4, atol=1e-6, max_rel=1e-5, name=f"d{n}")


def test_upstream_gradient_with_zero_strides():
    """out.sum().backward() hands the backward an expanded (stride 0) gradient."""
    inputs = _requires_grad(make_case("row", 5, 8, torch.float32))
    out = attention(**inputs)
    gq, gpb = torch.autograd.grad(out.sum(), [inputs["q"], inputs["pair_bias"]])
    out_r = attention_reference(**inputs)
    gq_r, gpb_r = torch.autograd.grad(out_r.sum(), [inputs["q"], inputs["pair_bias"]])
    assert_close(gq, gq_r, rtol=1e-4, atol=1e-6, max_rel=1e-5, name="dq")
    assert_close(gpb, gpb_r, rtol=1e-4, atol=1e-6, max_rel=1e-5, name="dpair_bias")


def test_no_grad_forward_and_input_checks():
    inputs = make_case("row", 5, 16, torch.float32)
    with torch.no_grad():
        out = attention(**inputs)
    assert_close(out, attention_reference(**inputs), rtol=1e-4, atol=1e-6, max_rel=1e-5)
    with pytest.raises(TypeError, match="share a dtype"):
        attention(inputs["q"], inputs["k"].double(), inputs["v"])
    with pytest.raises(ValueError, match="pair_bias .* does not broadcast"):
        attention(inputs["q"], inputs["k"], inputs["v"], pair_bias=torch.randn(3, 3))


def test_size_one_head_and_gate_dims_broadcast_and_mismatches_raise():
    """k / v shared over heads ([*, 1, K, C]) and a gate shared over heads broadcast as in the
    reference; a head count that does not broadcast is an error, never a silent misread."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 8, 16, generator=g) * 0.25
    k, v = torch.randn(2, 1, 8, 16, generator=g), torch.randn(2, 1, 8, 16, generator=g)
    gate = torch.randn(2, 8, 1, 16, generator=g)
    for kw in (dict(), dict(gate=gate)):
        out = attention(q, k, v, **kw)
        ref = attention_reference(q, k.expand(2, 4, 8, 16), v.expand(2, 4, 8, 16),
                                  gate=None if not kw else gate.expand(2, 8, 4, 16))
        assert_close(out, ref, rtol=1e-4, atol=1e-6, max_rel=1e-5)
    with pytest.raises(RuntimeError):
        attention(q, torch.randn(2, 3, 8, 16), torch.randn(2, 3, 8, 16))
    with pytest.raises(RuntimeError):
        attention(q, k, v, gate=torch.randn(2, 8, 3, 16))


# ---- backward paths: preprocess folded into the dK/dV kernel or its own launch --------------
ATTN = importlib.import_module("fastfold_plugin.kernels.attention")


class _CountLaunches:
    """Stands in for a kernel and counts its launches (``kernel[grid](...)``)."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def _force_fold(monkeypatch, fold):
    """Fold the preprocess whenever it may (True) or never (False); returns its launch counter."""
    monkeypatch.setattr(ATTN, "_FOLD_PRE_MAX_LOGITS", 1 << 62 if fold else -1)
    counter = _CountLaunches(ATTN._attention_bwd_preprocess_kernel)
    monkeypatch.setattr(ATTN, "_attention_bwd_preprocess_kernel", counter)
    return counter


# the preprocess folds when the dK/dV kernel runs and no other kernel reads dO / delta: the mask
# bias gradient (its own kernel) and dQ without dK/dV (its own kernel) keep the separate launch
GRAD_SETS = [
    pytest.param(("q", "k", "v", "pair_bias", "gate"), True, id="all-fused"),
    pytest.param(("k", "v", "pair_bias"), True, id="no-dq"),
    pytest.param(("q", "k", "gate"), True, id="no-dbias"),
    pytest.param(("v", "mask_bias"), False, id="mask-grad"),
    pytest.param(("q", "pair_bias"), False, id="dq-kernel"),
    pytest.param(("gate",), False, id="gate-only"),
]


@pytest.mark.parametrize("fold", [True, False], ids=["fold", "separate"])
@pytest.mark.parametrize("names,foldable", GRAD_SETS)
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
def test_backward_preprocess_folded_or_separate(monkeypatch, gated, names, foldable, fold):
    """Both backward paths against the reference, every gradient asked for; K = 33 spans two key
    blocks under the interpreter (the gate gradient is stored by the first one only) and Q = 33
    ends in a partial query block."""
    counter = _force_fold(monkeypatch, fold)
    inputs = make_case("row", 33, 16, torch.float32, b=1, s=2)
    if not gated:
        inputs["gate"] = None
    check(_requires_grad(inputs, names), torch.float32, 1e-5)
    no_backward = names == ("gate",) and not gated
    assert counter.launches == (0 if (fold and foldable) or no_backward else 1)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("case", ["row", "plain"])
def test_folded_preprocess_matches_separate(monkeypatch, case, dtype, tol):
    """The folded preprocess computes what the preprocess kernel computes (same dO rounding,
    delta from the rounded dO, fp32 ungated output when gated): both paths match the reference
    and each other; q/k/v gradients keep their inputs' layouts (row: gated, two key blocks;
    plain: ungated, contiguous [B, H, Q, C])."""
    inputs = _requires_grad(make_case(case, 33, 16, dtype, b=1, s=2))
    results = {}
    for fold in (True, False):
        counter = _force_fold(monkeypatch, fold)
        results[fold] = run(attention, inputs)
        assert counter.launches == (0 if fold else 1)
    check(inputs, dtype, tol)
    (out_f, grads_f, _), (out_s, grads_s, _) = results[True], results[False]
    assert_close(out_f, out_s, rtol=0, atol=0, name="out")
    for name in grads_f:
        exact = name != "pair_bias"  # its fp32 atomics may add in another order
        assert_close(grads_f[name], grads_s[name], rtol=0 if exact else 1e-5,
                     atol=0 if exact else 1e-6 * grads_s[name].abs().max().item(), name="d" + name)
    for name in ("q", "k", "v"):
        assert grads_f[name].stride() == inputs[name].stride(), name


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_folded_preprocess_fully_masked_rows(monkeypatch, dtype, gated):
    """Fully masked rows through the folded backward: uniform, finite, and (fp32) the
    reference's gradients."""
    counter = _force_fold(monkeypatch, True)
    inputs = make_case("row", 33, 16, dtype)
    inputs["mask_bias"][0, 1] = -INF
    if not gated:
        inputs["gate"] = None
    inputs = _requires_grad(inputs)
    out, grads, dout = run(attention, inputs)
    assert counter.launches == 0
    for name, g in grads.items():
        assert torch.isfinite(g).all(), f"d{name} not finite"
    uniform = inputs["v"][0, 1].double().mean(dim=-2, keepdim=True).transpose(-2, -3)
    if gated:
        uniform = uniform * torch.sigmoid(inputs["gate"][0, 1].double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_close(out[0, 1].double(), uniform.expand_as(out[0, 1]), rtol=tol, atol=tol,
                 name="masked rows")
    if dtype == torch.float32:
        out_ref, grads_ref, _ = run(attention_reference, inputs, dout)
        for name in grads:
            scale = grads_ref[name].abs().max().item()
            assert_close(grads[name], grads_ref[name], rtol=1e-3, atol=1e-5 * scale,
                         max_rel=1e-5, name="d" + name)


def test_layouts_with_equal_shapes_are_not_confused():
    """The per-layout cache keys on strides as well as shapes: the same shapes with transposed,
    contiguous or expanded (stride 0) inputs, called in turn, each match the reference."""
    g = _gen(11)
    q_t = (torch.randn(2, 9, 2, 16, generator=g) * 0.25).transpose(-2, -3)  # [2, 2, 9, 16]
    k_t = torch.randn(2, 11, 2, 16, generator=g).transpose(-2, -3)
    v = torch.randn(2, 2, 11, 16, generator=g)
    pb = torch.randn(2, 9, 11, generator=g)
    variants = [
        (q_t, k_t),
        (q_t.contiguous(), k_t.contiguous()),
        (q_t, k_t[:1].expand(2, 2, 11, 16)),
        (q_t, k_t),
    ]
    for q, k in variants:
        inputs = dict(q=q, k=k, v=v, mask_bias=None, pair_bias=pb, gate=None)
        check(_requires_grad(inputs, ("q", "k", "v", "pair_bias")), torch.float32, 1e-5)


def test_layout_errors_are_raised_every_call():
    """A layout that fails to broadcast raises on every call (errors are not cached)."""
    q = torch.randn(2, 2, 5, 16)
    k = torch.randn(2, 2, 7, 16)
    for _ in range(2):
        with pytest.raises(ValueError, match="pair_bias .* does not broadcast"):
            attention(q, k, k, pair_bias=torch.randn(3, 5, 7))


def test_cached_plans_are_keyed_on_everything_they_fix():
    """Calls on the same shapes that differ in one thing a cached plan fixes, made in turn, each
    match the reference: a bias's strides (a stride-0 broadcast, then a full bias with other
    values along those dims, then the broadcast again), the gradients asked for (other backward
    kernels), the dtype, the grad mode (a gated call without grad keeps no ungated output), and
    dout's strides."""
    inputs = make_case("row", 17, 16, torch.float32, b=1, s=2)
    logits = (*inputs["q"].shape[:-1], inputs["k"].shape[-2])
    bcast = inputs["mask_bias"].expand(logits)
    for mask_bias in (bcast, _mask_bias(logits, _gen(12), "cpu"), bcast):
        check(_requires_grad(dict(inputs, mask_bias=mask_bias)), torch.float32, 1e-5)
    for names in (("q", "pair_bias"), ("k", "v", "gate"), ("q", "k", "v", "pair_bias", "gate")):
        check(_requires_grad(inputs, names), torch.float32, 1e-5)
    check(_requires_grad(make_case("row", 17, 16, torch.bfloat16, b=1, s=2)), torch.bfloat16, 2.0)

    inputs = _requires_grad(dict(inputs, q=inputs["q"].contiguous()))  # a layout not seen yet
    with torch.no_grad():
        attention(**inputs)
    out = attention(**inputs)
    douts = [torch.randn(out.shape, generator=_gen(13)),
             torch.randn(out.shape[-1], generator=_gen(14)).expand(out.shape),  # as from a sum
             torch.randn(out.shape, generator=_gen(15)).transpose(-2, -3).contiguous()
             .transpose(-2, -3)]
    for dout in douts:
        out, grads, _ = run(attention, inputs, dout)
        out_ref, grads_ref, _ = run(attention_reference, inputs, dout)
        assert_close(out, out_ref, rtol=1e-4, atol=1e-6, max_rel=1e-5, name="out")
        for name in grads:
            assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-5, max_rel=1e-5,
                         name="d" + name)


# ---- the reference against OpenFold's own code (exact) -------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reference_matches_openfold_attention(dtype):
    from openfold.model.primitives import _attention

    inputs = _requires_grad(make_case("row", 7, 16, dtype))
    biases = [inputs["mask_bias"], inputs["pair_bias"]]
    ours = attention_reference(inputs["q"], inputs["k"], inputs["v"], *biases)
    theirs = _attention(inputs["q"], inputs["k"], inputs["v"], biases).transpose(-2, -3)
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
    dout = torch.randn(ours.shape, generator=_gen(2)).to(dtype)
    names = ("q", "k", "v", "pair_bias")
    g_ours = torch.autograd.grad(ours, [inputs[n] for n in names], dout)
    g_theirs = torch.autograd.grad(theirs, [inputs[n] for n in names], dout)
    for n, a, b in zip(names, g_ours, g_theirs, strict=True):
        assert torch.equal(a, b), n


def test_reference_matches_openfold_attention_module():
    """Gating as in OpenFold's Attention._wrap_up: o * sigmoid(linear_g(q_x))."""
    from openfold.model.primitives import Attention

    from fastfold_plugin.testing import randomize_parameters_

    mod = randomize_parameters_(Attention(24, 24, 24, 8, 2, gating=True), seed=3)
    x = torch.randn(2, 3, 7, 24, generator=_gen(4))
    mb = _mask_bias((2, 3, 1, 1, 7), _gen(5), "cpu")
    pb = torch.randn(2, 1, 2, 7, 7, generator=_gen(6))
    expected = mod(x, x, biases=[mb, pb])
    q, k, v = mod._prep_qkv(x, x)
    gate = mod.linear_g(x).view(2, 3, 7, 2, 8)
    o = attention_reference(q, k, v, mb, pb, gate)
    got = mod.linear_o(o.reshape(2, 3, 7, 16))
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6)


# ---- GPU: real sizes -----------------------------------------------------------------------
def _chunked_reference(inputs, dout, cast_to=None, chunk=64, q_div=None):
    """attention_reference (inputs cast to `cast_to` if given) over chunks of the batch-row
    dim (dim 1), so that one chunk's dense logits fit; the pair bias (shared over dim 1) gets
    its gradient summed over the chunks."""
    names = [n for n, t in inputs.items() if t is not None and t.requires_grad]
    cast = {n: (t.detach().to(cast_to or t.dtype) if t is not None else None)
            for n, t in inputs.items()}
    outs, parts = [], {n: [] for n in names}
    for start in range(0, cast["q"].shape[1], chunk):
        part = {n: (t if t is None or n == "pair_bias" else t[:, start:start + chunk])
                for n, t in cast.items()}
        part = {n: (t.detach().requires_grad_(n in names) if t is not None else None)
                for n, t in part.items()}
        out = attention_reference(**part, q_div=q_div)
        gs = torch.autograd.grad(out, [part[n] for n in names],
                                 dout[:, start:start + chunk].to(out.dtype))
        for n, g in zip(names, gs, strict=True):
            parts[n].append(g.float() if n == "pair_bias" else g)
        outs.append(out.detach())
    grads = {n: (sum(g) if n == "pair_bias" else torch.cat(g, dim=1)) for n, g in parts.items()}
    return torch.cat(outs, dim=1), grads


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", GPU_DTYPES)
@pytest.mark.parametrize("case,n,h,c,rows", [
    ("triangle", 37, 4, 32, 37),
    ("triangle", 256, 4, 32, 256),
    ("triangle", 1024, 4, 32, 1024),
    ("row", 256, 8, 32, 128),
    ("row", 384, 8, 8, 256),      # extra-MSA row attention: C = 8
    ("column", 256, 8, 32, 128),
    ("column_as_laid", 256, 8, 32, 128),
], ids=str)
def test_attention_gpu(case, n, h, c, rows, dtype, tol):
    torch.manual_seed(0)
    inputs = _requires_grad(make_case(case, n, c, dtype, device="cuda", h=h, b=1, s=rows))
    out, grads, dout = run(attention, inputs)
    chunk = max(1, (1 << 30) // (h * n * n * 8))  # about 1 GiB of fp64 logits per chunk
    out_t, grads_t = _chunked_reference(inputs, dout, torch.float64, chunk)
    out_r, grads_r = _chunked_reference(inputs, dout, None, chunk)  # OpenFold's math in dtype
    compare(out, out_r, out_t, dtype, tol, "out")
    for name in grads:
        compare(grads[name], grads_r[name].to(grads[name].dtype), grads_t[name], dtype, tol,
                "d" + name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", GPU_DTYPES)
@pytest.mark.parametrize("case,n,h,c,rows", [
    ("row", 256, 8, 32, 128),
    ("column", 256, 8, 32, 128),   # the MSA column attention on the MSA as it lies
    ("triangle", 256, 4, 32, 256),
], ids=str)
def test_attention_packed_gpu(case, n, h, c, rows, dtype, tol):
    """attention_packed at AF2 sizes against the chunked references on y's views: the output,
    each part of y's one gradient buffer, and the pair bias's gradient."""
    from fastfold_plugin.kernels.attention import _packed_views

    torch.manual_seed(0)
    columns = case == "column"
    inputs = _requires_grad(make_packed(case, n, c, dtype, device="cuda", h=h, b=1, s=rows),
                            ("y", "pair_bias"))
    op, _ = _packed_ops(h, c, True, columns)
    out, grads, dout = run(op, inputs)
    q, k, v, gate = _packed_views(inputs["y"].detach(), h, True, columns)
    views = _requires_grad(dict(q=q, k=k, v=v, mask_bias=inputs["mask_bias"],
                                pair_bias=inputs["pair_bias"], gate=gate))
    chunk = max(1, (1 << 30) // (h * n * n * 8))
    out_t, grads_t = _chunked_reference(views, dout, torch.float64, chunk, q_div=c ** 0.5)
    out_r, grads_r = _chunked_reference(views, dout, None, chunk, q_div=c ** 0.5)
    compare(out, out_r, out_t, dtype, tol, "out")
    got = dict(zip(("q", "k", "v", "gate"), _packed_views(grads["y"], h, True, columns)))
    if "pair_bias" in grads:
        got["pair_bias"] = grads["pair_bias"]
    assert set(got) == set(grads_t)
    for name, g in got.items():
        compare(g, grads_r[name].to(g.dtype), grads_t[name], dtype, tol, "d" + name)


@pytest.mark.gpu
def test_triangle_attention_memory_gpu():
    """fwd+bwd at N_res 1024 (I = 1024 rows, H = 4, C = 32, bf16) never holds the logits:
    the peak allocation growth stays a small multiple of the inputs."""
    n, h, c = 1024, 4, 32
    inputs = _requires_grad(make_case("triangle", n, c, torch.bfloat16, device="cuda", h=h, b=1))
    dout = torch.randn_like(inputs["q"].transpose(-2, -3))
    input_bytes = sum(t.numel() * t.element_size() for t in inputs.values() if t is not None)
    input_bytes += dout.numel() * dout.element_size()
    logits_bytes = n * h * n * n * 2
    names = ("q", "k", "v", "pair_bias", "gate")
    # compile + autotune every kernel outside the measurement
    torch.autograd.grad(attention(**inputs), [inputs[n_] for n_ in names], dout)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = attention(**inputs)
    grads = torch.autograd.grad(out, [inputs[n_] for n_ in names], dout)
    torch.cuda.synchronize()
    growth = torch.cuda.max_memory_allocated() - base
    del out, grads
    assert growth < 4 * input_bytes, f"peak growth {growth / 2**20:.0f} MiB vs inputs " \
        f"{input_bytes / 2**20:.0f} MiB"
    assert growth < logits_bytes / 2, f"peak growth {growth / 2**20:.0f} MiB"


@pytest.mark.gpu
def test_tf32_switch_gpu():
    """fp32 is IEEE unless torch.backends.cuda.matmul.allow_tf32 is set."""
    inputs = make_case("row", 128, 32, torch.float32, device="cuda", h=4, b=1, s=8)
    truth = attention_reference(**_double(inputs))
    prev = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        e_ieee = rel_err(attention(**inputs), truth)
        torch.backends.cuda.matmul.allow_tf32 = True
        e_tf32 = rel_err(attention(**inputs), truth)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    assert e_ieee < 1e-6, e_ieee
    assert e_tf32 < 1e-2 and e_tf32 > e_ieee, (e_tf32, e_ieee)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case,n", [("row", 131), ("triangle", 67)], ids=str)
def test_fully_masked_rows_gpu(case, n, dtype):
    """Rows whose every key is masked (padding residues and sequences: every DAP run has them,
    and AlphaFold training crops pad): the -1e9 mask bias dominates each logit, where one ulp is
    64, so a backward that recomputes a logit one ulp above the forward's row maximum blows up by
    ~2^64. Outputs and gradients stay finite and of the reference's size; rows with a key left
    match the reference as usual (fully masked rows are rounding artefacts on both sides)."""
    torch.manual_seed(0)
    inputs = make_case(case, n, 32, dtype, device="cuda", h=4, b=1, s=6)
    mb = inputs["mask_bias"].clone()
    mb[:, 1] = -INF  # batch row 1: every key of every query masked
    inputs["mask_bias"] = mb
    inputs = _requires_grad(inputs)
    out, grads, dout = run(attention, inputs)
    out_r, grads_r = _chunked_reference(inputs, dout, torch.float64, 2)
    keep = [i for i in range(out.shape[1]) if i != 1]
    for name, a, e in [("out", out, out_r)] + [("d" + k, grads[k], grads_r[k]) for k in grads]:
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        scale = e.abs().max().item()
        assert a.abs().max().item() <= 4 * scale + 1e-3, (
            f"{name}: max |value| {a.abs().max().item():.3e} vs reference {scale:.3e}")
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    err = rel_err(out[:, keep], out_r[:, keep].to(out.dtype))
    assert err <= tol, f"rows with a key left: rel err {err:.2e}"
