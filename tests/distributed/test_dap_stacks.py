"""DAP forwards of whole OpenFold stacks vs one process (stock OpenFold), on 1, 2, 3, 4 and 8
processes with lengths that are not multiples of the DAP size (at 8 also smaller than it).

Each case checks: eval forward (no grad, OpenFold's in-place path, unchunked and chunked; where
nothing is padded, the outputs come back in the inputs' memory); a
training forward with dropout and every parameter and input gradient, in fp32 and in fp64 (the
dropout masks are the ones one process draws); async == sync bit for bit; and that every op ran
on a shard (the recorded op input shapes). The worker cases live in workers.py.
"""
import pytest

CASES = {
    1: [dict(stack="evoformer", n_res=7, n_seq=5),
        dict(stack="extra_template", n_res=6, n_seq=4)],
    # odd lengths padded to 8 / 6; activation checkpointing of the blocks; single blocks; and
    # lengths that need no padding (in-place inference returns the outputs in the inputs)
    2: [dict(stack="evoformer", n_res=7, n_seq=5, blocks_per_ckpt=1),
        dict(stack="extra_template", n_res=5, n_seq=7, blocks_per_ckpt=1),
        dict(stack="blocks", n_res=5, n_seq=3),
        dict(stack="evoformer", n_res=6, n_seq=4),
        dict(stack="extra_template", n_res=6, n_seq=2)],
    # padded to 9 / 6; N_res 1: two of the three ranks hold only padding
    3: [dict(stack="evoformer", n_res=7, n_seq=5),
        dict(stack="evoformer", n_res=1, n_seq=1),
        dict(stack="extra_template", n_res=7, n_seq=4)],
    # padded to 16 / 8; activation checkpointing of the blocks; single blocks
    4: [dict(stack="evoformer", n_res=13, n_seq=6, blocks_per_ckpt=1),
        dict(stack="extra_template", n_res=13, n_seq=5),
        dict(stack="blocks", n_res=7, n_seq=3)],
    # padded to 16 / 8, and N_res, N_seq smaller than the DAP size
    8: [dict(stack="evoformer", n_res=13, n_seq=5),
        dict(stack="evoformer", n_res=5, n_seq=3),
        dict(stack="extra_template", n_res=13, n_seq=6),
        dict(stack="extra_template", n_res=5, n_seq=3)],
}


@pytest.mark.parametrize("nprocs", sorted(CASES))
def test_stacks_match_one_process(run_workers, nprocs):
    results = run_workers("stacks", nprocs, {"cases": CASES[nprocs]}, deadline=400)
    for r in results:
        recs = r.records()
        assert len(recs) == len(CASES[nprocs]), recs
        for rec, case in zip(recs, CASES[nprocs]):
            assert rec["ok"] and rec["size"] == nprocs and rec["ops"] > 0
            assert rec["stack"] == case["stack"] and rec["n_res"] == case["n_res"]
