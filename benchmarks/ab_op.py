"""What one fused op buys in the plugin's captured Evoformer block training step, on one GPU.

    python benchmarks/ab_op.py --op linear [--sizes 128x256,512x384] [--out DIR]
    python benchmarks/ab_op.py --op layer_norm,dropout_add --baseline OLD/layer_norm.py \
        --baseline OLD/dropout_add.py

Builds the plugin's block (bench_dap's block and inputs: AF2 widths, bf16 autocast, train mode
with OpenFold's dropout) twice, once with the ``--op`` ops (comma-separated) taken from the
reference table (OpenFold's maths, e.g. ``F.linear`` for ``linear``) and once with the Triton
ops, captures each whole training step in one CUDA graph (``bench_dap.captured_step``), and
times the two alternately: three rounds of 15 trials of 3 replays each, CUDA-event medians per
round. With ``--baseline`` files (earlier versions of the ops' kernel files, e.g. from ``git
show``), the first side takes the ops from those files instead of the reference table: what a
kernel change buys. Prints one JSON line per size (the three rounds' medians, ms) after a header
with the card, versions, commit and date; with ``--out``, also appends them to DIR/ab_op.jsonl.
"""
import argparse
import copy
import importlib.util
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


def load_baseline(path: str):
    """A kernel file of the op table loaded as a module of ``fastfold_plugin.kernels`` (its
    relative imports resolve there), under a name of its own: ``_baseline_<stem>``."""
    name = f"fastfold_plugin.kernels._baseline_{Path(path).stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--op", required=True,
                   help="ops of the table (fastfold_plugin.kernels), comma-separated")
    p.add_argument("--baseline", action="append", default=[],
                   help="an earlier version of an op's kernel file (repeatable): the first side "
                        "takes --op from these files instead of the reference table")
    p.add_argument("--sizes", default="128x256,512x384", help="N_seq x N_res, comma-separated")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    import fastfold_plugin
    from fastfold_plugin.kernels import _OP_MODULES, get_ops, op_pair

    names = a.op.split(",")
    fused = {n: op_pair(n)[1] for n in names}
    if a.baseline:
        files = {Path(f).stem: f for f in a.baseline}
        missing = sorted({_OP_MODULES[n] for n in names} - set(files))
        if missing:
            raise SystemExit(f"ab_op.py: no --baseline file for the kernel module(s) {missing}")
        mods = {stem: load_baseline(f) for stem, f in files.items()}
        first = {n: getattr(mods[_OP_MODULES[n]], n) for n in names}
    else:
        first = {n: op_pair(n)[0] for n in names}
    side = "baseline" if a.baseline else "reference"
    if not torch.cuda.is_available():
        raise SystemExit("ab_op.py times CUDA graphs: it needs a GPU")
    dev = torch.device("cuda")
    args = bd.parse_args([])
    header = dict(record="header", benchmark="ab_op", op=a.op, **harness.environment(dev))
    if a.baseline:
        header["baseline"] = a.baseline
    lines = [header]
    print(json.dumps(header), flush=True)
    ops = get_ops("triton")
    stock = bd.make_block(args, dev).train(True)
    for size in a.sizes.split(","):
        n_seq, n_res = (int(v) for v in size.split("x"))
        ins = bd.inputs(n_seq, n_res, args, dev)
        steps = {}
        try:
            for name, fns in ((side, first), ("triton", fused)):
                for n, fn in fns.items():
                    setattr(ops, n, fn)
                plugin = copy.deepcopy(stock)
                fastfold_plugin.enable(plugin, backend="triton")
                steps[name] = bd.graphed_single_process_step(plugin, ins, args, dev, whole=True)
        finally:
            for n, fn in fused.items():
                setattr(ops, n, fn)
        res = {k: [] for k in steps}
        for _ in range(3):
            for k, st in steps.items():
                res[k].append(round(timed(st), 3))
        row = dict(case=size, mode="fwd+bwd captured", dtype="bf16", **{f"ms_{side}_op": res[side]},
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
