"""Benchmark: the outer product mean on one DAP rank's shard, as the sharded Evoformer block runs
it in training (bf16 autocast): the MSA's columns in, this rank's pair rows out.

Providers, side by side on the same weights and inputs:
    openfold   OpenFold's maths on the shard (the reference ops: torch's LayerNorm, the two
               Linears times the mask, the outer product by einsum, linear_out, the division by
               the pair counts)
    plugin     ``outer_product_mean_projections`` (LayerNorm, both projections and the mask in
               one kernel) and ``outer_product_mean_rows`` (the outer product by GEMM per chunk
               of rows, linear_out / bias / norm fused; backward likewise)
b's all-gather over the group is stood in for by concatenating the local b with the other ranks'
(a fixed tensor): the same work on both sides, no collective. Gradients: the MSA shard and all
eight parameters.

    python benchmarks/bench_opm_shard.py [--quick | --full | --dry-run] [--out DIR]

--quick (default): N_seq 512 x N_res 384 and 128 x 256 on two ranks (the training shapes of
the DAP benchmark); --full adds four ranks.
"""
import harness
import torch

PROVIDERS = ("openfold", "plugin")


def sweep(args):
    if args.dry_run:
        return [dict(n_seq=3, n_res=8, ranks=2, c_m=16, c_hidden=4, c_z=8)]
    rows = [dict(n_seq=512, n_res=384, ranks=2), dict(n_seq=128, n_res=256, ranks=2)]
    if args.full:
        rows += [dict(n_seq=512, n_res=384, ranks=4), dict(n_seq=128, n_res=256, ranks=4)]
    return [dict(r, c_m=256, c_hidden=32, c_z=128) for r in rows]


def provider_fn(name, p, device):
    """() -> (forward closure, tensors whose gradients the backward computes)."""
    from openfold.model.outer_product_mean import OuterProductMean

    from fastfold_plugin.kernels import get_ops
    from fastfold_plugin.testing import randomize_parameters_

    ops = get_ops("reference" if name == "openfold" else "triton")
    mod = randomize_parameters_(OuterProductMean(p["c_m"], p["c_z"], p["c_hidden"]), seed=0)
    mod = mod.to(device)
    g = torch.Generator(device="cpu").manual_seed(1)
    s, n, r = p["n_seq"], p["n_res"], p["n_res"] // p["ranks"]
    m = torch.randn(1, s, r, p["c_m"], generator=g).to(device).requires_grad_()
    mask_full = (torch.rand(1, s, n, generator=g) > 0.05).float().to(device)
    mask = mask_full[..., :r]  # this rank's columns: the first block
    b_other = torch.randn(1, s, n - r, p["c_hidden"], generator=g).to(device)
    norm = torch.einsum("...ab,...ac->...bc", mask, mask_full)
    ln, l1, l2, lo = mod.layer_norm, mod.linear_1, mod.linear_2, mod.linear_out

    def forward():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            a, b = ops.outer_product_mean_projections(m, mask, ln.weight, ln.bias, l1.weight,
                                                      l1.bias, l2.weight, l2.bias, ln.eps)
            b = torch.cat([b, b_other.to(b.dtype)], dim=-2)  # (the all-gather's stand-in)
            return ops.outer_product_mean_rows(a, b, norm, lo.weight, lo.bias, mod.eps,
                                               inference=False)

    return forward, [m] + list(mod.parameters())


def main(argv=None):
    harness.run_sweep("opm_shard", __doc__.splitlines()[0], PROVIDERS, sweep, provider_fn, argv,
                      dtype="fp32-autocast")


if __name__ == "__main__":
    main()
