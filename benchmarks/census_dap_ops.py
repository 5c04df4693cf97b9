"""Which tensor ops a DAP training block step adds to the single-process step, by call site.

    TRITON_INTERPRET=1 torchrun --nproc-per-node 2 benchmarks/census_dap_ops.py [--n-seq 8 --n-res 16]

Runs bench_dap's Evoformer block (AF2 widths) for one training step (forward, backward, bf16
autocast, the Triton ops) in one process and sharded over the group, on the CPU with gloo and
Triton's interpreter at tiny lengths, and counts every aten op on a tensor of 256 elements or more
(views excluded) by (op, the plugin's call site, operands: C contiguous / S strided, dtype, shape).
Prints both tables, then a summary by op and operand layout (shapes and call sites left out):
calls and elements (the largest operand's) per step in one process and on one DAP rank. Work
that is split by DAP shows about 1/P of the elements on a rank; a higher share is work DAP adds
or repeats (packs for the collectives, replicated-weight gradients, unfused projections). The
ops are the ones a GPU runs (the interpreter's own kernels are not aten ops); their GPU cost is
not measured here - pair the summary with bench_dap's ``profile-graphed`` kernel table. A
diagnostic: it writes no results record.
"""
import argparse
import collections
import copy
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_dap as bd  # noqa: E402

REPO = str(Path(__file__).resolve().parents[1])
# ops that only make views or metadata (no kernel on a GPU)
_VIEWS = {
    "detach", "view", "_unsafe_view", "t", "transpose", "unsqueeze", "squeeze", "expand",
    "permute", "slice", "select", "as_strided", "alias", "split", "split_with_sizes", "unbind",
    "narrow", "unflatten", "movedim", "empty", "empty_like", "new_empty", "empty_strided",
    "new_empty_strided", "lift_fresh", "is_same_size", "_has_compatible_shallow_copy_type",
    "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "set_", "is_pinned",
    "_local_scalar_dense",
}


def _call_site() -> str:
    """The innermost frame in the plugin's code (not torch's, not this script's)."""
    for f in reversed(traceback.extract_stack()):
        if f.filename.startswith(REPO) and "/.venv/" not in f.filename and \
                not f.filename.endswith("census_dap_ops.py"):
            return f"{os.path.relpath(f.filename, REPO)}:{f.lineno}"
    return "(autograd / torch)"


class Census(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.rows = collections.Counter()
        self.elements = collections.Counter()  # (op, layouts) -> elements per step

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name not in _VIEWS:
            ts = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
            if any(t.numel() >= 256 and t.dtype != torch.uint8 for t in ts):
                layouts = [f"{'C' if t.is_contiguous() else 'S'}:{str(t.dtype).replace('torch.', '')}"
                           for t in ts[:3]]
                operands = ",".join(f"{lay}{tuple(t.shape)}" for lay, t in zip(layouts, ts))
                self.rows[(name, _call_site(), operands)] += 1
                self.elements[(name, ",".join(layouts))] += max(t.numel() for t in ts)
        return func(*args, **kwargs)


def census(fn, xs, args, device) -> collections.Counter:
    xs = tuple(x.detach().clone().requires_grad_() for x in xs)

    def step():
        with bd.autocast(args, device):
            bd._loss(fn(*xs)).backward()

    step()  # compiles; lazily made buffers
    c = Census()
    with c:
        step()
    return c


def summary(one: Census, dap: Census, p: int) -> str:
    calls_one, calls_dap = collections.Counter(), collections.Counter()
    for census_, calls in ((one, calls_one), (dap, calls_dap)):
        for (op, _, operands), n in census_.rows.items():
            layouts = ",".join(x.split("(")[0] for x in operands.split("),"))
            calls[(op, layouts)] += n
    keys = sorted(set(one.elements) | set(dap.elements),
                  key=lambda k: -(dap.elements[k] - one.elements[k] / p))
    lines = [f"{'calls 1':>8} {'calls P':>8} {'elems 1':>10} {'elems P':>10} {'P/1':>6}  op, operands"]
    for k in keys:
        e1, ep = one.elements[k], dap.elements[k]
        ratio = f"{ep / e1:6.2f}" if e1 else "   new"
        lines.append(f"{calls_one[k]:8d} {calls_dap[k]:8d} {e1:10d} {ep:10d} {ratio}  "
                     f"{k[0]} {k[1]}")
    return "\n".join(lines)


def table(rows: collections.Counter) -> str:
    return "\n".join(f"{n:5d}  {op:24s} {site:42s} {operands}"
                     for (op, site, operands), n in sorted(rows.items(), key=lambda kv: kv[0]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-seq", type=int, default=8)
    p.add_argument("--n-res", type=int, default=16)
    a = p.parse_args()
    import fastfold_plugin
    import fastfold_plugin.distributed as fd

    args = bd.parse_args(["--dtype", "bf16", "--backend", "triton"])
    args.dry_run = False  # AF2 widths
    fd.init(dap_size=1, timeout=300, backend="gloo")
    ctx = fd.make_context(dist.get_world_size(), timeout=300)
    torch.manual_seed(0)
    device = torch.device("cpu")
    block = bd.make_block(args, device).train()
    ins = bd.inputs(a.n_seq, a.n_res, args, device)
    plugin = copy.deepcopy(block)
    fastfold_plugin.enable(plugin, backend="triton")
    one = census(bd._single_process_fn(plugin, ins), ins[:2], args, device)
    fn, shards = bd._dap_fn(block, ctx, ins, args, device)
    dap = census(fn, shards, args, device)
    if dist.get_rank() == 0:
        print(f"== one process, {a.n_seq} x {a.n_res}\n{table(one.rows)}\n")
        print(f"== DAP {ctx.size}, rank 0\n{table(dap.rows)}\n")
        print(f"== by op and operand layout, one process vs one DAP rank (P = {ctx.size}; "
              f"DAP's excess over 1/P first)\n{summary(one, dap, ctx.size)}")
    dist.barrier()
    fd.shutdown()


if __name__ == "__main__":
    main()
