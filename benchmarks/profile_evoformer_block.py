"""Where one EvoformerBlock step spends its GPU time: a per-kernel table (GPU only).

Builds the block, inputs and step exactly as bench_evoformer_block does (random weights, bf16
autocast, train mode with dropout for training cases, eval + no_grad for inference), runs the step
until the autotuners have settled, then records a few steps under ``torch.profiler`` and writes
the kernels sorted by GPU time, with their share of the step, for each provider (and, with
``--cpu-rows N``, the N operators with the most host time: a step whose wall time is well above
its GPU time is bound by the host, launching kernels).

    python benchmarks/profile_evoformer_block.py [--cases train128x256,infer128x1024]
        [--providers plugin,openfold] [--steps 3] [--out DIR]

Writes DIR/profile_evoformer_block.txt (default: stdout only).
"""
import argparse
import copy
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_evoformer_block as bench  # noqa: E402

CASES = {
    "train128x256": dict(case="train", n_seq=128, n_res=256),
    "train512x384": dict(case="train", n_seq=512, n_res=384),
    "infer128x1024": dict(case="infer", n_seq=128, n_res=1024),
    "infer128x2048": dict(case="infer", n_seq=128, n_res=2048),
}


def kernel_table(prof, steps: int, limit: int = 30) -> str:
    """Kernels by total GPU time: ms per step, share of the step, calls per step."""
    rows = {}
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        t = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        name = e.name[:90]
        ms, n = rows.get(name, (0.0, 0))
        rows[name] = (ms + t / 1e3, n + 1)
    total = sum(ms for ms, _ in rows.values())
    lines = [f"GPU kernel time per step: {total / steps:.3f} ms ({len(rows)} distinct kernels, "
             f"{sum(n for _, n in rows.values()) // steps} launches per step)",
             f"{'ms/step':>9} {'share':>6} {'calls':>5}  kernel"]
    for name, (ms, n) in sorted(rows.items(), key=lambda kv: -kv[1][0])[:limit]:
        lines.append(f"{ms / steps:9.3f} {100 * ms / total:5.1f}% {n // steps:5d}  {name}")
    return "\n".join(lines)


def profile_report(label: str, step, steps: int, cpu_rows: int = 0, limit: int = 30) -> str:
    """Warm `step` up (autotuning included), then: wall time per step (CUDA events around `steps`
    back-to-back steps), and under torch.profiler the kernel table (``kernel_table``) and, with
    `cpu_rows`, the ops with the most host time. A wall time well above the kernel time means
    the step is bound by the host."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()
    end.record()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    text = (f"== {label}: wall {start.elapsed_time(end) / steps:.3f} ms/step\n"
            + kernel_table(prof, steps, limit=limit))
    if cpu_rows:
        cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=cpu_rows)
        text += f"\nhost time by op ({steps} steps):\n{cpu}"
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="train128x256")
    p.add_argument("--providers", default="plugin,openfold")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--cpu-rows", type=int, default=0,
                   help="also print the N ops with the most host (CPU) time")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this profiler needs a GPU")
    device = torch.device("cuda")
    import fastfold_plugin

    stock, kw = bench.make_block(device, dry_run=False)
    blocks = {"openfold": stock}
    if "plugin" in args.providers:
        blocks["plugin"] = copy.deepcopy(stock)
        fastfold_plugin.enable(blocks["plugin"], backend="triton")
    report = []
    for case in args.cases.split(","):
        for name in args.providers.split(","):
            step = bench.step_fn(blocks[name], kw, CASES[case], device)
            text = profile_report(f"{case} {name}", step, args.steps, args.cpu_rows)
            print(text, flush=True)
            report.append(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile_evoformer_block.txt").write_text("\n\n".join(report) + "\n")


if __name__ == "__main__":
    main()
