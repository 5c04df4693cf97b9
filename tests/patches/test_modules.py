"""Each patched OpenFold module vs stock on the same (randomised, non-zero) weights.

Forward outputs and every gradient (inputs and parameters) must match stock within fp32 rounding
(norm ratio <= 1e-5). A spy on the op table proves that the patched path really ran, so a
plugin that patched nothing could not pass.
"""
import copy

import pytest
import torch
from openfold.model.evoformer import (
    EvoformerBlock,
    EvoformerStack,
    ExtraMSABlock,
    MSATransition,
)
from openfold.model.msa import (
    MSAColumnAttention,
    MSAColumnGlobalAttention,
    MSARowAttentionWithPairBias,
)
from openfold.model.outer_product_mean import OuterProductMean
from openfold.model.pair_transition import PairTransition
from openfold.model.template import TemplatePairStackBlock, TemplatePointwiseAttention
from openfold.model.triangular_attention import TriangleAttention, TriangleAttentionEndingNode
from openfold.model.triangular_multiplicative_update import (
    TriangleMultiplicationIncoming,
    TriangleMultiplicationOutgoing,
)

import fastfold_plugin
from fastfold_plugin import kernels
from fastfold_plugin.testing import assert_close, grad_errors, randomize_parameters_, rel_err

S, N = 5, 7        # N_seq, N_res (awkward sizes)
C_M, C_Z, C_T = 32, 16, 16
GRAD_TOL = 1e-5    # ||a - b|| / ||b|| for every gradient, fp32


def _mask(*shape):
    m = (torch.rand(*shape) > 0.2).float()
    m[..., 0] = 1.0
    return m


def _block_kwargs():
    return dict(c_m=C_M, c_z=C_Z, c_hidden_msa_att=8, c_hidden_opm=8, c_hidden_mul=16,
                c_hidden_pair_att=8, no_heads_msa=4, no_heads_pair=2, transition_n=2,
                msa_dropout=0.15, pair_dropout=0.25, inf=1e9, eps=1e-10)


# name -> (constructor, inputs(), call(module, inputs) -> output tensor or tuple)
CASES = {
    "msa_row_attention": (
        lambda: MSARowAttentionWithPairBias(C_M, C_Z, 8, 4),
        lambda: dict(m=torch.randn(2, S, N, C_M), z=torch.randn(2, N, N, C_Z), mask=_mask(2, S, N)),
        lambda mod, x, cs: mod(x["m"], z=x["z"], mask=x["mask"], chunk_size=cs),
    ),
    "msa_column_attention": (
        lambda: MSAColumnAttention(C_M, 8, 4),
        lambda: dict(m=torch.randn(S, N, C_M), mask=_mask(S, N)),
        lambda mod, x, cs: mod(x["m"], mask=x["mask"], chunk_size=cs),
    ),
    "msa_column_global_attention": (
        lambda: MSAColumnGlobalAttention(C_M, 8, 4, eps=1e-10),
        lambda: dict(m=torch.randn(S, N, C_M), mask=_mask(S, N)),
        lambda mod, x, cs: mod(x["m"], mask=x["mask"], chunk_size=cs),
    ),
    "triangle_attention_start": (
        lambda: TriangleAttention(C_Z, 8, 2),
        lambda: dict(x=torch.randn(N, N, C_Z), mask=_mask(N, N)),
        lambda mod, x, cs: mod(x["x"], mask=x["mask"], chunk_size=cs),
    ),
    "triangle_attention_end": (
        lambda: TriangleAttentionEndingNode(C_Z, 8, 2),
        lambda: dict(x=torch.randn(N, N, C_Z), mask=_mask(N, N)),
        lambda mod, x, cs: mod(x["x"], mask=x["mask"], chunk_size=cs),
    ),
    "triangle_multiplication_outgoing": (
        lambda: TriangleMultiplicationOutgoing(C_Z, 16),
        lambda: dict(z=torch.randn(N, N, C_Z), mask=_mask(N, N)),
        lambda mod, x, cs: mod(x["z"], mask=x["mask"]),
    ),
    "triangle_multiplication_incoming": (
        lambda: TriangleMultiplicationIncoming(C_Z, 16),
        lambda: dict(z=torch.randn(N, N, C_Z), mask=_mask(N, N)),
        lambda mod, x, cs: mod(x["z"], mask=x["mask"]),
    ),
    "outer_product_mean": (
        lambda: OuterProductMean(C_M, C_Z, 8),
        lambda: dict(m=torch.randn(S, N, C_M), mask=_mask(S, N)),
        lambda mod, x, cs: mod(x["m"], mask=x["mask"], chunk_size=cs),
    ),
    "msa_transition": (
        lambda: MSATransition(C_M, 2),
        lambda: dict(m=torch.randn(S, N, C_M), mask=_mask(S, N)),
        lambda mod, x, cs: mod(x["m"], mask=x["mask"], chunk_size=cs),
    ),
    "pair_transition": (
        lambda: PairTransition(C_Z, 2),
        lambda: dict(z=torch.randn(N, N, C_Z), mask=_mask(N, N)),
        lambda mod, x, cs: mod(x["z"], mask=x["mask"], chunk_size=cs),
    ),
    "template_pointwise_attention": (
        lambda: TemplatePointwiseAttention(C_T, C_Z, 8, 2, 1e9),
        lambda: dict(t=torch.randn(3, N, N, C_T), z=torch.randn(N, N, C_Z),
                     mask=torch.tensor([1.0, 1.0, 0.0])),
        lambda mod, x, cs: mod(x["t"], x["z"], template_mask=x["mask"], chunk_size=cs),
    ),
    "evoformer_block": (
        lambda: EvoformerBlock(**_block_kwargs()),
        lambda: dict(m=torch.randn(S, N, C_M), z=torch.randn(N, N, C_Z), msa_mask=_mask(S, N),
                     pair_mask=_mask(N, N)),
        lambda mod, x, cs: mod(x["m"], x["z"], x["msa_mask"], x["pair_mask"], chunk_size=cs),
    ),
    "extra_msa_block": (
        lambda: ExtraMSABlock(**_block_kwargs(), ckpt=False),
        lambda: dict(m=torch.randn(S, N, C_M), z=torch.randn(N, N, C_Z), msa_mask=_mask(S, N),
                     pair_mask=_mask(N, N)),
        lambda mod, x, cs: mod(x["m"], x["z"], x["msa_mask"], x["pair_mask"], chunk_size=cs),
    ),
    "template_pair_stack_block": (
        lambda: TemplatePairStackBlock(c_t=C_T, c_hidden_tri_att=8, c_hidden_tri_mul=16,
                                       no_heads=2, pair_transition_n=2, dropout_rate=0.25, inf=1e9),
        lambda: dict(z=torch.randn(2, N, N, C_T), mask=_mask(2, N, N)),
        lambda mod, x, cs: mod(x["z"], x["mask"], chunk_size=cs),
    ),
}


class _Spy:
    """Wraps the reference op table and counts op calls."""

    def __init__(self, table):
        self.table, self.calls = table, {}

    def __getattr__(self, name):
        fn = getattr(self.table, name)
        if not callable(fn):
            return fn

        def wrapped(*a, **k):
            self.calls[name] = self.calls.get(name, 0) + 1
            return fn(*a, **k)
        return wrapped


@pytest.fixture
def spy(monkeypatch):
    table = kernels.get_ops("reference")
    s = _Spy(table)
    monkeypatch.setitem(kernels._TABLES, "reference", s)
    return s


def _outputs(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _run(mod, make_call, inputs, chunk_size, seed, grad=True):
    inputs = {k: v.clone().requires_grad_(grad and v.is_floating_point() and "mask" not in k)
              for k, v in inputs.items()}
    torch.manual_seed(seed)
    outs = _outputs(make_call(mod, inputs, chunk_size))
    grads = {}
    if grad:
        gen = torch.Generator().manual_seed(seed + 1)
        loss = sum((o * torch.randn(o.shape, generator=gen)).sum() for o in outs)
        loss.backward()
        grads = {f"input {k}": v.grad for k, v in inputs.items() if v.grad is not None}
        grads.update({f"param {n}": p.grad for n, p in mod.named_parameters()})
    return [o.detach() for o in outs], grads


def _pair(name, training):
    make, make_inputs, call = CASES[name]
    torch.manual_seed(1)
    stock = randomize_parameters_(make(), seed=2)
    stock.train(training)
    patched = copy.deepcopy(stock)
    handle = fastfold_plugin.enable(patched, backend="reference")
    return stock, patched, handle, make_inputs(), call


@pytest.mark.parametrize("chunk_size", [None, 2], ids=["unchunked", "chunk2"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_patched_module_matches_stock(name, chunk_size, spy):
    stock, patched, handle, inputs, call = _pair(name, training=False)
    assert handle.num_patched >= 1
    out_s, grad_s = _run(stock, call, inputs, chunk_size, seed=3)
    spy.calls.clear()
    out_p, grad_p = _run(patched, call, inputs, chunk_size, seed=3)
    assert spy.calls, f"{name}: the patched forward did not call the op table"
    for a, b in zip(out_p, out_s):
        assert rel_err(b, torch.zeros_like(b)) > 0, "stock output is zero: test would be vacuous"
        assert_close(a, b, rtol=1e-5, atol=1e-5, max_rel=1e-5, name=f"{name} output")
    assert grad_p.keys() == grad_s.keys()
    for k in grad_s:
        assert grad_s[k] is not None and grad_p[k] is not None, f"{name}: {k} has no gradient"
        assert grad_s[k].abs().sum() > 0, f"{name}: stock gradient of {k} is zero"
    for k, r in grad_errors(grad_p, grad_s).items():
        assert r <= GRAD_TOL, f"{name}: gradient of {k}: rel err {r:.2e} > {GRAD_TOL:g}"


@pytest.mark.parametrize("name", ["evoformer_block", "extra_msa_block", "template_pair_stack_block"])
def test_patched_block_training_dropout_matches_stock(name):
    """Train mode: the reference path draws OpenFold's dropout masks from the same RNG stream."""
    stock, patched, _, inputs, call = _pair(name, training=True)
    out_s, grad_s = _run(stock, call, inputs, None, seed=7)
    out_p, grad_p = _run(patched, call, inputs, None, seed=7)
    for a, b in zip(out_p, out_s):
        assert_close(a, b, rtol=1e-5, atol=1e-5, max_rel=1e-5, name=f"{name} train output")
    for k, r in grad_errors(grad_p, grad_s).items():
        assert r <= GRAD_TOL, f"{name}: gradient of {k}: rel err {r:.2e}"
    # and dropout really was active: another seed changes the stock output
    out_s2, _ = _run(stock, call, inputs, None, seed=8, grad=False)
    assert rel_err(out_s2[0], out_s[0]) > 1e-3


@pytest.mark.parametrize("name", ["evoformer_block", "extra_msa_block", "template_pair_stack_block",
                                  "triangle_multiplication_outgoing", "triangle_multiplication_incoming"])
def test_inplace_inference_path_matches_stock(name):
    """OpenFold's in-place inference path (eval, no_grad, inplace_safe=True)."""
    stock, patched, _, inputs, call = _pair(name, training=False)

    def run(mod):
        x = {k: v.clone() for k, v in inputs.items()}
        with torch.no_grad():
            if "block" in name:
                kw = dict(chunk_size=2, inplace_safe=True)
                if name == "template_pair_stack_block":
                    return _outputs(mod(x["z"], x["mask"], **kw))
                return _outputs(mod(x["m"], x["z"], x["msa_mask"], x["pair_mask"], **kw))
            return _outputs(mod(x["z"], mask=x["mask"], inplace_safe=True, _add_with_inplace=True))

    for a, b in zip(run(patched), run(stock)):
        assert_close(a, b, rtol=1e-5, atol=1e-5, max_rel=1e-5, name=f"{name} in-place")


def test_evoformer_stack_checkpointing_and_chunk_tuning():
    """blocks_per_ckpt (activation checkpointing) and the chunk-size tuner keep working."""
    kw = _block_kwargs()
    stack = EvoformerStack(**kw, c_s=24, no_blocks=2, blocks_per_ckpt=1, tune_chunk_size=True)
    randomize_parameters_(stack, seed=4)
    patched = copy.deepcopy(stack)
    fastfold_plugin.enable(patched, backend="reference")
    x = dict(m=torch.randn(S, N, C_M), z=torch.randn(N, N, C_Z), msa_mask=_mask(S, N),
             pair_mask=_mask(N, N))

    def call(mod, x, cs):
        return mod(x["m"], x["z"], x["msa_mask"], x["pair_mask"], chunk_size=cs)

    stack.eval(), patched.eval()
    out_s, grad_s = _run(stack, call, x, None, seed=5)
    out_p, grad_p = _run(patched, call, x, None, seed=5)
    for a, b in zip(out_p, out_s):
        assert_close(a, b, rtol=1e-5, atol=1e-5, max_rel=1e-5, name="stack output")
    for k, r in grad_errors(grad_p, grad_s).items():
        assert r <= GRAD_TOL, f"stack gradient of {k}: rel err {r:.2e}"
    with torch.no_grad():  # tuner runs trial calls of the patched block
        out_t = _outputs(call(patched, {k: v.clone() for k, v in x.items()}, 2))
    for a, b in zip(out_t, out_s):
        assert_close(a, b, rtol=1e-5, atol=1e-5, max_rel=1e-5, name="tuned stack output")


PAD_S, PAD_N = 1, 2  # padded MSA rows and residues, as DAP pads N_seq and N_res


def _pad_like_dap(inputs):
    """Every dim of size S or N grown by PAD_S / PAD_N: random data, mask 0 where padded. The
    padded MSA rows and residues make fully masked attention rows in every attention op."""
    out = {}
    for k, v in inputs.items():
        grow = [PAD_S if n == S else PAD_N if n == N else 0 for n in v.shape]
        if "mask" in k:
            p = torch.zeros([n + g for n, g in zip(v.shape, grow)])
        else:
            p = torch.randn([n + g for n, g in zip(v.shape, grow)])
        p[tuple(slice(0, n) for n in v.shape)] = v
        out[k] = p
    return out


def _unpad(t):
    return t[tuple(slice(0, S) if n == S + PAD_S else slice(0, N) if n == N + PAD_N else slice(None)
                   for n in t.shape)]


def _device_cases():
    cpu = ["msa_row_attention", "msa_column_attention", "triangle_attention_start",
           "triangle_attention_end", "template_pointwise_attention"]
    return ([pytest.param("cpu", n, id=f"cpu-{n}") for n in cpu]
            + [pytest.param("cuda", n, id=f"cuda-{n}", marks=pytest.mark.gpu) for n in sorted(CASES)])


@pytest.mark.parametrize("device,name", _device_cases())
def test_triton_module_with_padding_matches_stock(device, name, no_tf32):
    """backend="triton" on inputs padded as DAP pads them (fully masked rows) vs stock on the
    unpadded inputs: real positions' outputs and every gradient agree; padded rows stay finite.
    The loss sees only real positions, so no gradient enters a padded row from outside: one
    that appears comes from the kernels (DAP training on the GPU went wrong this way)."""
    make, make_inputs, call = CASES[name]
    torch.manual_seed(1)
    stock = randomize_parameters_(make(), seed=2).to(device).eval()
    patched = copy.deepcopy(stock)
    fastfold_plugin.enable(patched, backend="triton")
    x = make_inputs()
    padded = _pad_like_dap(x)

    def run(mod, inputs, cut):
        xs = {k: v.to(device).requires_grad_("mask" not in k) for k, v in inputs.items()}
        outs = _outputs(call(mod, xs, None))
        for o in outs:
            assert torch.isfinite(o).all(), f"{name}: non-finite output"
        outs = [cut(o) for o in outs]
        gen = torch.Generator().manual_seed(5)
        loss = sum((o * torch.randn(o.shape, generator=gen).to(device)).sum() for o in outs)
        loss.backward()
        grads = {f"input {k}": cut(v.grad) for k, v in xs.items() if v.grad is not None}
        grads.update({f"param {n}": p.grad for n, p in mod.named_parameters()})
        return [o.detach() for o in outs], grads

    out_s, grad_s = run(stock, x, lambda t: t)
    out_p, grad_p = run(patched, padded, _unpad)
    for a, b in zip(out_p, out_s):
        assert_close(a, b, rtol=2e-4, atol=2e-4, max_rel=1e-4, name=f"{name} padded output")
    bad = {k: f"{r:.2e}" for k, r in grad_errors(grad_p, grad_s).items() if not r <= 1e-4}
    assert not bad, f"{name}: {len(bad)}/{len(grad_s)} gradients off (rel err): {bad}"


@pytest.mark.parametrize("name", ["msa_row_attention", "msa_column_attention",
                                  "triangle_attention_start", "triangle_attention_end"])
def test_triton_attention_chunks_with_gradients(name):
    """The Triton ops with chunks and gradients (fp32): each chunk runs its own packed q, k, v
    and gate projection, whose weight gradients (views of one stacked gradient per chunk) add
    up across the chunks, as stock's do. Tolerance as test_triton_blocks' (the Triton kernels
    sum in another order; the pair-bias LayerNorm's bias gradient is zero by symmetry, so its
    relative error is rounding noise over a tiny norm)."""
    make, make_inputs, call = CASES[name]
    torch.manual_seed(1)
    stock = randomize_parameters_(make(), seed=2)
    patched = copy.deepcopy(stock)
    fastfold_plugin.enable(patched, backend="triton")
    inputs = make_inputs()
    out_s, grad_s = _run(stock, call, inputs, 2, seed=3)
    out_p, grad_p = _run(patched, call, inputs, 2, seed=3)
    for a, b in zip(out_p, out_s):
        assert_close(a, b, rtol=1e-5, atol=1e-5, max_rel=1e-5, name=f"{name} output")
    assert grad_p.keys() == grad_s.keys()
    for k, r in grad_errors(grad_p, grad_s).items():
        assert r <= 1e-4, f"{name}: gradient of {k}: rel err {r:.2e}"


@pytest.mark.parametrize("dt", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_head_bias_gemms_and_gradient_layouts(dt):
    """The GPU path of ``head_bias`` (its GEMMs run here on the CPU): the stock Linear's
    [*, Q, K, H] bias as [*, Q, H, K]; gradients: dx laid out as x (contiguous, not the
    transposed view autograd's own backward gives) and dweight, both matching autograd
    through the stock Linear (fp32 exactly up to summation order; under autocast bf16 operands
    and one rounding of dweight to bf16, as the stock Linear's)."""
    from fastfold_plugin.patches.forwards import _HeadBias

    g = torch.Generator().manual_seed(41)
    x0 = torch.randn(2, 6, 7, 16, generator=g)
    w0 = torch.randn(4, 16, generator=g) / 4
    cot = torch.randn(2, 6, 4, 7, generator=g)
    if dt is not None:
        x0 = x0.to(dt)  # (a LayerNorm's output, rounded for the Linears)
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    out = _HeadBias.apply(x, w, dt)
    dx, dw = torch.autograd.grad(out, (x, w), cot.to(out.dtype))
    xr, wr = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dt is not None):
        ref = torch.nn.functional.linear(xr, wr).transpose(-1, -2)
    dxr, dwr = torch.autograd.grad(ref, (xr, wr), cot.to(ref.dtype))
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert dx.is_contiguous() and dx.dtype == x.dtype and dw.dtype == w.dtype
    tol = 1e-5 if dt is None else 2e-2
    for a, e, name in ((out, ref, "out"), (dx, dxr, "dx"), (dw, dwr, "dweight")):
        assert rel_err(a.float(), e.float()) < tol, name
