"""The Evoformer block's training step captured whole, on one GPU: time, and where it goes.

    python benchmarks/profile_block_step.py [--sizes 128x256,512x384] [--no-stock] [--no-carry]
        [--no-packed] [--dense-grad] [--out DIR]

bench_dap's block and inputs (AF2 widths, bf16 autocast, train mode with OpenFold's dropout),
the whole training step (forward, loss, backward) captured in one CUDA graph
(``bench_dap.captured_step``), for stock OpenFold and the plugin in the same process: each step
timed as ``ab_op.timed`` does (three rounds, CUDA-event medians), then the plugin's step under
``torch.profiler`` with its kernels by GPU time (``profile_evoformer_block.kernel_table``). The
one-GPU counterpart of bench_dap's ``profile-graphed`` suite, at any size. Prints a header (card,
versions, commit, date) and one JSON line per size; with ``--out``, appends them to
DIR/block_step.jsonl and writes the kernel tables to DIR/block_step_kernels.txt.
"""
import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ab_op  # noqa: E402
import bench_dap as bd  # noqa: E402
import harness  # noqa: E402
from profile_evoformer_block import kernel_table  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="128x256,512x384", help="N_seq x N_res, comma-separated")
    p.add_argument("--no-stock", action="store_true", help="time the plugin only")
    p.add_argument("--no-carry", action="store_true",
                   help="also time the plugin with its sub-modules called as stock calls them "
                        "(a no-op forward hook on each: no residual carried through the "
                        "LayerNorms), provider plugin_nocarry")
    p.add_argument("--no-packed", action="store_true",
                   help="also time the plugin with each attention's q, k, v and gate projections "
                        "as four Linears (a no-op forward hook on each linear_q: no packed "
                        "projection), provider plugin_unpacked")
    p.add_argument("--dense-grad", action="store_true",
                   help="also time each step with dense random gradients of the block's outputs "
                        "in place of the loss's (one value broadcast over every element), as a "
                        "block inside a stack receives them: providers <name>_dense")
    p.add_argument("--steps", type=int, default=3, help="replays under the profiler")
    p.add_argument("--limit", type=int, default=60, help="kernel rows per table")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_block_step.py captures CUDA graphs: it needs a GPU")
    from openfold.model.primitives import Attention

    import fastfold_plugin
    from fastfold_plugin.patches.forwards import CARRIED_MODULES

    dev = torch.device("cuda")
    args = bd.parse_args([])
    header = dict(record="header", benchmark="block_step", **harness.environment(dev))
    lines, tables = [header], []
    print(json.dumps(header), flush=True)
    stock = bd.make_block(args, dev).train(True)
    for size in a.sizes.split(","):
        n_seq, n_res = (int(v) for v in size.split("x"))
        ins = bd.inputs(n_seq, n_res, args, dev)
        plugin = copy.deepcopy(stock)
        fastfold_plugin.enable(plugin, backend="triton")
        steps = {"plugin": bd.graphed_single_process_step(plugin, ins, args, dev, whole=True)}
        if a.no_carry:
            hooked = copy.deepcopy(plugin)
            for name in CARRIED_MODULES:
                hooked.get_submodule(name).register_forward_hook(lambda *args: None)
            steps["plugin_nocarry"] = bd.graphed_single_process_step(hooked, ins, args, dev,
                                                                     whole=True)
        if a.no_packed:
            unpacked = copy.deepcopy(plugin)
            for mod in unpacked.modules():
                if isinstance(mod, Attention):
                    mod.linear_q.register_forward_hook(lambda *args: None)
            steps["plugin_unpacked"] = bd.graphed_single_process_step(unpacked, ins, args, dev,
                                                                      whole=True)
        if not a.no_stock:
            steps["openfold"] = bd.graphed_single_process_step(stock, ins, args, dev, whole=True)
        if a.dense_grad:
            gen = torch.Generator(device=dev).manual_seed(2)
            grads = tuple(torch.randn(x.shape, generator=gen, device=dev) for x in ins[:2])
            for name, block in (("plugin", plugin), ("openfold", stock)):
                if name in steps:
                    steps[f"{name}_dense"] = bd.graphed_single_process_step(
                        block, ins, args, dev, whole=True, grads=grads)
        ms = {k: [] for k in steps}
        for _ in range(3):
            for k, st in steps.items():
                ms[k].append(round(ab_op.timed(st), 3))
        kernel_ms = {}
        for name in [k for k in ("plugin", "plugin_dense") if k in steps]:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(a.steps):
                    steps[name]()
                torch.cuda.synchronize()
            table = kernel_table(prof, a.steps, limit=a.limit)
            what = "" if name == "plugin" else ", dense output gradients"
            tables.append(f"== plugin, whole step captured{what}, {size}: {min(ms[name]):.3f} "
                          f"ms/step (event timing)\n{table}")
            print(tables[-1], flush=True)
            kernel_ms["kernel_ms" if name == "plugin" else "kernel_ms_dense"] = round(
                float(table.split()[5]), 3)
        row = dict(case=size, mode="fwd+bwd captured", dtype="bf16",
                   **{f"ms_{k}": v for k, v in ms.items()}, **kernel_ms)
        lines.append(row)
        print(json.dumps(row), flush=True)
        del steps, plugin, ins
        torch.cuda.empty_cache()
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "block_step.jsonl", "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in lines)
        (out / "block_step_kernels.txt").write_text("\n\n".join(tables) + "\n")


if __name__ == "__main__":
    main()
