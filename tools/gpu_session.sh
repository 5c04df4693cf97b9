#!/usr/bin/env bash
# One GPU session: offline install, the GPU kernel tests, the quick benchmark sweep.
# Usage (on a machine with a CUDA GPU and the wheelhouse in .whl):
#   FASTFOLD_COMMIT=$(git rev-parse HEAD) bash tools/gpu_session.sh OUTDIR
# Writes OUTDIR/env.txt, install.log, test-gpu.log and the benchmarks' <name>.jsonl files.
# GPU_TESTS, GPU_BENCHES and the *_TIMEOUT variables select and bound the steps.
set -uo pipefail
out=${1:?usage: tools/gpu_session.sh OUTDIR}
source "$(dirname "$0")/gpu_setup.sh"
gpu_setup "$out"
for b in ${GPU_BENCHES:-evoformer_block attention triangle_multiplication}; do
  [ -f benchmarks/bench_$b.py ] || continue
  timeout "${GPU_BENCH_TIMEOUT:-120}" .venv/bin/python benchmarks/bench_$b.py --quick --out "$out" 2>&1 \
    | grep -v -i warn | tail -40
done
timeout "${GPU_TEST_TIMEOUT:-240}" .venv/bin/python -m pytest -m gpu -q --timeout 120 ${GPU_TESTS:-tests/kernels} \
  2>&1 | tee "$out/test-gpu.log" | tail -25
