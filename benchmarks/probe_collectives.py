"""Raw NCCL cost of DAP's pair-tensor collectives on two GPUs, and how much of it hides behind
compute on another stream.

    torchrun --nproc-per-node 2 benchmarks/probe_collectives.py      # PROBE_N=2048 by default

At N_res = PROBE_N (C_z 128), per rank: the all-to-all of an axis switch (the fp32 pair shard,
packed: ``all_to_all_single``), the same as peer-only send/recv in 1, 4 and 16 chunks, the local
copy of the rank's own block, the all-gather of a bf16 triangle-multiplication operand (whole
and in channel chunks, as ``_sharded_inference`` issues it), and four 8192^3 bf16 GEMMs alone
and with an all-to-all / send-recv on a side stream; then the same exchange as copy-engine writes
into the peer's symmetric-memory buffer (no SMs: ``torch.distributed._symmetric_memory``), alone
and beside the GEMMs. Median of 10 CUDA-event timings between
barriers; rank 0 prints ms and GB/s (bytes each rank sends to its peer). Set NCCL_PROTO or
CUDA_DEVICE_MAX_CONNECTIONS in the environment to compare. A diagnostic: it writes no results
file (its output is kept as a log).
"""
import os
import statistics

import torch
import torch.distributed as dist

dist.init_process_group("nccl")
rank, p = dist.get_rank(), dist.get_world_size()
dev = torch.device("cuda", rank)
torch.cuda.set_device(dev)
peer = 1 - rank
N, C = int(os.environ.get("PROBE_N", 2048)), 128
R = N // p


def t(fn, reps=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        dist.barrier()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def say(name, ms, nbytes=None):
    if rank == 0:
        bw = f"  {nbytes / ms / 1e6:.0f} GB/s" if nbytes else ""
        print(f"{os.environ.get('NCCL_PROTO', 'default'):>8} {name:<48} {ms:8.3f} ms{bw}", flush=True)


x = torch.randn(p, R, N // p, C, device=dev)  # packed send, fp32 1 GiB at N 2048
y = torch.empty_like(x)
half = x[peer].numel() * 4
say("a2a_single fp32 shard", t(lambda: dist.all_to_all_single(y, x)), half)


def p2p(k=1):
    s, r = x[peer].view(k, -1), y[peer].view(k, -1)
    for i in range(k):
        ops = [dist.P2POp(dist.isend, s[i], peer), dist.P2POp(dist.irecv, r[i], peer)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()


for k in (1, 4, 16):
    say(f"p2p peer only, {k} chunks", t(lambda k=k: p2p(k)), half)
say("local copy own block (torch)", t(lambda: y[rank].copy_(x[rank])))


def p2p_and_copy():
    p2p(1)
    y[rank].copy_(x[rank])


say("p2p + local copy (serial)", t(p2p_and_copy), half)

g_in = torch.randn(R, N, C, device=dev, dtype=torch.bfloat16)
g_out = torch.empty(p * R, N, C, device=dev, dtype=torch.bfloat16)
say("all_gather bf16 shard (0.5 GiB)", t(lambda: dist.all_gather_into_tensor(g_out, g_in)),
    g_in.numel() * 2)
for mib in (256, 64, 16):
    cc = max(1, C * mib // 512)
    gi = torch.randn(cc, R, N, device=dev, dtype=torch.bfloat16)
    go = torch.empty(p, cc, R, N, device=dev, dtype=torch.bfloat16)
    say(f"all_gather bf16 {cc} channels (~{mib} MiB send)",
        t(lambda go=go, gi=gi: dist.all_gather_into_tensor(go, gi)), gi.numel() * 2)

# overlap: GEMMs on the default stream vs a2a on a side stream
A = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
B = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)


def gemms():
    for _ in range(4):
        A @ B


side = torch.cuda.Stream()


def beside_gemms(exchange):
    """The GEMMs on the current stream with `exchange()` issued on the side stream."""
    def run():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            exchange()
        gemms()
        torch.cuda.current_stream().wait_stream(side)
    return run


say("4 GEMMs 8192^3 alone", t(gemms))
say("GEMMs + a2a_single on side stream", t(beside_gemms(lambda: dist.all_to_all_single(y, x))))
say("GEMMs + p2p on side stream", t(beside_gemms(p2p)))

# copy engine: write the peer's block straight into its symmetric-memory receive buffer
try:
    import torch.distributed._symmetric_memory as symm_mem
    recv = symm_mem.empty(x.shape, dtype=x.dtype, device=dev)
    hdl = symm_mem.rendezvous(recv, dist.group.WORLD)
    peer_recv = hdl.get_buffer(peer, tuple(x.shape), x.dtype)
except Exception as e:  # noqa: BLE001 - a diagnostic: report and stop
    say(f"symmetric memory unavailable: {type(e).__name__}: {e}"[:90], 0.0)
    dist.destroy_process_group()
    raise SystemExit(0) from None


def ce(k=1):
    s, r = x[peer].view(k, -1), peer_recv[rank].view(k, -1)
    for i in range(k):
        r[i].copy_(s[i])
    hdl.barrier(channel=0)


for k in (1, 4):
    say(f"copy-engine peer write, {k} chunks", t(lambda k=k: ce(k)), half)
say("GEMMs + copy-engine write on side stream", t(beside_gemms(ce)))
torch.cuda.synchronize()
dist.all_to_all_single(y, x)  # reference exchange
say(f"copy-engine result equals all_to_all: {torch.equal(recv[peer], y[peer])}", 0.0)
dist.destroy_process_group()
