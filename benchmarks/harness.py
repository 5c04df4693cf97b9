"""Shared benchmark harness: timing, peak memory and result files for benchmarks/bench_<op>.py.

One result row per (op, provider, mode, shape, dtype)::

    {"record": "result", "op", "provider", "mode", <shape params>, "dtype",
     "ms", "ms_p20", "ms_p80", "peak_mib"}            # or "error" instead of the numbers

Times are the median and 20/80 % quantiles of ``triton.testing.do_bench``; ``peak_mib`` is the
peak of ``torch.cuda.max_memory_allocated`` during one call, above what was allocated before it
(inputs excluded). Modes: ``fwd`` (forward under no_grad), ``bwd`` (backward only, the graph
built once outside the timing), ``fwd+bwd``.

Each run appends a header record (GPU, torch/triton versions, git commit, date, command line)
and its rows to ``benchmarks/results/<name>.jsonl`` (``--out DIR`` elsewhere). ``--dry-run``
runs tiny sizes on the CPU through Triton's interpreter, timing with a wall clock, to check a
benchmark script without a GPU; it writes a file only when ``--out`` is given. Plotting reads
the JSON lines; it is not done here.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
MODES = ("fwd", "bwd", "fwd+bwd")


def parse_args(description: str, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The options every benchmark takes."""
    p = argparse.ArgumentParser(description=description)
    sweep = p.add_mutually_exclusive_group()
    sweep.add_argument("--quick", action="store_true", help="reduced sweep (the default)")
    sweep.add_argument("--full", action="store_true", help="full sweep")
    sweep.add_argument("--dry-run", action="store_true",
                       help="tiny sizes on the CPU (Triton interpreter): checks the script")
    p.add_argument("--out", type=Path, default=None,
                   help=f"directory for <name>.jsonl (default {RESULTS_DIR})")
    p.add_argument("--providers", default=None,
                   help="comma-separated subset of the providers to run")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " +
                   ", ".join(MODES))
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetitions, ms")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        p.error(f"unknown mode(s) {bad}; choose from {MODES}")
    args.providers = None if args.providers is None else [
        s.strip() for s in args.providers.split(",") if s.strip()]
    return args


def setup_device(args: argparse.Namespace) -> torch.device:
    """The device to run on. A dry run without CUDA uses Triton's interpreter, which must be
    switched on before any kernel module is imported (Triton reads it at decoration time)."""
    if args.dry_run and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
        return torch.device("cpu")
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: benchmarks need a GPU (use --dry-run to check a script here)")
    return torch.device("cuda")


def environment(device: torch.device) -> Dict[str, object]:
    """Header facts: device, library versions, commit, date."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
    else:
        gpu = f"cpu ({platform.processor() or platform.machine()}, Triton interpreter)"
    return dict(
        gpu=gpu,
        torch=torch.__version__,
        cuda=torch.version.cuda,
        triton=triton_version,
        python=platform.python_version(),
        commit=_git_commit(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        argv=sys.argv,
    )


def _git_commit() -> str:
    """The commit measured: $FASTFOLD_COMMIT when set (a copy of the tree shipped to a GPU
    machine may carry stale git metadata, so the caller's word wins), else git's HEAD."""
    if os.environ.get("FASTFOLD_COMMIT"):
        return os.environ["FASTFOLD_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
        # changed or untracked source files (results files do not count)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "kernels", "patches",
                                "fastfold_plugin", "benchmarks/*.py"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Recorder:
    """Prints rows as they come and appends them (after one header) to <out>/<name>.jsonl."""

    def __init__(self, name: str, args: argparse.Namespace, device: torch.device):
        self.rows: List[dict] = []
        out_dir = args.out if args.out is not None else (None if args.dry_run else RESULTS_DIR)
        self.path = None if out_dir is None else Path(out_dir) / f"{name}.jsonl"
        header = dict(record="header", benchmark=name, dry_run=bool(args.dry_run),
                      **environment(device))
        print(json.dumps(header), flush=True)
        self._write(header)

    def _write(self, rec: dict) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def add(self, row: dict) -> None:
        rec = dict(record="result", **row)
        self.rows.append(rec)
        self._write(rec)
        if "error" in row:
            print(f"{_label(row)}: {row['error']}", flush=True)
        else:
            peak = "-" if row.get("peak_mib") is None else f"{row['peak_mib']:.0f} MiB"
            print(f"{_label(row)}: {row['ms']:.3f} ms [{row['ms_p20']:.3f}, "
                  f"{row['ms_p80']:.3f}]  peak {peak}", flush=True)

    def note(self, text: str) -> None:
        print(f"note: {text}", flush=True)

    def done(self) -> None:
        where = f" -> {self.path}" if self.path is not None else " (dry run: no file written)"
        print(f"{len(self.rows)} rows{where}", flush=True)


def _label(row: dict) -> str:
    skip = {"op", "provider", "mode", "ms", "ms_p20", "ms_p80", "peak_mib", "error", "dtype"}
    shape = " ".join(f"{k}={v}" for k, v in row.items() if k not in skip)
    return f"{row['op']:<10} {row['provider']:<16} {row['mode']:<8} {shape} {row.get('dtype', '')}"


def _time(fn: Callable[[], object], device: torch.device, warmup: int, rep: int):
    """(median, p20, p80) in ms."""
    if device.type == "cuda":
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep,
                                                quantiles=[0.5, 0.2, 0.8])
        return med, p20, p80
    times = []
    for _ in range(2):  # dry run: a wall clock, two calls
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=5, method="inclusive")
    return statistics.median(times), q[0], q[-1]


def _peak_mib(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def measure(
    forward: Callable[[], torch.Tensor],
    grad_inputs: Sequence[torch.Tensor],
    modes: Iterable[str],
    device: torch.device,
    warmup: int = 25,
    rep: int = 100,
) -> Dict[str, dict]:
    """Time `forward` (a closure over its inputs) in each mode; mode -> numbers or error.

    Backward is ``torch.autograd.grad`` of the output for the `grad_inputs` with a fixed random
    upstream gradient (no ``.grad`` accumulation). The first call (compilation, autotuning) is
    made before any timing.
    """
    results: Dict[str, dict] = {}
    dout = None

    def fwd_nograd():
        with torch.no_grad():
            return forward()

    def fwd_bwd():
        out = forward()
        return torch.autograd.grad(out, grad_inputs, dout)

    for mode in modes:
        try:
            if mode == "fwd":
                fn = fwd_nograd
            else:
                if dout is None:
                    out = forward()
                    dout = torch.randn_like(out)
                    del out
                if mode == "fwd+bwd":
                    fn = fwd_bwd
                else:
                    graph_out = forward()

                    def fn(graph_out=graph_out, dout=dout):
                        return torch.autograd.grad(graph_out, grad_inputs, dout,
                                                   retain_graph=True)
            fn()  # compile / autotune
            ms, p20, p80 = _time(fn, device, warmup, rep)
            results[mode] = dict(ms=ms, ms_p20=p20, ms_p80=p80, peak_mib=_peak_mib(fn, device))
        except Exception as e:  # noqa: BLE001 - a failing provider is a result (e.g. OOM)
            results[mode] = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            if not isinstance(e, torch.cuda.OutOfMemoryError):
                traceback.print_exc()
        finally:
            fn = None
            graph_out = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return results


def available_providers(recorder: "Recorder", args: argparse.Namespace, providers: Sequence[str],
                        why_not: Callable[[str], Optional[str]]) -> List[str]:
    """The providers to run: those asked for (``--providers``, default all), minus those for
    which ``why_not(name)`` gives a reason (printed as a note). Unknown names exit."""
    names = args.providers or list(providers)
    unknown = [n for n in names if n not in providers]
    if unknown:
        raise SystemExit(f"unknown provider(s) {unknown}; choose from {tuple(providers)}")
    available = []
    for name in names:
        why = why_not(name)
        if why:
            recorder.note(why)
        else:
            available.append(name)
    return available


def run_provider(recorder: Recorder, row: dict, make: Callable[[], tuple], args,
                 device: torch.device) -> None:
    """Build a provider's inputs with `make()` -> (forward, grad_inputs), measure every mode,
    and record one row per mode. A failure while building is recorded for every mode."""
    try:
        forward, grad_inputs = make()
    except Exception as e:  # noqa: BLE001
        for mode in args.modes:
            recorder.add(dict(row, mode=mode, error=f"{type(e).__name__}: {str(e)[:200]}"))
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return
    res = measure(forward, grad_inputs, args.modes, device, args.warmup, args.rep)
    for mode in args.modes:
        recorder.add(dict(row, mode=mode, **res[mode]))
    del forward, grad_inputs
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_sweep(benchmark: str, description: str, providers: Sequence[str],
              sweep: Callable[[argparse.Namespace], List[dict]],
              provider_fn: Callable[[str, dict, torch.device], tuple], argv=None, **row) -> None:
    """A benchmark whose every provider runs on every sweep point: parse the common options,
    then record `provider_fn(name, params, device)` -> (forward, grad_inputs) for each (params,
    provider), rows tagged ``op=benchmark`` and `row`'s extra fields."""
    args = parse_args(description, argv)
    device = setup_device(args)
    rec = Recorder(benchmark, args, device)
    available = available_providers(rec, args, providers, lambda name: None)
    for params in sweep(args):
        for name in available:
            run_provider(rec, dict(op=benchmark, provider=name, **params, **row),
                         lambda n=name, p=params: provider_fn(n, p, device), args, device)
    rec.done()
