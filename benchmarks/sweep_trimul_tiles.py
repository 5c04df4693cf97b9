"""Per-tile timings of the triangle multiplication's four kernels (GPU only).

Replaces each kernel's autotuner with one over a wide candidate list (BLOCK_M x inner tile x
warps x stages), runs the op's forward and backward once at each N_res (bench_triangle_multiplication's
inputs: bf16 autocast, c_z = c_hidden = 128, outgoing) so that every candidate is timed by
Triton's autotuner, and prints each kernel's candidates from fastest to slowest (ms), the
shipped candidate list's best marked. Used to choose the tile lists in
kernels/triangle_multiplication.py.

    python benchmarks/sweep_trimul_tiles.py [--n-res 384,1024] [--out DIR]
"""
import argparse
import itertools
import os
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_triangle_multiplication as bench  # noqa: E402

from fastfold_plugin.kernels import triangle_multiplication as T  # noqa: E402

# (attribute of the tuned kernel, jit kernel, inner tile name, width arg, key, extra kwargs)
KERNELS = [
    ("_proj_fwd_tuned", T._trimul_proj_fwd_kernel, "BLOCK_H", "CH", T._PROJ_KEY, {}),
    ("_out_fwd_tuned", T._trimul_out_fwd_kernel, "BLOCK_N", "CZ", T._KEY, {}),
    ("_out_bwd_tuned", T._trimul_out_bwd_kernel, "BLOCK_N", "CZ", T._KEY, {"reset_to_zero": ["PART"]}),
    ("_proj_bwd_tuned", T._trimul_proj_bwd_kernel, "BLOCK_H", "CH", T._PROJ_BWD_KEY, {"reset_to_zero": ["PART"]}),
]
SHIPPED = {"_proj_fwd_tuned": T._FWD_SHAPES, "_out_fwd_tuned": T._FWD_SHAPES,
           "_out_bwd_tuned": T._BWD_SHAPES, "_proj_bwd_tuned": T._BWD_SHAPES}
# backward BLOCK_M >= the partial buffers' minimum (T._MIN_BWD_BLOCK_M)
FWD_M, FWD_INNER = (64, 128, 256), (32, 64, 128)
BWD_M, BWD_INNER = (32, 64, 128), (16, 32, 64)
WARPS_STAGES = ((4, 2), (8, 2), (8, 3))


def candidates(backward: bool):
    m, inner = (BWD_M, BWD_INNER) if backward else (FWD_M, FWD_INNER)
    return [(bm, bi, w, s) for bm, bi, (w, s) in itertools.product(m, inner, WARPS_STAGES)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-res", default="384,1024")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this sweep needs a GPU")
    if os.environ.get("FASTFOLD_PLUGIN_AUTOTUNE", "1").strip() == "0":
        sys.exit("FASTFOLD_PLUGIN_AUTOTUNE=0 keeps one candidate per kernel: unset it to sweep")
    device = torch.device("cuda")
    tuners = {}
    for attr, fn, inner, width, key, kw in KERNELS:
        cands = candidates("bwd" in attr)
        configs = [triton.Config({"BLOCK_M": bm, inner: bi}, num_warps=w, num_stages=s)
                   for bm, bi, w, s in cands]
        tuners[attr] = T.autotune(configs, key=key, prune=T._prune_inner(inner, width), **kw)(fn)
        setattr(T, attr, tuners[attr])
    lines = []
    for n in (int(x) for x in args.n_res.split(",")):
        params = dict(n_res=n, c_z=128, c_hidden=128)
        forward, grads = bench.provider_fn("plugin", "outgoing", params, device)
        out = forward()
        torch.autograd.grad(out, grads, torch.randn_like(out))
        torch.cuda.synchronize()
        for attr, _, inner, *_ in KERNELS:
            t = tuners[attr]
            rows = sorted((float(ms if not isinstance(ms, (list, tuple)) else ms[0]),
                           (c.kwargs["BLOCK_M"], c.kwargs[inner], c.num_warps, c.num_stages))
                          for c, ms in t.configs_timings.items())
            shipped = {(*sh, 2) for sh in SHIPPED[attr]}
            best_shipped = min((r for r in rows if r[1] in shipped), default=None)
            lines.append(f"== N_res {n} {attr[1:-6]}: best {rows[0][1]} {rows[0][0]:.3f} ms; "
                         f"best of the shipped list {best_shipped}")
            lines += [f"   {ms:8.3f}  BLOCK_M={c[0]:<4} inner={c[1]:<4} warps={c[2]} stages={c[3]}"
                      for ms, c in rows[:8]]
            print("\n".join(lines[-9:]), flush=True)
            t.reset()
        del forward, grads, out
        torch.cuda.empty_cache()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sweep_trimul_tiles.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
