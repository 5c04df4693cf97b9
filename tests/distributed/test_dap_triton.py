"""DAP on GPUs with NCCL and the Triton ops (2 GPUs, one process each): the Evoformer and
template pair stacks vs stock OpenFold on one GPU. Run with `pytest -m gpu` on a 2-GPU machine."""
import pytest
import torch


@pytest.mark.gpu
def test_dap_on_two_gpus_matches_one_gpu(run_workers):
    if torch.cuda.device_count() < 2:
        pytest.fail(f"this test needs 2 CUDA GPUs (found {torch.cuda.device_count()}): run it on a "
                    f"2-GPU machine")
    results = run_workers("gpu_stacks", 2, {"n_res": 37, "n_seq": 11}, deadline=600)
    for r in results:
        assert [rec["stack"] for rec in r.records()] == ["evoformer", "template"]
