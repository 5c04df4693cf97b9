"""The sharded triangle multiplication on 2 and 3 gloo processes (Triton kernels in the CPU
interpreter without a GPU): output, dz and all 16 weight gradients after the DAP reduction equal
the single-process fused op; the reference sharded op equals the single-process reference;
overlap on and off are bit-identical. N_res is not a multiple of the group size (padded, mask 0);
N_res 1 on 3 processes leaves two ranks with padding only. And the DAP Evoformer and template
pair stacks with the Triton sharded op inside equal stock OpenFold (every gradient). Scenarios:
workers_trimul.py."""
import json
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).resolve().parent / "workers_trimul.py"

CASES = {
    2: [dict(n_res=7, batch=[], c_z=8, c_h=8), dict(n_res=5, batch=[2], c_z=12, c_h=16),
        dict(n_res=7, batch=[], c_z=16, c_h=16, dtype="bf16")],
    3: [dict(n_res=7, batch=[], c_z=8, c_h=8), dict(n_res=1, batch=[], c_z=8, c_h=8)],
}


@pytest.mark.parametrize("nprocs", sorted(CASES))
def test_sharded_trimul_matches_one_process(run_workers, nprocs):
    results = run_workers("sharded_trimul", nprocs, deadline=300, script=WORKER,
                          extra_argv=["sharded_trimul", json.dumps({"cases": CASES[nprocs]})])
    for r in results:
        recs = r.records()
        assert len(recs) == len(CASES[nprocs]), recs
        for rec, case in zip(recs, CASES[nprocs]):
            assert rec["ok"] and rec["size"] == nprocs and rec["n_res"] == case["n_res"]


@pytest.mark.parametrize("nprocs", [2, 3])
def test_dap_stacks_with_triton_trimul_match_stock(run_workers, nprocs):
    args = {"n_res": 7, "n_seq": 3}
    results = run_workers("stacks_triton_trimul", nprocs, deadline=300, script=WORKER,
                          extra_argv=["stacks_triton_trimul", json.dumps(args)])
    for r in results:
        recs = r.records()
        assert [rec["stack"] for rec in recs] == ["evoformer", "template"], recs
        # 2 blocks x (outgoing + incoming) per stack; the Evoformer's checkpointed blocks run
        # their forward twice (the gradient-free pass and the recompute)
        calls = {rec["stack"]: rec["trimul_calls"] for rec in recs}
        assert calls == {"evoformer": 8, "template": 4}, calls
        assert all(rec["ok"] and rec["size"] == nprocs for rec in recs)


@pytest.mark.gpu
def test_sharded_trimul_on_two_gpus(run_workers):
    """NCCL, the compiled kernels, AF2's channel widths: fp32 (no TF32) within fp32 tolerance of
    one GPU; bf16 autocast within twice one GPU's error."""
    if torch.cuda.device_count() < 2:
        pytest.fail(f"this test needs 2 CUDA GPUs (found {torch.cuda.device_count()}): run it on a "
                    f"2-GPU machine")
    cases = [dict(n_res=131, batch=[1], c_z=128, c_h=128),
             dict(n_res=257, batch=[1], c_z=128, c_h=128, dtype="bf16")]
    results = run_workers("sharded_trimul", 2, deadline=600, script=WORKER,
                          extra_argv=["sharded_trimul", json.dumps({"cases": cases})])
    for r in results:
        assert len(r.records()) == len(cases), r.records()
