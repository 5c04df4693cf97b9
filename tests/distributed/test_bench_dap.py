"""benchmarks/bench_dap.py dry-runs end to end under torchrun (CPU, gloo, tiny sizes) and writes
the shared harness's JSON lines: a header with the environment, then one row per case."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("nprocs", [2, 3])
def test_bench_dap_dry_run(tmp_path, tcp_port, nprocs):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nprocs}",
           f"--master-port={tcp_port}", str(REPO / "benchmarks" / "bench_dap.py"), "--dry-run",
           "--out", str(tmp_path), "--profile-dir", str(tmp_path / "traces")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    header, *rows = [json.loads(line) for line in (tmp_path / "dap.jsonl").read_text().splitlines()]
    assert header["record"] == "header" and header["benchmark"] == "dap" and header["dry_run"]
    for key in ("gpu", "torch", "triton", "commit", "date", "colossalai"):
        assert header[key], (key, header)
    assert header["world"] == nprocs and header["dist_backend"] == "gloo"
    assert {r["suite"] for r in rows} == {"strong", "inference", "weak", "profile",
                                      "profile-inference"}
    for r in rows:
        assert r["record"] == "result"
        if not r["suite"].startswith("profile"):
            assert r["ms"] > 0 and r["ms_p20"] <= r["ms_p80"], r
    dap_rows = [r for r in rows if r["suite"] == "strong" and r["provider"] == "dap"]
    assert {r["dap"] for r in dap_rows} == {nprocs} and {r["async"] for r in dap_rows} == {True, False}
    assert {r["provider"] for r in rows if r["suite"] == "strong"} == {"stock", "plugin", "dap"}
    prof = [r for r in rows if r["suite"] == "profile"]
    assert {r["async"] for r in prof} == {True, False} and all(r["n_comm"] > 0 for r in prof)
    assert all(Path(r["trace"]).is_file() for r in prof)
    # wall vs busy time per step: busy (kernels or collectives running) fits inside the wall
    assert all(0 < r["busy_ms_per_step"] <= r["wall_ms_per_step"] for r in prof), prof
    # the inference profile: DAP 1 and DAP P, and its kernel-table report
    inf = [r for r in rows if r["suite"] == "profile-inference"]
    assert sorted(r["dap"] for r in inf) == [1, nprocs], inf
    assert all(0 < r["busy_ms_per_step"] <= r["wall_ms_per_step"] for r in inf), inf
    report = (tmp_path / "traces" / "inference_kernels.txt").read_text()
    assert "DAP 1" in report and f"DAP {nprocs}" in report and "kernel" in report
