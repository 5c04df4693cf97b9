"""kernels/linear.py: a Linear whose bias gradient is the column-sum kernel's, against
``F.linear`` (the reference): the forward bit for bit, dx and dW as autograd forms them, the bias
gradient as the same fp32 sum in another order."""
import pytest
import torch
import torch.nn.functional as F

from fastfold_plugin.kernels import get_ops
from fastfold_plugin.kernels import linear as lin


def _case(lead, c_in, c_out, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, c_in, generator=g)
    w = torch.randn(c_out, c_in, generator=g) / c_in ** 0.5
    b = torch.randn(c_out, generator=g)
    dout = torch.randn(*lead, c_out, generator=g)
    return x, w, b, dout


def _run(backend, x0, w0, b0, dout, autocast_dtype):
    x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
    h = x * 1.0  # not a leaf (an activation)
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16,
                        enabled=autocast_dtype is not None):
        out = get_ops(backend).linear(h, w, b)
    out.backward(dout.to(out.dtype))
    return out.detach(), x.grad, w.grad, b.grad


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16-autocast", "fp16-autocast"])
@pytest.mark.parametrize("lead,c_in,c_out", [((3, 37), 24, 16), ((2, 5, 7), 8, 200), ((1,), 4, 3),
                                             ((2, 2100), 8, 5)],
                         ids=["rows-111", "batch-wide-out", "one-row", "several-tiles-a-program"])
def test_matches_reference(autocast_dtype, lead, c_in, c_out):
    x, w, b, dout = _case(lead, c_in, c_out, seed=c_out)
    ref = _run("reference", x, w, b, dout, autocast_dtype)
    got = _run("triton", x, w, b, dout, autocast_dtype)
    assert torch.equal(got[0], ref[0]) and got[0].dtype == ref[0].dtype  # the same F.linear
    for name, a, e in zip(("dx", "dW"), got[1:3], ref[1:3]):
        assert a.dtype == e.dtype == torch.float32, name
        torch.testing.assert_close(a, e, rtol=0, atol=0, msg=name)  # autograd's own GEMMs
    assert got[3].dtype == torch.float32
    if autocast_dtype is None:  # fp32 sums of the same terms in another order
        torch.testing.assert_close(got[3], ref[3], rtol=1e-5, atol=1e-5, msg="db")
    else:  # each an fp32 sum rounded once to the autocast dtype: at most one step apart
        step = 2.0 ** (-7 if autocast_dtype == torch.bfloat16 else -10)
        assert ((got[3] - ref[3]).abs() <= ref[3].abs() * step + 1e-6).all(), (got[3], ref[3])


@pytest.mark.parametrize("frozen", ["x", "weight", "none"])
@pytest.mark.parametrize("layout", ["transposed", "contiguous"])
def test_strided_input_and_frozen_operands(frozen, layout):
    """A transposed input (as OpenFold's column attention projects m transposed), and x or the
    weight without a gradient: the same values and gradients as F.linear, and only the tensors
    the backward reads are saved (as autograd's addmm)."""
    x0, w0, b0, dout = _case((6, 5), 12, 7, seed=11)
    x = x0.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(frozen != "x")
    if layout == "contiguous":
        x = x.detach().contiguous().requires_grad_(frozen != "x")
    w = w0.clone().requires_grad_(frozen != "weight")
    b = b0.clone().requires_grad_()
    saved = []

    def pack(t):
        saved.append(t.shape)
        return t

    def run(fn):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn(x * 1.0 if frozen != "x" else x, w, b)
        grads = torch.autograd.grad(out, [t for t in (x, w, b) if t.requires_grad], dout)
        return out, grads

    out_r, grads_r = run(F.linear)
    n_ref = len(saved)
    saved.clear()
    out_t, grads_t = run(lin.linear)
    assert torch.equal(out_t, out_r)
    for a, e in zip(grads_t, grads_r):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    assert len(saved) == n_ref, (saved, n_ref)


@pytest.mark.parametrize("reentrant", [True, False])
def test_under_activation_checkpointing(reentrant):
    from torch.utils.checkpoint import checkpoint

    x0, w0, b0, dout = _case((4, 9), 6, 5, seed=12)

    def grads(fn, ckpt):
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = (checkpoint(fn, x * 1.0, w, b, use_reentrant=reentrant) if ckpt
                   else fn(x * 1.0, w, b))
        out.backward(dout.to(out.dtype))
        return [out.detach(), x.grad, w.grad, b.grad]

    for a, e in zip(grads(lin.linear, True), grads(lin.linear, False)):
        assert torch.equal(a, e)


def test_column_sum_is_an_fp32_sum_rounded_once():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(5000, 70, generator=g).to(torch.bfloat16)  # several programs, partial tiles
    got = lin.column_sum(t, torch.bfloat16)
    exact = t.double().sum(0)
    assert got.dtype == torch.bfloat16
    # within one bf16 rounding of the exact sum (an fp32 sum of 5000 terms is far closer)
    assert ((got.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-6).all()
    assert torch.equal(lin.column_sum(t[:0], torch.float32), torch.zeros(70))


def test_no_grad_and_no_bias_are_plain_linear(monkeypatch):
    calls = []
    monkeypatch.setattr(lin._LinearFn, "apply", lambda *a: calls.append(a) or F.linear(*a))
    x, w, b, _ = _case((4,), 6, 5, seed=0)
    with torch.no_grad():
        assert torch.equal(lin.linear(x, w.requires_grad_(), b), F.linear(x, w, b))
    assert torch.equal(lin.linear(x, w, None), F.linear(x, w))
    assert not calls
    lin.linear(x, w, b)  # the bias needs no gradient: nothing to fuse
    assert not calls
    lin.linear(x, w, b.requires_grad_())
    assert len(calls) == 1


@pytest.mark.parametrize("m", [1, 48, 40, 37, 2100])
def test_capture_launches_only_kernels_launched_before(monkeypatch, m):
    """Inside a CUDA-graph capture (simulated) the column sum launches only a kernel of a shape
    class launched before (a first launch would load a module, which CUDA forbids while
    capturing) and otherwise sums with torch; ``_prepare_capture`` launches the class an eager
    ``linear`` call's backward would take, on zeros, so the capture finds it."""
    monkeypatch.setattr(lin, "_LAUNCHED", set())
    monkeypatch.setattr(lin, "_capturing", lambda t: True)
    launches = []
    launch = lin._launch
    monkeypatch.setattr(lin, "_launch", lambda *a: launches.append(a[1]) or launch(*a))
    g2 = torch.randn(m, 24, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
    exact = g2.double().sum(0)
    got = lin.column_sum(g2, torch.bfloat16)
    assert launches == []  # never launched: torch's sum
    assert ((got.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-3).all()
    lin._prepare_capture.cache_clear()
    lin._prepare_capture(m, 24, torch.bfloat16, g2.device)
    assert len(launches) == 1 and launches[0] == lin._class_representative(m)
    got = lin.column_sum(g2, torch.bfloat16)
    assert launches[1:] == [m]  # the same class: the kernel
    assert ((got.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-3).all()
    lin.column_sum(g2[:, :16], torch.bfloat16)  # another class (channels, row stride): torch
    assert launches[2:] == []


def test_double_backward_is_refused():
    x, w, b, _ = _case((3,), 4, 2, seed=1)
    x.requires_grad_()
    out = lin.linear(x, w, b.requires_grad_())
    (gx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        gx.sum().backward()


@pytest.mark.gpu
@pytest.mark.parametrize("rows,c", [(512 * 384, 256), (384 * 384, 128), (1, 8)])
def test_gpu_matches_reference(rows, c):
    x, w, b, dout = _gpu_case(rows, c)
    ref = _run_dev(F.linear, x, w, b, dout)
    got = _run_dev(lin.linear_fused, x, w, b, dout)
    assert torch.equal(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1], rtol=0, atol=0)
    torch.testing.assert_close(got[2], ref[2], rtol=0, atol=0)
    _assert_bias_grad_close(got[3], ref[3])


@pytest.mark.gpu
def test_gpu_fused_only_inside_a_captured_graph(monkeypatch):
    """Eager on a GPU, ``linear`` is F.linear (bit for bit, the bias gradient too); captured
    into a CUDA graph (forward and backward), it is ``linear_fused``, and the replayed graph
    gives F.linear's values (the bias gradient within one bf16 step)."""
    calls = []
    fused_apply = lin._LinearFn.apply
    monkeypatch.setattr(lin._LinearFn, "apply", lambda *a: calls.append(1) or fused_apply(*a))
    monkeypatch.setattr(lin, "_LAUNCHED", set())  # (as in a fresh process)
    lin._prepare_capture.cache_clear()
    launches = []
    launch = lin._launch
    monkeypatch.setattr(lin, "_launch", lambda *a: launches.append(a[1]) or launch(*a))
    rows = 384 * 384 + 5  # a row count no other test launches the kernel for
    x, w, b, dout = _gpu_case(rows, 128)
    ref = _run_dev(F.linear, x, w, b, dout)
    eager = _run_dev(lin.linear, x, w, b, dout)
    assert not calls
    for got, want in zip(eager, ref):
        assert torch.equal(got, want)
    assert len(launches) == 1  # the eager call loaded its backward's kernel, on a few rows

    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (eager: F.linear), as torch's capture recipe does
        for _ in range(2):
            _step(lin.linear, xs, ws, bs, dout)
    torch.cuda.current_stream().wait_stream(side)
    calls.clear()
    for t in (xs, ws, bs):
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _step(lin.linear, xs, ws, bs, dout)
    assert calls == [1] and launches[1:] == [rows]  # captured: the kernel, no fallback
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, ref[0], rtol=0, atol=0)
    torch.testing.assert_close(xs.grad, ref[1], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(ws.grad, ref[2], rtol=1e-2, atol=1e-2)
    _assert_bias_grad_close(bs.grad, ref[3])


def _gpu_case(rows, c):
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, c, generator=g).to(dev)
    w = (torch.randn(c, c, generator=g) / c ** 0.5).to(dev)
    b = torch.randn(c, generator=g).to(dev)
    dout = torch.randn(rows, c, generator=g).to(dev)
    return x, w, b, dout


def _step(fn, x, w, b, dout):
    with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        out = fn(x * 1.0, w, b)
    out.backward(dout.to(out.dtype))
    return out


def _run_dev(fn, x0, w0, b0, dout):
    x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
    out = _step(fn, x, w, b, dout)
    return out.detach(), x.grad, w.grad, b.grad


def _assert_bias_grad_close(got, ref):
    # bf16 roundings of fp32 sums in different orders: at most one bf16 step apart
    assert ((got - ref).abs() <= ref.abs() * 2 ** -7 + 1e-3).all()


# ---- linear_packed: several Linears of one input as one GEMM -------------------------------
def _packed_case(lead, c_in, outs, biases, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, c_in, generator=g)
    ws = [torch.randn(c, c_in, generator=g) / c_in ** 0.5 for c in outs]
    bs = [torch.randn(c, generator=g) if has else None for c, has in zip(outs, biases)]
    dout = torch.randn(*lead, sum(outs), generator=g)
    return x, ws, bs, dout


def _run_packed(fn, x0, ws0, bs0, dout, autocast_dtype):
    x = x0.clone().requires_grad_()
    ws = [w.clone().requires_grad_() for w in ws0]
    bs = [None if b is None else b.clone().requires_grad_() for b in bs0]
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16,
                        enabled=autocast_dtype is not None):
        out = fn(x * 1.0, ws, bs)
    out.backward(dout.to(out.dtype))
    return out.detach(), x.grad, [w.grad for w in ws], [None if b is None else b.grad for b in bs]


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16],
                         ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("lead,c_in,outs,biases", [
    ((3, 37), 24, (16, 16, 16, 16), (False, False, False, True)),  # q, k, v, gate
    ((2, 5), 8, (6, 10, 3), (True, False, True)),
    ((1,), 4, (5,), (True,)),
], ids=["qkvg", "uneven", "one"])
def test_linear_packed_matches_reference(autocast_dtype, lead, c_in, outs, biases):
    """linear_packed vs OpenFold's separate Linears (the reference): every output column the
    same dot product; dx the readers' gradients summed (in the GEMM's fp32 accumulator,
    rounded once, where autograd rounds each and sums them in fp32); each weight's gradient its
    own rows of one GEMM, each bias's its own columns' sum, in the parameters' dtypes."""
    x, ws, bs, dout = _packed_case(lead, c_in, outs, biases, seed=len(outs))
    ref = _run_packed(lin.linear_packed_reference, x, ws, bs, dout, autocast_dtype)
    got = _run_packed(lin.linear_packed, x, ws, bs, dout, autocast_dtype)
    tol = 1e-5 if autocast_dtype is None else 2 ** -7
    assert got[0].dtype == ref[0].dtype
    torch.testing.assert_close(got[0].float(), ref[0].float(), rtol=tol, atol=tol)
    torch.testing.assert_close(got[1], ref[1], rtol=tol, atol=tol * 4, msg="dx")
    for i, (a, e) in enumerate(zip(got[2], ref[2])):
        assert a.dtype == e.dtype == torch.float32
        torch.testing.assert_close(a, e, rtol=tol, atol=tol, msg=f"dW{i}")
    for i, (a, e) in enumerate(zip(got[3], ref[3])):
        assert (a is None) == (e is None)
        if a is not None:
            assert a.dtype == e.dtype == torch.float32
            torch.testing.assert_close(a, e, rtol=tol, atol=tol, msg=f"db{i}")


def test_linear_packed_outside_autograd_and_checks():
    """No gradient asked for: F.linear of the stacked weights; frozen weights get no gradient;
    mismatched lists and dtypes (outside autocast) raise."""
    x, ws, bs, _ = _packed_case((4, 3), 6, (5, 7), (False, True), seed=0)
    with torch.no_grad():
        got = lin.linear_packed(x, ws, bs)
    torch.testing.assert_close(got, lin.linear_packed_reference(x, ws, bs), rtol=1e-6, atol=1e-6)
    xg = x.clone().requires_grad_()
    out = lin.linear_packed(xg, ws, bs)  # only x needs a gradient
    (dx,) = torch.autograd.grad(out.sum(), [xg])
    (dx_r,) = torch.autograd.grad(lin.linear_packed_reference(xg, ws, bs).sum(), [xg])
    torch.testing.assert_close(dx, dx_r, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one bias"):
        lin.linear_packed(x, ws, bs[:1])
    with pytest.raises(TypeError, match="linear_packed"):
        lin.linear_packed(x.requires_grad_(), [w.bfloat16() for w in ws], [None, None])


def test_linear_packed_gradients_accumulate_per_parameter():
    """The weights' gradients are views of one stacked gradient: two backward passes still
    accumulate each parameter's own gradient (as with separate Linears), and zeroing one
    parameter's gradient leaves the others alone."""
    x, ws, bs, dout = _packed_case((3, 5), 8, (6, 6, 6, 6), (False, False, False, True), seed=3)

    def two_steps(fn):
        w = [t.clone().requires_grad_() for t in ws]
        b = [None if t is None else t.clone().requires_grad_() for t in bs]
        for _ in range(2):
            fn(x, w, b).backward(dout)
        return w, b

    w_got, b_got = two_steps(lin.linear_packed)
    w_ref, b_ref = two_steps(lin.linear_packed_reference)
    for a, e in zip(w_got, w_ref):
        torch.testing.assert_close(a.grad, e.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b_got[3].grad, b_ref[3].grad, rtol=1e-5, atol=1e-5)
    w_got[0].grad.zero_()
    torch.testing.assert_close(w_got[1].grad, w_ref[1].grad, rtol=1e-5, atol=1e-5)
