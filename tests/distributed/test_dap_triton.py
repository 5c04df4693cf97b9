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
@pytest.mark.parametrize("nprocs,args", [
    (2, dict(n_res=37, n_seq=11)),
    # lengths that need no padding: in-place inference gathers the outputs into the inputs
    # (NCCL in-place all-gather); the trimul's operand gathered in many small chunks
    (2, dict(n_res=38, n_seq=12, gather_chunk_bytes=4096)),
    (4, dict(n_res=37, n_seq=11)),  # padded to 40 / 12
], ids=["2gpus", "2gpus-unpadded-chunked", "4gpus"])
def test_dap_on_gpus_matches_one_gpu(run_workers, nprocs, args):
    if torch.cuda.device_count() < nprocs:
        pytest.fail(f"this test needs {nprocs} CUDA GPUs (found {torch.cuda.device_count()}): run "
                    f"it on a {nprocs}-GPU machine")
    results = run_workers("triton_stacks", nprocs, dict(args, device="cuda"), deadline=600)
    for r in results:
        assert [rec["stack"] for rec in r.records()] == ["evoformer", "template"]


@pytest.mark.parametrize("args", [dict(n_res=7, n_seq=3),
                                  dict(n_res=8, n_seq=4, gather_chunk_bytes=64),
                                  # one residue per rank: the MSA transition's mask on the column
                                  # shard is a strided view one column wide
                                  dict(n_res=1, n_seq=2)],
                         ids=["padded", "unpadded-chunked", "one-column-shards"])
def test_dap_triton_ops_on_cpu_with_poisoned_memory(run_workers, args):
    results = run_workers("triton_stacks", 2, dict(args, device="cpu", poison=True), deadline=900)
    for r in results:
        assert [rec["stack"] for rec in r.records()] == ["evoformer", "template"]
