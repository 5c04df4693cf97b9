"""Benchmark: the outer product mean (AlphaFold2 Algorithm 10) across providers.

Providers, side by side on the same module weights and inputs (bf16 autocast, m fp32 as the
Evoformer's MSA stream, c_m 256, c_hidden 32, c_z 128, a random MSA mask):
    openfold          stock OpenFold ``OuterProductMean`` (eager, no chunking: training's path)
    openfold_compile  ``torch.compile`` of the same module
    plugin            ``fastfold_plugin.kernels.outer_product_mean`` (Triton + cuBLAS, chunked
                      outer product with a fused linear_out / norm epilogue)
A provider that is not installed is skipped with a note. Gradients: m and every parameter.

    python benchmarks/bench_outer_product_mean.py [--quick | --full | --dry-run] [--out DIR]

--quick (default): N_seq 128 x N_res 256, 384, 512, 1024, 2048, and the fine-tuning shape
512 x 384; --full adds N_seq 512 at every N_res.
"""
import importlib.util

import harness
import torch

OP = "opm"
PROVIDERS = ("openfold", "openfold_compile", "plugin")


def sweep(args):
    if args.dry_run:
        return [dict(n_seq=s, n_res=r, c_m=16, c_hidden=8, c_z=16) for s, r in ((3, 8), (5, 13))]
    shapes = [(128, n) for n in (256, 384, 512, 1024, 2048)] + [(512, 384)]
    if args.full:
        shapes += [(512, n) for n in (256, 512, 1024, 2048)]
    return [dict(n_seq=s, n_res=r, c_m=256, c_hidden=32, c_z=128) for s, r in shapes]


def make_module(p, device, seed=0):
    from openfold.model.outer_product_mean import OuterProductMean

    from fastfold_plugin.testing import randomize_parameters_

    mod = OuterProductMean(p["c_m"], p["c_z"], p["c_hidden"])
    return randomize_parameters_(mod, seed=seed).to(device)


def make_inputs(p, device, seed=1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    m = torch.randn(1, p["n_seq"], p["n_res"], p["c_m"], generator=g).to(device).requires_grad_()
    mask = (torch.rand(1, p["n_seq"], p["n_res"], generator=g) > 0.05).float().to(device)
    return m, mask


def _autocast(device, fn):
    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return fn()
    return run


def provider_fn(name, p, device):
    """() -> (forward closure, tensors whose gradients the backward computes)."""
    mod = make_module(p, device)
    m, mask = make_inputs(p, device)
    grads = [m] + list(mod.parameters())
    if name == "openfold":
        return _autocast(device, lambda: mod(m, mask)), grads
    if name == "openfold_compile":
        compiled = torch.compile(mod, dynamic=False)
        return _autocast(device, lambda: compiled(m, mask)), grads
    if name == "plugin":
        from fastfold_plugin.kernels.outer_product_mean import outer_product_mean

        def forward():
            return outer_product_mean(
                m, mask, mod.layer_norm.weight, mod.layer_norm.bias, mod.linear_1.weight, mod.linear_1.bias,
                mod.linear_2.weight, mod.linear_2.bias, mod.linear_out.weight, mod.linear_out.bias,
                eps=mod.eps, ln_eps=mod.layer_norm.eps)

        return _autocast(device, forward), grads
    raise ValueError(name)


def installed(name, device, dry_run):
    module = {"openfold": "openfold", "openfold_compile": "openfold", "plugin": "triton"}[name]
    if importlib.util.find_spec(module) is None:
        return f"{name}: `{module}` is not installed, skipped"
    if name == "openfold_compile" and dry_run:
        return f"{name}: torch.compile is skipped in a dry run (about 30 s per shape on CPU)"
    return None


def flops_fwd(p):
    """Forward matmul FLOPs: the two projections, the outer product over N_seq, linear_out."""
    s, r, cm, c, cz = p["n_seq"], p["n_res"], p["c_m"], p["c_hidden"], p["c_z"]
    return 2 * s * r * cm * 2 * c + 2 * r * r * c * c * s + 2 * r * r * c * c * cz


def main(argv=None):
    args = harness.parse_args(__doc__.splitlines()[0], argv)
    device = harness.setup_device(args)
    rec = harness.Recorder("outer_product_mean", args, device)
    available = harness.available_providers(rec, args, PROVIDERS, lambda name: installed(name, device, args.dry_run))
    for params in sweep(args):
        for name in available:
            row = dict(op=OP, provider=name, **params, dtype="bf16-autocast", flops_fwd=flops_fwd(params))
            harness.run_provider(rec, row, lambda n=name, p=params: provider_fn(n, p, device), args, device)
    rec.done()


if __name__ == "__main__":
    main()
