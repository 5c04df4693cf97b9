"""Benchmark: the attention core (OpenFold's `_attention` + gating) across providers.

Providers, side by side on the same inputs:
    openfold          stock OpenFold: ``primitives._attention`` on q, k, v and the two biases
                      (plus ``o * sigmoid(gate)`` in the gated cases)
    openfold_compile  ``torch.compile`` of the same function
    plugin            ``fastfold_plugin.kernels.attention.attention`` (Triton, flash-style)
    trifast           ``trifast.triangle_attention`` (triangle case only)
    cueq              ``cuequivariance_torch.triangle_attention`` (cases with one pair bias
                      of shape [B, 1, H, Q, K] and a key mask)
A provider that is not installed is skipped with a note.

Cases (bf16, as under OpenFold's bf16 autocast: mask bias fp32, pair bias bf16):
    tri_att   triangle attention, q/k/v [1, N, 4, N, 32], pair bias [1, 1, 4, N, N], no gate
              (the shapes of ../shared/bench/anchor_cueq.py)
    msa_row   MSA row attention with pair bias and gate, H 8, C 32, N_seq x N_res
    msa_col   MSA column attention with gate, no pair bias, H 8, C 32
    extra_row extra-MSA row attention, H 8, C 8

    python benchmarks/bench_attention.py [--quick | --full | --dry-run] [--out DIR]
"""
import importlib.util

import harness
import torch

OP = "attention"
PROVIDERS = ("openfold", "openfold_compile", "plugin", "trifast", "cueq")


def sweep(args):
    """(case, params) pairs for the chosen sweep."""
    if args.dry_run:
        return [("tri_att", dict(n_res=n, heads=2, c=16)) for n in (5, 9)] + [
            ("msa_row", dict(n_seq=2, n_res=9, heads=2, c=8))]
    if args.full:
        tri = [128, 256, 384, 512, 768, 1024, 1536, 2048]
        msa = [(128, 256), (128, 384), (512, 384), (128, 1024)]
        extra = [(1024, 256), (1024, 384), (5120, 384)]
    else:
        tri = [256, 384, 1024]
        msa = [(128, 256), (512, 384)]
        extra = [(1024, 384)]
    cases = [("tri_att", dict(n_res=n, heads=4, c=32)) for n in tri]
    cases += [("msa_row", dict(n_seq=s, n_res=r, heads=8, c=32)) for s, r in msa]
    cases += [("msa_col", dict(n_seq=s, n_res=r, heads=8, c=32)) for s, r in msa]
    cases += [("extra_row", dict(n_seq=s, n_res=r, heads=8, c=8)) for s, r in extra]
    return cases


def make_inputs(case, p, device, dtype=torch.bfloat16, seed=0):
    """OpenFold-layout inputs: q/k/v [B, rows, H, L, C] as views of [B, rows, L, H*C] Linear
    outputs, mask bias [B, rows, 1, 1, L] fp32, pair bias [B, 1, H, L, L], gate."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    h, c = p["heads"], p["c"]
    if case == "tri_att":
        rows, length, pair, gated = p["n_res"], p["n_res"], True, False
    elif case in ("msa_row", "extra_row"):
        rows, length, pair, gated = p["n_seq"], p["n_res"], True, True
    elif case == "msa_col":
        rows, length, pair, gated = p["n_res"], p["n_seq"], False, True
    else:
        raise ValueError(case)

    def heads(scale=1.0):
        x = torch.randn(1, rows, length, h * c, generator=g) * scale
        x = x.to(device=device, dtype=dtype).view(1, rows, length, h, c).transpose(-2, -3)
        return x.requires_grad_()

    q, k, v = heads(c ** -0.5), heads(), heads()
    mask = torch.rand(1, rows, 1, 1, length, generator=g) > 0.1
    mask[..., 0] = True
    inputs = dict(q=q, k=k, v=v, mask=mask.to(device), mask_bias=(1e9 * (mask.float() - 1)).to(
        device), pair_bias=None, gate=None)
    if pair:
        inputs["pair_bias"] = torch.randn(1, 1, h, length, length, generator=g).to(
            device=device, dtype=dtype).requires_grad_()
    if gated:
        inputs["gate"] = torch.randn(1, rows, length, h, c, generator=g).to(
            device=device, dtype=dtype).requires_grad_()
    return inputs


def _grad_inputs(inputs):
    return [inputs[n] for n in ("q", "k", "v", "pair_bias", "gate") if inputs[n] is not None]


def _stock(inputs):
    """OpenFold's attention core, called as its Attention module calls it."""
    from openfold.model.primitives import _attention

    biases = [b for b in (inputs["mask_bias"], inputs["pair_bias"]) if b is not None]

    def core(q, k, v, biases, gate):
        o = _attention(q, k, v, biases).transpose(-2, -3)
        return o if gate is None else o * torch.sigmoid(gate)

    return core, biases


def provider_fn(name, case, inputs, device):
    """() -> (forward closure, tensors whose gradients the backward computes)."""
    grads = _grad_inputs(inputs)
    q, k, v, gate = inputs["q"], inputs["k"], inputs["v"], inputs["gate"]
    if name == "openfold":
        core, biases = _stock(inputs)
        return lambda: core(q, k, v, biases, gate), grads
    if name == "openfold_compile":
        core, biases = _stock(inputs)
        compiled = torch.compile(core, dynamic=False)
        return lambda: compiled(q, k, v, biases, gate), grads
    if name == "plugin":
        from fastfold_plugin.kernels.attention import attention

        mb, pb = inputs["mask_bias"], inputs["pair_bias"]
        return lambda: attention(q, k, v, mb, pb, gate), grads
    if name == "trifast":
        from trifast import triangle_attention

        # trifast takes [B, H, N, N, C] (contiguous), bias [B, H, N, N], mask [B, N, N] (True =
        # masked) and scales q itself: layouts are prepared outside the timing.
        qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
        bt = inputs["pair_bias"].detach()[:, 0].contiguous().requires_grad_()
        mt = ~inputs["mask"][:, :, 0, 0, :]
        return lambda: triangle_attention(qt, kt, vt, bt, mt), [qt, kt, vt, bt]
    if name == "cueq":
        import cuequivariance_torch as cuet

        # [B, N, H, Q, C] with bias [B, 1, H, Q, K] (cast to fp32 inside) and a bool key mask
        pb = inputs["pair_bias"]
        mask = inputs["mask"]
        return lambda: cuet.triangle_attention(q, k, v, pb, mask, 1.0), [q, k, v, pb]
    raise ValueError(name)


def applicable(name, case):
    if name == "trifast":
        return case == "tri_att"
    if name == "cueq":
        return case in ("tri_att",)  # no gate in its API: compared on the ungated case only
    return True


def installed(name, device, dry_run):
    module = {"openfold": "openfold", "openfold_compile": "openfold", "plugin": "triton",
              "trifast": "trifast", "cueq": "cuequivariance_torch"}[name]
    if importlib.util.find_spec(module) is None:
        return f"{name}: `{module}` is not installed, skipped"
    if name in ("trifast", "cueq") and device.type != "cuda":
        return f"{name}: needs a GPU, skipped in a dry run"
    if name == "openfold_compile" and dry_run:
        return f"{name}: torch.compile is skipped in a dry run (about 30 s per shape on CPU)"
    return None


def main(argv=None):
    args = harness.parse_args(__doc__.splitlines()[0], argv)
    device = harness.setup_device(args)
    rec = harness.Recorder("attention", args, device)
    available = harness.available_providers(rec, args, PROVIDERS, lambda name: installed(name, device, args.dry_run))
    for case, params in sweep(args):
        for name in available:
            if not applicable(name, case):
                continue
            inputs = make_inputs(case, params, device)
            row = dict(op=OP, provider=name, case=case, **params, dtype="bf16",
                       flops_fwd=_flops(case, params))
            harness.run_provider(rec, row, lambda n=name, c=case, i=inputs: provider_fn(
                n, c, i, device), args, device)
            inputs = None
    rec.done()


def _flops(case, p):
    """Forward matmul FLOPs (q k^T and p v)."""
    if case == "tri_att":
        rows = length = p["n_res"]
    elif case == "msa_col":
        rows, length = p["n_res"], p["n_seq"]
    else:
        rows, length = p["n_seq"], p["n_res"]
    return 4 * rows * p["heads"] * length * length * p["c"]


if __name__ == "__main__":
    main()
