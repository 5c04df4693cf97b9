"""The whole AlphaFold (model_1_ptm sizes), stock vs plugin, on real sample features.

The plugin model is built through the public path (`register()` + `config.globals.use_fastfold`)
and loads the stock model's state_dict; weights are randomised so that every module's update is
non-zero. Features: OpenFold's 200-residue test sample, cropped for the CPU.
"""
import copy

import pytest
import torch
from openfold.config import model_config
from openfold.model.model import AlphaFold

import fastfold_plugin
from fastfold_plugin.testing import SAMPLE_FEATS, load_sample_batch, randomize_parameters_, rel_err


def _models(train: bool, backend: str = "reference"):
    config = model_config("model_1_ptm", train=train)
    stock = AlphaFold(config)
    randomize_parameters_(stock, seed=11)
    flagged = copy.deepcopy(config)
    flagged.globals.use_fastfold = True
    flagged.globals.fastfold_backend = backend
    fastfold_plugin.register()
    try:
        plugin = AlphaFold(flagged)
    finally:
        fastfold_plugin.unregister()
    plugin.load_state_dict(stock.state_dict())
    assert fastfold_plugin.is_enabled(plugin) and not fastfold_plugin.is_enabled(stock)
    return stock.train(train), plugin.train(train)


@pytest.fixture(scope="module")
def batch(shared_data):
    return load_sample_batch(str(shared_data / SAMPLE_FEATS), n_res=16, n_msa=8, n_extra=16,
                             n_templ=2, n_recycle=1)


def test_alphafold_eval_matches_stock(batch):
    """Inference path (eval + no_grad: OpenFold's in-place path, chunk size 4 with tuning)."""
    stock, plugin = _models(train=False)
    with torch.no_grad():
        out_s = stock({k: v.clone() for k, v in batch.items()})
        out_p = plugin({k: v.clone() for k, v in batch.items()})
    pos_s, pos_p = out_s["final_atom_positions"], out_p["final_atom_positions"]
    mask = out_s["final_atom_mask"].bool()
    dpos = (pos_p - pos_s).norm(dim=-1)[mask].max().item()
    dplddt = (out_p["plddt"] - out_s["plddt"]).abs().max().item()
    print(f"\nwhole model eval: max atom deviation {dpos:.2e} A, max pLDDT deviation {dplddt:.2e}")
    assert pos_s[mask].abs().max() > 1.0, "degenerate stock structure: the test would be vacuous"
    assert dpos <= 1e-3, f"atom positions deviate by {dpos:.3e} A"
    assert dplddt <= 0.01, f"pLDDT deviates by {dplddt:.3e}"
    assert rel_err(out_p["single"], out_s["single"]) < 1e-4


def test_alphafold_train_matches_stock_outputs_and_gradients(batch):
    """Train mode (dropout on, activation checkpointing): same RNG seed -> same dropout masks on
    the reference path; outputs and every parameter gradient match."""
    stock, plugin = _models(train=True)
    results = []
    for model in (stock, plugin):
        torch.manual_seed(123)
        out = model({k: v.clone() for k, v in batch.items()})
        w_pos = torch.randn(out["final_atom_positions"].shape, generator=torch.Generator().manual_seed(1))
        w_s = torch.randn(out["single"].shape, generator=torch.Generator().manual_seed(2))
        loss = (out["final_atom_positions"] * w_pos).sum() * 1e-2 + (out["single"] * w_s).sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out["single"].detach(), loss.item(), grads))
    (single_s, loss_s, g_s), (single_p, loss_p, g_p) = results
    assert rel_err(single_p, single_s) < 1e-5
    assert abs(loss_p - loss_s) <= 1e-5 * max(1.0, abs(loss_s))
    assert g_p.keys() == g_s.keys() and len(g_s) > 100
    worst = max(g_s, key=lambda n: rel_err(g_p[n], g_s[n]))
    print(f"\nwhole model train: {len(g_s)} gradients, worst {worst}: {rel_err(g_p[worst], g_s[worst]):.2e}")
    evo = [n for n in g_s if n.startswith(("evoformer.", "extra_msa_stack.", "template_"))]
    assert evo and all(g_s[n].abs().sum() > 0 for n in evo if "evoformer.blocks.0." in n)
    for n in g_s:
        assert rel_err(g_p[n], g_s[n]) <= 1e-4, f"{n}: {rel_err(g_p[n], g_s[n]):.2e}"
