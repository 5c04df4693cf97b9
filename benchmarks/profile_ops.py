"""Where one op's fwd+bwd spends its time: wall vs GPU time and a per-kernel table (GPU only).

Each case builds its inputs exactly as the op's benchmark does (bench_attention /
bench_triangle_multiplication: bf16, the same shapes), runs forward + backward until the
autotuners have settled, then records a few steps under ``torch.profiler``: the wall time per step
(CUDA events around back-to-back steps, as the benchmarks time them), the GPU kernel time per step
and the kernels sorted by GPU time. A wall time well above the kernel time means the step is
bound by the host (Python, launches), not by the kernels.

    python benchmarks/profile_ops.py [--cases tri256,trimul1024] [--providers plugin]
        [--steps 5] [--out DIR]

Writes DIR/profile_ops.txt (default: stdout only).
"""
import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_attention  # noqa: E402
import bench_triangle_multiplication as bench_trimul  # noqa: E402
from profile_evoformer_block import profile_report  # noqa: E402

CASES = {
    "tri256": ("attention", "tri_att", dict(n_res=256, heads=4, c=32)),
    "tri1024": ("attention", "tri_att", dict(n_res=1024, heads=4, c=32)),
    "msa512x384": ("attention", "msa_row", dict(n_seq=512, n_res=384, heads=8, c=32)),
    "trimul1024": ("trimul", "outgoing", dict(n_res=1024, c_z=128, c_hidden=128)),
    "trimul384": ("trimul", "outgoing", dict(n_res=384, c_z=128, c_hidden=128)),
}


def make_step(case: str, provider: str, device: torch.device):
    """() -> one forward + backward of `provider` on the case's inputs (fixed upstream grad)."""
    op, kind, p = CASES[case]
    if op == "attention":
        forward, grads = bench_attention.provider_fn(
            provider, kind, bench_attention.make_inputs(kind, p, device), device)
    else:
        forward, grads = bench_trimul.provider_fn(provider, kind, p, device)
    dout = torch.randn_like(forward())

    def step():
        return torch.autograd.grad(forward(), grads, dout)

    return step


def python_table(step, steps: int, rows: int) -> str:
    """cProfile of `steps` steps (then one synchronize): functions by own time."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(rows)
    return "\n".join(line for line in buf.getvalue().splitlines() if line.strip())


def chosen_configs() -> str:
    """The configuration each autotuned kernel runs, per tuning key (after the steps above)."""
    import importlib

    from fastfold_plugin.kernels._triton_utils import Tuned

    lines = []
    for mod_name in ("attention", "triangle_multiplication", "outer_product_mean"):
        mod = importlib.import_module(f"fastfold_plugin.kernels.{mod_name}")
        for name, obj in sorted(vars(mod).items()):
            if isinstance(obj, Tuned):
                for key, config in obj._chosen.items():
                    lines.append(f"  {mod_name}.{name} {key[:7]}: {config}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="tri256,trimul1024")
    p.add_argument("--providers", default="plugin")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--cpu-rows", type=int, default=0,
                   help="also print the N ops with the most host (CPU) time")
    p.add_argument("--cprofile", type=int, default=0,
                   help="also print the N Python functions with the most own time (cProfile)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this profiler needs a GPU")
    device = torch.device("cuda")
    report = []
    for case in args.cases.split(","):
        for name in args.providers.split(","):
            step = make_step(case, name, device)
            text = profile_report(f"{case} {name} fwd+bwd", step, args.steps, args.cpu_rows, limit=20)
            if args.cprofile:
                text += f"\nPython time ({args.steps} steps):\n" + python_table(step, args.steps, args.cprofile)
            print(text, flush=True)
            report.append(text)
            del step
            torch.cuda.empty_cache()
    report.append("autotuned configurations:\n" + chosen_configs())
    print(report[-1], flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile_ops.txt").write_text("\n\n".join(report) + "\n")


if __name__ == "__main__":
    main()
