# Sourced by tools/gpu_session.sh and tools/gpu_dap_session.sh: `gpu_setup OUTDIR` writes
# OUTDIR/env.txt (date, commit, GPUs and their links, torch/triton versions) and does the
# offline install from .whl into .venv (OUTDIR/install.log); a failed install ends the script.
gpu_setup() {
  local out=$1
  mkdir -p "$out"
  export PYTHONUNBUFFERED=1
  {
    date -u +%FT%TZ
    echo "commit ${FASTFOLD_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    nvidia-smi topo -m 2>/dev/null | head -4
    python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
  } > "$out/env.txt" 2>&1
  cat "$out/env.txt"
  make install OFFLINE_WHEELHOUSE=.whl > "$out/install.log" 2>&1 || { tail -40 "$out/install.log"; exit 1; }
  tail -1 "$out/install.log"
}
