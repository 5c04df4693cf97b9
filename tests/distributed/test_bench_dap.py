"""benchmarks/bench_dap.py dry-runs end to end under torchrun (CPU, gloo, tiny sizes) and writes
its JSON lines with the environment fields."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("nprocs", [2, 3])
def test_bench_dap_dry_run(tmp_path, tcp_port, nprocs):
    out = tmp_path / "dap.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nprocs}",
           f"--master-port={tcp_port}", str(REPO / "benchmarks" / "bench_dap.py"), "--dry-run",
           "--out", str(out), "--profile-dir", str(tmp_path / "traces")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    suites = {r["suite"] for r in rows}
    assert suites == {"strong", "inference", "weak", "profile"}, suites
    for r in rows:
        for key in ("gpu", "torch", "triton", "commit", "date", "world"):
            assert r[key], (key, r)
        assert r["world"] == nprocs and r["dry_run"]
        if r["suite"] != "profile":
            assert r["ms_median"] > 0 and r["ms_q20"] <= r["ms_q80"], r
    dap_rows = [r for r in rows if r["suite"] == "strong" and r["provider"] == "dap"]
    assert {r["dap"] for r in dap_rows} == {nprocs} and {r["async"] for r in dap_rows} == {True, False}
    prof = [r for r in rows if r["suite"] == "profile"]
    assert {r["async"] for r in prof} == {True, False} and all(r["n_comm"] > 0 for r in prof)
    assert all(Path(r["trace"]).is_file() for r in prof)
