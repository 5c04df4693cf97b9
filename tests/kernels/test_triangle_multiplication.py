"""triangle_multiplication: Triton op vs reference (forward and all 17 gradients), the
reference vs OpenFold's TriangleMultiplicationOutgoing / Incoming modules, and the sharded op's
rectangular shards (P ranks emulated by threads of this process) vs the whole-tensor reference.
The sharded op on real process groups: tests/distributed/test_dap_trimul.py."""
import contextlib
import threading

import pytest
import torch

from fastfold_plugin.kernels import triangle_multiplication as trimul_module
from fastfold_plugin.kernels.triangle_multiplication import (
    TriMulWeights,
    triangle_multiplication,
    triangle_multiplication_reference,
    triangle_multiplication_sharded,
    triangle_multiplication_sharded_reference,
)
from fastfold_plugin.patches.forwards import tri_mul_weights as weights_of
from fastfold_plugin.testing import assert_close, randomize_parameters_, rel_err

GRAD_NAMES = ("z",) + TriMulWeights._fields

# Precision cases: (input dtype, parameter dtype, autocast dtype or None), and the tolerance.
# fp32: op vs reference elementwise (rtol; atol scaled by the tensor's max).  Low precision:
# the op's error against an fp64 truth must stay within `tol` x the reference's own error in
# that precision (the CPU interpreter rounds to nearest like a GPU: see _cast in the kernel).
CASES = [
    pytest.param(torch.float32, torch.float32, None, 1e-4, id="fp32"),
    pytest.param(torch.float32, torch.float32, torch.bfloat16, 2.0, id="bf16-autocast"),
    pytest.param(torch.float32, torch.float32, torch.float16, 2.0, id="fp16-autocast"),
    pytest.param(torch.bfloat16, torch.bfloat16, None, 2.0, id="bf16-model"),
]
LOW_PRECISION_CASES = CASES[1:]

# (batch dims, N_res, c_z, c_hidden, masked): N 1, odd sizes, non-power-of-two channels.
SHAPES = [
    pytest.param((), 1, 8, 8, True, id="N1"),
    pytest.param((2,), 5, 16, 8, True, id="B2-N5"),
    pytest.param((), 17, 12, 16, False, id="N17-nomask"),
]


def random_weights(c_z, c_hidden, dtype=torch.float32, device="cpu", seed=0):
    """Fresh TriMulWeights: unit-variance projections, LayerNorm scales near 1, small biases."""
    gen = torch.Generator().manual_seed(seed)

    def mat(o, i):
        return torch.randn(o, i, generator=gen) / i ** 0.5

    def vec(n, around=0.0):
        return around + 0.1 * torch.randn(n, generator=gen)

    w = TriMulWeights(
        ln_in_w=vec(c_z, 1.0), ln_in_b=vec(c_z),
        a_p_w=mat(c_hidden, c_z), a_p_b=vec(c_hidden), a_g_w=mat(c_hidden, c_z), a_g_b=vec(c_hidden),
        b_p_w=mat(c_hidden, c_z), b_p_b=vec(c_hidden), b_g_w=mat(c_hidden, c_z), b_g_b=vec(c_hidden),
        ln_out_w=vec(c_hidden, 1.0), ln_out_b=vec(c_hidden),
        z_w=mat(c_z, c_hidden), z_b=vec(c_z), g_w=mat(c_z, c_z), g_b=vec(c_z),
    )
    return TriMulWeights(*[t.to(device=device, dtype=dtype) for t in w])


def random_inputs(batch, n, c_z, masked, dtype=torch.float32, device="cpu", seed=1):
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(*batch, n, n, c_z, generator=gen) * 2.0 + 0.5).to(device=device, dtype=dtype)
    mask = None
    if masked:
        mask = (torch.rand(*batch, n, n, generator=gen) > 0.25).to(device=device, dtype=dtype)
    return z, mask


def run(fn, z, mask, w, outgoing, autocast_dtype=None, g=None):
    """(out, grads of z and the 16 weights) for upstream gradient g (drawn when None)."""
    leaves = [t.detach().clone().requires_grad_() for t in (z, *w)]
    ctx = (torch.autocast(z.device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    with ctx:
        out = fn(leaves[0], mask, TriMulWeights(*leaves[1:]), outgoing)
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


def compare_with_reference(out, grads, out_r, grads_r, z, mask, w, outgoing, g, x_dtype, ac, tol):
    """The op's output and gradients vs the reference's: elementwise in fp32; otherwise against
    an fp64 truth on the same (already rounded) inputs and weights, within `tol` x the
    reference's own error."""
    assert out.shape == z.shape and out.dtype == out_r.dtype
    if x_dtype == torch.float32 and ac is None:
        check_fp32(out, out_r, "out")
        for name, a, e in zip(GRAD_NAMES, grads, grads_r, strict=True):
            assert a.dtype == e.dtype, name
            check_fp32(a, e, "d" + name)
        return
    mask64 = None if mask is None else mask.double()
    out_t, grads_t, _ = run(triangle_multiplication_reference, z.double(), mask64,
                            TriMulWeights(*[t.double() for t in w]), outgoing, None, g.double())
    check_against_truth(out, out_r, out_t, tol, "out")
    for name, a, e, t in zip(GRAD_NAMES, grads, grads_r, grads_t, strict=True):
        check_against_truth(a, e, t, tol, "d" + name)


def check_case(batch, n, c_z, c_hidden, masked, outgoing, x_dtype, p_dtype, ac, tol, device="cpu"):
    z, mask = random_inputs(batch, n, c_z, masked, x_dtype, device)
    w = random_weights(c_z, c_hidden, p_dtype, device)
    out, grads, g = run(triangle_multiplication, z, mask, w, outgoing, ac)
    out_r, grads_r, _ = run(triangle_multiplication_reference, z, mask, w, outgoing, ac, g)
    compare_with_reference(out, grads, out_r, grads_r, z, mask, w, outgoing, g, x_dtype, ac, tol)


@pytest.mark.parametrize("outgoing", [True, False], ids=["outgoing", "incoming"])
@pytest.mark.parametrize("batch,n,c_z,c_hidden,masked", SHAPES)
def test_fp32_matches_reference(batch, n, c_z, c_hidden, masked, outgoing):
    check_case(batch, n, c_z, c_hidden, masked, outgoing, torch.float32, torch.float32, None, None)


@pytest.mark.parametrize("outgoing", [True, False], ids=["outgoing", "incoming"])
@pytest.mark.parametrize("batch,n", [((2,), 5), ((), 17)], ids=["B2-N5", "N17"])
@pytest.mark.parametrize("x_dtype,p_dtype,ac,tol", LOW_PRECISION_CASES)
def test_low_precision_within_reference_error(batch, n, x_dtype, p_dtype, ac, tol, outgoing):
    check_case(batch, n, 16, 16, True, outgoing, x_dtype, p_dtype, ac, tol)


@pytest.mark.parametrize("x_dtype,p_dtype,ac,tol", CASES)
def test_output_dtype_contract(x_dtype, p_dtype, ac, tol):
    z, mask = random_inputs((), 3, 8, True, x_dtype)
    w = random_weights(8, 8, p_dtype)
    ctx = torch.autocast("cpu", dtype=ac) if ac is not None else contextlib.nullcontext()
    with ctx:
        for outgoing in (True, False):
            assert (triangle_multiplication(z, mask, w, outgoing).dtype
                    == triangle_multiplication_reference(z, mask, w, outgoing).dtype)


def test_two_batch_dims_and_non_contiguous_input():
    """[B1, B2, N, N, C] with z a transposed (non-contiguous) view, as the Evoformer passes it."""
    z, mask = random_inputs((2, 1), 6, 8, True)
    z = z.transpose(-2, -3)
    mask = mask.transpose(-1, -2)
    w = random_weights(8, 16)
    for outgoing in (True, False):
        out, grads, g = run(triangle_multiplication, z, mask, w, outgoing)
        out_r, grads_r, _ = run(triangle_multiplication_reference, z, mask, w, outgoing, None, g)
        check_fp32(out, out_r, "out")
        for name, a, e in zip(GRAD_NAMES, grads, grads_r, strict=True):
            check_fp32(a, e, "d" + name)


def test_mask_none_equals_ones():
    z, _ = random_inputs((), 5, 8, False)
    w = random_weights(8, 8)
    ones = torch.ones(z.shape[:-1])
    for outgoing in (True, False):
        assert torch.equal(triangle_multiplication(z, None, w, outgoing),
                           triangle_multiplication(z, ones, w, outgoing))


def test_masked_rows_and_columns_do_not_contribute():
    """Zeroing the mask on residue 0 removes its contribution to every other pair's update."""
    z, _ = random_inputs((), 5, 8, False)
    w = random_weights(8, 8)
    mask = torch.ones(z.shape[:-1])
    mask[0, :] = 0.0
    mask[:, 0] = 0.0
    z2 = z.clone()
    z2[0, :] += 3.0 * torch.randn_like(z2[0, :])
    z2[:, 0] += 3.0 * torch.randn_like(z2[:, 0])
    for outgoing in (True, False):
        a = triangle_multiplication(z, mask, w, outgoing)[1:, 1:]
        b = triangle_multiplication(z2, mask, w, outgoing)[1:, 1:]
        assert_close(a, b, rtol=1e-5, atol=1e-6, name="pairs away from the masked residue")


def test_weights_are_read_at_every_call():
    """The concatenated projection is built per call: an in-place parameter update is seen."""
    z, mask = random_inputs((), 4, 8, True)
    w = random_weights(8, 8)
    before = triangle_multiplication(z, mask, w, True)
    with torch.no_grad():
        w.a_p_w.mul_(-2.0)
        w.g_w.add_(0.5)
    after = triangle_multiplication(z, mask, w, True)
    check_fp32(after, triangle_multiplication_reference(z, mask, w, True), "after update")
    assert rel_err(after, before) > 1e-2



def test_cached_plans_are_keyed_on_everything_they_fix():
    """Calls on one z shape that differ in one thing a cached plan (``_plan``) fixes, made in
    turn, each match the reference: the mask (present, absent, present), the direction, eps,
    the grad mode (a call without grad keeps no operands for a backward), the dtypes (z and
    the weights, autocast, a LayerNorm weight alone), TF32 switched on between forward and
    backward (the backward reads the dot precision again) and a batch dim that changes M
    but not N.  The repeats hit the cache."""
    z, mask = random_inputs((2,), 5, 8, True)
    w = random_weights(8, 16)
    hits = trimul_module._plan.cache_info().hits

    def check(z, mask, w, outgoing, eps=1e-5, ac=None, tol=None):
        def op(z, mask, w, outgoing):
            return triangle_multiplication(z, mask, w, outgoing, eps)

        def ref(z, mask, w, outgoing):
            return triangle_multiplication_reference(z, mask, w, outgoing, eps)
        out, grads, g = run(op, z, mask, w, outgoing, ac)
        out_r, grads_r, _ = run(ref, z, mask, w, outgoing, ac, g)
        if tol is None:
            check_fp32(out, out_r, "out")
            for name, a, e in zip(GRAD_NAMES, grads, grads_r, strict=True):
                check_fp32(a, e, "d" + name)
        else:
            compare_with_reference(out, grads, out_r, grads_r, z, mask, w, outgoing, g, z.dtype, ac, tol)

    for m in (mask, None, mask):
        check(z, m, w, True)
    check(z, mask, w, False)
    check(z, mask, w, True, eps=1e-3)
    with torch.no_grad():
        triangle_multiplication(z, mask, w, True)
    check(z, mask, w, True)
    check(z, mask, w, True, ac=torch.bfloat16, tol=2.0)
    check(z.bfloat16(), mask.bfloat16(), TriMulWeights(*[t.bfloat16() for t in w]), True, tol=2.0)
    w_ln = w._replace(ln_out_w=w.ln_out_w.bfloat16())
    check(z, mask, w_ln, True, ac=torch.bfloat16, tol=2.0)
    check(z[:1], mask[:1], w, True)
    assert trimul_module._plan.cache_info().hits > hits

    # the backward's dot precision is read when it runs (as torch's matmuls read it)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    seen = []
    launch = trimul_module._launch

    def spy(lnch, tensors):
        seen.append(lnch.kwargs["DOT_PREC"])
        return launch(lnch, tensors)
    try:
        trimul_module._launch = spy
        torch.backends.cuda.matmul.allow_tf32 = False
        out = triangle_multiplication(z.requires_grad_(), mask, w, True)
        torch.backends.cuda.matmul.allow_tf32 = True
        out.sum().backward()
    finally:
        trimul_module._launch = launch
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert seen == ["ieee", "ieee", "tf32", "tf32"]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 4e-3)], ids=["fp32", "bf16"])
def test_weight_grad_split_reduction(dtype, tol):
    """The weight-gradient GEMM splits its long reduction: slices plus a remainder."""
    from fastfold_plugin.kernels.triangle_multiplication import _weight_grad

    gen = torch.Generator().manual_seed(4)
    m = 3 * 4096 + 37
    dy, x = torch.randn(m, 24, generator=gen).to(dtype), torch.randn(m, 8, generator=gen).to(dtype)
    got = _weight_grad(dy, x)
    assert got.dtype == torch.float32
    assert rel_err(got, dy.double().t() @ x.double()) < tol


# ---- carry: z handed back, its gradient added to dz by the projection backward kernel ---------
def run_carry(fn, z, mask, w, outgoing, autocast_dtype, g_out, g_res):
    """`fn` with carry: (out, the carried z, z's leaf, grads of z and the 16 weights) for the
    cotangents g_out of out and g_res of the carried z (None: that output is not used; a
    gradient that does not arise is None)."""
    leaves = [t.detach().clone().requires_grad_() for t in (z, *w)]
    with _autocast(z.device.type, autocast_dtype):
        out, zc = fn(leaves[0], mask, TriMulWeights(*leaves[1:]), outgoing, carry=True)
    used = [(o, g.to(o.dtype)) for o, g in ((out, g_out), (zc, g_res)) if g is not None]
    grads = torch.autograd.grad([o for o, _ in used], leaves, [g for _, g in used],
                                allow_unused=True)
    return out, zc, leaves[0], grads


def carry_inputs(dtype=torch.float32, batch=()):
    """z, a mask with zeros, random weights (n 5, c_z 8, c_hidden 4) and the cotangents g_out,
    g_res (fp32; run_carry casts them)."""
    z, mask = random_inputs(batch, 5, 8, True, dtype)
    assert (mask == 0).any() and (mask == 1).any()
    w = random_weights(8, 4, dtype)
    gen = torch.Generator().manual_seed(9)
    return z, mask, w, torch.randn(z.shape, generator=gen), torch.randn(z.shape, generator=gen)


# (z and weight dtype, autocast dtype, tolerance of dz against the plain op's dz + g_res): z's
# dtype is dz's, so under autocast the kernel's fp32 add is the same add; a bf16 model's dz is
# rounded once (after the add) where the plain op's dz + g_res rounds twice.
CARRY_CASES = [
    pytest.param(torch.float32, None, 1e-5, id="fp32"),
    pytest.param(torch.float32, torch.bfloat16, 1e-5, id="bf16-autocast"),
    pytest.param(torch.bfloat16, None, 1e-2, id="bf16-model"),
]


@pytest.mark.parametrize("outgoing", [True, False], ids=["outgoing", "incoming"])
@pytest.mark.parametrize("dtype,ac,tol", CARRY_CASES)
def test_carry_adds_the_residual_gradient(dtype, ac, tol, outgoing):
    """With carry the op returns (out, z): out is the plain op's, bit for bit, and the carried
    z's gradient g_res reaches dz through the projection backward kernel: dz = the plain op's
    dz + g_res, the weight gradients the plain op's, bit for bit."""
    z, mask, w, g_out, g_res = carry_inputs(dtype)
    out, grads, _ = run(triangle_multiplication, z, mask, w, outgoing, ac, g_out)
    out_c, zc, z_leaf, grads_c = run_carry(triangle_multiplication, z, mask, w, outgoing, ac,
                                           g_out, g_res)
    assert torch.equal(out_c, out) and out_c.dtype == out.dtype
    assert torch.equal(zc, z_leaf) and zc.dtype == z.dtype
    expected = grads[0].float() + g_res.to(z.dtype).float()
    assert grads_c[0].dtype == z.dtype
    assert rel_err(grads_c[0], expected) < tol, f"dz: rel err {rel_err(grads_c[0], expected):.3e}"
    assert rel_err(grads[0], expected) > 0.1  # the residual gradient is not negligible here
    for name, a, e in zip(GRAD_NAMES[1:], grads_c[1:], grads[1:], strict=True):
        assert torch.equal(a, e), "d" + name
    if dtype == torch.float32 and ac is None:  # the reference with carry: autograd's add
        out_r, zc_r, z_r, grads_r = run_carry(triangle_multiplication_reference, z, mask, w,
                                              outgoing, None, g_out, g_res)
        assert torch.equal(zc_r, z_r)
        check_fp32(out_c, out_r, "out")
        for name, a, e in zip(GRAD_NAMES, grads_c, grads_r, strict=True):
            check_fp32(a, e, "d" + name)


@pytest.mark.parametrize("outgoing", [True, False], ids=["outgoing", "incoming"])
def test_carry_with_one_output_used(outgoing):
    """Only out has a gradient: the plain op's gradients, bit for bit.  Only the carried z has
    one: dz is g_res itself and the weights get none.  Without grad: (out, z) all the same."""
    z, mask, w, g_out, g_res = carry_inputs(batch=(2,))
    out, grads, _ = run(triangle_multiplication, z, mask, w, outgoing, None, g_out)
    _, _, _, grads_c = run_carry(triangle_multiplication, z, mask, w, outgoing, None, g_out, None)
    for name, a, e in zip(GRAD_NAMES, grads_c, grads, strict=True):
        assert torch.equal(a, e), "d" + name
    _, _, _, grads_c = run_carry(triangle_multiplication, z, mask, w, outgoing, None, None, g_res)
    assert torch.equal(grads_c[0], g_res)
    assert all(gr is None for gr in grads_c[1:])
    with torch.no_grad():
        out_c, zc = triangle_multiplication(z, mask, w, outgoing, carry=True)
    assert torch.equal(out_c, out) and torch.equal(zc, z)


def _strided_residual_gradient(kind, shape):
    """A cotangent of `shape` [*, N, N, C] that is not contiguous [M, C] rows."""
    gen = torch.Generator().manual_seed(11)
    if kind == "transposed":  # rows that do not collapse to one stride
        return torch.randn(shape[:-3] + (shape[-2], shape[-3], shape[-1]),
                           generator=gen).transpose(-2, -3)
    if kind == "channel-slice":  # unit column stride, row stride 2 C
        return torch.randn(shape[:-1] + (2 * shape[-1],), generator=gen)[..., :shape[-1]]
    return torch.randn(shape[-1], generator=gen).expand(shape)  # broadcast: row stride 0


@pytest.mark.parametrize("outgoing", [True, False], ids=["outgoing", "incoming"])
@pytest.mark.parametrize("kind", ["transposed", "channel-slice", "broadcast"])
def test_carry_non_contiguous_residual_gradient(kind, outgoing):
    """A carried z's gradient with any strides: dz = the plain op's dz + g_res."""
    z, mask, w, g_out, _ = carry_inputs(batch=(2,))
    g_res = _strided_residual_gradient(kind, z.shape)
    assert not g_res.is_contiguous()
    _, grads, _ = run(triangle_multiplication, z, mask, w, outgoing, None, g_out)
    _, _, _, grads_c = run_carry(triangle_multiplication, z, mask, w, outgoing, None, g_out, g_res)
    expected = grads[0] + g_res
    assert rel_err(grads_c[0], expected) < 1e-5, f"dz: rel err {rel_err(grads_c[0], expected):.3e}"
    assert rel_err(grads[0], expected) > 0.1


def test_carry_and_plain_backward_launches_in_one_process():
    """The plain and the carry backward on one cached plan, in turn: each its own projection
    backward launch (HAS_RES off / on), kept and reused, each giving its own right dz."""
    z, mask, w, g_out, g_res = carry_inputs()
    seen = []
    launch = trimul_module._launch

    def spy(lnch, tensors):
        if lnch.kernel is trimul_module._trimul_proj_bwd_kernel:
            seen.append((id(lnch), lnch.kwargs["HAS_RES"]))
        return launch(lnch, tensors)
    try:
        trimul_module._launch = spy
        dzs = []
        for carry in (False, True, False, True):
            if carry:
                dzs.append(run_carry(triangle_multiplication, z, mask, w, True, None, g_out,
                                     g_res)[3][0])
            else:
                dzs.append(run(triangle_multiplication, z, mask, w, True, None, g_out)[1][0])
    finally:
        trimul_module._launch = launch
    assert [has_res for _, has_res in seen] == [False, True, False, True]
    ids = [i for i, _ in seen]
    assert ids[0] == ids[2] and ids[1] == ids[3] and ids[0] != ids[1]
    assert torch.equal(dzs[0], dzs[2]) and torch.equal(dzs[1], dzs[3])
    assert rel_err(dzs[1], dzs[0] + g_res) < 1e-5


# ---- the sharded op: rectangular shards, P ranks emulated in this process ---------------------
class _Shared:
    def __init__(self, p):
        self.barrier = threading.Barrier(p, timeout=120)
        self.slots = [None] * p


class _Done:
    def wait(self):
        pass


class _ThreadComm:
    """The sharded Function's collectives (``_DistComm``'s interface) between P threads: rank q's
    block is rows [q R, (q+1) R) of the dim-0 concatenation; the sum runs in rank order."""

    def __init__(self, shared, rank, size):
        self.shared, self.rank, self.size = shared, rank, size

    def _exchange(self, t):
        self.shared.slots[self.rank] = t.clone()
        self.shared.barrier.wait()
        slots = list(self.shared.slots)
        self.shared.barrier.wait()  # everyone has read the slots before they are reused
        return slots

    def all_gather(self, full, local, async_op):
        full.copy_(torch.cat(self._exchange(local)))
        return _Done()

    def all_to_all(self, recv, send, async_op):
        recv.copy_(torch.stack([s[self.rank] for s in self._exchange(send)]))
        return _Done()

    def reduce_scatter(self, local, full, async_op):
        r = local.shape[0]
        blocks = [s[self.rank * r:(self.rank + 1) * r] for s in self._exchange(full)]
        total = blocks[0].clone()
        for b in blocks[1:]:
            total += b
        local.copy_(total)
        return _Done()


def _pad_like_dap(z, mask, p):
    """z and the mask padded to a multiple of P as DAP pads them (padded pairs: random z, mask
    0): (z, mask, rows per rank, padding)."""
    n = z.shape[-2]
    r = -(-n // p)
    pad = p * r - n
    zp = torch.nn.functional.pad(z, (0, 0, 0, pad, 0, pad))
    if pad:  # padded pairs hold garbage: the mask must keep it out
        zp[..., n:, :, :] = torch.randn_like(zp[..., n:, :, :])
        zp[..., :, n:, :] = torch.randn_like(zp[..., :, n:, :])
    mp = torch.nn.functional.pad(mask, (0, pad, 0, pad)) if mask is not None else None
    return zp, mp, r, pad


def _on_emulated_ranks(p, rank_main):
    """rank_main(q, comm) on P threads, one per emulated rank (interpreter launches serialised:
    it is not thread-safe): the list of their results; the first error is raised."""
    shared, results, errors = _Shared(p), [None] * p, []
    launch_lock = threading.Lock()
    launch = trimul_module._launch

    def locked_launch(*a, **k):
        with launch_lock:
            return launch(*a, **k)

    def run(q):
        try:
            results[q] = rank_main(q, _ThreadComm(shared, q, p))
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)
            shared.barrier.abort()

    trimul_module._launch = locked_launch
    try:
        threads = [threading.Thread(target=run, args=(q,)) for q in range(p)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        trimul_module._launch = launch
    if errors:
        raise errors[0]
    return results


def _autocast(device_type, dtype):
    """Autocast to `dtype` (None: off). Autocast is per thread: each emulated rank enters it."""
    return (torch.autocast(device_type, dtype=dtype) if dtype is not None
            else contextlib.nullcontext())


def run_emulated_ranks(p, z, mask, w, outgoing, autocast_dtype, g, overlap=True, grad=True):
    """The sharded Function on P threads (one per emulated rank) on z [*, N, N, C_z] padded to a
    multiple of P (padding: random z, mask 0, zero upstream gradient, as DAP pads): the whole
    output and dz (unpadded) and the weight gradients summed over ranks.  `grad` False: the
    inference forward (the Function told that nothing needs a gradient); returns (output, ())."""
    n = z.shape[-2]
    zp, mp, r, pad = _pad_like_dap(z, mask, p)
    gp = torch.nn.functional.pad(g, (0, 0, 0, pad, 0, pad))
    dim = -3 if outgoing else -2

    def shard(t, d, q):
        return None if t is None else t.narrow(d, q * r, r).contiguous()

    def rank_main(q, comm):
        leaves = [shard(zp, dim, q).requires_grad_()] + [t.detach().clone().requires_grad_() for t in w]
        with _autocast(z.device.type, autocast_dtype):
            out = trimul_module._TriMulShardedFn.apply(
                leaves[0], shard(mp, dim + 1, q), outgoing, 1e-5, comm, overlap, grad,
                *leaves[1:])
        if not grad:
            return out, ()
        gq = shard(gp, dim, q).to(out.dtype)
        return out.detach(), torch.autograd.grad(out, leaves, gq)

    results = _on_emulated_ranks(p, rank_main)
    out = torch.cat([res[0] for res in results], dim)[..., :n, :n, :]
    if not grad:
        return out, ()
    dz = torch.cat([res[1][0] for res in results], dim)[..., :n, :n, :]
    dws = [sum(res[1][i] for res in results[1:]) + results[0][1][i] if p > 1 else results[0][1][i]
           for i in range(1, len(w) + 1)]
    return out, (dz, *dws)


def check_sharded_case(p, batch, n, c_z, c_hidden, masked, outgoing, x_dtype, p_dtype, ac, tol,
                       overlap=True):
    z, mask = random_inputs(batch, n, c_z, masked, x_dtype)
    w = random_weights(c_z, c_hidden, p_dtype)
    out_r, grads_r, g = run(triangle_multiplication_reference, z, mask, w, outgoing, ac)
    out, grads = run_emulated_ranks(p, z, mask, w, outgoing, ac, g, overlap)
    compare_with_reference(out, grads, out_r, grads_r, z, mask, w, outgoing, g, x_dtype, ac, tol)


# (P, batch dims, N_res, c_z, c_hidden, masked): N_res not a multiple of P (padded), N_res 1 on
# 3 ranks (two hold only padding), P = 1 through the sharded Function (square shard).
SHARDED_SHAPES = [
    pytest.param(2, (), 7, 8, 8, True, id="P2-N7"),
    pytest.param(3, (2,), 5, 12, 16, True, id="P3-B2-N5"),
    pytest.param(3, (), 1, 8, 8, True, id="P3-N1"),
    pytest.param(2, (), 6, 8, 16, False, id="P2-N6-nomask"),
    pytest.param(1, (), 5, 8, 8, True, id="P1-N5"),
]


@pytest.mark.parametrize("outgoing", [True, False], ids=["outgoing", "incoming"])
@pytest.mark.parametrize("p,batch,n,c_z,c_hidden,masked", SHARDED_SHAPES)
def test_sharded_fp32_matches_reference(p, batch, n, c_z, c_hidden, masked, outgoing):
    check_sharded_case(p, batch, n, c_z, c_hidden, masked, outgoing, torch.float32, torch.float32,
                       None, None)


@pytest.mark.parametrize("outgoing", [True, False], ids=["outgoing", "incoming"])
@pytest.mark.parametrize("x_dtype,p_dtype,ac,tol", LOW_PRECISION_CASES)
def test_sharded_low_precision_within_reference_error(x_dtype, p_dtype, ac, tol, outgoing):
    check_sharded_case(3, (2,), 7, 16, 16, True, outgoing, x_dtype, p_dtype, ac, tol)


@pytest.mark.parametrize("outgoing", [True, False], ids=["outgoing", "incoming"])
def test_sharded_without_overlap_is_bit_identical(outgoing):
    z, mask = random_inputs((), 5, 8, True)
    w = random_weights(8, 8)
    g = torch.randn(z.shape, generator=torch.Generator().manual_seed(5))
    on = run_emulated_ranks(2, z, mask, w, outgoing, None, g, overlap=True)
    off = run_emulated_ranks(2, z, mask, w, outgoing, None, g, overlap=False)
    assert torch.equal(on[0], off[0])
    for a, b in zip(on[1], off[1], strict=True):
        assert torch.equal(a, b)


def run_emulated_rows_incoming(p, z, mask, w, overlap=True, autocast_dtype=None):
    """The incoming update's forward on row shards (``_sharded_inference_rows``) on P threads,
    z padded to a multiple of P as DAP pads (garbage z, mask 0): the whole output, unpadded."""
    n = z.shape[-2]
    zp, mp, r, _ = _pad_like_dap(z, mask, p)

    def rank_main(q, comm):
        with torch.no_grad(), _autocast(z.device.type, autocast_dtype):
            return trimul_module._sharded_inference_rows(
                zp.narrow(-3, q * r, r).contiguous(), mp.narrow(-2, q * r, r), w, 1e-5, comm,
                overlap)

    return torch.cat(_on_emulated_ranks(p, rank_main), -3)[..., :n, :n, :]


@pytest.mark.parametrize("chunk_channels", [1, 3, 100], ids=["chunk1", "chunk3", "whole"])
@pytest.mark.parametrize("path", ["outgoing", "incoming", "incoming-rows"])
@pytest.mark.parametrize("p,batch,n", [(2, (), 7), (3, (2,), 5), (3, (), 1)],
                         ids=["P2-N7", "P3-B2-N5", "P3-N1"])
def test_sharded_inference_chunks_match_reference(p, batch, n, path, chunk_channels, monkeypatch):
    """Inference: the contracted operand all-gathered in channel chunks (1 and 3 channels: a
    last partial chunk, more chunks than the two buffers; and whole) equals the reference,
    overlap on and off bit for bit; with a batch dim the chunks cut across batch entries; N_res 1
    on 3 ranks leaves two ranks only padding. "incoming-rows": the incoming update on row shards
    (a's columns by an all-to-all, b gathered, the contraction over every rank's rows at once)."""
    c_z, c_h = 8, 8
    z, mask = random_inputs(batch, n, c_z, True)
    w = random_weights(c_z, c_h)
    r = -(-n // p)
    monkeypatch.setattr(trimul_module, "_GATHER_CHUNK_BYTES", chunk_channels * p * r * p * r * 4)
    outgoing = path == "outgoing"
    exp = triangle_multiplication_reference(z, mask, w, outgoing)
    if path == "incoming-rows":
        on = run_emulated_rows_incoming(p, z, mask, w, overlap=True)
        off = run_emulated_rows_incoming(p, z, mask, w, overlap=False)
    else:
        g = torch.zeros_like(z)  # no backward runs
        with torch.no_grad():
            on, _ = run_emulated_ranks(p, z, mask, w, outgoing, None, g, overlap=True, grad=False)
            off, _ = run_emulated_ranks(p, z, mask, w, outgoing, None, g, overlap=False, grad=False)
    check_fp32(on, exp, f"{path} inference out")
    assert torch.equal(on, off)


@pytest.mark.parametrize("x_dtype,p_dtype,ac,tol", LOW_PRECISION_CASES)
def test_incoming_on_row_shards_low_precision(x_dtype, p_dtype, ac, tol):
    """bf16 / fp16 autocast and a bf16 model: the row-shard incoming forward's error against an
    fp64 truth stays within `tol` x the reference's own error in that precision."""
    z, mask = random_inputs((2,), 7, 16, True, x_dtype)
    w = random_weights(16, 16, p_dtype)
    truth = triangle_multiplication_reference(
        z.double(), mask.double(), TriMulWeights(*[t.double() for t in w]), False)
    ctx = torch.autocast("cpu", dtype=ac) if ac is not None else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        ref = triangle_multiplication_reference(z, mask, w, False)
    got = run_emulated_rows_incoming(3, z, mask, w, autocast_dtype=ac)
    check_against_truth(got, ref, truth, tol, "incoming on rows out")


def test_inference_is_decided_at_the_call_site():
    """ctx.needs_input_grad says True for Parameters even under torch.no_grad, so the ops decide
    before entering their Function: no_grad (or nothing requiring grad) -> the inference path."""
    z, _ = random_inputs((), 6, 8, True)
    w = TriMulWeights(*[torch.nn.Parameter(t) for t in random_weights(8, 8)])
    assert trimul_module._needs_grad(z, w)
    with torch.no_grad():
        assert not trimul_module._needs_grad(z, w)
    assert not trimul_module._needs_grad(z, TriMulWeights(*[t.detach() for t in w]))
    # the sharded op's explicit choice: a checkpoint's gradient-free first pass asks for the
    # training forward (False), so that its recompute computes the same numbers
    training = trimul_module._training
    assert training(z, w, None) and training(z, w, False)
    with pytest.raises(ValueError, match="gradient is needed"):
        training(z, w, True)
    with torch.no_grad():
        assert not training(z, w, None) and not training(z, w, True)
        assert training(z, w, False)


@pytest.mark.parametrize("outgoing", [True, False], ids=["outgoing", "incoming"])
def test_sharded_group_of_one_is_the_whole_op(outgoing):
    z, mask = random_inputs((2,), 5, 8, True)
    w = random_weights(8, 8)
    assert torch.equal(triangle_multiplication_sharded(z, mask, w, outgoing, group=None),
                       triangle_multiplication(z, mask, w, outgoing))
    assert torch.equal(triangle_multiplication_sharded_reference(z, mask, w, outgoing, group=None),
                       triangle_multiplication_reference(z, mask, w, outgoing))


@pytest.mark.parametrize("outgoing", [True, False], ids=["outgoing", "incoming"])
def test_64bit_offsets_give_the_same_results(outgoing, monkeypatch):
    """The I64 variants (offsets past 2**31 at large N_res) compute what the 32-bit ones do,
    whole-tensor and sharded (the gathered layout's and the transposed grid's offsets)."""
    z, mask = random_inputs((2,), 5, 8, True)
    w = random_weights(8, 8)
    g = torch.randn(z.shape, generator=torch.Generator().manual_seed(6))
    runs = []
    for wide in (False, True):
        monkeypatch.setattr(trimul_module, "_needs_i64", lambda *a, wide=wide: wide)
        runs.append((run(triangle_multiplication, z, mask, w, outgoing, None, g)[:2],
                     run_emulated_ranks(2, z, mask, w, outgoing, None, g)))
    (whole32, shard32), (whole64, shard64) = runs
    for a, b in zip([whole32[0], *whole32[1], shard32[0], *shard32[1]],
                    [whole64[0], *whole64[1], shard64[0], *shard64[1]], strict=True):
        assert torch.equal(a, b)


def test_sharded_rejects_a_shape_that_is_not_a_shard():
    z, mask = random_inputs((), 4, 8, True)
    w = random_weights(8, 8)
    with pytest.raises(ValueError, match="pad N_res"):
        trimul_module._check_shard("op", z[:3], w, True, 2)
    with pytest.raises(ValueError, match="pad N_res"):
        trimul_module._check_shard("op", z, w, False, 2)
    trimul_module._check_shard("op", z[:2], w, True, 2)
    trimul_module._check_shard("op", z[:, :2], w, False, 2)


# ---- the reference against OpenFold's own modules (fp32, exact-ish) ---------------------------
@pytest.mark.parametrize("outgoing", [True, False], ids=["outgoing", "incoming"])
def test_reference_matches_openfold_module(outgoing):
    from openfold.model.triangular_multiplicative_update import (
        TriangleMultiplicationIncoming,
        TriangleMultiplicationOutgoing,
    )

    cls = TriangleMultiplicationOutgoing if outgoing else TriangleMultiplicationIncoming
    mod = randomize_parameters_(cls(12, 16), seed=7)
    z, mask = random_inputs((2,), 9, 12, True)
    z.requires_grad_()
    params = list(mod.parameters())
    g = torch.randn(z.shape, generator=torch.Generator().manual_seed(3))
    out_mod = mod(z, mask)
    grads_mod = torch.autograd.grad(out_mod, [z] + params, g)
    out_ref = triangle_multiplication_reference(z, mask, weights_of(mod), outgoing, mod.layer_norm_in.eps)
    grads_ref = torch.autograd.grad(out_ref, [z] + params, g)
    assert_close(out_ref, out_mod, rtol=1e-6, atol=1e-6, name="out")
    names = ["z"] + [n for n, _ in mod.named_parameters()]
    for name, a, e in zip(names, grads_ref, grads_mod, strict=True):
        assert_close(a, e, rtol=1e-6, atol=1e-6 * e.abs().max().item(), name="d" + name)


def test_weights_of_covers_every_parameter():
    from openfold.model.triangular_multiplicative_update import TriangleMultiplicationOutgoing

    mod = TriangleMultiplicationOutgoing(8, 4)
    assert {id(p) for p in weights_of(mod)} == {id(p) for p in mod.parameters()}


# ---- GPU: real sizes, CUDA autocast ------------------------------------------------------------
GPU_CASES = [
    pytest.param(torch.float32, torch.float32, None, 1e-4, id="fp32"),
    pytest.param(torch.float32, torch.float32, torch.bfloat16, 2.0, id="bf16-autocast"),
    pytest.param(torch.float32, torch.float32, torch.float16, 2.0, id="fp16-autocast"),
    pytest.param(torch.bfloat16, torch.bfloat16, None, 2.0, id="bf16-model"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("outgoing", [True, False], ids=["outgoing", "incoming"])
@pytest.mark.parametrize("n", [37, 128, 257])
@pytest.mark.parametrize("x_dtype,p_dtype,ac,tol", GPU_CASES)
def test_gpu(n, x_dtype, p_dtype, ac, tol, outgoing, no_tf32):
    check_case((1,), n, 128, 128, True, outgoing, x_dtype, p_dtype, ac, tol, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("outgoing", [True, False], ids=["outgoing", "incoming"])
def test_gpu_n1024_bf16(outgoing, no_tf32):
    """AF2's long-crop size under bf16 autocast; truth is the fp32 (IEEE) reference."""
    z, mask = random_inputs((1,), 1024, 128, True, device="cuda")
    w = random_weights(128, 128, device="cuda")
    out, grads, g = run(triangle_multiplication, z, mask, w, outgoing, torch.bfloat16)
    out_r, grads_r, _ = run(triangle_multiplication_reference, z, mask, w, outgoing, torch.bfloat16, g)
    out_t, grads_t, _ = run(triangle_multiplication_reference, z, mask, w, outgoing, None, g.float())
    check_against_truth(out, out_r, out_t, 2.0, "out")
    for name, a, e, t in zip(GRAD_NAMES, grads, grads_r, grads_t, strict=True):
        check_against_truth(a, e, t, 2.0, "d" + name)


@pytest.mark.gpu
@pytest.mark.parametrize("outgoing", [True, False], ids=["outgoing", "incoming"])
def test_gpu_carry_n256_bf16(outgoing, no_tf32):
    """carry at AF2 widths (N_res 256, C_z = C_h = 128) under bf16 autocast: out and the weight
    gradients as the plain op's, dz the plain op's dz + the carried z's cotangent."""
    z, mask = random_inputs((1,), 256, 128, True, device="cuda")
    w = random_weights(128, 128, device="cuda")
    g_out = torch.randn(z.shape, generator=torch.Generator().manual_seed(5)).cuda()
    g_res = torch.randn(z.shape, generator=torch.Generator().manual_seed(6)).cuda()
    out, grads, _ = run(triangle_multiplication, z, mask, w, outgoing, torch.bfloat16, g_out)
    out_c, zc, z_leaf, grads_c = run_carry(triangle_multiplication, z, mask, w, outgoing,
                                           torch.bfloat16, g_out, g_res)
    assert torch.equal(zc, z_leaf)
    assert rel_err(out_c, out) < 1e-6
    assert rel_err(grads_c[0], grads[0] + g_res) < 1e-5
    for name, a, e in zip(GRAD_NAMES[1:], grads_c[1:], grads[1:], strict=True):
        assert rel_err(a, e) < 1e-5, "d" + name


@pytest.mark.gpu
def test_gpu_reference_matches_openfold_under_autocast():
    from openfold.model.triangular_multiplicative_update import TriangleMultiplicationOutgoing

    mod = randomize_parameters_(TriangleMultiplicationOutgoing(128, 128), seed=8).cuda()
    z, mask = random_inputs((1,), 64, 128, True, device="cuda")
    for ac in (torch.bfloat16, torch.float16):
        with torch.autocast("cuda", dtype=ac):
            out_mod = mod(z, mask)
            out_ref = triangle_multiplication_reference(z, mask, weights_of(mod), True)
        assert out_mod.dtype == out_ref.dtype and torch.equal(out_mod, out_ref), ac


def test_sharded_collective_failure_raises_the_callers_error_type():
    """A failed collective inside the sharded op raises the type the caller passes (the DAP
    layer: DAPCommError), naming the collective, the group size and the rank."""
    from fastfold_plugin.distributed import DAPCommError
    from fastfold_plugin.kernels.triangle_multiplication import _DistComm

    def broken():
        raise RuntimeError("connection closed by peer")

    comm = _DistComm(None, DAPCommError)
    with pytest.raises(DAPCommError, match="reduce-scatter on a group of 1 processes failed on "
                                           "group rank 0: connection closed by peer"):
        comm.guard("reduce-scatter", broken)
