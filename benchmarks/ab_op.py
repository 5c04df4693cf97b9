"""What one fused op buys in the plugin's captured Evoformer block training step, on one GPU.

    python benchmarks/ab_op.py --op linear [--sizes 128x256,512x384] [--out DIR]

Builds the plugin's block (bench_dap's block and inputs: AF2 widths, bf16 autocast, train mode
with OpenFold's dropout) twice, once with ``--op`` taken from the reference table (OpenFold's
maths, e.g. ``F.linear`` for ``linear``) and once with the Triton op, captures each whole
training step in one CUDA graph (``bench_dap.captured_step``), and times the two alternately:
three rounds of 15 trials of 3 replays each, CUDA-event medians per round. Prints one JSON line
per size (the three rounds' medians, ms) after a header with the card, versions, commit and
date; with ``--out``, also appends them to DIR/ab_op.jsonl.
"""
import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_dap as bd  # noqa: E402
import harness  # noqa: E402


def timed(step, trials=15, inner=3) -> float:
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    ts = []
    for _ in range(trials):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(inner):
            step()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e) / inner)
    return statistics.median(ts)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--op", required=True, help="an op of the table (fastfold_plugin.kernels)")
    p.add_argument("--sizes", default="128x256,512x384", help="N_seq x N_res, comma-separated")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    import fastfold_plugin
    from fastfold_plugin.kernels import get_ops, op_pair

    reference, fused = op_pair(a.op)
    if not torch.cuda.is_available():
        raise SystemExit("ab_op.py times CUDA graphs: it needs a GPU")
    dev = torch.device("cuda")
    args = bd.parse_args([])
    header = dict(record="header", benchmark="ab_op", op=a.op, **harness.environment(dev))
    lines = [header]
    print(json.dumps(header), flush=True)
    ops = get_ops("triton")
    stock = bd.make_block(args, dev).train(True)
    for size in a.sizes.split(","):
        n_seq, n_res = (int(v) for v in size.split("x"))
        ins = bd.inputs(n_seq, n_res, args, dev)
        steps = {}
        try:
            for name, fn in (("reference", reference), ("triton", fused)):
                setattr(ops, a.op, fn)
                plugin = copy.deepcopy(stock)
                fastfold_plugin.enable(plugin, backend="triton")
                steps[name] = bd.graphed_single_process_step(plugin, ins, args, dev, whole=True)
        finally:
            setattr(ops, a.op, fused)
        res = {k: [] for k in steps}
        for _ in range(3):
            for k, st in steps.items():
                res[k].append(round(timed(st), 3))
        row = dict(case=size, mode="fwd+bwd captured", dtype="bf16", ms_reference_op=res["reference"],
                   ms_triton_op=res["triton"])
        lines.append(row)
        print(json.dumps(row), flush=True)
        del steps
        torch.cuda.empty_cache()
    if a.out:
        with open(Path(a.out) / "ab_op.jsonl", "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in lines)


if __name__ == "__main__":
    main()
