"""The attentions' gate and output projections go through the op table's ``linear`` (their bias
gradient fused) when calling the module would be plain ``F.linear``; a module with hooks, or a
Linear with its own forward, is called as stock OpenFold calls it. With the Triton ops, a
self-attention's q, k, v and gate projections run as one packed GEMM (``linear_packed``) read
in place by ``attention_packed``, unless one of them has hooks."""
import torch
from openfold.model.primitives import Attention, Linear

from fastfold_plugin.kernels import get_ops
from fastfold_plugin.kernels.linear import linear
from fastfold_plugin.patches.forwards import _mha
from fastfold_plugin.testing import randomize_parameters_


class _LinearOnly:
    """The reference op table with the Triton ``linear``, counting its calls."""

    def __init__(self):
        self.calls = 0

    def __getattr__(self, name):
        if name == "linear":
            def counted(*args):
                self.calls += 1
                return linear(*args)
            return counted
        return getattr(get_ops("reference"), name)


def _attention():
    return randomize_parameters_(Attention(16, 16, 16, 8, 2, gating=True), seed=0)


def _step(att, ops, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 16, generator=g).requires_grad_()
    for p in att.parameters():
        p.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = x * 1.0
        out = _mha(att, ops, h, h, None, None)
    out.backward(torch.randn(out.shape, generator=g).to(out.dtype))
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in att.named_parameters()}


def test_gate_and_output_projections_use_the_op():
    att = _attention()
    ops = _LinearOnly()
    out_t, gx_t, gp_t = _step(att, ops)
    out_r, gx_r, gp_r = _step(att, get_ops("reference"))
    assert ops.calls == 2
    assert torch.equal(out_t, out_r) and torch.equal(gx_t, gx_r)
    for name, grad in gp_t.items():
        if name in ("linear_g.bias", "linear_o.bias"):  # an fp32 sum in another order
            torch.testing.assert_close(grad, gp_r[name], rtol=1e-2, atol=1e-2)
        else:
            assert torch.equal(grad, gp_r[name]), name


def test_hooked_or_custom_linears_are_called():
    att = _attention()
    seen = []
    att.linear_o.register_forward_hook(lambda mod, args, out: seen.append("o") or out * 0.0)
    ops = _LinearOnly()
    out, _, _ = _step(att, ops)
    assert seen == ["o"] and ops.calls == 1 and float(out.abs().max()) == 0.0

    class Scaled(Linear):
        def forward(self, x):
            return 2.0 * super().forward(x)

    att = _attention()
    ref_out, _, _ = _step(att, get_ops("reference"))
    scaled = Scaled(16, 16)
    scaled.load_state_dict(att.linear_o.state_dict())
    att.linear_o = scaled
    ops = _LinearOnly()
    out, _, _ = _step(att, ops)
    assert ops.calls == 1
    torch.testing.assert_close(out.float(), 2.0 * ref_out.float(), rtol=1e-2, atol=1e-2)


class _TritonCounting:
    """The Triton op table, counting the calls of each op."""

    backend = "triton"

    def __init__(self):
        self.calls = {}

    def __getattr__(self, name):
        fn = getattr(get_ops("triton"), name)

        def counted(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return fn(*args, **kwargs)
        return counted


def _fp32_step(att, ops, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 16, generator=g).requires_grad_()
    for p in att.parameters():
        p.grad = None
    h = x * 1.0
    out = _mha(att, ops, h, h, None, None)
    out.backward(torch.randn(out.shape, generator=g))
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in att.named_parameters()}


def test_self_attention_packs_its_projections():
    """With the Triton ops a self-attention's q, k, v and gate projections are one GEMM into one
    packed tensor that the attention reads in place (``linear_packed``, ``attention_packed``);
    a hook on one of them keeps OpenFold's four Linears. Either way the values and gradients are
    the reference ops' (fp32)."""
    att = _attention()
    out_r, gx_r, gp_r = _fp32_step(att, get_ops("reference"))
    for hooked in (False, True):
        if hooked:
            att.linear_k.register_forward_hook(lambda mod, args, out: out)
        ops = _TritonCounting()
        out, gx, gp = _fp32_step(att, ops)
        packed = 0 if hooked else 1
        assert ops.calls.get("linear_packed", 0) == packed
        assert ops.calls.get("attention_packed", 0) == packed
        assert ops.calls.get("attention", 0) == 1 - packed
        torch.testing.assert_close(out, out_r, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gx, gx_r, rtol=1e-5, atol=1e-5)
        for name, grad in gp.items():
            torch.testing.assert_close(grad, gp_r[name], rtol=1e-5, atol=1e-5, msg=name)
