"""Launch shapes of the LayerNorm backward kernel, timed at the Evoformer block's sizes (GPU only).

The backward (``layer_norm_bwd_rows``: dx, and the partial dweight / dbias rows summed by one
reduction) is memory-bound; its launch shape is set by three constants of
kernels/layer_norm.py: elements per row tile (``_BWD_TILE_ELEMS``), programs per SM
(``_BWD_PROGRAMS_PER_SM``) and warps (``_BWD_WARPS``). For each candidate this sets them and
times one backward with ``triton.testing.do_bench`` on the block step's calls: the attentions'
LayerNorms (4 or 5 bf16 output gradients summed, the residual's fp32 gradient added) and the
transitions' (one gradient, the residual's added), MSA and pair, at 128 x 256 and 512 x 384.
Prints per case the candidates from fastest to slowest with the bandwidth they reach (bytes a
call must move / time), the shipped one marked. Used to choose the constants.

    python benchmarks/sweep_layer_norm_bwd.py [--out DIR]
"""
import argparse
import functools
import itertools
import sys
from pathlib import Path

import torch
import triton.testing

from fastfold_plugin.kernels import layer_norm as L

# (label, rows, channels, output gradients summed): bf16 gradients, fp32 x / dx / residual
CASES = [
    ("MSA att 512x384", 512 * 384, 256, 4), ("MSA transition 512x384", 512 * 384, 256, 1),
    ("pair tri-att 384", 384 * 384, 128, 5), ("pair transition 384", 384 * 384, 128, 1),
    ("MSA att 128x256", 128 * 256, 256, 4), ("pair tri-att 256", 256 * 256, 128, 5),
]
TILE_ELEMS, PER_SM, WARPS = (2048, 4096, 8192), (4, 8, 16), (4, 8)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this sweep needs a GPU")
    dev = torch.device("cuda")
    shipped = (L._BWD_TILE_ELEMS, L._BWD_PROGRAMS_PER_SM, L._BWD_WARPS)
    lines = [f"{torch.cuda.get_device_name(dev)}; shipped (tile elems, programs/SM, warps) = "
             f"{shipped}"]
    g = torch.Generator(device=dev).manual_seed(0)
    try:
        for label, m, c, n_dy in CASES:
            x = torch.randn(m, c, device=dev, generator=g)
            w = torch.randn(c, device=dev, generator=g)
            mean, rstd = x.mean(1), x.var(1, unbiased=False).add(1e-5).rsqrt()
            dys = [torch.randn(m, c, device=dev, generator=g).to(torch.bfloat16)
                   for _ in range(n_dy)]
            dres = torch.randn(m, c, device=dev, generator=g)
            nbytes = m * c * (4 + 2 * n_dy + 4 + 4)  # x, the gradients, the residual's, dx
            call = functools.partial(L.layer_norm_bwd_rows, x, w, mean, rstd, dys[0],
                                     torch.float32, more_dy=dys[1:], dres=dres)
            rows = []
            for tile, per_sm, warps in itertools.product(TILE_ELEMS, PER_SM, WARPS):
                L._BWD_TILE_ELEMS, L._BWD_PROGRAMS_PER_SM, L._BWD_WARPS = tile, per_sm, warps
                L._bwd_plan.cache_clear()
                ms = triton.testing.do_bench(call, warmup=10, rep=50)
                rows.append((ms, (tile, per_sm, warps)))
            rows.sort()
            lines.append(f"\n== {label}: [{m}, {c}], {n_dy} gradient(s) + residual, "
                         f"{nbytes / 1e6:.0f} MB")
            for ms, cfg in rows:
                mark = "  <- shipped" if cfg == shipped else ""
                lines.append(f"  {ms * 1e3:8.1f} us  {nbytes / ms / 1e9:6.0f} GB/s  "
                             f"tile {cfg[0]:5d}  programs/SM {cfg[1]:2d}  warps {cfg[2]}{mark}")
            print("\n".join(lines[-len(rows) - 1:]), flush=True)
    finally:
        L._BWD_TILE_ELEMS, L._BWD_PROGRAMS_PER_SM, L._BWD_WARPS = shipped
        L._bwd_plan.cache_clear()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sweep_layer_norm_bwd.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
