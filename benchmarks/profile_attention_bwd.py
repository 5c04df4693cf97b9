"""Attention backward breakdown: time per kernel and per launch configuration (GPU only).

For each case (bench_attention's inputs, bf16): forward time; the backward in each variant
(V = dQ and pair-bias gradient in their own kernels, as before; Q = dQ fused into the dK/dV
kernel with fp32 atomics; QB = dQ and the pair-bias gradient both fused there, the default),
with a profiler breakdown per kernel and the gradients' difference from the first variant;
with --sweep, per-config timings of the dK/dV, dQ and bias-gradient kernels over a wide
candidate list (the autotuner's own measurements).

    python benchmarks/profile_attention_bwd.py [--cases tri1024,msa128x256] [--variants V,QB]
        [--sweep]

Measured on an H200 (bwd ms; fwd 3.20 / 0.22 / 0.21 / 0.64):
    tri-att N 1024: V 32.3 (bias-gradient kernel 23.6, dK/dV 5.5, dQ 3.4); Q 31.6
    MSA row 128 x 256: V 1.60 (bias grad 0.42, dK/dV 0.12, dQ 0.08); Q 0.83
    MSA row 512 x 384: V 6.49 (bias grad 4.88, dK/dV 0.88, dQ 0.58); Q 6.42
    QB (from bench_attention --quick, same card): tri-att 1024 11.78, 256 0.45;
    MSA row 128 x 256 0.58, 512 x 384 1.98. (Its per-kernel breakdown is still to be run.)
"""
import argparse
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_attention  # noqa: E402

from fastfold_plugin.kernels import attention as A  # noqa: E402

CASES = {
    "tri256": ("tri_att", dict(n_res=256, heads=4, c=32)),
    "tri1024": ("tri_att", dict(n_res=1024, heads=4, c=32)),
    "msa128x256": ("msa_row", dict(n_seq=128, n_res=256, heads=8, c=32)),
    "msa512x384": ("msa_row", dict(n_seq=512, n_res=384, heads=8, c=32)),
    "col128x256": ("msa_col", dict(n_seq=128, n_res=256, heads=8, c=32)),
    "col512x384": ("msa_col", dict(n_seq=512, n_res=384, heads=8, c=32)),
}
# (BLOCK_M, BLOCK_N, num_warps, num_stages)
DKDV = [(64, 128, 8, 2), (32, 128, 4, 3), (64, 64, 4, 3), (32, 64, 4, 2), (128, 128, 8, 2),
        (64, 128, 4, 3), (64, 128, 8, 3), (128, 128, 8, 3), (32, 128, 4, 2), (64, 64, 4, 2)]
DQ = [(128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3), (64, 128, 4, 2),
      (128, 128, 8, 2), (128, 64, 4, 3), (128, 128, 8, 3), (64, 128, 4, 3)]
DBIAS_BLOCKS = [(64, 64), (128, 64), (64, 128), (128, 128)]
DBIAS_WARPS = [(4, 3), (8, 2), (4, 2), (8, 3)]
LOG = []


def say(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    LOG.append(s)


def tuner(fn, blocks, key, **kw):
    return triton.autotune(A._configs(blocks), key=key,
                           prune_configs_by={"early_config_prune": A._prune}, **kw)(fn)


def timings(t, default=None):
    if not getattr(t, "configs_timings", None):
        return "(not tuned here)"
    rows = sorted(((v[0] if isinstance(v, (list, tuple)) else v, c) for c, v in
                   t.configs_timings.items()), key=lambda r: r[0])
    out = []
    for ms, c in rows:
        m = (c.kwargs.get("BLOCK_M"), c.kwargs.get("BLOCK_N"), c.num_warps, c.num_stages)
        tag = "*" if default is not None and m in default else " "
        out.append(f"{tag}{m}:{ms:.3f}")
    return " ".join(out)


def profile(fn, n=3):
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append((t / n / 1000.0, e.key[:60]))
    rows.sort(reverse=True)
    return rows


VARIANTS = {"V": (False, False), "Q": (True, False), "QB": (True, True), "B": (False, True)}


def run_case(name, variants, sweep):
    case, p = CASES[name]
    inp = bench_attention.make_inputs(case, p, torch.device("cuda"))
    fwd, grads = bench_attention.provider_fn("plugin", case, inp, torch.device("cuda"))
    with torch.no_grad():
        t_fwd = triton.testing.do_bench(fwd, quantiles=[0.5])
    out = fwd()  # (with gradients: the forward a training step tunes and runs)
    say(f"{name} fwd configs (ms, training forward):", timings(A._fwd_tuned))
    dout = torch.randn_like(out)

    def bwd():
        return torch.autograd.grad(out, grads, dout, retain_graph=True)

    ref = None
    for var in variants:
        A._FUSE_DQ, A._FUSE_DB = VARIANTS[var]
        t0 = time.time()
        g = bwd()
        torch.cuda.synchronize()
        tune_s = time.time() - t0
        if ref is None:
            ref = g
        else:
            errs = [f"{((a.float() - b.float()).norm() / b.float().norm()).item():.1e}"
                    for a, b in zip(g, ref)]
            say(f"  {name} {var}: grads rel diff vs {variants[0]}: {errs}")
        t_bwd = triton.testing.do_bench(bwd, quantiles=[0.5])
        say(f"{name} {var}: fwd {t_fwd:.3f} ms  bwd {t_bwd:.3f} ms  (tuning {tune_s:.0f}s)")
        if sweep:
            say("  dkdv:", timings(A._dkdv_tuned, A._DKDV_BLOCKS))
            if not A._FUSE_DQ:
                say("  dq:  ", timings(A._dq_tuned, A._DQ_BLOCKS))
        for ms, k in profile(bwd)[:8]:
            say(f"    {ms:8.3f} ms  {k}")
    A._FUSE_DQ, A._FUSE_DB = VARIANTS["V"]
    if not sweep:
        A._FUSE_DQ, A._FUSE_DB = VARIANTS["QB"]
        return
    # bias-gradient block sizes
    for bm, bn in DBIAS_BLOCKS:
        A._DBIAS_BLOCK_M, A._DBIAS_BLOCK_N = bm, bn
        A._dbias_tuned = triton.autotune(
            [triton.Config({}, num_warps=w, num_stages=s) for w, s in DBIAS_WARPS],
            key=A._TUNE_KEY + ["RED_Z0", "RED_Z1", "RED_H", "RED_Q"])(
            A._attention_bwd_dbias_kernel)
        bwd()
        rows = [(v[0] if isinstance(v, (list, tuple)) else v, c) for c, v in
                A._dbias_tuned.configs_timings.items()]
        say(f"  dbias {bm}x{bn}: " + " ".join(
            f"(w{c.num_warps},s{c.num_stages}):{ms:.3f}" for ms, c in sorted(rows, key=lambda r: r[0])))
    A._DBIAS_BLOCK_M = A._DBIAS_BLOCK_N = 64
    A._FUSE_DQ, A._FUSE_DB = VARIANTS["QB"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="tri1024,msa128x256,tri256,msa512x384")
    ap.add_argument("--variants", default="V,Q,QB")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    say("device:", torch.cuda.get_device_name(), "triton", triton.__version__)
    if args.sweep:
        A._dkdv_tuned = tuner(A._attention_bwd_dkdv_kernel, DKDV,
                              A._TUNE_KEY + ["FUSE_DQ", "FUSE_DB", "FOLD_PRE", "HAS_GATE"],
                              reset_to_zero=["DQA", "DB"])
        A._dq_tuned = tuner(A._attention_bwd_dq_kernel, DQ, A._TUNE_KEY)
    try:
        for name in args.cases.split(","):
            run_case(name, args.variants.split(","), args.sweep)
    finally:
        if args.out:
            with open(os.path.join(args.out, "profile_attention_bwd.txt"), "w") as f:
                f.write("\n".join(LOG) + "\n")


if __name__ == "__main__":
    main()
