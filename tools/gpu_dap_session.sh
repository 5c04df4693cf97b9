#!/usr/bin/env bash
# Two-GPU session (one host, NCCL): offline install, the 2-GPU DAP test, the DAP benchmark.
# Usage (on a machine with 2 CUDA GPUs and the wheelhouse in .whl):
#   FASTFOLD_COMMIT=$(git rev-parse HEAD) bash tools/gpu_dap_session.sh OUTDIR
# Writes OUTDIR/env.txt, install.log, test-dap-gpu.log, bench-dap.log and dap.jsonl; profiler
# traces go to DAP_TRACES (default /tmp/dap_traces: they are large). DAP_SUITES, DAP_TESTS and
# the *_TIMEOUT variables select and bound the steps.
set -uo pipefail
out=${1:?usage: tools/gpu_dap_session.sh OUTDIR}
source "$(dirname "$0")/gpu_setup.sh"
gpu_setup "$out"
FASTFOLD_PLUGIN_AUTOTUNE=0 timeout "${DAP_TEST_TIMEOUT:-150}" .venv/bin/python -m pytest -m gpu -q \
  --tb=short ${DAP_TESTS:-tests/distributed/test_dap_triton.py} 2>&1 | tee "$out/test-dap-gpu.log" | tail -20
timeout "${DAP_BENCH_TIMEOUT:-360}" .venv/bin/python -m torch.distributed.run --nproc-per-node 2 \
  benchmarks/bench_dap.py --out "$out" --suites "${DAP_SUITES:-strong,inference,profile,weak}" \
  --profile-dir "${DAP_TRACES:-/tmp/dap_traces}" 2>&1 | grep -v -i warn | tee "$out/bench-dap.log" | tail -45
