"""outer_product_mean: Triton op vs reference (forward and all 9 gradients), and the reference
vs OpenFold's OuterProductMean module."""
import contextlib

import pytest
import torch

from fastfold_plugin.kernels.outer_product_mean import (
    _outer_product_mean,
    outer_product_mean,
    outer_product_mean_reference,
)
from fastfold_plugin.testing import assert_close, describe_mismatch, randomize_parameters_, rel_err

PARAM_NAMES = ("ln_w", "ln_b", "w1", "b1", "w2", "b2", "w_out", "b_out")
GRAD_NAMES = ("m",) + PARAM_NAMES

# Precision cases: (input dtype, parameter dtype, autocast dtype or None), and the tolerance.
# fp32: op vs reference elementwise.  Low precision: the op's error against an fp64 truth must
# stay within `tol` x the reference's own error in that precision.
CASES = [
    pytest.param(torch.float32, torch.float32, None, 1e-4, id="fp32"),
    pytest.param(torch.float32, torch.float32, torch.bfloat16, 2.0, id="bf16-autocast"),
    pytest.param(torch.float32, torch.float32, torch.float16, 2.0, id="fp16-autocast"),
    pytest.param(torch.bfloat16, torch.bfloat16, None, 2.0, id="bf16-model"),
]
LOW_PRECISION_CASES = CASES[1:]

# (batch dims, N_seq, N_res, c_m, c_hidden, c_z, masked, pair rows per outer-product chunk)
SHAPES = [
    pytest.param((), 1, 1, 8, 8, 8, True, None, id="S1-N1"),
    pytest.param((2,), 5, 7, 16, 8, 16, True, None, id="B2-S5-N7"),
    pytest.param((), 3, 13, 24, 12, 8, False, 5, id="S3-N13-nomask-chunked"),
]


def random_params(c_m, c_hidden, c_z, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)

    def mat(o, i):
        return torch.randn(o, i, generator=gen) / i ** 0.5

    def vec(n, around=0.0):
        return around + 0.1 * torch.randn(n, generator=gen)

    ps = (vec(c_m, 1.0), vec(c_m), mat(c_hidden, c_m), vec(c_hidden), mat(c_hidden, c_m), vec(c_hidden),
          mat(c_z, c_hidden * c_hidden), vec(c_z))
    return [p.to(device=device, dtype=dtype) for p in ps]


def random_inputs(batch, n_seq, n_res, c_m, masked, dtype=torch.float32, device="cpu", seed=1):
    gen = torch.Generator().manual_seed(seed)
    m = (torch.randn(*batch, n_seq, n_res, c_m, generator=gen) * 2.0 + 0.5).to(device=device, dtype=dtype)
    mask = None
    if masked:
        mask = (torch.rand(*batch, n_seq, n_res, generator=gen) > 0.25).to(device=device, dtype=dtype)
    return m, mask


def run(fn, m, mask, params, autocast_dtype=None, g=None, **kwargs):
    """(out, grads of m and the 8 parameters) for upstream gradient g (drawn when None)."""
    leaves = [t.detach().clone().requires_grad_() for t in (m, *params)]
    ctx = (torch.autocast(m.device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    with ctx:
        out = fn(leaves[0], mask, *leaves[1:], **kwargs)
    if g is None:
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out)
    grads = torch.autograd.grad(out, leaves, g.to(out.dtype))
    return out, grads, g


def check_fp32(actual, expected, name):
    scale = expected.detach().abs().max().item()
    assert_close(actual, expected, rtol=1e-4, atol=1e-5 * scale, max_rel=1e-5, name=name)


def check_against_truth(actual, expected, truth, tol, name):
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != reference's {expected.dtype}"
    e_op, e_ref = rel_err(actual, truth), rel_err(expected, truth)
    assert e_op <= tol * e_ref + 1e-6, f"{name}: op error {e_op:.3e} > {tol} x reference error {e_ref:.3e}"


def check_case(batch, n_seq, n_res, c_m, c_hidden, c_z, masked, chunk_rows, x_dtype, p_dtype, ac, tol,
               device="cpu", truth_dtype=torch.float64):
    m, mask = random_inputs(batch, n_seq, n_res, c_m, masked, x_dtype, device)
    ps = random_params(c_m, c_hidden, c_z, p_dtype, device)
    out, grads, g = run(_outer_product_mean, m, mask, ps, ac, chunk_rows=chunk_rows)
    out_r, grads_r, _ = run(outer_product_mean_reference, m, mask, ps, ac, g)
    assert out.shape == (*batch, n_res, n_res, c_z) and out.dtype == out_r.dtype
    if x_dtype == torch.float32 and ac is None:
        check_fp32(out, out_r, "out")
        for name, a, e in zip(GRAD_NAMES, grads, grads_r, strict=True):
            assert a.dtype == e.dtype, name
            check_fp32(a, e, "d" + name)
        return
    # truth: the reference in higher precision on the same (already rounded) inputs
    mask_t = None if mask is None else mask.to(truth_dtype)
    out_t, grads_t, _ = run(outer_product_mean_reference, m.to(truth_dtype), mask_t,
                            [p.to(truth_dtype) for p in ps], None, g.to(truth_dtype))
    check_against_truth(out, out_r, out_t, tol, "out")
    for name, a, e, t in zip(GRAD_NAMES, grads, grads_r, grads_t, strict=True):
        check_against_truth(a, e, t, tol, "d" + name)


@pytest.mark.parametrize("batch,n_seq,n_res,c_m,c_hidden,c_z,masked,chunk_rows", SHAPES)
def test_fp32_matches_reference(batch, n_seq, n_res, c_m, c_hidden, c_z, masked, chunk_rows):
    check_case(batch, n_seq, n_res, c_m, c_hidden, c_z, masked, chunk_rows,
               torch.float32, torch.float32, None, None)


@pytest.mark.parametrize("batch,n_seq,n_res", [((2,), 5, 7), ((), 4, 13)], ids=["B2-S5-N7", "S4-N13"])
@pytest.mark.parametrize("x_dtype,p_dtype,ac,tol", LOW_PRECISION_CASES)
def test_low_precision_within_reference_error(batch, n_seq, n_res, x_dtype, p_dtype, ac, tol):
    check_case(batch, n_seq, n_res, 16, 8, 16, True, None, x_dtype, p_dtype, ac, tol)


@pytest.mark.parametrize("x_dtype,p_dtype,ac,tol", CASES)
def test_output_dtype_contract(x_dtype, p_dtype, ac, tol):
    m, mask = random_inputs((), 2, 3, 8, True, x_dtype)
    ps = random_params(8, 8, 8, p_dtype)
    ctx = torch.autocast("cpu", dtype=ac) if ac is not None else contextlib.nullcontext()
    with ctx:
        assert outer_product_mean(m, mask, *ps).dtype == outer_product_mean_reference(m, mask, *ps).dtype


def test_chunking_does_not_change_the_result():
    m, mask = random_inputs((2,), 3, 9, 8, True)
    ps = random_params(8, 8, 8)
    out, grads, g = run(_outer_product_mean, m, mask, ps, chunk_rows=None)
    for rows in (1, 4):
        out_c, grads_c, _ = run(_outer_product_mean, m, mask, ps, None, g, chunk_rows=rows)
        check_fp32(out_c, out, f"out (chunk {rows})")
        for name, a, e in zip(GRAD_NAMES, grads_c, grads, strict=True):
            check_fp32(a, e, f"d{name} (chunk {rows})")


def test_two_batch_dims_non_contiguous_input_and_eps():
    m, mask = random_inputs((2, 1), 3, 5, 8, True)
    m = m.transpose(-2, -3).contiguous().transpose(-2, -3)  # same values, non-contiguous view
    ps = random_params(8, 8, 8)
    kw = dict(eps=0.5, ln_eps=1e-3)
    out, grads, g = run(outer_product_mean, m, mask, ps, **kw)
    out_r, grads_r, _ = run(outer_product_mean_reference, m, mask, ps, None, g, **kw)
    check_fp32(out, out_r, "out")
    for name, a, e in zip(GRAD_NAMES, grads, grads_r, strict=True):
        check_fp32(a, e, "d" + name)


def test_mask_none_equals_ones_and_empty_columns():
    m, _ = random_inputs((), 3, 5, 8, False)
    ps = random_params(8, 8, 8)
    ones = torch.ones(m.shape[:-1])
    assert torch.equal(outer_product_mean(m, None, *ps), outer_product_mean(m, ones, *ps))
    mask = ones.clone()
    mask[:, 2] = 0.0  # residue 2 in no sequence: its rows and columns are b_out / eps
    check_fp32(outer_product_mean(m, mask, *ps), outer_product_mean_reference(m, mask, *ps), "out")


# ---- the reference against OpenFold's own module (fp32, exact-ish) ----------------------------
def test_reference_matches_openfold_module():
    from openfold.model.outer_product_mean import OuterProductMean

    mod = randomize_parameters_(OuterProductMean(c_m=16, c_z=8, c_hidden=6), seed=9)
    m, mask = random_inputs((2,), 5, 7, 16, True)
    m.requires_grad_()
    params = [mod.layer_norm.weight, mod.layer_norm.bias, mod.linear_1.weight, mod.linear_1.bias,
              mod.linear_2.weight, mod.linear_2.bias, mod.linear_out.weight, mod.linear_out.bias]
    assert {id(p) for p in params} == {id(p) for p in mod.parameters()}
    g = torch.randn(2, 7, 7, 8, generator=torch.Generator().manual_seed(3))
    out_mod = mod(m, mask)
    grads_mod = torch.autograd.grad(out_mod, [m] + params, g)
    out_ref = outer_product_mean_reference(m, mask, *params, eps=mod.eps, ln_eps=mod.layer_norm.eps)
    grads_ref = torch.autograd.grad(out_ref, [m] + params, g)
    assert_close(out_ref, out_mod, rtol=1e-6, atol=1e-6, name="out")
    for name, a, e in zip(GRAD_NAMES, grads_ref, grads_mod, strict=True):
        assert_close(a, e, rtol=1e-6, atol=1e-6 * e.abs().max().item(), name="d" + name)


# ---- GPU: real sizes (c_m 256, c_hidden 32, c_z 128), CUDA autocast ----------------------------
GPU_CASES = [
    pytest.param(torch.float32, torch.float32, None, 1e-4, id="fp32"),
    pytest.param(torch.float32, torch.float32, torch.bfloat16, 2.0, id="bf16-autocast"),
    pytest.param(torch.bfloat16, torch.bfloat16, None, 2.0, id="bf16-model"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("n_seq,n_res", [(128, 37), (64, 128), (31, 257)], ids=str)
@pytest.mark.parametrize("x_dtype,p_dtype,ac,tol", GPU_CASES)
def test_gpu(n_seq, n_res, x_dtype, p_dtype, ac, tol, no_tf32):
    check_case((1,), n_seq, n_res, 256, 32, 128, True, None, x_dtype, p_dtype, ac, tol, device="cuda")


@pytest.mark.gpu
def test_gpu_chunked_matches_unchunked():
    m, mask = random_inputs((1,), 32, 96, 256, True, device="cuda")
    ps = random_params(256, 32, 128, device="cuda")
    out, grads, g = run(_outer_product_mean, m, mask, ps, torch.bfloat16, chunk_rows=None)
    out_c, grads_c, _ = run(_outer_product_mean, m, mask, ps, torch.bfloat16, g, chunk_rows=17)
    assert_close(out_c.float(), out.float(), rtol=1e-2, atol=1e-2 * out.abs().max().item(), name="out")
    for name, a, e in zip(GRAD_NAMES, grads_c, grads, strict=True):
        assert rel_err(a, e) < 1e-2, name


@pytest.mark.gpu
def test_gpu_n1024_bf16(no_tf32):
    """N_res 1024 (several outer-product chunks) under bf16 autocast; truth: fp32 reference."""
    check_case((1,), 128, 1024, 256, 32, 128, True, None, torch.float32, torch.float32, torch.bfloat16, 2.0,
               device="cuda", truth_dtype=torch.float32)


@pytest.mark.gpu
def test_gpu_carry_bf16(no_tf32):
    """carry at AF2 widths (N_seq 128, N_res 96, C_m 256, C 32, C_z 128) under bf16 autocast:
    out and the parameter gradients as the plain op's, dm the plain op's dm + the carried m's
    cotangent (added by ``_opm_proj_bwd_kernel``)."""
    m, mask = random_inputs((1,), 128, 96, 256, True, device="cuda")
    ps = random_params(256, 32, 128, device="cuda")
    out0, grads0, g = run(outer_product_mean, m, mask, ps, torch.bfloat16)
    leaves = [t.detach().clone().requires_grad_() for t in (m, *ps)]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, m2 = outer_product_mean(leaves[0], mask, *leaves[1:], carry=True)
    assert torch.equal(m2, m) and rel_err(out, out0) < 1e-6
    g_res = torch.randn(m.shape, generator=torch.Generator().manual_seed(9)).cuda()
    grads = torch.autograd.grad((out, m2), leaves, (g.to(out.dtype), g_res))
    assert rel_err(grads[0], grads0[0] + g_res) < 1e-5
    for name, a, e in zip(PARAM_NAMES, grads[1:], grads0[1:], strict=True):
        assert rel_err(a, e) < 1e-5, "d" + name


@pytest.mark.gpu
def test_gpu_reference_matches_openfold_under_autocast():
    from openfold.model.outer_product_mean import OuterProductMean

    mod = randomize_parameters_(OuterProductMean(256, 128, 32), seed=10).cuda()
    m, mask = random_inputs((1,), 16, 48, 256, True, device="cuda")
    params = [mod.layer_norm.weight, mod.layer_norm.bias, mod.linear_1.weight, mod.linear_1.bias,
              mod.linear_2.weight, mod.linear_2.bias, mod.linear_out.weight, mod.linear_out.bias]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_mod = mod(m, mask)
        out_ref = outer_product_mean_reference(m, mask, *params, eps=mod.eps)
    assert out_mod.dtype == out_ref.dtype and torch.equal(out_mod, out_ref)


# ---- pair rows from projected operands (DAP's outer product mean) -----------------------------
def _projected(m, mask, ps, ln_eps=1e-5):
    """a, b (masked projections) and the pair counts, as OpenFold forms them."""
    ln = torch.nn.functional.layer_norm(m, (m.shape[-1],), ps[0], ps[1], ln_eps)
    mk = torch.ones(m.shape[:-1]) if mask is None else mask
    a = torch.nn.functional.linear(ln, ps[2], ps[3]) * mk.unsqueeze(-1)
    b = torch.nn.functional.linear(ln, ps[4], ps[5]) * mk.unsqueeze(-1)
    return a, b, torch.einsum("...si,...sj->...ij", mk, mk)


@pytest.mark.parametrize("batch,n_seq,n_res,r0,rows,chunk", [
    ((), 3, 9, 0, 9, None), ((2,), 5, 11, 4, 5, 2), ((), 1, 6, 5, 1, None), ((), 4, 13, 3, 7, 3)])
def test_rows_match_the_whole_op(batch, n_seq, n_res, r0, rows, chunk):
    """Rows r0..r0+rows of the whole output, from a of those rows and b of every residue: the
    Triton rows op (inference) and its reference equal the whole-op reference (fp32)."""
    from fastfold_plugin.kernels.outer_product_mean import (
        outer_product_mean_rows,
        outer_product_mean_rows_reference,
    )

    m, mask = random_inputs(batch, n_seq, n_res, 16, True, seed=3)
    ps = random_params(16, 8, 12, seed=4)
    exp = outer_product_mean_reference(m, mask, *ps)[..., r0:r0 + rows, :, :]
    a, b, norm = _projected(m, mask, ps)
    a, norm = a[..., r0:r0 + rows, :], norm[..., r0:r0 + rows, :]
    with torch.no_grad():
        got = outer_product_mean_rows(a, b, norm, ps[6], ps[7], 1e-3, chunk)
    ref = outer_product_mean_rows_reference(a, b, norm, ps[6], ps[7], 1e-3, chunk)
    scale = exp.abs().max().item()
    assert_close(ref, exp, rtol=1e-5, atol=1e-6 * scale, name="rows reference")
    assert_close(got, exp, rtol=1e-4, atol=1e-5 * scale, max_rel=1e-5, name="rows triton")


@pytest.mark.parametrize("batch,n_seq,n_res,rows,chunk", [
    ((), 5, 11, 4, None), ((2,), 3, 7, 7, 2), ((), 1, 6, 1, None), ((), 4, 9, 5, 3)])
def test_rows_gradients_match_reference(batch, n_seq, n_res, rows, chunk):
    """fp32: the Triton rows op's output and its gradients for a, b, w_out and b_out equal the
    reference's (in chunks of rows too); norm gets no gradient."""
    from fastfold_plugin.kernels.outer_product_mean import (
        outer_product_mean_rows,
        outer_product_mean_rows_reference,
    )

    m, mask = random_inputs(batch, n_seq, n_res, 16, True, seed=11)
    ps = random_params(16, 8, 12, seed=12)
    a, b, norm = _projected(m, mask, ps)
    a, norm = a[..., :rows, :], norm[..., :rows, :]
    g = None
    res = []
    for op in (outer_product_mean_rows, outer_product_mean_rows_reference):
        leaves = [t.detach().clone().requires_grad_() for t in (a, b, ps[6], ps[7])]
        out = op(leaves[0], leaves[1], norm, leaves[2], leaves[3], 1e-3, chunk)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(13)) if g is None else g
        res.append([out.detach()] + list(torch.autograd.grad(out, leaves, g)))
    for name, got, exp in zip(("out", "da", "db", "dw_out", "db_out"), *res, strict=True):
        scale = exp.abs().max().item()
        assert_close(got, exp, rtol=1e-4, atol=1e-5 * scale, max_rel=1e-5, name=f"rows {name}")


def test_rows_bf16_and_gradients():
    """bf16 autocast: the rows op's output and gradients stay within twice the reference's
    error against an fp64 truth, each gradient in its input's dtype."""
    from fastfold_plugin.kernels.outer_product_mean import (
        outer_product_mean_rows,
        outer_product_mean_rows_reference,
    )

    m, mask = random_inputs((), 6, 10, 16, True, seed=5)
    ps = random_params(16, 8, 12, seed=6)
    a, b, norm = _projected(m, mask, ps)
    g = torch.randn(a.shape[:-3] + (a.shape[-2], b.shape[-2], 12),
                    generator=torch.Generator().manual_seed(7))
    res = {}
    for name, op, dt, ac in (("truth", outer_product_mean_rows_reference, torch.float64, False),
                             ("ref", outer_product_mean_rows_reference, torch.float32, True),
                             ("got", outer_product_mean_rows, torch.float32, True)):
        leaves = [t.detach().to(dt).requires_grad_() for t in (a, b, ps[6], ps[7])]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=ac):
            out = op(leaves[0], leaves[1], norm.to(dt), leaves[2], leaves[3])
        grads = torch.autograd.grad(out, leaves, g.to(out.dtype))
        assert all(gr.dtype == t.dtype for gr, t in zip(grads, leaves))
        res[name] = [out.detach()] + list(grads)
    assert res["got"][0].dtype == torch.bfloat16
    for i, name in enumerate(("out", "da", "db", "dw_out", "db_out")):
        e_got, e_ref = rel_err(res["got"][i], res["truth"][i]), rel_err(res["ref"][i], res["truth"][i])
        assert e_got <= 2.0 * e_ref + 1e-6, f"bf16 rows {name}: {e_got:.2e} vs reference {e_ref:.2e}"


def test_rows_inference_switch_and_errors():
    """The same numbers with and without gradients and whatever `inference` says (a checkpoint's
    first pass and its recompute agree); inference=True with a gradient needed, and weights or
    norm of the wrong shape, are errors."""
    from fastfold_plugin.kernels.outer_product_mean import outer_product_mean_rows

    m, mask = random_inputs((), 4, 6, 16, True, seed=7)
    ps = random_params(16, 8, 12, seed=8)
    a, b, norm = _projected(m, mask, ps)
    a = a.detach()
    with_grad = outer_product_mean_rows(a.clone().requires_grad_(), b, norm, ps[6], ps[7],
                                        inference=False)
    assert with_grad.grad_fn is not None
    with torch.no_grad():
        for flag in (None, False, True):
            assert torch.equal(outer_product_mean_rows(a, b, norm, ps[6], ps[7], inference=flag),
                               with_grad.detach())
        with pytest.raises(ValueError, match="w_out"):
            outer_product_mean_rows(a, b, norm, ps[6][:, :-1], ps[7])
        with pytest.raises(ValueError, match="norm"):
            outer_product_mean_rows(a, b, norm[:, :-1], ps[6], ps[7])
    with pytest.raises(ValueError, match="gradient is needed"):
        outer_product_mean_rows(a, b, norm, ps[6].requires_grad_(), ps[7], inference=True)


# ---- the projected operands alone (DAP: before b's all-gather) -------------------------------
@pytest.mark.parametrize("batch,n_seq,n_res,masked", [((), 5, 7, True), ((2,), 3, 4, False),
                                                       ((), 1, 1, True)])
def test_projections_match_reference(batch, n_seq, n_res, masked):
    """fp32: the fused projections (a, b) and the gradients of m and all six parameters equal
    the reference's (OpenFold's LayerNorm, Linears and mask)."""
    from fastfold_plugin.kernels.outer_product_mean import (
        outer_product_mean_projections,
        outer_product_mean_projections_reference,
    )

    m, mask = random_inputs(batch, n_seq, n_res, 16, masked, seed=21)
    ps = random_params(16, 8, 12, seed=22)[:6]
    gen = torch.Generator().manual_seed(23)
    ga, gb = (torch.randn(*m.shape[:-1], 8, generator=gen) for _ in range(2))
    res = []
    for op in (outer_product_mean_projections, outer_product_mean_projections_reference):
        leaves = [t.detach().clone().requires_grad_() for t in (m, *ps)]
        a, b = op(leaves[0], mask, *leaves[1:])
        res.append([a.detach(), b.detach()] + list(torch.autograd.grad((a, b), leaves, (ga, gb))))
    names = ("a", "b", "dm", "dln_w", "dln_b", "dw1", "db1", "dw2", "db2")
    for name, got, exp in zip(names, *res, strict=True):
        scale = exp.abs().max().item()
        assert_close(got, exp, rtol=1e-4, atol=1e-5 * scale + 1e-30, max_rel=1e-5,
                     name=f"projections {name}")


def test_projections_bf16_and_errors():
    """bf16 autocast: a and b come in bf16 and, with every gradient, stay within twice the
    reference's error against an fp64 truth; mismatched weights or mask are errors."""
    from fastfold_plugin.kernels.outer_product_mean import (
        outer_product_mean_projections,
        outer_product_mean_projections_reference,
    )

    m, mask = random_inputs((), 6, 9, 16, True, seed=24)
    ps = random_params(16, 8, 12, seed=25)[:6]
    gen = torch.Generator().manual_seed(26)
    ga, gb = (torch.randn(*m.shape[:-1], 8, generator=gen) for _ in range(2))
    res = {}
    for name, op, dt, ac in (("truth", outer_product_mean_projections_reference, torch.float64,
                              False),
                             ("ref", outer_product_mean_projections_reference, torch.float32, True),
                             ("got", outer_product_mean_projections, torch.float32, True)):
        leaves = [t.detach().to(dt).requires_grad_() for t in (m, *ps)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=ac):
            a, b = op(leaves[0], mask.to(dt), *leaves[1:])
        grads = torch.autograd.grad((a, b), leaves, (ga.to(a.dtype), gb.to(b.dtype)))
        res[name] = [a.detach(), b.detach()] + list(grads)
    assert res["got"][0].dtype == torch.bfloat16
    for i, t in enumerate(res["truth"]):
        e_got, e_ref = rel_err(res["got"][i], t), rel_err(res["ref"][i], t)
        assert e_got <= 2.0 * e_ref + 1e-6, f"bf16 projections output {i}: {e_got:.2e} vs {e_ref:.2e}"
    with pytest.raises(ValueError, match="weights"):
        outer_product_mean_projections(m, mask, ps[0], ps[1], ps[2][:, :-1], ps[3], ps[4], ps[5])
    with pytest.raises(ValueError, match="mask"):
        outer_product_mean_projections(m, mask[:, :-1], *ps)


# ---- carry: m handed back, its other reader's gradient added by the backward kernel ----------
# (m dtype, autocast dtype or None, tolerance of dm against the no-carry dm + g_res): in fp32 m
# the kernel adds g_res to the fp32 dm before its one store; a bf16 m rounds the sum once
# instead of twice.
CARRY_CASES = [
    pytest.param(torch.float32, None, 1e-5, id="fp32"),
    pytest.param(torch.float32, torch.bfloat16, 1e-5, id="bf16-autocast"),
    pytest.param(torch.bfloat16, None, 1e-2, id="bf16-model"),
]


def _res_grad(shape, layout, dtype):
    """A cotangent for the carried m of `shape` laid out as `layout` says."""
    gen = torch.Generator().manual_seed(31)
    if layout == "transposed":  # N_seq and N_res swapped in memory: read in place (two-level rows)
        return torch.randn(*shape[:-3], shape[-2], shape[-3], shape[-1],
                           generator=gen).to(dtype).transpose(-2, -3)
    if layout == "strided-channels":  # channel stride 2: read through a contiguous copy
        return torch.randn(*shape[:-1], 2 * shape[-1], generator=gen).to(dtype)[..., ::2]
    if layout == "broadcast":  # one row for all, as a sum's gradient: read with row stride 0
        return (torch.rand(shape[-1], generator=gen) + 0.5).to(dtype).expand(shape)
    return torch.randn(shape, generator=gen).to(dtype)


@pytest.mark.parametrize("res_layout", ["contiguous", "transposed", "strided-channels",
                                        "broadcast"])
@pytest.mark.parametrize("x_dtype,ac,tol", CARRY_CASES)
def test_carry_adds_the_residual_gradient(x_dtype, ac, tol, res_layout):
    """With carry the op returns (out, m2): out is the no-carry output, m2 equals m (its own
    tensor); dm with cotangents for both is the no-carry dm plus m2's cotangent (added by
    ``_opm_proj_bwd_kernel``, whatever that cotangent's strides), the parameter gradients are
    the no-carry ones; with a cotangent for out alone, the no-carry gradients; for m2 alone,
    dm is that cotangent and the parameters get none."""
    m, mask = random_inputs((), 3, 5, 16, True, x_dtype, seed=27)
    assert 0 < mask.sum() < mask.numel()
    ps = random_params(16, 4, 8, x_dtype, seed=28)
    ctx = torch.autocast("cpu", dtype=ac) if ac is not None else contextlib.nullcontext()
    out0, grads0, g = run(outer_product_mean, m, mask, ps, ac)
    leaves = [t.detach().clone().requires_grad_() for t in (m, *ps)]

    def carried():
        with ctx:
            return outer_product_mean(leaves[0], mask, *leaves[1:], carry=True)

    out, m2 = carried()
    assert torch.equal(out, out0) and torch.equal(m2, m) and m2 is not leaves[0]
    g_res = _res_grad(m.shape, res_layout, x_dtype)
    assert g_res.is_contiguous() == (res_layout == "contiguous") and g_res.abs().min() > 0
    grads = torch.autograd.grad((out, m2), leaves, (g.to(out.dtype), g_res))
    assert rel_err(grads[0], grads0[0] + g_res) < tol, "dm: " + describe_mismatch(grads[0], grads0[0] + g_res)
    assert rel_err(grads[0], grads0[0]) > 0.1  # the residual's gradient is not lost
    for name, a, e in zip(PARAM_NAMES, grads[1:], grads0[1:], strict=True):
        assert a.dtype == e.dtype and torch.equal(a, e), "d" + name
    # only out gets a gradient (m2 unused): the no-carry gradients
    out, m2 = carried()
    for name, a, e in zip(GRAD_NAMES, torch.autograd.grad(out, leaves, g.to(out.dtype)), grads0,
                          strict=True):
        assert torch.equal(a, e), "d" + name
    # only m2 gets a gradient: dm is its cotangent, the parameters get none
    out, m2 = carried()
    grads = torch.autograd.grad(m2, leaves, g_res, allow_unused=True)
    assert torch.equal(grads[0], g_res) and all(d is None for d in grads[1:])


def test_carry_reference_returns_m():
    m, mask = random_inputs((2,), 3, 5, 16, True)
    ps = random_params(16, 4, 8)
    out, m2 = outer_product_mean_reference(m, mask, *ps, carry=True)
    assert m2 is m and torch.equal(out, outer_product_mean_reference(m, mask, *ps))
