"""Which torch ops of the plugin's Evoformer block training step cost GPU time, by call site (GPU).

    python benchmarks/census_block_gpu.py [--sizes 128x256,512x384] [--rows 40] [--out DIR]

bench_dap's block and inputs (AF2 widths, bf16 autocast, train mode with OpenFold's dropout), one
eager training step of the plugin (after warm-up steps), every aten op that runs a kernel (views
excluded) timed with CUDA events around it and grouped by (op, the plugin's call site or, in
backward, the autograd node running it, operands: C contiguous / S strided, dtype, shape). Prints
the groups by GPU time: the PyTorch glue between the plugin's Triton kernels (casts, adds,
copies, reductions, cuBLAS GEMMs) at real sizes, where ``census_dap_ops.py`` counts them at
tiny sizes on the CPU. Triton kernels are not aten ops and do not appear. Each op is timed alone
(the stream is synchronised around it), so the times are per-op costs, not the step's overlap.
A diagnostic: with ``--out`` it writes DIR/census_block_gpu.txt.
"""
import argparse
import collections
import copy
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_dap as bd  # noqa: E402
from census_dap_ops import _VIEWS, _call_site  # noqa: E402


class _Timed(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ms = collections.Counter()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in _VIEWS:
            return func(*args, **kwargs)
        ts = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        site = _call_site()
        if site == "(autograd / torch)":
            node = torch._C._current_autograd_node()
            site = f"(backward: {node.name()})" if node is not None else site
        operands = ",".join(f"{'C' if t.is_contiguous() else 'S'}:"
                            f"{str(t.dtype).replace('torch.', '')}{tuple(t.shape)}"
                            for t in ts[:3])
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = func(*args, **kwargs)
        end.record()
        end.synchronize()
        key = (name, site, operands)
        self.ms[key] += start.elapsed_time(end)
        self.calls[key] += 1
        return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="128x256,512x384")
    p.add_argument("--rows", type=int, default=40)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("census_block_gpu.py times GPU ops: it needs a GPU")
    import fastfold_plugin

    dev = torch.device("cuda")
    args = bd.parse_args([])
    stock = bd.make_block(args, dev).train(True)
    plugin = copy.deepcopy(stock)
    fastfold_plugin.enable(plugin, backend="triton")
    report = []
    for size in a.sizes.split(","):
        n_seq, n_res = (int(v) for v in size.split("x"))
        ins = bd.inputs(n_seq, n_res, args, dev)
        fn = bd._single_process_fn(plugin, ins)
        xs = tuple(x.detach().clone().requires_grad_() for x in ins[:2])

        def step(fn=fn, xs=xs):
            with bd.autocast(args, dev, cache_enabled=False):
                bd._loss(fn(*xs)).backward()

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        timed = _Timed()
        with timed:
            step()
        total = sum(timed.ms.values())
        lines = [f"== {size}: {total:.3f} ms in {sum(timed.calls.values())} aten ops "
                 f"(timed one by one)", f"{'ms':>8} {'calls':>5}  op, call site, operands"]
        for key, ms in timed.ms.most_common(a.rows):
            op, site, operands = key
            lines.append(f"{ms:8.3f} {timed.calls[key]:5d}  {op:18s} {site:44s} {operands}")
        report.append("\n".join(lines))
        print(report[-1], flush=True)
        del ins, xs, step
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "census_block_gpu.txt").write_text("\n\n".join(report) + "\n")


if __name__ == "__main__":
    main()
