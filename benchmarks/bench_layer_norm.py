"""Benchmark: LayerNorm over the channel dim of MSA and pair activations across providers.

Providers, side by side on the same weights and inputs:
    openfold          stock OpenFold ``primitives.LayerNorm`` (its bf16 branch for a bf16 input)
    plugin            ``fastfold_plugin.kernels.layer_norm`` (the same contract, Triton)
    torch             ``torch.nn.LayerNorm`` (OpenFold uses it in e.g. MSAColumnGlobalAttention)
    plugin_torch      ``fastfold_plugin.kernels.layer_norm_torch`` (its contract, Triton)
A provider that is not installed is skipped with a note. Gradients: the input, weight and bias.

Inputs (``dtype`` column): ``fp32-autocast``: an fp32 activation under bf16 autocast (the
Evoformer's residual stream; every provider returns fp32); ``bf16``: a bf16 activation (OpenFold
returns bf16, torch.nn.LayerNorm under autocast fp32).

    python benchmarks/bench_layer_norm.py [--quick | --full | --dry-run] [--out DIR]

--quick (default): N_seq x N_res 128 x 256, 512 x 384, 128 x 1024: the MSA activation
[N_seq, N_res, 256] and the pair activation [N_res, N_res, 128]; --full adds N_res 2048.
"""
import importlib.util

import harness
import torch

PROVIDERS = ("openfold", "plugin", "torch", "plugin_torch")
INPUTS = ("fp32-autocast", "bf16")


def sweep(args):
    if args.dry_run:
        shapes, c = [(3, 8), (5, 13)], dict(msa=24, pair=16)
    else:
        shapes, c = [(128, 256), (512, 384), (128, 1024)], dict(msa=256, pair=128)
        if args.full:
            shapes += [(128, 2048)]
    rows = []
    for kind in ("msa", "pair"):
        seen = set()
        for n_seq, n_res in shapes:
            rows_dim = n_seq if kind == "msa" else n_res
            if (rows_dim, n_res) not in seen:
                seen.add((rows_dim, n_res))
                rows.append(dict(kind=kind, n_seq=n_seq, n_res=n_res, rows=rows_dim, c=c[kind]))
    return rows


def provider_fn(name, p, dtype, device):
    """() -> (forward closure, tensors whose gradients the backward computes)."""
    from openfold.model.primitives import LayerNorm

    from fastfold_plugin.kernels.layer_norm import layer_norm, layer_norm_torch
    from fastfold_plugin.testing import randomize_parameters_

    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(1, p["rows"], p["n_res"], p["c"], generator=g)
    x = x.to(device=device, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32).requires_grad_()
    if name in ("openfold", "plugin"):
        mod = randomize_parameters_(LayerNorm(p["c"]), seed=0).to(device)
    else:
        mod = randomize_parameters_(torch.nn.LayerNorm(p["c"]), seed=0).to(device)
    fn = {
        "openfold": lambda: mod(x),
        "torch": lambda: mod(x),
        "plugin": lambda: layer_norm(x, mod.weight, mod.bias, mod.eps),
        "plugin_torch": lambda: layer_norm_torch(x, mod.weight, mod.bias, mod.eps),
    }[name]

    def forward():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return fn()

    return forward, [x, mod.weight, mod.bias]


def installed(name):
    module = "openfold" if name == "openfold" else ("triton" if name.startswith("plugin") else "torch")
    if importlib.util.find_spec(module) is None:
        return f"{name}: `{module}` is not installed, skipped"
    return None


def main(argv=None):
    args = harness.parse_args(__doc__.splitlines()[0], argv)
    device = harness.setup_device(args)
    rec = harness.Recorder("layer_norm", args, device)
    available = harness.available_providers(rec, args, PROVIDERS, lambda name: installed(name))
    for params in sweep(args):
        for dtype in INPUTS:
            for name in available:
                row = dict(op="layer_norm", provider=name, **params, dtype=dtype)
                harness.run_provider(rec, row, lambda n=name, p=params, d=dtype: provider_fn(n, p, d, device),
                                     args, device)
    rec.done()


if __name__ == "__main__":
    main()
