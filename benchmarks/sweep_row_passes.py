"""Launch shapes of the memory-bound row-loop kernels, timed at the Evoformer block's sizes (GPU).

Three kernels stream over [M, N] rows, each program looping over its share of them and writing
one row of fp32 partial sums: the LayerNorm backward (``layer_norm_bwd_rows``: dx, partial
dweight / dbias), the column sum of a Linear's bias gradient (``linear.column_sum``) and the
transition's backward passes (``transition._bwd_pass``: mask or ReLU, partial bias gradient).
Their launch shapes are module constants: programs per SM (``_BWD_PROGRAMS_PER_SM`` /
``_PROGRAMS_PER_SM``) and, for the LayerNorm, elements per row tile and warps. For each
candidate this sets them and times one call (partial sums and their reduction included) with
``triton.testing.do_bench`` on the block step's calls at 128 x 256 and 512 x 384. Prints per
case the candidates from fastest to slowest with the bandwidth they reach (the bytes a call
must move / its time), the shipped one marked. Used to choose the constants.

    python benchmarks/sweep_row_passes.py [--out DIR]
"""
import argparse
import functools
import itertools
import sys
from pathlib import Path

import torch
import triton.testing

from fastfold_plugin.kernels import layer_norm as L
from fastfold_plugin.kernels import linear as LIN
from fastfold_plugin.kernels import transition as T

# LayerNorm backward: (label, rows, channels, output gradients summed); bf16 gradients, fp32
# x / dx / residual gradient. An attention's LayerNorm has one reader per projection GEMM: the
# packed q/k/v/gate projection (``linear_packed``), plus the pair-bias projection in the
# triangle attention.
LN_CASES = [
    ("MSA att 512x384", 512 * 384, 256, 1), ("MSA transition 512x384", 512 * 384, 256, 1),
    ("pair tri-att 384", 384 * 384, 128, 2), ("pair transition 384", 384 * 384, 128, 1),
    ("MSA att 128x256", 128 * 256, 256, 1), ("pair tri-att 256", 256 * 256, 128, 2),
]
LN_CONFIGS = list(itertools.product((2048, 4096, 8192), (4, 8, 16), (4, 8)))
# column sum and transition passes: (label, rows, columns), bf16
SUM_CASES = [("MSA 512x384", 512 * 384, 256), ("pair 384", 384 * 384, 128),
             ("MSA 128x256", 128 * 256, 256), ("pair 256", 256 * 256, 128)]
PASS_CASES = [("MSA hidden 512x384", 512 * 384, 1024), ("pair hidden 384", 384 * 384, 512),
              ("MSA hidden 128x256", 128 * 256, 1024), ("pair hidden 256", 256 * 256, 512)]
PER_SM = (4, 8, 16, 32)


def _table(label, nbytes, rows, shipped):
    rows = sorted(rows)
    lines = [f"\n== {label}: {nbytes / 1e6:.0f} MB"]
    for ms, cfg in rows:
        mark = "  <- shipped" if cfg == shipped else ""
        lines.append(f"  {ms * 1e3:8.1f} us  {nbytes / ms / 1e6:6.0f} GB/s  {cfg}{mark}")
    print("\n".join(lines), flush=True)
    return lines


def _sweep(configs, apply, call):
    rows = []
    for cfg in configs:
        apply(cfg)
        rows.append((triton.testing.do_bench(call, warmup=10, rep=50), cfg))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this sweep needs a GPU")
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    ln_shipped = (L._BWD_TILE_ELEMS, L._BWD_PROGRAMS_PER_SM, L._BWD_WARPS)
    sum_shipped, pass_shipped = LIN._PROGRAMS_PER_SM, T._BWD_PROGRAMS_PER_SM
    lines = [f"{torch.cuda.get_device_name(dev)}; shipped: LayerNorm backward (tile elements, "
             f"programs per SM, warps) {ln_shipped}, column sum programs per SM {sum_shipped}, "
             f"transition passes programs per SM {pass_shipped}"]

    def set_ln(cfg):
        L._BWD_TILE_ELEMS, L._BWD_PROGRAMS_PER_SM, L._BWD_WARPS = cfg
        L._bwd_plan.cache_clear()

    def set_sum(n):
        LIN._PROGRAMS_PER_SM = n
        LIN._plan.cache_clear()

    def set_pass(n):
        T._BWD_PROGRAMS_PER_SM = n
        T._bwd_pass_plan.cache_clear()

    try:
        for label, m, c, n_dy in LN_CASES:
            x = torch.randn(m, c, device=dev, generator=g)
            w = torch.randn(c, device=dev, generator=g)
            mean, rstd = x.mean(1), x.var(1, unbiased=False).add(1e-5).rsqrt()
            dys = [torch.randn(m, c, device=dev, generator=g).to(torch.bfloat16)
                   for _ in range(n_dy)]
            dres = torch.randn(m, c, device=dev, generator=g)
            call = functools.partial(L.layer_norm_bwd_rows, x, w, mean, rstd, dys[0],
                                     torch.float32, more_dy=dys[1:], dres=dres)
            nbytes = m * c * (4 + 2 * n_dy + 4 + 4)  # x, the gradients, the residual's, dx
            lines += _table(f"LayerNorm backward, {label}: [{m}, {c}], {n_dy} gradient(s) + "
                            f"residual", nbytes, _sweep(LN_CONFIGS, set_ln, call), ln_shipped)
        for label, m, c in SUM_CASES:
            g2 = torch.randn(m, c, device=dev, generator=g).to(torch.bfloat16)
            call = functools.partial(LIN.column_sum, g2, torch.bfloat16)
            lines += _table(f"column sum, {label}: [{m}, {c}]", m * c * 2,
                            _sweep(PER_SM, set_sum, call), sum_shipped)
        for label, m, c in PASS_CASES:
            dh = torch.randn(m, c, device=dev, generator=g).to(torch.bfloat16)
            h = torch.randn(m, c, device=dev, generator=g).to(torch.bfloat16).relu_()
            out = torch.empty_like(dh)
            call = functools.partial(T._bwd_pass, dh, h, out, True, False)
            lines += _table(f"transition ReLU pass, {label}: [{m}, {c}]", m * c * 2 * 3,
                            _sweep(PER_SM, set_pass, call), pass_shipped)
    finally:
        set_ln(ln_shipped)
        set_sum(sum_shipped)
        set_pass(pass_shipped)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sweep_row_passes.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
