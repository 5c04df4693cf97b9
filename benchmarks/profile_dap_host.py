"""Where the host's time goes in a training block step: one process vs DAP 2 (sync and async).

    torchrun --nproc-per-node 2 benchmarks/profile_dap_host.py OUTDIR

For 128 x 256 and 512 x 384 (bench_dap's blocks, inputs and steps): 10 steps issued back to back
without synchronising ("host": the time to issue them), then synchronised ("wall"); when the two
agree, the step is bound by the host. Then a cProfile of 10 more steps on rank 0, by own time and
by cumulative time. Appends to OUTDIR/host_probe.txt. A diagnostic: it writes no results record.
"""
import copy
import cProfile
import io
import os
import pstats
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_dap as bd  # noqa: E402

import fastfold_plugin  # noqa: E402
import fastfold_plugin.distributed as fd  # noqa: E402


def main(out: str) -> None:
    args = bd.parse_args([])
    torch.manual_seed(0)
    fd.init(dap_size=1, timeout=300)
    dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    ctx = fd.make_context(2, timeout=300)
    rank = dist.get_rank()
    for n_seq, n_res in ((128, 256), (512, 384)):
        block = bd.make_block(args, dev).train()
        plugin = copy.deepcopy(block)
        fastfold_plugin.enable(plugin)
        ins = bd.inputs(n_seq, n_res, args, dev)
        steps = {"dap1": bd.single_process_step(plugin, ins, args, dev, True),
                 "dap2sync": bd.dap_block_step(block, ctx.with_async(False), ins, args, dev, True),
                 "dap2async": bd.dap_block_step(block, ctx.with_async(True), ins, args, dev, True)}
        for name, step in steps.items():
            for _ in range(5):
                step()
            torch.cuda.synchronize()
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(10):
                step()
            host = (time.perf_counter() - t0) * 100
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) * 100
            dist.barrier()
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(10):
                step()
            prof.disable()
            torch.cuda.synchronize()
            dist.barrier()
            if rank == 0:
                s = io.StringIO()
                stats = pstats.Stats(prof, stream=s)
                stats.sort_stats("tottime").print_stats(40)
                stats.sort_stats("cumtime").print_stats(60)
                head = (f"== {n_seq}x{n_res} {name}: host {host:.2f} ms/step (launch loop), "
                        f"wall {wall:.2f} ms/step\n")
                print(head, flush=True)
                with open(os.path.join(out, "host_probe.txt"), "a") as f:
                    f.write(head + s.getvalue() + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
