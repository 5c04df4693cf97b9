"""Benchmark: a self-attention module whole (LayerNorm, q/k/v/gate projections, gated biased
attention, output projection), fwd+bwd under bf16 autocast, with and without the packed
projection.

Providers, side by side on the same weights and inputs:
    openfold          stock: ``F.layer_norm``, then OpenFold's ``Attention`` (four Linears,
                      ``_attention`` with the mask and pair biases, gating, linear_o)
    plugin_unpacked   the plugin's Triton ops with the four projections as four Linears
                      (``layer_norm_fanout`` to four readers; a no-op forward hook on linear_q
                      keeps ``_mha`` off the packed path)
    plugin            the plugin's Triton ops as the blocks call them: ``layer_norm_fanout`` to
                      one reader, ``linear_packed`` and ``attention_packed``
Gradients: the module input, the pair bias and every parameter.

    python benchmarks/bench_packed_attention.py [--quick | --full | --dry-run] [--out DIR]

--quick (default): MSA row attention with pair bias (c_m 256, 8 heads of 32) at 128 x 256 and
512 x 384; triangle attention (c_z 128, 4 heads of 32) at N_res 256 and 384. --full adds N_res
512 (triangle). The Evoformer block's captured step times the same switch in context
(``profile_block_step.py --no-packed``).
"""
import harness
import torch

PROVIDERS = ("openfold", "plugin_unpacked", "plugin")


def sweep(args):
    if args.dry_run:
        return [dict(kind="msa_row", rows=3, n_res=8, c=16, heads=2, c_hidden=8)]
    rows = [dict(kind="msa_row", rows=128, n_res=256, c=256, heads=8, c_hidden=32),
            dict(kind="msa_row", rows=512, n_res=384, c=256, heads=8, c_hidden=32),
            dict(kind="tri_att", rows=256, n_res=256, c=128, heads=4, c_hidden=32),
            dict(kind="tri_att", rows=384, n_res=384, c=128, heads=4, c_hidden=32)]
    if args.full:
        rows.append(dict(kind="tri_att", rows=512, n_res=512, c=128, heads=4, c_hidden=32))
    return rows


def provider_fn(name, p, device):
    """() -> (forward closure, tensors whose gradients the backward computes)."""
    import torch.nn.functional as F
    from openfold.model.primitives import Attention, LayerNorm

    from fastfold_plugin.kernels import get_ops
    from fastfold_plugin.patches.forwards import _mha, _n_inputs
    from fastfold_plugin.testing import randomize_parameters_

    c, h, ch, rows, n = p["c"], p["heads"], p["c_hidden"], p["rows"], p["n_res"]
    g = torch.Generator(device="cpu").manual_seed(0)
    m = torch.randn(1, rows, n, c, generator=g).to(device).requires_grad_()
    keep = (torch.rand(1, rows, 1, 1, n, generator=g) > 0.1).float()
    keep[..., 0] = 1.0
    mask_bias = (1e9 * (keep - 1)).to(device)
    pair_bias = torch.randn(1, 1, h, n, n, generator=g).to(device, torch.bfloat16)
    pair_bias.requires_grad_()
    ln = randomize_parameters_(LayerNorm(c), seed=1).to(device)
    mha = randomize_parameters_(Attention(c, c, c, ch, h, gating=True), seed=2).to(device)
    params = [*ln.parameters(), *mha.parameters()]

    if name == "openfold":
        def forward():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                x = F.layer_norm(m, (c,), ln.weight, ln.bias, ln.eps)
                return mha(x, x, biases=[mask_bias, pair_bias])
        return forward, [m, pair_bias, *params]

    ops = get_ops("triton")
    if name == "plugin_unpacked":
        mha.linear_q.register_forward_hook(lambda *args: None)
    n_in = _n_inputs(mha, ops)

    def forward():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            xs = ops.layer_norm_fanout(m, ln.weight, ln.bias, ln.eps, n_in)
            return _mha(mha, ops, None, None, mask_bias, pair_bias, xs=xs)
    return forward, [m, pair_bias, *params]


def main(argv=None):
    harness.run_sweep("packed_attention", __doc__.splitlines()[0], PROVIDERS, sweep, provider_fn,
                      argv, dtype="fp32-autocast")


if __name__ == "__main__":
    main()
