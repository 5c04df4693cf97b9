"""Run every single-GPU benchmark (`benchmarks/bench_*.py`) with the same options.

    python benchmarks/run_all.py [--quick | --full | --dry-run] [--out DIR] [--only a,b]

bench_dap.py needs several processes: run it with torchrun (see docs/dap.md); it is skipped here.
A benchmark that fails is reported and the others still run; the exit status is 1 if any failed.
"""
import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MULTI_PROCESS = {"dap"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=None, help="comma-separated benchmark names (e.g. attention)")
    args, passthrough = p.parse_known_args(argv)
    names = sorted(f.stem[len("bench_"):] for f in HERE.glob("bench_*.py"))
    names = [n for n in names if n not in MULTI_PROCESS]
    if args.only:
        wanted = [n.strip() for n in args.only.split(",")]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            sys.exit(f"unknown benchmark(s) {unknown}; choose from {names}")
        names = wanted
    failed = []
    for name in names:
        print(f"== bench_{name}", flush=True)
        rc = subprocess.call([sys.executable, str(HERE / f"bench_{name}.py"), *passthrough])
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"failed: {failed}", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
