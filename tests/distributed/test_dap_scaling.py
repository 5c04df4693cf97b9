"""DAP at the sizes of 4- and 8-GPU machines, on the CPU (gloo, 4 and 8 processes): DP x DAP
2 x 4 on a world of 8 and the DAP benchmark's dry run on 4 and 8 processes (the stacks at DAP 4
and 8 are cases of test_dap_stacks.py). Same contract and scenarios (workers.py) as the DAP
1 / 2 / 3 tests.

Every N_res and N_seq here is not a multiple of the DAP size, and at DAP 8 some are smaller than
it (N_res 5: three of the eight ranks hold only padding residues; N_seq 3: five hold only padding
sequences).
"""
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

def test_dp_x_dap_2_x_4(run_workers):
    dap = 4
    results = run_workers("dp_x_dap", 8, {"dap_size": dap}, deadline=400)
    recs = [r.records()[0] for r in results]
    assert sorted((rec["dp_rank"], rec["dap_rank"]) for rec in recs) == \
        [(i, j) for i in range(2) for j in range(dap)]
    # each DAP group trained on its own sample, of a length that DAP 4 does not divide
    n_res = {rec["dp_rank"]: {x["n_res"] for x in recs if x["dp_rank"] == rec["dp_rank"]}
             for rec in recs}
    assert all(len(v) == 1 for v in n_res.values()), n_res
    for (length,) in n_res.values():
        assert length % dap != 0, n_res
    assert all(rec["ops"] > 0 for rec in recs)


def _dap_sizes(world):
    return {d for d in range(2, world + 1) if world % d == 0}


@pytest.mark.parametrize("nprocs", [4, 8])
def test_bench_dap_dry_run(run_workers, tmp_path, nprocs):
    """Every suite runs at world 4 and 8: strong and inference at every DAP size that divides the
    world, weak with every number of DAP-2 groups that divides it, profile traces on every rank."""
    traces = tmp_path / "traces"
    run_workers("bench_dap", nprocs, script=REPO / "benchmarks" / "bench_dap.py",
           extra_argv=["--dry-run", "--out", str(tmp_path), "--profile-dir", str(traces)],
           deadline=400)
    header, *rows = [json.loads(line) for line in (tmp_path / "dap.jsonl").read_text().splitlines()]
    assert header["record"] == "header" and header["dry_run"] and header["world"] == nprocs
    assert header["dist_backend"] == "gloo"
    assert {r["suite"] for r in rows} == {"strong", "inference", "weak", "profile",
                                      "profile-inference"}
    for r in rows:
        assert r["record"] == "result" and "note" not in r, r
        if not r["suite"].startswith("profile"):
            assert r["ms"] > 0 and r["ms_p20"] <= r["ms_p80"], r
    for suite in ("strong", "inference"):
        dap_rows = [r for r in rows if r["suite"] == suite and r["provider"] == "dap"]
        got = {(r["dap"], r["async"]) for r in dap_rows}
        assert got == {(d, a) for d in _dap_sizes(nprocs) for a in (True, False)}, (suite, got)
        assert len(dap_rows) == len(got), suite  # one row per case (one case per suite here)
    weak = {(r["dap"], r["dp"], r["async"]) for r in rows if r["suite"] == "weak"}
    n_groups = nprocs // 2
    assert weak == {(2, dp, a) for dp in range(1, n_groups + 1) if n_groups % dp == 0
                    for a in (True, False)}, weak
    prof = [r for r in rows if r["suite"] == "profile"]
    assert {r["async"] for r in prof} == {True, False} and all(r["n_comm"] > 0 for r in prof)
    for r in prof:
        mode = "async" if r["async"] else "sync"
        for rank in range(nprocs):
            assert (traces / f"dap{r['dap']}_{r['case']}_{mode}_rank{rank}.json").is_file(), (r, rank)
