"""Benchmark: an attention's gate or output projection (a Linear with a bias over every row of
the MSA or the pair tensor) in training under bf16 autocast, with and without ``linear``.

Providers, side by side on the same weights and inputs:
    openfold   stock: ``F.linear``; autograd forms the bias gradient as torch's sum over the rows
    plugin     ``fastfold_plugin.kernels.linear.linear_fused``: the same forward, dx and dW, and
               the bias gradient as a Triton column sum (what ``linear`` runs inside a captured
               CUDA graph; in eager mode on a GPU ``linear`` is ``F.linear``)
Gradients: the input, the weight and the bias.

    python benchmarks/bench_linear.py [--quick | --full | --dry-run] [--out DIR]

--quick (default): the MSA projection [N_seq, N_res, 256] at 128 x 256 and 512 x 384 and the
pair projection [N_res, N_res, 128] at N_res 256 and 384; --full adds N_res 1024 (pair).
Timed eagerly, so the host's share shows: the captured block step's gain is
``benchmarks/ab_op.py --op linear``; ``benchmarks/profile_linear.py`` splits GPU and host time.
"""
import harness
import torch

PROVIDERS = ("openfold", "plugin")


def sweep(args):
    if args.dry_run:
        return [dict(kind="msa", rows=3, n_res=8, c=16)]
    rows = [dict(kind="msa", rows=128, n_res=256, c=256),
            dict(kind="msa", rows=512, n_res=384, c=256),
            dict(kind="pair", rows=256, n_res=256, c=128),
            dict(kind="pair", rows=384, n_res=384, c=128)]
    if args.full:
        rows.append(dict(kind="pair", rows=1024, n_res=1024, c=128))
    return rows


def provider_fn(name, p, device):
    """() -> (forward closure, tensors whose gradients the backward computes)."""
    import torch.nn.functional as F

    from fastfold_plugin.kernels.linear import linear_fused

    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(1, p["rows"], p["n_res"], p["c"], generator=g).to(device).requires_grad_()
    w = (torch.randn(p["c"], p["c"], generator=g) / p["c"] ** 0.5).to(device).requires_grad_()
    b = torch.randn(p["c"], generator=g).to(device).requires_grad_()
    fn = linear_fused if name == "plugin" else F.linear

    def forward():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return fn(x.to(torch.bfloat16), w, b)  # (the attention's bf16 output, as o is)

    return forward, [x, w, b]


def main(argv=None):
    harness.run_sweep("linear", __doc__.splitlines()[0], PROVIDERS, sweep, provider_fn, argv,
                      dtype="fp32-autocast")


if __name__ == "__main__":
    main()
