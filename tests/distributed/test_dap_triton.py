"""DAP with the Triton ops on every shard, vs stock OpenFold in one process.

GPU (2 and 4 GPUs, NCCL, one process each; `make test-gpu` on a 4-GPU machine): AF2-like widths are
not needed here, the point is NCCL + compiled kernels + the caching allocator, and the padding
rows DAP adds (N_res 37 and N_seq 11 on 2 ranks), which are fully masked attention rows: before
the attention kernels floored their logits, those made DAP training gradients ~1e19 on GPUs. CPU (gloo,
Triton's interpreter, tiny sizes, in CI): the same scenario with torch.empty poisoned (NaN), so
that a kernel which reads memory it never wrote fails here as it would on a GPU."""
import pytest
import torch


@pytest.mark.gpu
def test_dap_on_two_gpus_matches_one_gpu(run_workers):
    if torch.cuda.device_count() < 2:
        pytest.fail(f"this test needs 2 CUDA GPUs (found {torch.cuda.device_count()}): run it on a "
                    f"2-GPU machine")
    results = run_workers("triton_stacks", 2, {"n_res": 37, "n_seq": 11, "device": "cuda"},
                          deadline=600)
    for r in results:
        assert [rec["stack"] for rec in r.records()] == ["evoformer", "template"]


@pytest.mark.gpu
def test_dap_on_four_gpus_matches_one_gpu(run_workers):
    """The same at DAP 4 (N_res 37 padded to 40, N_seq 11 to 12)."""
    if torch.cuda.device_count() < 4:
        pytest.fail(f"this test needs 4 CUDA GPUs (found {torch.cuda.device_count()}): run it on a "
                    f"4-GPU machine")
    results = run_workers("triton_stacks", 4, {"n_res": 37, "n_seq": 11, "device": "cuda"},
                          deadline=600)
    for r in results:
        assert [rec["stack"] for rec in r.records()] == ["evoformer", "template"]


@pytest.mark.gpu
def test_dap_unpadded_on_two_gpus_matches_one_gpu(run_workers):
    """Lengths that need no padding (N_res 38, N_seq 12): in-place inference gathers the
    outputs into the inputs (NCCL in-place all-gather); the trimul's operand gathered in many
    small chunks through both buffers."""
    if torch.cuda.device_count() < 2:
        pytest.fail(f"this test needs 2 CUDA GPUs (found {torch.cuda.device_count()}): run it on a "
                    f"2-GPU machine")
    results = run_workers("triton_stacks", 2, {"n_res": 38, "n_seq": 12, "device": "cuda",
                                               "gather_chunk_bytes": 4096}, deadline=600)
    for r in results:
        assert [rec["stack"] for rec in r.records()] == ["evoformer", "template"]


@pytest.mark.parametrize("args", [dict(n_res=7, n_seq=3),
                                  dict(n_res=8, n_seq=4, gather_chunk_bytes=64)],
                         ids=["padded", "unpadded-chunked"])
def test_dap_triton_ops_on_cpu_with_poisoned_memory(run_workers, args):
    results = run_workers("triton_stacks", 2, dict(args, device="cpu", poison=True), deadline=900)
    for r in results:
        assert [rec["stack"] for rec in r.records()] == ["evoformer", "template"]
