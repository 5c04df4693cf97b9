"""The attention projections read their shared input through ``cast_fanout`` (one rounding under
autocast, one fp32 sum of the input's gradients): with the reference ops and only that op
swapped for the Triton one, a bf16-autocast training step gives the same outputs and parameter
gradients as the reference bit for bit, the same input gradient up to the order of its fp32
additions, and rounds the input once instead of once per projection. Through OpenFold's
Attention (``_mha``: self-attention and the template's cross-attention) and the sharded
blocks' attention (``_attend``, a DAP context of size 1)."""
import pytest
import torch
from openfold.model.primitives import Attention
from torch.utils._python_dispatch import TorchDispatchMode

import fastfold_plugin.distributed as fd
from fastfold_plugin.kernels import get_ops
from fastfold_plugin.kernels.cast_fanout import cast_fanout
from fastfold_plugin.patches.dap import _enter_msa, _msa_block_sharded, _Run
from fastfold_plugin.patches.forwards import _mha
from fastfold_plugin.testing import randomize_parameters_


class _FanoutOnly:
    """The reference op table with the Triton ``cast_fanout``."""

    def __getattr__(self, name):
        return cast_fanout if name == "cast_fanout" else getattr(get_ops("reference"), name)


class _Roundings(TorchDispatchMode):
    """Counts fp32 -> low-precision conversions of tensors with `numel` elements."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func.overloadpacket.__name__ == "_to_copy" and args[0].dtype == torch.float32
                and kwargs.get("dtype") in (torch.bfloat16, torch.float16)
                and args[0].numel() == self.numel):
            self.count += 1
        return func(*args, **kwargs)


def _step(fn, params, inputs, seed):
    """bf16-autocast forward of fn(*non-leaf inputs), backward from random output gradients:
    (outputs, input gradients, parameter gradients, roundings of an input-sized tensor)."""
    leaves = [x.clone().requires_grad_() for x in inputs]
    for p in params:
        p.grad = None
    counter = _Roundings(inputs[0].numel())
    with counter, torch.autocast("cpu", dtype=torch.bfloat16):
        outs = fn(*[x * 1.0 for x in leaves])  # not leaves: LayerNorm outputs in the model
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seed)
    torch.autograd.backward(outs, [torch.randn(o.shape, generator=g).to(o.dtype) for o in outs])
    return ([o.detach() for o in outs], [x.grad for x in leaves],
            [p.grad.clone() for p in params], counter.count)


def _compare(ref, fan):
    outs_r, gin_r, gp_r, n_r = ref
    outs_f, gin_f, gp_f, n_f = fan
    for a, b in zip(outs_f, outs_r):
        assert torch.equal(a, b)
    for a, b in zip(gp_f, gp_r):
        assert torch.equal(a, b)
    for a, b in zip(gin_f, gin_r):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    return n_r, n_f


@pytest.mark.parametrize("gating", [True, False], ids=["gated", "ungated"])
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_openfold_attention_rounds_its_input_once(cross, gating):
    att = randomize_parameters_(Attention(16, 16, 16, 8, 2, gating=gating), seed=0)
    g = torch.Generator().manual_seed(1)
    q_x = torch.randn(3, 5, 16, generator=g)
    kv_x = torch.randn(3, 5, 16, generator=g)
    inputs = [q_x, kv_x] if cross else [q_x]

    def run(ops):
        def fn(q, kv=None):
            return _mha(att, ops, q, q if kv is None else kv, None, None)
        return _step(fn, list(att.parameters()), inputs, seed=2)

    n_ref, n_fan = _compare(run(get_ops("reference")), run(_FanoutOnly()))
    # roundings of q_x-sized tensors: self-attention q, k, v (, gate) -> once; cross-attention
    # q (, gate) and kv_x's k, v -> once each (q alone: once either way)
    n_q = 2 if gating else 1
    expected = (n_q + 2, 1) if not cross else (n_q + 2, 2)
    assert (n_ref, n_fan) == expected


def test_sharded_block_attention_rounds_its_input_once():
    from openfold.model.evoformer import EvoformerBlock

    block = randomize_parameters_(EvoformerBlock(
        c_m=16, c_z=8, c_hidden_msa_att=4, c_hidden_opm=4, c_hidden_mul=8, c_hidden_pair_att=4,
        no_heads_msa=2, no_heads_pair=2, transition_n=2, msa_dropout=0.0, pair_dropout=0.0,
        inf=1e9, eps=1e-10), seed=0).train()
    g = torch.Generator().manual_seed(3)
    n_seq, n_res = 5, 7
    m = torch.randn(n_seq, n_res, 16, generator=g)
    z = torch.randn(n_res, n_res, 8, generator=g)

    def run(ops):
        r = _Run(fd.DAPContext(), ops, n_res, n_seq, None, inplace_safe=False, mask_trans=True)
        with torch.no_grad():
            shards = _enter_msa(r, m, z, torch.ones(n_seq, n_res), torch.ones(n_res, n_res))
        return _step(lambda *xs: _msa_block_sharded(block, r, *xs),
                     list(block.parameters()), list(shards), seed=4)

    n_ref, n_fan = _compare(run(get_ops("reference")), run(_FanoutOnly()))
    # m-sized roundings: the MSA row and column attentions' inputs, once each instead of four
    # times (the others, e.g. the outer product mean's, are the same on both sides)
    assert n_ref - n_fan == 2 * 3, (n_ref, n_fan)
