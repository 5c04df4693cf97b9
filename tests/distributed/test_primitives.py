"""DAP communication primitives: values, adjointness of each pair, async == sync, padding."""
import pytest
import torch

from fastfold_plugin.distributed import pad_to, pad_to_multiple, padded_length, unpad


@pytest.mark.parametrize("nprocs", [1, 2, 3])
def test_primitives_are_exact_adjoints(run_workers, nprocs):
    results = run_workers("primitives", nprocs, deadline=120)
    assert all(r.records() == [{"ok": True, "size": nprocs}] for r in results)


@pytest.mark.parametrize("n, multiple, expected", [(0, 3, 0), (1, 3, 3), (37, 2, 38), (37, 3, 39),
                                                   (36, 3, 36), (5, 1, 5)])
def test_padded_length(n, multiple, expected):
    assert padded_length(n, multiple) == expected


def test_pad_to_multiple_round_trip_and_gradient():
    x = torch.randn(2, 5, 7, 3, dtype=torch.float64, requires_grad=True)
    y = pad_to_multiple(x, [-3, -2], 3, value=0.0)
    assert y.shape == (2, 6, 9, 3)
    assert torch.equal(y[:, 5:], torch.zeros_like(y[:, 5:]))
    assert torch.equal(y[:, :, 7:], torch.zeros_like(y[:, :, 7:]))
    assert torch.equal(unpad(y, {-3: 5, -2: 7}), x)
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad, g[:, :5, :7])
    # nothing to pad: the same tensor comes back
    assert pad_to_multiple(x, -3, 5) is x
    assert pad_to(x, {1: 5}) is x
    with pytest.raises(ValueError):
        pad_to(x, {1: 4})
    with pytest.raises(ValueError):
        padded_length(3, 0)


def test_copy_engine_gathers_only_on_gpu_groups_and_freed_by_shutdown(monkeypatch):
    """The sharded triangle multiplication's copy-engine all-gathers (symmetric memory) are set
    up only for a GPU process group of several ranks, never on the CPU or for one process;
    buffers larger than the chunk size are powers of two in MiB; ``shutdown`` frees them."""
    import fastfold_plugin.distributed as fd
    from fastfold_plugin.kernels import triangle_multiplication as tm

    one = tm._DistComm(None)
    assert tm._PeerSlots.get(one, torch.device("cpu"), 2**20) is None
    assert tm._PeerSlots.get(one, torch.device("cuda", 0), 2**20) is None
    monkeypatch.setattr(tm, "_GATHER_CHUNK_BYTES", 4 * 2**20)
    assert tm._slot_bytes(1000) == 4 * 2**20 and tm._slot_bytes(4 * 2**20) == 4 * 2**20
    assert tm._slot_bytes(5 * 2**20 + 1) == 8 * 2**20  # above: powers of two in MiB
    assert tm._slot_bytes(8 * 2**20) == 8 * 2**20 and tm._slot_bytes(9 * 2**20) == 16 * 2**20
    monkeypatch.setitem(tm._PeerSlots._made, ("1", (0, 1), 0, 2**20), None)
    fd.shutdown()  # (no process group here: frees the buffers and returns)
    assert not tm._PeerSlots._made


def test_copy_engine_all_to_alls_only_for_gpu_groups_and_freed_by_shutdown():
    """The all-to-alls' copy-engine path (symmetric memory) is taken only for CUDA tensors of a
    group of several ranks (never on the CPU, for one process, or below 1 MiB); its slots are
    powers of two in MiB; ``shutdown`` frees them."""
    import fastfold_plugin.distributed as fd
    from fastfold_plugin.distributed import peer

    x = torch.randn(64, 64, 128)
    assert peer.PeerAllToAll.launch(x, 1, 0, None) is None
    mib = 2**20
    # the MSA / pair switches [S, N/P, C] -> rows (split along dim 0): push; rows -> columns
    # (gathered along dim 0): pull; with a batch dim of 1 in front as well
    assert peer._mode((512, 192, 256), 0, 1, 4 * mib, 2) == "push"
    assert peer._mode((256, 384, 256), 1, 0, 4 * mib, 2) == "pull"
    assert peer._mode((1, 256, 384, 256), 2, 1, 4 * mib, 2) == "pull"
    assert peer._mode((1, 512, 192, 256), 1, 2, 4 * mib, 2) == "push"
    # batch dims above 1 in front of both axes, one process, below 1 MiB: NCCL
    assert peer._mode((2, 256, 384, 256), 2, 1, 4 * mib, 2) is None
    assert peer._mode((512, 192, 256), 0, 1, 4 * mib, 1) is None
    assert peer._mode((512, 192, 256), 0, 1, mib - 1, 2) is None
    assert peer._slot_bytes(1) == 2**20 and peer._slot_bytes(2**20) == 2**20
    assert peer._slot_bytes(2**20 + 1) == 2 * 2**20 and peer._slot_bytes(5 * 2**20) == 8 * 2**20
    peer._Pool._pools[("1", (0, 1), 0)] = None
    assert peer.slot_bytes() == 0
    fd.shutdown()  # (no process group here: frees the slots and returns)
    assert not peer._Pool._pools


def test_copy_engine_barriers_wait_for_the_context_timeout(monkeypatch):
    """A DAP context gives its group's copy-engine barriers its timeout (else 10 minutes)."""
    import datetime

    import torch.distributed as dist

    import fastfold_plugin.distributed as fd
    from fastfold_plugin.distributed import peer

    monkeypatch.setattr(peer, "_TIMEOUT_MS", {})
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        group = dist.new_group([0])
        assert peer._Pool(group, torch.device("cpu")).timeout_ms == 600_000
        fd.DAPContext(group=group, timeout=datetime.timedelta(seconds=7))
        assert peer._Pool(group, torch.device("cpu")).timeout_ms == 7000
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
def test_copy_engine_all_to_alls_on_two_gpus(run_workers):
    if torch.cuda.device_count() < 2:
        pytest.fail(f"this test needs 2 CUDA GPUs (found {torch.cuda.device_count()})")
    results = run_workers("peer_all_to_all", 2, {}, deadline=300)
    assert all(r.records() == [{"ok": True, "size": 2}] for r in results)
