"""Host vs GPU time of the outer product mean on one DAP rank's shard, eager, on one GPU.

    python benchmarks/profile_opm_shard.py

``bench_opm_shard.py``'s two providers at its quick sizes: per provider, the host time to issue
20 forwards (GPU idle before), the wall time of 20 forwards and of 10 forward + backward steps
(synchronised); for the plugin, torch.profiler's table of 5 fwd+bwd steps by self CPU time (the
autograd Functions' Python shows as their own rows; Self CUDA is the kernels' time). A
diagnostic: it writes no results file (its output is kept as a log).
"""
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_opm_shard as bench  # noqa: E402


def main() -> None:
    dev = torch.device("cuda")
    for p in [dict(n_seq=128, n_res=256, ranks=2), dict(n_seq=512, n_res=384, ranks=2)]:
        p = dict(p, c_m=256, c_hidden=32, c_z=128)
        for name in bench.PROVIDERS:
            fwd, _ = bench.provider_fn(name, p, dev)
            for _ in range(5):
                fwd().float().sum().backward()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(20):
                fwd()
            host = (time.perf_counter() - t) / 20 * 1e3
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(20):
                fwd()
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t) / 20 * 1e3
            t = time.perf_counter()
            for _ in range(10):
                fwd().float().sum().backward()
            torch.cuda.synchronize()
            wall_fb = (time.perf_counter() - t) / 10 * 1e3
            print(f"{p['n_seq']}x{p['n_res']} {name}: host fwd {host:.3f} ms, wall fwd {wall:.3f}, "
                  f"wall fwd+bwd {wall_fb:.3f}", flush=True)
            if name == "plugin":
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        fwd().float().sum().backward()
                    torch.cuda.synchronize()
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18,
                                                max_name_column_width=60), flush=True)


if __name__ == "__main__":
    main()
