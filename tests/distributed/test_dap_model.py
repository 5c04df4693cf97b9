"""The whole AlphaFold (model_1_ptm, reduced depth) under DAP vs one process, in eval mode, on
OpenFold's real sample features cropped to an N_res that no DAP size here divides."""
import pytest

from fastfold_plugin.testing import SAMPLE_FEATS


# DAP size 3 (N_res 13 padded to 15); size 2 is covered by the stack and DP x DAP tests
@pytest.mark.parametrize("nprocs", [3])
def test_alphafold_eval_matches_one_process(run_workers, shared_data, nprocs):
    args = {"feats": str(shared_data / SAMPLE_FEATS), "n_res": 13, "n_msa": 5, "n_extra": 7}
    results = run_workers("alphafold_eval", nprocs, args, deadline=400)
    for r in results:
        (rec,) = r.records()
        assert rec["ok"] and rec["size"] == nprocs
        print(f"rank {r.rank}: max atom deviation {rec['dpos']:.2e} A, "
              f"pLDDT {rec['dplddt']:.2e} (no_grad={rec['no_grad']})")
