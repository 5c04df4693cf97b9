"""Benchmark: the triangle multiplicative update (AlphaFold2 Algorithms 11/12) across providers.

Providers, side by side on the same module weights and inputs (bf16 autocast, z fp32 as the
Evoformer's pair stream, c_z = c_hidden = 128, a random pair mask):
    openfold          stock OpenFold ``TriangleMultiplicationOutgoing`` / ``Incoming`` (eager)
    openfold_compile  ``torch.compile`` of the same module
    plugin            ``fastfold_plugin.kernels.triangle_multiplication`` (Triton + cuBLAS)
    cueq              ``cuequivariance_torch.triangle_multiplicative_update`` (the same maths:
                      its input projection and gate take [a; b] stacked weights, built per call)
A provider that is not installed is skipped with a note. Gradients: z and every parameter.

    python benchmarks/bench_triangle_multiplication.py [--quick | --full | --dry-run] [--out DIR]

--quick (default): N_res 256, 384, 512, 1024, 2048, outgoing; --full adds incoming.
"""
import importlib.util
import inspect

import harness
import torch

OP = "trimul"
PROVIDERS = ("openfold", "openfold_compile", "plugin", "cueq")


def sweep(args):
    """(direction, params) pairs for the chosen sweep."""
    if args.dry_run:
        return [("outgoing", dict(n_res=n, c_z=16, c_hidden=16)) for n in (8, 17)] + [
            ("incoming", dict(n_res=9, c_z=16, c_hidden=16))]
    sizes = (256, 384, 512, 1024, 2048)
    directions = ("outgoing", "incoming") if args.full else ("outgoing",)
    return [(d, dict(n_res=n, c_z=128, c_hidden=128)) for d in directions for n in sizes]


def make_module(direction, p, device, seed=0):
    from openfold.model.triangular_multiplicative_update import (
        TriangleMultiplicationIncoming,
        TriangleMultiplicationOutgoing,
    )

    from fastfold_plugin.testing import randomize_parameters_

    cls = TriangleMultiplicationOutgoing if direction == "outgoing" else TriangleMultiplicationIncoming
    return randomize_parameters_(cls(p["c_z"], p["c_hidden"]), seed=seed).to(device)


def make_inputs(p, device, seed=1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    n = p["n_res"]
    z = torch.randn(1, n, n, p["c_z"], generator=g).to(device).requires_grad_()
    mask = (torch.rand(1, n, n, generator=g) > 0.05).float().to(device)
    return z, mask


def trimul_weights(mod):
    """The op's TriMulWeights from the module's own parameters (as the patch builds them)."""
    from fastfold_plugin.kernels.triangle_multiplication import TriMulWeights

    return TriMulWeights(
        mod.layer_norm_in.weight, mod.layer_norm_in.bias,
        mod.linear_a_p.weight, mod.linear_a_p.bias, mod.linear_a_g.weight, mod.linear_a_g.bias,
        mod.linear_b_p.weight, mod.linear_b_p.bias, mod.linear_b_g.weight, mod.linear_b_g.bias,
        mod.layer_norm_out.weight, mod.layer_norm_out.bias,
        mod.linear_z.weight, mod.linear_z.bias, mod.linear_g.weight, mod.linear_g.bias,
    )


def _autocast(device, fn):
    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return fn()
    return run


def provider_fn(name, direction, p, device):
    """() -> (forward closure, tensors whose gradients the backward computes)."""
    mod = make_module(direction, p, device)
    z, mask = make_inputs(p, device)
    grads = [z] + list(mod.parameters())
    outgoing = direction == "outgoing"
    if name == "openfold":
        return _autocast(device, lambda: mod(z, mask)), grads
    if name == "openfold_compile":
        compiled = torch.compile(mod, dynamic=False)
        return _autocast(device, lambda: compiled(z, mask)), grads
    if name == "plugin":
        from fastfold_plugin.kernels.triangle_multiplication import triangle_multiplication

        return _autocast(device, lambda: triangle_multiplication(z, mask, trimul_weights(mod), outgoing,
                                                                 mod.layer_norm_in.eps)), grads
    if name == "cueq":
        import cuequivariance_torch as cuet

        takes_bias = "p_in_bias" in inspect.signature(cuet.triangle_multiplicative_update).parameters

        def forward():
            kw = dict(
                direction=direction, mask=mask,
                norm_in_weight=mod.layer_norm_in.weight, norm_in_bias=mod.layer_norm_in.bias,
                p_in_weight=torch.cat([mod.linear_a_p.weight, mod.linear_b_p.weight]),
                g_in_weight=torch.cat([mod.linear_a_g.weight, mod.linear_b_g.weight]),
                norm_out_weight=mod.layer_norm_out.weight, norm_out_bias=mod.layer_norm_out.bias,
                p_out_weight=mod.linear_z.weight, g_out_weight=mod.linear_g.weight,
                eps=mod.layer_norm_in.eps,
            )
            if takes_bias:
                kw.update(
                    p_in_bias=torch.cat([mod.linear_a_p.bias, mod.linear_b_p.bias]),
                    g_in_bias=torch.cat([mod.linear_a_g.bias, mod.linear_b_g.bias]),
                    p_out_bias=mod.linear_z.bias, g_out_bias=mod.linear_g.bias,
                )
            return cuet.triangle_multiplicative_update(z, **kw)

        if not takes_bias:  # older releases take no linear biases: same work, biases unused
            grads = [z] + [t for n, t in mod.named_parameters()
                           if not (n.startswith("linear_") and n.endswith(".bias"))]
        return _autocast(device, forward), grads
    raise ValueError(name)


def installed(name, device, dry_run):
    module = {"openfold": "openfold", "openfold_compile": "openfold", "plugin": "triton",
              "cueq": "cuequivariance_torch"}[name]
    if importlib.util.find_spec(module) is None:
        return f"{name}: `{module}` is not installed, skipped"
    if name == "cueq" and device.type != "cuda":
        return f"{name}: needs a GPU, skipped in a dry run"
    if name == "openfold_compile" and dry_run:
        return f"{name}: torch.compile is skipped in a dry run (about 30 s per shape on CPU)"
    return None


def flops_fwd(p):
    """Forward matmul FLOPs: five input projections, the contraction, linear_z."""
    n2, cz, ch = p["n_res"] ** 2, p["c_z"], p["c_hidden"]
    return 2 * n2 * cz * (4 * ch + cz) + 2 * n2 * p["n_res"] * ch + 2 * n2 * ch * cz


def main(argv=None):
    args = harness.parse_args(__doc__.splitlines()[0], argv)
    device = harness.setup_device(args)
    rec = harness.Recorder("triangle_multiplication", args, device)
    available = harness.available_providers(rec, args, PROVIDERS, lambda name: installed(name, device, args.dry_run))
    for direction, params in sweep(args):
        for name in available:
            row = dict(op=OP, provider=name, direction=direction, **params, dtype="bf16-autocast",
                       flops_fwd=flops_fwd(params))
            harness.run_provider(rec, row, lambda n=name, d=direction, p=params: provider_fn(n, d, p, device),
                                 args, device)
    rec.done()


if __name__ == "__main__":
    main()
