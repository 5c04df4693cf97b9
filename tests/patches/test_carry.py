"""The blocks' residual stream carried through the sub-modules' LayerNorms (Triton ops).

In a training step the Evoformer and extra-MSA blocks call the row and column attentions, the
triangle attentions, the triangle multiplications and the outer product mean with ``carry``:
the LayerNorm that starts each of them (``layer_norm_fanout``, or the op's own) hands its input
back, and the residual add around the sub-module (for the outer product mean, the block's
output m) reads that, so its gradient is added to dx by the LayerNorm's backward kernel instead
of by an add of its own. The transitions are called with ``residual``: the op returns
input + update, the add fused with its mask multiply, its gradient added the same way. Under
autocast the attentions' LayerNorms also store their output
rounded to bf16 once for all its readers. Checked here on a patched EvoformerBlock in a bf16
training step, against the same block with a no-op forward hook on each of those sub-modules
(a hooked module is called as in stock OpenFold, without carry): the same outputs and gradients,
thirteen fewer activation-sized fp32 adds (the column attention's update is added by the MSA
transition's LayerNorm), and no fp32 -> bf16 rounding of an activation.
"""
import copy

import torch
from openfold.model.evoformer import EvoformerBlock
from torch.utils._python_dispatch import TorchDispatchMode

import fastfold_plugin
from fastfold_plugin.patches.forwards import CARRIED_MODULES
from fastfold_plugin.testing import randomize_parameters_, rel_err

S, N, C_M, C_Z = 3, 5, 16, 8


class _Census(TorchDispatchMode):
    """Counts out-of-place fp32 adds and, while `forward` is set, fp32 -> bf16 conversions of
    tensors with one of `sizes` elements (the MSA's and the pair's). (In backward, autograd
    converts the fp32 gradients of the bf16 updates added to the residual stream, as in stock.)"""

    def __init__(self, sizes):
        super().__init__()
        self.sizes, self.adds, self.roundings, self.forward = set(sizes), 0, 0, True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        a = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if a is not None and a.numel() in self.sizes and a.dtype == torch.float32:
            if name == "add" and isinstance(args[1], torch.Tensor):
                self.adds += 1
            if name == "_to_copy" and kwargs.get("dtype") == torch.bfloat16 and self.forward:
                self.roundings += 1
        return func(*args, **kwargs)


def _step(block, inputs, hooked, names=CARRIED_MODULES):
    handles = [block.get_submodule(n).register_forward_hook(lambda *a: None)
               for n in names] if hooked else []
    m, z = (inputs[k].clone().requires_grad_() for k in ("m", "z"))
    census = _Census([m.numel(), z.numel()])
    torch.manual_seed(7)  # the same dropout masks on both sides
    with census, torch.autocast("cpu", dtype=torch.bfloat16):
        outs = block(m * 1.0, z * 1.0, inputs["msa_mask"], inputs["pair_mask"], chunk_size=None)
        census.forward = False
        gen = torch.Generator().manual_seed(8)
        torch.autograd.backward(outs, [torch.randn(o.shape, generator=gen) for o in outs])
    for h in handles:
        h.remove()
    grads = {"m": m.grad, "z": z.grad}
    grads.update({n: p.grad.clone() for n, p in block.named_parameters()})
    for p in block.parameters():
        p.grad = None
    return [o.detach() for o in outs], grads, census


def test_evoformer_block_carries_its_residuals_through_the_layer_norms():
    stock = randomize_parameters_(EvoformerBlock(
        c_m=C_M, c_z=C_Z, c_hidden_msa_att=8, c_hidden_opm=4, c_hidden_mul=8,
        c_hidden_pair_att=8, no_heads_msa=2, no_heads_pair=2, transition_n=2,
        msa_dropout=0.15, pair_dropout=0.25, inf=1e9, eps=1e-10), seed=3).train()
    block = copy.deepcopy(stock)
    fastfold_plugin.enable(block, backend="triton")
    g = torch.Generator().manual_seed(0)
    inputs = dict(m=torch.randn(S, N, C_M, generator=g), z=torch.randn(N, N, C_Z, generator=g),
                  msa_mask=(torch.rand(S, N, generator=g) > 0.2).float(),
                  pair_mask=(torch.rand(N, N, generator=g) > 0.2).float())
    outs_h, grads_h, census_h = _step(block, inputs, hooked=True)
    outs_c, grads_c, census_c = _step(block, inputs, hooked=False)
    for a, b in zip(outs_c, outs_h):
        assert torch.equal(a, b)  # the same values: one rounding of the same fp32 LayerNorm
    for name, a in grads_c.items():  # only the order of fp32 additions differs
        assert rel_err(a, grads_h[name]) < 1e-5, name
    # hooked: each of the nine sub-modules' inputs has a second reader, whose gradient a
    # backward add sums with the sub-module's, and so does the row attention's z (read by its
    # LayerNorm and by the next residual add); the two transitions' forward adds are fused, and
    # so is the column attention's (the MSA transition's LayerNorm adds that update): carried,
    # the one add left is the outer product mean's update of z
    assert census_h.adds - census_c.adds == 13, (census_h.adds, census_c.adds)
    assert census_c.adds == 1
    # the LayerNorms store bf16 for the Linears (stock: one rounding per Linear that reads them)
    assert census_c.roundings == 0 and census_h.roundings == 0
    assert _step(stock, inputs, hooked=False)[2].roundings > 0


def test_column_attention_update_reaches_a_hooked_core():
    """With a forward hook on the block's core (``EvoformerBlockCore``), the block adds the
    column attention's update itself and calls the core as stock does (no pending update for
    its transition): the outputs and gradients of the unhooked step, one more fp32 add."""
    block = randomize_parameters_(EvoformerBlock(
        c_m=C_M, c_z=C_Z, c_hidden_msa_att=8, c_hidden_opm=4, c_hidden_mul=8,
        c_hidden_pair_att=8, no_heads_msa=2, no_heads_pair=2, transition_n=2,
        msa_dropout=0.15, pair_dropout=0.25, inf=1e9, eps=1e-10), seed=4).train()
    fastfold_plugin.enable(block, backend="triton")
    g = torch.Generator().manual_seed(1)
    inputs = dict(m=torch.randn(S, N, C_M, generator=g), z=torch.randn(N, N, C_Z, generator=g),
                  msa_mask=(torch.rand(S, N, generator=g) > 0.2).float(),
                  pair_mask=(torch.rand(N, N, generator=g) > 0.2).float())
    outs_h, grads_h, census_h = _step(block, inputs, hooked=True, names=("core",))
    outs_c, grads_c, census_c = _step(block, inputs, hooked=False)
    for a, b in zip(outs_c, outs_h):
        assert torch.equal(a, b)
    for name, a in grads_c.items():
        assert rel_err(a, grads_h[name]) < 1e-5, name
    assert census_h.adds == census_c.adds + 1
