#!/usr/bin/env bash
# One GPU session: offline install, the GPU test suite, the quick benchmark sweep.
# Usage (on a machine with a CUDA GPU and the wheelhouse in .whl):  bash tools/gpu_session.sh OUTDIR
# Writes OUTDIR/env.txt, OUTDIR/test-gpu.log and the benchmarks' JSON lines under OUTDIR.
set -uo pipefail
out=${1:?usage: tools/gpu_session.sh OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{
  date -u +%FT%TZ
  git rev-parse HEAD 2>/dev/null || echo "commit: unknown"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
} > "$out/env.txt" 2>&1
cat "$out/env.txt"
make install OFFLINE_WHEELHOUSE=.whl > "$out/install.log" 2>&1 || { tail -40 "$out/install.log"; exit 1; }
tail -3 "$out/install.log"
if [ -d .whl-cueq ]; then .venv/bin/python -m pip install -q --no-index --no-deps --find-links .whl-cueq .whl-cueq/*.whl >> "$out/install.log" 2>&1 || true; fi
timeout "${GPU_TEST_TIMEOUT:-240}" .venv/bin/python -m pytest -m gpu -q -x --timeout 120 tests 2>&1 | tee "$out/test-gpu.log" | tail -25
for b in ${GPU_BENCHES:-attention triangle_multiplication layer_norm transition outer_product_mean}; do
  [ -f benchmarks/bench_$b.py ] || continue
  timeout "${GPU_BENCH_TIMEOUT:-90}" .venv/bin/python benchmarks/bench_$b.py --quick --out "$out" 2>&1 | tail -30
done
