"""DAP forwards of whole OpenFold stacks vs one process (stock OpenFold), forward and every
gradient, on 1, 2 and 3 processes with lengths that are not multiples of the DAP size."""
import pytest


@pytest.mark.parametrize("nprocs, n_res, n_seq, blocks_per_ckpt", [
    (1, 7, 5, None),
    (2, 7, 5, 1),   # N_res and N_seq odd: padded to 8 and 6
    (3, 7, 5, None),  # padded to 9 and 6
    (3, 1, 1, None),  # N_res 1: two of the three ranks hold only padding
])
def test_evoformer_stack(run_workers, nprocs, n_res, n_seq, blocks_per_ckpt):
    results = run_workers("evoformer_stack_equivalence", nprocs,
                          {"n_res": n_res, "n_seq": n_seq, "blocks_per_ckpt": blocks_per_ckpt},
                          deadline=300)
    for r in results:
        (rec,) = r.records()
        assert rec["ok"] and rec["size"] == nprocs and rec["ops"] > 0


@pytest.mark.parametrize("nprocs, n_res, n_seq, blocks_per_ckpt", [
    (1, 6, 4, None),
    (2, 5, 7, 1),
    (3, 7, 4, None),
])
def test_extra_msa_and_template_stacks(run_workers, nprocs, n_res, n_seq, blocks_per_ckpt):
    results = run_workers("extra_msa_and_template_stacks", nprocs,
                          {"n_res": n_res, "n_seq": n_seq, "blocks_per_ckpt": blocks_per_ckpt},
                          deadline=300)
    for r in results:
        (rec,) = r.records()
        assert rec["ok"] and rec["size"] == nprocs and rec["ops"] > 0
