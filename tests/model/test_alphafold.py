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
from fastfold_plugin import kernels
from fastfold_plugin.testing import (
    SAMPLE_FEATS,
    grad_errors,
    load_sample_batch,
    randomize_parameters_,
    rel_err,
)


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


class _CallCounter:
    """The reference op table, counting calls per op."""

    def __init__(self, table):
        self.table, self.calls = table, {}

    def __getattr__(self, name):
        fn = getattr(self.table, name)

        def counted(*a, **k):
            self.calls[name] = self.calls.get(name, 0) + 1
            return fn(*a, **k)
        return counted


@pytest.fixture
def op_calls(monkeypatch):
    counter = _CallCounter(kernels.get_ops("reference"))
    monkeypatch.setitem(kernels._TABLES, "reference", counter)
    return counter.calls


def _assert_every_op_ran(calls):
    expected = {"attention", "layer_norm_fanout", "layer_norm_torch", "transition",
                "triangle_multiplication", "outer_product_mean", "global_attention"}
    assert expected <= set(calls), f"ops never called by the plugin model: {expected - set(calls)}"


@pytest.fixture(scope="module")
def batch(shared_data):
    return load_sample_batch(str(shared_data / SAMPLE_FEATS), n_res=16, n_msa=8, n_extra=16,
                             n_templ=2, n_recycle=1)


def test_alphafold_eval_matches_stock(batch, op_calls):
    """Inference path (eval + no_grad: OpenFold's in-place path, chunk size 4 with tuning)."""
    stock, plugin = _models(train=False)
    with torch.no_grad():
        out_s = stock({k: v.clone() for k, v in batch.items()})
        assert not op_calls
        out_p = plugin({k: v.clone() for k, v in batch.items()})
    _assert_every_op_ran(op_calls)
    pos_s, pos_p = out_s["final_atom_positions"], out_p["final_atom_positions"]
    mask = out_s["final_atom_mask"].bool()
    dpos = (pos_p - pos_s).norm(dim=-1)[mask].max().item()
    dplddt = (out_p["plddt"] - out_s["plddt"]).abs().max().item()
    print(f"\nwhole model eval: max atom deviation {dpos:.2e} A, max pLDDT deviation {dplddt:.2e}")
    assert pos_s[mask].abs().max() > 1.0, "degenerate stock structure: the test would be vacuous"
    assert dpos <= 1e-3, f"atom positions deviate by {dpos:.3e} A"
    assert dplddt <= 0.01, f"pLDDT deviates by {dplddt:.3e}"
    assert rel_err(out_p["single"], out_s["single"]) < 1e-4


def test_alphafold_train_matches_stock_outputs_and_gradients(batch, op_calls):
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
    _assert_every_op_ran(op_calls)
    assert op_calls.get("dropout_add", 0) > 0
    (single_s, loss_s, g_s), (single_p, loss_p, g_p) = results
    assert rel_err(single_p, single_s) < 1e-5
    assert abs(loss_p - loss_s) <= 1e-5 * max(1.0, abs(loss_s))
    assert g_p.keys() == g_s.keys() and len(g_s) > 100
    errs = grad_errors(g_p, g_s)
    worst = max(errs, key=errs.get)
    print(f"\nwhole model train: {len(g_s)} gradients, worst {worst}: {errs[worst]:.2e}")
    assert all(g_s[n].abs().sum() > 0 for n in g_s if n.startswith("evoformer.blocks.0."))
    for n, r in errs.items():
        assert r <= 1e-4, f"{n}: gradient rel err {r:.2e}"
