"""Dynamic Axial Parallelism benchmark: launch with torchrun (2, 3, 4 or 8 processes).

    torchrun --nproc-per-node 2 benchmarks/bench_dap.py                  # GPUs, NCCL, bf16
    torchrun --nproc-per-node 2 benchmarks/bench_dap.py --dry-run        # CPU, gloo, tiny sizes

Suites (``--suites``, default all):

- ``strong``: one Evoformer block, training fwd+bwd, at N_seq x N_res = 128 x 256 and 512 x 384,
  DAP size 1 (one process: stock OpenFold and the plugin) vs every DAP size that divides the world
  (the sharded block as it runs inside a stack), async overlap on and off: strong scaling.
- ``strong-graphed``: the ``strong`` cases captured in CUDA graphs at DAP 1 (the plugin) and at
  every DAP size (async and sync; the collectives are captured too), two ways: forward and
  backward as two graphs (``torch.cuda.make_graphed_callables``, provider ``*_cudagraph``) and
  the whole step in one (``*_graphstep``): what the step costs once the host no longer issues
  each launch. GPUs only; a case that cannot be captured records the error.
- ``inference``: one Evoformer block, inference (no grad, in place, chunked), N_res 2048 and 4096
  (N_seq 128): speed-up and peak memory per GPU. As in OpenFold's in-place inference stack, the
  block works on the caller's m and z (the values drift from step to step; the work does not):
  at DAP 1 the block itself, at DAP P the stack's way in (``_enter_msa``: pad, this rank's
  shards as views of the inputs) and the sharded block; the stack's way out (one all-gather
  per stack, not per block) is not timed. Peak memory includes the full inputs, which every
  rank holds (the contract). Outputs are not checked here: tests/distributed does that.
- ``weak``: DP x DAP weak scaling: a 2-block Evoformer stack training step (fwd+bwd, data-parallel
  gradient averaging) per DAP group of 2, with 1, 2, ... data-parallel groups.
- ``profile``: a torch.profiler trace of a DAP block step (async and sync), with a summary of the
  time collectives spend running concurrently with compute kernels (the overlap of NCCL kernels
  with compute kernels on other streams); Chrome traces go to ``--profile-dir``.
- ``profile-graphed``: the ``strong-graphed`` whole-step capture at 512 x 384, DAP 1 and the
  smallest DAP size (async and sync): busy time, the collectives' overlap with compute and the per-kernel GPU time
  table (rank 0's), to ``<--profile-dir>/graphed_kernels.txt`` (where the captured step's time
  goes once the host is out of it).
- ``profile-inference``: the inference block at N_res 2048, DAP 1 and the smallest DAP size
  (async): wall and busy time per step and the per-kernel GPU time table of each, written to
  ``<--profile-dir>/inference_kernels.txt`` (where DAP's time goes beside halved compute).

Timing: each case runs ``--warmup`` steps, then ``--trials`` timed trials of ``--inner`` steps
between barriers (CUDA-synchronised); a trial's time is the slowest rank's; results are the median
and the 20 / 80 % quantiles over trials. (triton.testing.do_bench is not used here: its adaptive
repetition count could differ between ranks and deadlock the collectives.) Peak memory is the
largest ``max_memory_allocated`` over ranks.

Results append to ``<--out>/dap.jsonl`` (default ``benchmarks/results``; a dry run writes only
with ``--out``) in the shared harness's format: a header record (GPU name, torch / triton / CUDA /
Colossal-AI versions, commit, date, world size) then one result record per case, with ``ms``,
``ms_p20``, ``ms_p80`` and ``peak_mib``. Rank 0 writes them and prints each row.
"""
import argparse
import copy
import datetime
import json
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Dict, List

import harness
import torch
import torch.distributed as dist

SUITES = ("strong", "strong-graphed", "inference", "weak", "profile", "profile-graphed",
          "profile-inference")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true",
                   help="CPU + gloo, tiny sizes, fp32, reference ops: checks the script end to end")
    p.add_argument("--suites", default=",".join(SUITES), help=f"comma-separated subset of {SUITES}")
    p.add_argument("--out", default=None,
                   help=f"directory for dap.jsonl (default {harness.RESULTS_DIR}; dry runs write "
                        f"only with --out)")
    p.add_argument("--profile-dir", default=str(harness.RESULTS_DIR / "dap_traces"))
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                   help="bf16 autocast (default on GPU) or fp32 (default for --dry-run)")
    p.add_argument("--backend", choices=("auto", "triton", "reference"), default="auto")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--trials", type=int, default=None)
    p.add_argument("--inner", type=int, default=None)
    p.add_argument("--inference-n-res", default="2048,4096",
                   help="comma-separated N_res of the inference suite (N_seq 128)")
    p.add_argument("--inference-chunk-size", type=int, default=128,
                   help="chunk_size for the inference suite (rows per chunk)")
    p.add_argument("--timeout", type=float, default=600.0, help="process-group timeout, seconds")
    a = p.parse_args(argv)
    a.suites = [s for s in a.suites.split(",") if s]
    unknown = set(a.suites) - set(SUITES)
    if unknown:
        p.error(f"unknown suites {sorted(unknown)}; choose from {SUITES}")
    dry = a.dry_run
    a.dtype = a.dtype or ("fp32" if dry else "bf16")
    a.warmup = a.warmup if a.warmup is not None else (1 if dry else 3)
    a.trials = a.trials if a.trials is not None else (2 if dry else 10)
    a.inner = a.inner if a.inner is not None else (1 if dry else 3)
    if dry:
        a.inference_chunk_size = 2
    return a


# ----------------------------------------------------------------------------------------------
# Environment and output

def environment(device: torch.device, args) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        colossalai_version = version("colossalai")
    except PackageNotFoundError:
        colossalai_version = None
    return dict(harness.environment(device), colossalai=colossalai_version,
                dist_backend=dist.get_backend(), world=dist.get_world_size(), dtype=args.dtype)


class Output:
    """Rank 0 appends a header and the result rows to <out>/dap.jsonl and prints each row."""

    def __init__(self, args, env: dict, rank: int):
        out_dir = args.out if args.out is not None else (None if args.dry_run else harness.RESULTS_DIR)
        self.path = None if out_dir is None else Path(out_dir) / "dap.jsonl"
        self.rank, self.rows = rank, []
        self._write(dict(record="header", benchmark="dap", dry_run=bool(args.dry_run), **env))

    def _write(self, rec: dict) -> None:
        if self.rank != 0:
            return
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        if rec["record"] == "header":
            print(json.dumps(rec), flush=True)
            return
        keys = ("suite", "case", "provider", "dap", "dp", "async", "ms", "ms_p20", "ms_p80",
                "peak_mib", "comm_ms", "overlap_ms", "overlap_frac_of_comm", "note")
        print("  ".join(f"{k}={rec[k]}" for k in keys if k in rec), flush=True)

    def add(self, **row) -> None:
        rec = dict(record="result", op=row.pop("op", "evoformer_block"), **row)
        self.rows.append(rec)
        self._write(rec)


# ----------------------------------------------------------------------------------------------
# Timing

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _all_max(x: float, device) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def measure(step, args, device, active: bool = True) -> dict:
    """Median / quantiles (ms, slowest rank) and peak memory (GiB, largest rank) of `step`.
    Ranks with `active` False only join the barriers."""
    oom = False
    try:
        if active:
            for _ in range(args.warmup):
                step()
        _sync(device)
    except torch.cuda.OutOfMemoryError:
        oom = True
    if _all_max(float(oom), device) > 0:
        return {"note": "out of memory"}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.trials):
        dist.barrier()
        _sync(device)
        t0 = time.perf_counter()
        if active:
            for _ in range(args.inner):
                step()
        _sync(device)
        times.append(_all_max((time.perf_counter() - t0) * 1e3 / args.inner, device))
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    qs = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return {"ms": round(statistics.median(times), 4), "ms_p20": round(qs[0], 4),
            "ms_p80": round(qs[3], 4),
            "peak_mib": None if peak is None else round(_all_max(peak, device), 1),
            "symm_mib": round(_all_max(symmetric_workspace_mib(), device), 1)}


def symmetric_workspace_mib() -> float:
    """The symmetric memory this process holds for the triangle multiplications' copy-engine
    all-gathers and the copy-engine all-to-alls (made on first use and kept; reported beside
    the allocator's peak; records before the all-to-alls' slots were counted, e.g. 4f65205's,
    leave those out)."""
    from fastfold_plugin.distributed.peer import slot_bytes
    from fastfold_plugin.kernels.triangle_multiplication import peer_buffer_bytes

    return (peer_buffer_bytes() + slot_bytes()) / 2**20


# ----------------------------------------------------------------------------------------------
# Models and inputs

def block_dims(dry: bool) -> dict:
    if dry:
        return dict(c_m=16, c_z=8, c_hidden_msa_att=4, c_hidden_opm=4, c_hidden_mul=8,
                    c_hidden_pair_att=4, no_heads_msa=2, no_heads_pair=2, transition_n=2)
    return dict(c_m=256, c_z=128, c_hidden_msa_att=32, c_hidden_opm=32, c_hidden_mul=128,
                c_hidden_pair_att=32, no_heads_msa=8, no_heads_pair=4, transition_n=4)


def make_block(args, device):
    from openfold.model.evoformer import EvoformerBlock

    from fastfold_plugin.testing import randomize_parameters_

    block = EvoformerBlock(**block_dims(args.dry_run), msa_dropout=0.15, pair_dropout=0.25,
                           inf=1e9, eps=1e-10)
    return randomize_parameters_(block, seed=0).to(device)


def make_stack(args, device, no_blocks=2):
    from openfold.model.evoformer import EvoformerStack

    from fastfold_plugin.testing import randomize_parameters_

    stack = EvoformerStack(**block_dims(args.dry_run), c_s=32 if args.dry_run else 384,
                           no_blocks=no_blocks, msa_dropout=0.15, pair_dropout=0.25,
                           blocks_per_ckpt=None, inf=1e9, eps=1e-10)
    return randomize_parameters_(stack, seed=0).to(device)


def inputs(n_seq, n_res, args, device, seed=0):
    d = block_dims(args.dry_run)
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n_seq, n_res, d["c_m"], generator=g).to(device)
    z = torch.randn(n_res, n_res, d["c_z"], generator=g).to(device)
    msa_mask = torch.ones(n_seq, n_res, device=device)
    pair_mask = torch.ones(n_res, n_res, device=device)
    return m, z, msa_mask, pair_mask


def autocast(args, device, cache_enabled: bool = True):
    if args.dtype == "bf16":
        # autocast's weight-cast cache must be off around captured graphs (torch's documented rule)
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                              cache_enabled=cache_enabled)
    return torch.autocast(device_type=device.type, enabled=False)


def op_backend(args, device) -> str:
    if args.backend != "auto":
        return args.backend
    return "triton" if device.type == "cuda" else "reference"


def dap_sizes(world: int) -> List[int]:
    return [d for d in range(2, world + 1) if world % d == 0]


# ----------------------------------------------------------------------------------------------
# Steps

def single_process_step(block, ins, args, device, train: bool, chunk_size=None):
    """One block in one process (stock OpenFold or the plugin's single-process forwards)."""
    m, z, mm, pm = ins

    def step():
        with autocast(args, device):
            if train:
                mi, zi = m.detach().requires_grad_(), z.detach().requires_grad_()
                mo, zo = block(mi, zi, msa_mask=mm, pair_mask=pm, chunk_size=None)
                (mo.float().sum() + zo.float().sum()).backward()
            else:
                with torch.no_grad():  # in place on the inputs, as inside the stack
                    block(m, z, msa_mask=mm, pair_mask=pm, chunk_size=chunk_size,
                          inplace_safe=True)
    return step


def _dap_fn(block, ctx, ins, args, device):
    """(fn, shards): fn(*shards) is the sharded training block as a stack's middle block runs
    (-> m rows for the next block, z rows, m columns), and shards are this rank's inputs, split
    once as the stack's blocks get them (m rows, z rows, m columns: ``_enter_msa``)."""
    from fastfold_plugin.kernels import get_ops
    from fastfold_plugin.patches.dap import _enter_msa, _msa_block_sharded, _Run

    m, z, mm, pm = ins
    run = _Run(ctx, get_ops(op_backend(args, device)), z.shape[-2], m.shape[-3], None,
               inplace_safe=False, mask_trans=True)
    with torch.no_grad():
        shards = _enter_msa(run, m, z, mm, pm)
    return (lambda *xs: _msa_block_sharded(block, run, *xs)), shards


def _loss(outs) -> torch.Tensor:
    """The benchmarks' loss: the sum of every output (each needs its gradient)."""
    return sum(o.float().sum() for o in outs if o is not None)


def dap_block_step(block, ctx, ins, args, device, train: bool, chunk_size=None):
    """The sharded block as it runs inside a DAP stack. Training: on shards split once
    (``_dap_fn``). Inference: the stack's way in each step (pad, this rank's shards as views of
    the full inputs, which the block then updates in place), then the block."""
    from fastfold_plugin.kernels import get_ops
    from fastfold_plugin.patches.dap import _enter_msa, _msa_block_sharded, _Run

    if train:
        fn, shards = _dap_fn(block, ctx, ins, args, device)

        def train_step():
            with autocast(args, device):
                _loss(fn(*(t.detach().requires_grad_() for t in shards))).backward()
        return train_step

    m, z, mm, pm = ins
    run = _Run(ctx, get_ops(op_backend(args, device)), z.shape[-2], m.shape[-3], chunk_size,
               inplace_safe=True, mask_trans=True)

    def step():
        with autocast(args, device), torch.no_grad():
            _msa_block_sharded(block, run, *_enter_msa(run, m, z, mm, pm))
    return step


class _Positional(torch.nn.Module):
    """``fn(*tensors)`` as a module holding `block`, whose parameters the captured backward
    differentiates (``torch.cuda.make_graphed_callables`` takes positional tensors only)."""

    def __init__(self, block, fn):
        super().__init__()
        self.block = block
        self.fn = fn

    def forward(self, *xs):
        return tuple(self.fn(*xs))


def graphed_step(block, fn, xs, args, device):
    """The training step of `fn(*xs)` with its forward and backward captured in CUDA graphs
    (dropout draws fresh masks on every replay; autotuning runs in the capture's warm-up)."""
    xs = tuple(x.detach().clone().requires_grad_() for x in xs)
    with autocast(args, device, cache_enabled=False):
        graphed = torch.cuda.make_graphed_callables(_Positional(block, fn), xs)

    def step():
        with autocast(args, device, cache_enabled=False):
            outs = graphed(*xs)
        _loss(outs).backward()
    return step


def captured_step(fn, xs, args, device, params=(), grads=None):
    """The whole training step of `fn(*xs)` (forward, loss, and the backward writing every
    gradient into ``.grad``) captured in one CUDA graph, torch's whole-network capture: a
    replay is one launch. Warmed up first on a side stream (autotuning, NCCL communicators);
    then, as torch's recipe does (``zero_grad(set_to_none=True)`` before the capture), the
    gradients of `params` (the parameters fn trains) and of the inputs are set to None, so that
    the captured backward writes them rather than adding into last step's (a training step
    starts from no gradients; the inputs stand for the previous block's outputs).
    `grads`: the outputs' gradients instead of the loss's (``_loss``, whose gradient is one
    value broadcast over every output), as a block inside a stack receives them."""
    xs = tuple(x.detach().clone().requires_grad_() for x in xs)
    params = list(params)

    def body():
        with autocast(args, device, cache_enabled=False):
            outs = fn(*xs)
            if grads is None:
                _loss(outs).backward()
            else:
                torch.autograd.backward(outs, grads)

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            body()
    torch.cuda.current_stream(device).wait_stream(side)
    for t in (*xs, *params):
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()

    def step():
        graph.replay()
    step.inputs = xs  # the graph reads them: keep them alive
    return step


def _single_process_fn(block, ins):
    m, z, mm, pm = ins
    return lambda mi, zi: block(mi, zi, msa_mask=mm, pair_mask=pm, chunk_size=None)


def graphed_single_process_step(block, ins, args, device, whole: bool = False, grads=None):
    fn = _single_process_fn(block, ins)
    if whole:
        return captured_step(fn, ins[:2], args, device, block.parameters(), grads)
    return graphed_step(block, fn, ins[:2], args, device)


def graphed_dap_block_step(block, ctx, ins, args, device, whole: bool = False):
    fn, shards = _dap_fn(block, ctx, ins, args, device)
    if whole:
        return captured_step(fn, shards, args, device, block.parameters())
    return graphed_step(block, fn, shards, args, device)


def _measure_or_note(make, args, device) -> dict:
    """`measure` of the step `make()` builds; the error as a note when building it fails on any
    rank (every rank then skips the case together)."""
    try:
        step, err = make(), None
    except Exception as e:  # noqa: BLE001 - recorded in the results, the suite goes on
        step, err = None, f"{type(e).__name__}: {e}"[:300]
    if _all_max(float(err is not None), device) > 0:
        return {"note": f"not captured: {err}" if err else "not captured on another rank"}
    return measure(step, args, device)


# ----------------------------------------------------------------------------------------------
# Suites

def suite_block(out: Output, contexts, args, device, train: bool):
    import fastfold_plugin

    suite = "strong" if train else "inference"
    if train:
        sizes = [(5, 9)] if args.dry_run else [(128, 256), (512, 384)]
        chunk = None
    else:
        sizes = [(4, 11)] if args.dry_run else [(128, int(n)) for n in args.inference_n_res.split(",")]
        chunk = args.inference_chunk_size
    stock = make_block(args, device).train(train)
    plugin = copy.deepcopy(stock)
    fastfold_plugin.enable(plugin, backend=args.backend)
    for n_seq, n_res in sizes:
        case = f"{n_seq}x{n_res}"
        ins = inputs(n_seq, n_res, args, device)
        providers = [("stock", stock), ("plugin", plugin)]
        for name, model in providers:
            if not train and name == "stock":
                continue  # stock OpenFold at these lengths is the anchors' business (OOM / minutes)
            res = measure(single_process_step(model, ins, args, device, train, chunk), args, device)
            out.add(suite=suite, case=case, provider=name, dap=1, dp=1, n_seq=n_seq, n_res=n_res,
                    mode="fwd+bwd" if train else "inference", **res)
        for d, ctx in contexts.items():
            for use_async in (True, False):
                step = dap_block_step(stock, ctx.with_async(use_async), ins, args, device, train,
                                      chunk)
                res = measure(step, args, device)
                out.add(suite=suite, case=case, provider="dap", dap=d, dp=1, n_seq=n_seq,
                        n_res=n_res, mode="fwd+bwd" if train else "inference", **{"async": use_async},
                        ops=op_backend(args, device), **res)
        del ins
        if device.type == "cuda":
            torch.cuda.empty_cache()


def suite_graphed(out: Output, contexts, args, device):
    """Per case: DAP 1 (the plugin) and every DAP size (async and sync), captured two ways:
    ``*_cudagraph``, the block's forward and backward as two graphs
    (``torch.cuda.make_graphed_callables``; the loss and the accumulation of the parameters'
    gradients run eagerly around them), and ``*_graphstep``, the whole step in one graph."""
    import fastfold_plugin

    if device.type != "cuda":
        if dist.get_rank() == 0:
            print("strong-graphed: CUDA graphs need GPUs; not run on the CPU", flush=True)
        return
    stock = make_block(args, device).train(True)
    for n_seq, n_res in [(128, 256), (512, 384)]:
        case = f"{n_seq}x{n_res}"
        ins = inputs(n_seq, n_res, args, device)
        for whole, kind in ((False, "cudagraph"), (True, "graphstep")):
            plugin = copy.deepcopy(stock)
            fastfold_plugin.enable(plugin, backend=args.backend)
            res = _measure_or_note(partial(graphed_single_process_step, plugin, ins, args,
                                           device, whole), args, device)
            out.add(suite="strong-graphed", case=case, provider=f"plugin_{kind}", dap=1, dp=1,
                    n_seq=n_seq, n_res=n_res, mode="fwd+bwd", **res)
            del plugin
            for d, ctx in contexts.items():
                for use_async in (True, False):
                    block = copy.deepcopy(stock)
                    res = _measure_or_note(partial(graphed_dap_block_step, block,
                                                   ctx.with_async(use_async), ins, args, device,
                                                   whole), args, device)
                    out.add(suite="strong-graphed", case=case, provider=f"dap_{kind}", dap=d,
                            dp=1, n_seq=n_seq, n_res=n_res, mode="fwd+bwd",
                            **{"async": use_async}, ops=op_backend(args, device), **res)
                    del block
            torch.cuda.empty_cache()
        del ins
        torch.cuda.empty_cache()


def _subset_context(dp: int, dap: int, timeout: float):
    """DAP groups of `dap` consecutive ranks and data-parallel groups across them, on the first
    dp * dap ranks (every rank creates every group, in the same order)."""
    from fastfold_plugin.distributed import DAPContext

    rank = dist.get_rank()
    td = datetime.timedelta(seconds=timeout)
    my_dap = my_dp = None
    for g in range(dp):
        ranks = list(range(g * dap, (g + 1) * dap))
        grp = dist.new_group(ranks, timeout=td) if dap > 1 else None
        if rank in ranks:
            my_dap = grp
    for j in range(dap):
        ranks = list(range(j, dp * dap, dap))
        grp = dist.new_group(ranks, timeout=td) if dp > 1 else None
        if rank in ranks:
            my_dp = grp
    return DAPContext(group=my_dap, dp_group=my_dp), rank < dp * dap


def suite_weak(out: Output, args, device):
    import fastfold_plugin
    import fastfold_plugin.distributed as fd

    world = dist.get_world_size()
    dap = 2 if world % 2 == 0 else world
    n_seq, n_res = (4, 7) if args.dry_run else (128, 256)
    stock = make_stack(args, device).train()
    ins = inputs(n_seq, n_res, args, device, seed=dist.get_rank() // dap)
    for dp in [d for d in range(1, world // dap + 1) if (world // dap) % d == 0]:
        base, active = _subset_context(dp, dap, args.timeout)
        for use_async in (True, False):
            ctx = base.with_async(use_async)
            model = copy.deepcopy(stock)
            if active:
                fastfold_plugin.enable(model, backend=args.backend, dap=ctx)
                hooks = fd.register_data_parallel_hooks(model, ctx)

            def step(model=model):
                m, z, mm, pm = ins
                with autocast(args, device):
                    mo, zo, so = model(m.detach().requires_grad_(), z.detach().requires_grad_(),
                                       msa_mask=mm, pair_mask=pm, chunk_size=None)
                    (mo.float().sum() + zo.float().sum() + so.float().sum()).backward()

            res = measure(step, args, device, active=active)
            if active:
                hooks.remove()
            out.add(op="evoformer_stack", suite="weak", case=f"{n_seq}x{n_res}",
                    provider="dap+dp", dap=dap, dp=dp,
                    n_seq=n_seq, n_res=n_res, mode="stack fwd+bwd (2 blocks)",
                    **{"async": use_async}, ops=op_backend(args, device), **res)


def overlap_summary(prof, device) -> dict:
    """How long collectives run concurrently with compute (device kernels on CUDA; on the CPU,
    the collective ranges of gloo's threads against aten compute ranges)."""
    from torch.autograd import DeviceType

    comm_words = ("nccl", "gloo", "all_to_all", "allgather", "all_gather", "reduce_scatter",
                  "reducescatter", "alltoall", "allreduce")
    comm, compute = [], []
    for e in prof.events():
        name = e.name.lower()
        is_dev = e.device_type == DeviceType.CUDA
        if device.type == "cuda" and not is_dev:
            continue
        rng = (e.time_range.start, e.time_range.end)
        if any(w in name for w in comm_words):
            comm.append(rng)
        elif is_dev or name.startswith(("aten::mm", "aten::bmm", "aten::addmm", "aten::matmul",
                                        "aten::linear", "aten::softmax", "aten::_softmax")):
            compute.append(rng)

    def union(iv):
        merged = []
        for s, e in sorted(iv):
            if merged and s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        return merged

    cu, pu = union(comm), union(compute)
    busy_us = sum(e - s for s, e in union(comm + compute))
    overlap = 0.0
    for s, e in cu:
        for ps, pe in pu:
            overlap += max(0.0, min(e, pe) - max(s, ps))
    comm_us = sum(e - s for s, e in cu)
    return {"comm_ms": round(comm_us / 1e3, 4), "compute_ms": round(sum(e - s for s, e in pu) / 1e3, 4),
            "overlap_ms": round(overlap / 1e3, 4),
            "overlap_frac_of_comm": round(overlap / comm_us, 4) if comm_us else None,
            "n_comm": len(comm), "busy_ms": round(busy_us / 1e3, 4)}


def _profiled(step, args, device):
    """Warm `step` up, then run `--inner` steps (at least one) under torch.profiler between
    barriers: (profile, steps, wall seconds)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for _ in range(args.warmup):
        step()
    _sync(device)
    dist.barrier()
    steps = max(1, args.inner)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        wall = time.perf_counter() - t0
    return prof, steps, wall


def suite_profile(out: Output, contexts, args, device):
    """Per case and async setting: a Chrome trace, the collectives' overlap with compute, and
    the step's wall time against the time the GPU is busy (kernels of any kind): where the wall
    time is the larger, the step waits on the host (Python and kernel launches), not the GPU."""
    if not contexts:
        return
    d = min(contexts)
    Path(args.profile_dir).mkdir(parents=True, exist_ok=True)
    block = make_block(args, device).train()
    for n_seq, n_res in [(6, 7)] if args.dry_run else [(128, 256), (512, 384)]:
        ins = inputs(n_seq, n_res, args, device)
        for use_async in (True, False):
            step = dap_block_step(block, contexts[d].with_async(use_async), ins, args, device, True)
            prof, steps, wall = _profiled(step, args, device)
            trace = (Path(args.profile_dir) / f"dap{d}_{n_seq}x{n_res}_"
                     f"{'async' if use_async else 'sync'}_rank{dist.get_rank()}.json")
            prof.export_chrome_trace(str(trace))
            summ = overlap_summary(prof, device)
            out.add(suite="profile", case=f"{n_seq}x{n_res}", provider="dap", dap=d, dp=1,
                    n_seq=n_seq, n_res=n_res, mode="fwd+bwd", **{"async": use_async},
                    steps=steps, wall_ms_per_step=round(wall * 1e3 / steps, 3),
                    busy_ms_per_step=round(summ["busy_ms"] / steps, 3), trace=str(trace), **summ)
        del ins


def _kernel_report(out: Output, suite: str, provider: str, mode: str, n_seq: int, n_res: int,
                   cases, args, device, filename: str, limit: int) -> None:
    """Profile each case (label, DAP size, async, make_step): a result row each (wall vs busy
    time per step, the collectives' overlap with compute) and rank 0's kernels by GPU time, to
    <profile-dir>/<filename>."""
    from profile_evoformer_block import kernel_table

    report = []
    for label, dap, use_async, make in cases:
        prof, steps, wall = _profiled(make(), args, device)
        summ = overlap_summary(prof, device)
        out.add(suite=suite, case=f"{n_seq}x{n_res}", provider=provider, dap=dap, dp=1,
                n_seq=n_seq, n_res=n_res, mode=mode, **{"async": use_async}, steps=steps,
                wall_ms_per_step=round(wall * 1e3 / steps, 3),
                busy_ms_per_step=round(summ["busy_ms"] / steps, 3), **summ)
        report.append(f"== {label} {n_seq}x{n_res} DAP {dap} async {use_async}: wall "
                      f"{wall * 1e3 / steps:.2f} ms/step, busy {summ['busy_ms'] / steps:.2f} "
                      f"ms/step, collectives {summ['comm_ms'] / steps:.2f} ms/step of which "
                      f"{summ['overlap_ms'] / steps:.2f} overlap compute (rank "
                      f"{dist.get_rank()})\n" + kernel_table(prof, steps, limit=limit))
        dist.barrier()
    if dist.get_rank() == 0:
        Path(args.profile_dir).mkdir(parents=True, exist_ok=True)
        text = "\n\n".join(report) + "\n"
        (Path(args.profile_dir) / filename).write_text(text)
        print(text, flush=True)


def suite_profile_graphed(out: Output, contexts, args, device):
    """The training step captured whole at 512 x 384: DAP 1 (the plugin) and the smallest DAP size,
    async and sync; wall vs busy time, overlap, and the kernels by GPU time (rank 0's)."""
    import fastfold_plugin

    if not contexts or device.type != "cuda":
        return
    d = min(contexts)
    n_seq, n_res = 512, 384
    stock = make_block(args, device).train()
    plugin = copy.deepcopy(stock)
    fastfold_plugin.enable(plugin, backend=args.backend)
    ins = inputs(n_seq, n_res, args, device)
    label = "captured fwd+bwd"
    cases = [(label, 1, None, partial(graphed_single_process_step, plugin, ins, args, device, True))]
    cases += [(label, d, a, partial(graphed_dap_block_step, copy.deepcopy(stock),
                                    contexts[d].with_async(a), ins, args, device, True))
              for a in (True, False)]
    _kernel_report(out, "profile-graphed", "cudagraph", "fwd+bwd", n_seq, n_res, cases, args,
                   device, "graphed_kernels.txt", limit=45)


def suite_profile_inference(out: Output, contexts, args, device):
    """The inference block at N_res 2048 (N_seq 128), DAP 1 and the smallest DAP size (async):
    wall vs busy time per step and the kernels by GPU time (rank 0's), to
    <profile-dir>/inference_kernels.txt."""
    import fastfold_plugin

    if not contexts:
        return
    d = min(contexts)
    n_seq, n_res = (4, 11) if args.dry_run else (128, 2048)
    block = make_block(args, device).eval()
    plugin = copy.deepcopy(block)
    fastfold_plugin.enable(plugin, backend=args.backend)
    ins = inputs(n_seq, n_res, args, device)
    chunk = args.inference_chunk_size
    steps = [(1, False, single_process_step(plugin, ins, args, device, False, chunk)),
             (d, True, dap_block_step(block, contexts[d].with_async(True), ins, args, device,
                                      False, chunk))]
    with torch.no_grad():
        _kernel_report(out, "profile-inference", "dap", "inference", n_seq, n_res,
                       [("inference", dap, a, (lambda st=st: st)) for dap, a, st in steps],
                       args, device, "inference_kernels.txt", limit=40)


def main(argv=None) -> int:
    import fastfold_plugin.distributed as fd

    args = parse_args(argv)
    if "RANK" not in os.environ:
        print("bench_dap.py: launch with torchrun, e.g. torchrun --nproc-per-node 2 "
              "benchmarks/bench_dap.py [--dry-run]", file=sys.stderr)
        return 2
    backend = "gloo" if args.dry_run or not torch.cuda.is_available() else "nccl"
    if not args.dry_run and backend == "gloo":
        print("bench_dap.py: no CUDA device; use --dry-run on the CPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    world_ctx = fd.init(dap_size=1, timeout=args.timeout, backend=backend)
    device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl"
              else torch.device("cpu"))
    if device.type == "cpu":
        torch.set_num_threads(1)
    world = dist.get_world_size()
    contexts: Dict[int, object] = {d: fd.make_context(d, timeout=args.timeout)
                                   for d in dap_sizes(world)}
    env = environment(device, args)
    out = Output(args, env, dist.get_rank())
    if dist.get_rank() == 0:
        print(f"bench_dap: world {world}, DAP sizes {list(contexts) or [1]}, {env['gpu']}, "
              f"{args.dtype}, suites {args.suites}", flush=True)
    if "strong" in args.suites:
        suite_block(out, contexts, args, device, train=True)
    if "strong-graphed" in args.suites:
        suite_graphed(out, contexts, args, device)
    if "inference" in args.suites:
        with torch.no_grad():
            suite_block(out, contexts, args, device, train=False)
    if "weak" in args.suites:
        suite_weak(out, args, device)
    if "profile" in args.suites:
        suite_profile(out, contexts, args, device)
    if "profile-graphed" in args.suites:
        suite_profile_graphed(out, contexts, args, device)
    if "profile-inference" in args.suites:
        suite_profile_inference(out, contexts, args, device)
    dist.barrier()
    del world_ctx
    fd.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
