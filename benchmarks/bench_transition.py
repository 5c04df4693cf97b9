"""Benchmark: the MSA and pair transitions (LayerNorm, Linear + ReLU, Linear, mask) across providers.

Providers, side by side on the same module weights and inputs (bf16 autocast; the activation is
fp32 as the Evoformer's residual stream, the mask a random fp32 mask):
    openfold          stock OpenFold ``MSATransition`` (c_m 256, n 4) / ``PairTransition``
                      (c_z 128, n 4), unchunked (training's path)
    openfold_compile  ``torch.compile`` of the same module
    plugin            ``fastfold_plugin.kernels.transition`` (Triton LayerNorm and backward
                      passes, cuBLAS GEMMs with fused bias/ReLU epilogues)
A provider that is not installed is skipped with a note. Gradients: the activation and every
parameter.

    python benchmarks/bench_transition.py [--quick | --full | --dry-run] [--out DIR]

--quick (default): N_seq x N_res 128 x 256, 512 x 384, 128 x 1024 (the MSA transition on
[N_seq, N_res, 256], the pair transition on [N_res, N_res, 128]); --full adds N_res 512 and 2048.
"""
import importlib.util

import harness
import torch

PROVIDERS = ("openfold", "openfold_compile", "plugin")
KINDS = ("msa", "pair")


def sweep(args):
    if args.dry_run:
        shapes, c = [(3, 8), (5, 13)], dict(msa=16, pair=8)
    else:
        shapes, c = [(128, 256), (512, 384), (128, 1024)], dict(msa=256, pair=128)
        if args.full:
            shapes += [(128, 512), (128, 2048)]
    rows = []
    for kind in KINDS:
        seen = set()
        for n_seq, n_res in shapes:
            # the pair transition does not depend on N_seq: one row per N_res
            rows_dim = n_seq if kind == "msa" else n_res
            if (rows_dim, n_res) in seen:
                continue
            seen.add((rows_dim, n_res))
            rows.append(dict(kind=kind, n_seq=n_seq, n_res=n_res, rows=rows_dim, c=c[kind], n=4))
    return rows


def make_module(p, device, seed=0):
    from openfold.model.evoformer import MSATransition
    from openfold.model.pair_transition import PairTransition

    from fastfold_plugin.testing import randomize_parameters_

    cls = MSATransition if p["kind"] == "msa" else PairTransition
    return randomize_parameters_(cls(p["c"], p["n"]), seed=seed).to(device)


def make_inputs(p, device, seed=1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(1, p["rows"], p["n_res"], p["c"], generator=g).to(device).requires_grad_()
    mask = (torch.rand(1, p["rows"], p["n_res"], generator=g) > 0.05).float().to(device)
    return x, mask


def _autocast(device, fn):
    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return fn()
    return run


def provider_fn(name, p, device):
    """() -> (forward closure, tensors whose gradients the backward computes)."""
    mod = make_module(p, device)
    x, mask = make_inputs(p, device)
    grads = [x] + list(mod.parameters())
    if name == "openfold":
        return _autocast(device, lambda: mod(x, mask)), grads
    if name == "openfold_compile":
        compiled = torch.compile(mod, dynamic=False)
        return _autocast(device, lambda: compiled(x, mask)), grads
    if name == "plugin":
        from fastfold_plugin.kernels.transition import transition

        def forward():
            return transition(x, mask.unsqueeze(-1), mod.layer_norm.weight, mod.layer_norm.bias,
                              mod.linear_1.weight, mod.linear_1.bias, mod.linear_2.weight,
                              mod.linear_2.bias, eps=mod.layer_norm.eps)

        return _autocast(device, forward), grads
    raise ValueError(name)


def installed(name, dry_run):
    module = {"openfold": "openfold", "openfold_compile": "openfold", "plugin": "triton"}[name]
    if importlib.util.find_spec(module) is None:
        return f"{name}: `{module}` is not installed, skipped"
    if name == "openfold_compile" and dry_run:
        return f"{name}: torch.compile is skipped in a dry run (about 30 s per shape on CPU)"
    return None


def flops_fwd(p):
    """Forward matmul FLOPs: linear_1 and linear_2."""
    return 2 * 2 * p["rows"] * p["n_res"] * p["c"] * p["n"] * p["c"]


def main(argv=None):
    args = harness.parse_args(__doc__.splitlines()[0], argv)
    device = harness.setup_device(args)
    rec = harness.Recorder("transition", args, device)
    available = harness.available_providers(rec, args, PROVIDERS, lambda name: installed(name, args.dry_run))
    for params in sweep(args):
        for name in available:
            row = dict(op="transition", provider=name, **params, dtype="bf16-autocast",
                       flops_fwd=flops_fwd(params))
            harness.run_provider(rec, row, lambda n=name, p=params: provider_fn(n, p, device), args, device)
    rec.done()


if __name__ == "__main__":
    main()
