"""The 512 x 384 captured DAP training step alone, under the NCCL settings in the environment.

    torchrun --nproc-per-node 2 benchmarks/probe_dap_graphstep.py [--dap1]
    NCCL_MAX_CTAS=16 torchrun --nproc-per-node 2 benchmarks/probe_dap_graphstep.py

bench_dap's ``strong-graphed`` case at 512 x 384 with the whole step captured in one graph
(``graphstep``), and nothing else: DAP 2 async and sync (and, with ``--dap1``, the plugin on one
GPU first), timed by ``bench_dap.measure``. NCCL reads its environment when the communicator is
made, so each setting is one launch; rank 0 prints the NCCL variables in effect with each time.
A diagnostic for repeats and environment sweeps: it writes no results file (its output is kept as
a log); ``bench_dap.py --suites strong-graphed`` records the same case.
"""
import argparse
import copy
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_dap as bd  # noqa: E402


def main() -> None:
    import fastfold_plugin
    import fastfold_plugin.distributed as fd

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dap1", action="store_true", help="also time the plugin on one GPU")
    a = p.parse_args()
    args = bd.parse_args(["--suites", "strong-graphed"])
    torch.manual_seed(0)
    fd.init(dap_size=1, timeout=args.timeout, backend="nccl")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    ctx = fd.make_context(2, timeout=args.timeout)
    stock = bd.make_block(args, device).train(True)
    ins = bd.inputs(512, 384, args, device)
    nccl = " ".join(f"{k}={v}" for k, v in os.environ.items() if k.startswith("NCCL_"))

    def say(what, res):
        if dist.get_rank() == 0:
            print(f"[{nccl or 'NCCL defaults'}] {what} {res.get('ms', float('nan')):.3f} ms "
                  f"{res.get('note', '')}", flush=True)

    if a.dap1:
        plugin = copy.deepcopy(stock)
        fastfold_plugin.enable(plugin, backend="auto")
        say("DAP1 graphstep", bd.measure(
            bd.graphed_single_process_step(plugin, ins, args, device, whole=True), args, device))
        del plugin
    for use_async in (True, False):
        block = copy.deepcopy(stock)
        say(f"DAP2 graphstep async={use_async}", bd.measure(bd.graphed_dap_block_step(
            block, ctx.with_async(use_async), ins, args, device, whole=True), args, device))
        del block
    dist.barrier()
    fd.shutdown()


if __name__ == "__main__":
    main()
