"""Where the ``linear`` op's backward time goes (``linear_fused``: the column-sum path it takes in
a captured graph), against ``F.linear``'s, on one GPU.

    python benchmarks/profile_linear.py

bench_linear.py's training cases (x fp32, cast to bf16 as the attention's output is, bf16
autocast; the backward for x, the weight and the bias) at the MSA's [512, 384, 256] and the pair's
[256, 256, 128]: the backward's ``triton.testing.do_bench`` time, then a torch.profiler table of
ten backwards (GPU kernel time per kernel; CPU time per op). The two numbers differ where the
host, not the GPU, sets the pace: a diagnostic, it writes no results file (its output is kept as
a log).
"""
import torch
import torch.nn.functional as F
import triton.testing
from torch.profiler import ProfilerActivity, profile

from fastfold_plugin.kernels.linear import linear_fused


def main() -> None:
    dev = torch.device("cuda")
    for rows, n, c in ((512, 384, 256), (256, 256, 128)):
        x = torch.randn(1, rows, n, c, device=dev).requires_grad_()
        w = (torch.randn(c, c, device=dev) / c ** 0.5).requires_grad_()
        b = torch.randn(c, device=dev).requires_grad_()
        for name, fn in (("F.linear", F.linear), ("plugin", linear_fused)):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = fn(x.to(torch.bfloat16), w, b)
            g = torch.randn_like(out)

            def bwd(out=out, g=g, inputs=(x, w, b)):
                return torch.autograd.grad(out, list(inputs), g, retain_graph=True)

            bwd()
            ms = triton.testing.do_bench(bwd, warmup=25, rep=100)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                for _ in range(10):
                    bwd()
                torch.cuda.synchronize()
            print(f"== {name} rows={rows} n={n} c={c}: bwd {ms:.3f} ms (do_bench)")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12,
                                            max_name_column_width=70))


if __name__ == "__main__":
    main()
