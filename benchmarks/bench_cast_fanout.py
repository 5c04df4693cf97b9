"""Benchmark: an attention's four projections (q, k, v, gate) of one fp32 activation under bf16
autocast, with and without ``cast_fanout``.

Providers, side by side on the same weights and inputs:
    openfold   stock: each OpenFold ``Linear`` rounds the fp32 activation itself (four roundings),
               and autograd converts the four input gradients to fp32 and adds them
    plugin     ``fastfold_plugin.kernels.cast_fanout``: one rounding shared by the four, one
               fp32 pass summing their gradients
The activation is a LayerNorm output (fp32 under autocast), as in OpenFold's attentions; both
providers include that LayerNorm and stack the four outputs (the same extra work on both sides).
Gradients: the LayerNorm's input and the four weights.

    python benchmarks/bench_cast_fanout.py [--quick | --full | --dry-run] [--out DIR]

--quick (default): the MSA activation [N_seq, N_res, 256] at 128 x 256 and 512 x 384 and the
pair activation [N_res, N_res, 128] at N_res 256 and 384 (MSA and triangle attention's inputs in
training); --full adds N_res 1024 (pair).
"""
import harness
import torch

PROVIDERS = ("openfold", "plugin")


def sweep(args):
    if args.dry_run:
        return [dict(kind="msa", rows=3, n_res=8, c=16, c_hidden=8)]
    rows = [dict(kind="msa", rows=128, n_res=256, c=256, c_hidden=256),
            dict(kind="msa", rows=512, n_res=384, c=256, c_hidden=256),
            dict(kind="pair", rows=256, n_res=256, c=128, c_hidden=128),
            dict(kind="pair", rows=384, n_res=384, c=128, c_hidden=128)]
    if args.full:
        rows.append(dict(kind="pair", rows=1024, n_res=1024, c=128, c_hidden=128))
    return rows


def provider_fn(name, p, device):
    """() -> (forward closure, tensors whose gradients the backward computes)."""
    from openfold.model.primitives import Linear

    from fastfold_plugin.kernels.cast_fanout import cast_fanout
    from fastfold_plugin.testing import randomize_parameters_

    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(1, p["rows"], p["n_res"], p["c"], generator=g).to(device).requires_grad_()
    lins = [randomize_parameters_(Linear(p["c"], p["c_hidden"], bias=False), seed=i).to(device)
            for i in range(4)]
    fan = cast_fanout if name == "plugin" else (lambda t, n: (t,) * n)

    def forward():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            ln = torch.nn.functional.layer_norm(x, (p["c"],))
            return torch.stack([lin(xi) for lin, xi in zip(lins, fan(ln, 4))])

    return forward, [x] + [lin.weight for lin in lins]


def main(argv=None):
    harness.run_sweep("cast_fanout", __doc__.splitlines()[0], PROVIDERS, sweep, provider_fn, argv,
                      dtype="fp32-autocast")


if __name__ == "__main__":
    main()
