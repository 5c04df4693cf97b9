"""global_attention: Triton op vs reference (forward, every gradient), reference vs OpenFold."""
import contextlib

import pytest
import torch

from fastfold_plugin.kernels.global_attention import global_attention, global_attention_reference
from fastfold_plugin.testing import assert_close, randomize_parameters_, rel_err

GRAD_NAMES = ("dm", "dwq", "dwk", "dwv", "dwg", "dbg", "dwo", "dbo")
INF, EPS = 1e9, 1e-10  # the extra-MSA stack's values

# (m dtype, weight dtype, autocast dtype or None, tolerance, fully masked column?)
# fp32: op vs reference rtol. Otherwise the op's error against an fp64 truth must stay within
# `tol` x the reference's own error (3 for bf16 on CPU: the interpreter truncates on bf16 casts).
# fp16: stock adds the -1e9 mask bias in fp16 (-inf): a fully masked column is NaN there, so the
# fp16 cases keep at least one unmasked sequence per column.
PRECISIONS = [
    pytest.param(torch.float32, torch.float32, None, 1e-5, True, id="fp32"),
    pytest.param(torch.bfloat16, torch.bfloat16, None, 3.0, True, id="bf16"),
    pytest.param(torch.float16, torch.float16, None, 2.0, False, id="fp16"),
    pytest.param(torch.float32, torch.float32, torch.bfloat16, 3.0, True, id="fp32-autocast-bf16"),
    pytest.param(torch.float32, torch.float32, torch.float16, 2.0, False, id="fp32-autocast-fp16"),
]
# (leading dims [*, N_res], N_seq, C, heads, C_hidden)
SHAPES = [((2, 2), 37, 24, 3, 8), ((24,), 1, 16, 2, 8), ((1, 1, 2), 20, 64, 8, 8)]


def _autocast(device, dtype):
    return contextlib.nullcontext() if dtype is None else torch.autocast(device, dtype=dtype)


def make_inputs(lead, n_seq, c, h, d, m_dtype, w_dtype, device, masked_column, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0):
        return torch.randn(*s, generator=gen) * scale

    m = r(*lead, n_seq, c).to(device=device, dtype=m_dtype)
    mask = (torch.rand(*lead, n_seq, generator=gen) > 0.3).float()
    if masked_column:
        mask.view(-1, n_seq)[0] = 0.0
    else:
        mask[..., 0] = 1.0
    mask = mask.to(device=device, dtype=m_dtype)  # OpenFold builds the mask in m's dtype
    ws = [r(h * d, c, scale=c ** -0.5), r(d, c, scale=c ** -0.5), r(d, c, scale=c ** -0.5),
          r(h * d, c, scale=c ** -0.5), r(h * d, scale=0.5), r(c, h * d, scale=(h * d) ** -0.5),
          r(c, scale=0.1)]
    ws = [w.to(device=device, dtype=w_dtype).requires_grad_() for w in ws]
    return [m.requires_grad_(), mask] + ws


def run(fn, args, h, g=None):
    out = fn(*args, h, INF, EPS)
    if g is None:
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    grads = torch.autograd.grad(out, [args[0]] + args[2:], g)
    return out, grads, g


def truth(args, h, g):
    d = [a.detach().double() for a in args]
    d = [d[0].requires_grad_(), d[1]] + [t.requires_grad_() for t in d[2:]]
    return run(global_attention_reference, d, h, g.double())


def check_global_attention(shape, m_dtype, w_dtype, ac_dtype, tol, masked_column, device, seed=0):
    lead, n_seq, c, h, d = shape
    args = make_inputs(lead, n_seq, c, h, d, m_dtype, w_dtype, device, masked_column, seed)
    with _autocast(device, ac_dtype):
        out, grads, g = run(global_attention, args, h)
        out_ref, grads_ref, _ = run(global_attention_reference, args, h, g)
    assert out.dtype == out_ref.dtype and out.shape == out_ref.shape
    for name, a, e in zip(GRAD_NAMES, grads, grads_ref, strict=True):
        assert a.dtype == e.dtype, f"{name}: dtype {a.dtype} != {e.dtype}"
    exact = m_dtype == torch.float32 and ac_dtype is None
    out_t, grads_t, _ = truth(args, h, g)
    grad_scale = max(t.norm().item() for t in grads_t)
    for name, a, e, t in zip(("out",) + GRAD_NAMES, (out,) + grads, (out_ref,) + grads_ref, (out_t,) + grads_t,
                             strict=True):
        if not bool(t.any()):
            # an exactly zero gradient (N_seq 1: the softmax is constant, dWq = dWk = 0); the op
            # forms it from rounded operands, so it is zero to rounding (relative to the other
            # gradients), not bit for bit
            bound = 4 * torch.finfo(ac_dtype or m_dtype).eps * grad_scale
            assert a.double().norm().item() <= bound, f"{name}: should be 0, norm {a.double().norm():.3e}"
        elif exact:
            assert_close(a, e, rtol=tol, atol=tol * e.abs().max().item(), max_rel=tol, name=name)
        else:
            e_op, e_ref = rel_err(a, t), rel_err(e, t)
            assert e_op <= tol * e_ref + 1e-6, f"{name}: op error {e_op:.3e} > {tol} x reference error {e_ref:.3e}"


@pytest.mark.parametrize("m_dtype,w_dtype,ac_dtype,tol,masked_column", PRECISIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_global_attention_matches_reference(shape, m_dtype, w_dtype, ac_dtype, tol, masked_column):
    check_global_attention(shape, m_dtype, w_dtype, ac_dtype, tol, masked_column, "cpu")


def test_non_contiguous_m_and_broadcast_mask():
    """m as a transposed view (as MSAColumnGlobalAttention makes it), mask broadcast over N_res."""
    lead, n_seq, c, h, d = (3,), 18, 16, 2, 8
    args = make_inputs(lead, n_seq, c, h, d, torch.float32, torch.float32, "cpu", False)
    m = args[0].detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    args[0], args[1] = m, args[1][:1]  # [1, N_seq] broadcast to [N_res, N_seq]
    out, grads, g = run(global_attention, args, h)
    out_ref, grads_ref, _ = run(global_attention_reference, args, h, g)
    for a, e in zip((out,) + grads, (out_ref,) + grads_ref, strict=True):
        assert_close(a, e, rtol=1e-5, atol=1e-5 * e.abs().max().item())


def test_large_dims_take_the_reference_path():
    lead, n_seq, c, h, d = (2,), 5, 136, 2, 8  # C > 128: explicit fallback
    args = make_inputs(lead, n_seq, c, h, d, torch.float32, torch.float32, "cpu", False)
    out = global_attention(*args, h, INF, EPS)
    assert torch.equal(out, global_attention_reference(*args, h, INF, EPS))


# ---- the reference against OpenFold's GlobalAttention (exact) --------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reference_matches_openfold_global_attention(dtype):
    from openfold.model.primitives import GlobalAttention

    c, d, h = 32, 8, 4
    mod = randomize_parameters_(GlobalAttention(c, d, h, inf=INF, eps=EPS), seed=9).to(dtype)
    args = make_inputs((3,), 21, c, h, d, dtype, dtype, "cpu", masked_column=True)
    m, mask = args[0], args[1]
    weights = [mod.linear_q.weight, mod.linear_k.weight, mod.linear_v.weight, mod.linear_g.weight,
               mod.linear_g.bias, mod.linear_o.weight, mod.linear_o.bias]
    g = torch.randn(3, 21, c).to(dtype)
    out_mod = mod(m, mask)
    out_ref = global_attention_reference(m, mask, *weights, h, INF, EPS)
    assert out_mod.dtype == out_ref.dtype and torch.equal(out_mod, out_ref)
    grads_mod = torch.autograd.grad(out_mod, [m] + weights, g)
    grads_ref = torch.autograd.grad(out_ref, [m] + weights, g)
    for name, a, e in zip(GRAD_NAMES, grads_ref, grads_mod, strict=True):
        assert torch.equal(a, e), name


# ---- GPU: extra-MSA sizes (c_e 64, 8 heads of 8) -----------------------------------------------
GPU_PRECISIONS = [
    pytest.param(torch.float32, torch.float32, None, 1e-4, True, id="fp32"),
    pytest.param(torch.float32, torch.float32, torch.bfloat16, 2.0, True, id="fp32-autocast-bf16"),
    pytest.param(torch.float32, torch.float32, torch.float16, 2.0, False, id="fp32-autocast-fp16"),
    pytest.param(torch.bfloat16, torch.bfloat16, None, 2.0, True, id="bf16"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("m_dtype,w_dtype,ac_dtype,tol,masked_column", GPU_PRECISIONS)
@pytest.mark.parametrize("shape", [((1, 256), 1024, 64, 8, 8), ((1, 64), 5120, 64, 8, 8),
                                   ((2, 37), 129, 64, 8, 8)], ids=str)
def test_global_attention_gpu(shape, m_dtype, w_dtype, ac_dtype, tol, masked_column):
    check_global_attention(shape, m_dtype, w_dtype, ac_dtype, tol, masked_column, "cuda")


@pytest.mark.gpu
def test_reference_matches_openfold_under_cuda_autocast():
    from openfold.model.primitives import GlobalAttention

    mod = randomize_parameters_(GlobalAttention(64, 8, 8, inf=INF, eps=EPS), seed=10).cuda()
    args = make_inputs((1, 32), 200, 64, 8, 8, torch.float32, torch.float32, "cuda", True)
    weights = [mod.linear_q.weight, mod.linear_k.weight, mod.linear_v.weight, mod.linear_g.weight,
               mod.linear_g.bias, mod.linear_o.weight, mod.linear_o.bias]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_mod = mod(args[0], args[1])
        out_ref = global_attention_reference(args[0], args[1], *weights, 8, INF, EPS)
    assert out_mod.dtype == out_ref.dtype and torch.equal(out_mod, out_ref)
