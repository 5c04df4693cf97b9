"""Whole patched blocks on the Triton backend vs stock OpenFold (same randomised weights).

On a CPU machine the Triton kernels run through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so the sizes are tiny. fp32 is IEEE fp32 inside the kernels: outputs and
every gradient must match stock to fp32 rounding (norm ratio <= 1e-4 over a whole block).
Training mode draws OpenFold's dropout masks from torch's RNG in OpenFold's order, so the same
seed gives the same masks on both sides.
"""
import copy

import pytest
import torch
from openfold.model.evoformer import EvoformerBlock, ExtraMSABlock
from openfold.model.template import TemplatePairStackBlock

import fastfold_plugin
from fastfold_plugin.testing import grad_errors, randomize_parameters_, rel_err

S, N, C_M, C_Z = 3, 5, 16, 8


def _kw():
    return dict(c_m=C_M, c_z=C_Z, c_hidden_msa_att=8, c_hidden_opm=4, c_hidden_mul=8,
                c_hidden_pair_att=8, no_heads_msa=2, no_heads_pair=2, transition_n=2,
                msa_dropout=0.15, pair_dropout=0.25, inf=1e9, eps=1e-10)


def _mask(*shape):
    m = (torch.rand(*shape) > 0.2).float()
    m[..., 0] = 1.0
    return m


BLOCKS = {
    "evoformer_block": (lambda: EvoformerBlock(**_kw()), "msa"),
    "extra_msa_block": (lambda: ExtraMSABlock(**_kw(), ckpt=False), "msa"),
    "template_pair_stack_block": (
        lambda: TemplatePairStackBlock(c_t=C_Z, c_hidden_tri_att=8, c_hidden_tri_mul=8, no_heads=2,
                                       pair_transition_n=2, dropout_rate=0.25, inf=1e9), "pair"),
}


def _run(block, kind, inputs, seed):
    x = {k: v.clone().requires_grad_("mask" not in k) for k, v in inputs.items()}
    torch.manual_seed(seed)
    if kind == "msa":
        outs = block(x["m"], x["z"], x["msa_mask"], x["pair_mask"])
    else:
        outs = (block(x["z"], x["mask"]),)
    gen = torch.Generator().manual_seed(seed + 1)
    loss = sum((o * torch.randn(o.shape, generator=gen)).sum() for o in outs)
    loss.backward()
    grads = {f"input {k}": v.grad for k, v in x.items() if v.grad is not None}
    grads.update({f"param {n}": p.grad for n, p in block.named_parameters()})
    return [o.detach() for o in outs], grads


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_triton_block_matches_stock(name, training):
    _check_block(name, training)


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_triton_block_with_the_gpu_pair_bias_path(monkeypatch, name):
    """The same in training, with the pair biases formed as on GPUs (``_HeadBias``: one GEMM
    batched over the rows, its backward writing z's gradient in z's layout) instead of the
    CPU's stock Linear."""
    from fastfold_plugin.kernels._triton_utils import autocast_dtype
    from fastfold_plugin.patches import forwards

    def gpu_head_bias(x, weight):
        return forwards._HeadBias.apply(x, weight, autocast_dtype(x.device.type))

    monkeypatch.setattr(forwards, "head_bias", gpu_head_bias)
    _check_block(name, True)


def _check_block(name, training):
    make, kind = BLOCKS[name]
    torch.manual_seed(0)
    stock = randomize_parameters_(make(), seed=3).train(training)
    patched = copy.deepcopy(stock)
    handle = fastfold_plugin.enable(patched, backend="triton")
    assert handle.num_patched > 5
    if kind == "msa":
        inputs = dict(m=torch.randn(S, N, C_M), z=torch.randn(N, N, C_Z), msa_mask=_mask(S, N),
                      pair_mask=_mask(N, N))
    else:
        inputs = dict(z=torch.randn(2, N, N, C_Z), mask=_mask(2, N, N))
    out_s, grad_s = _run(stock, kind, inputs, seed=5)
    out_p, grad_p = _run(patched, kind, inputs, seed=5)
    for a, b in zip(out_p, out_s):
        r = rel_err(a, b)
        assert r <= 1e-4, f"{name} output: rel err {r:.2e}"
    assert grad_p.keys() == grad_s.keys()
    for k, r in grad_errors(grad_p, grad_s).items():
        assert r <= 1e-4, f"{name}: gradient of {k}: rel err {r:.2e}"
