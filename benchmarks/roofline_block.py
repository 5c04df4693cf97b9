"""How far the Evoformer block's training step is from the card's roofline (CPU; reads a profile).

    python benchmarks/roofline_block.py [--sizes 128x256,512x384]
        [--kernels benchmarks/results/logs/block-step-kernels_h100_<commit>.txt]

Counts the model FLOPs of one training step (forward and backward) of stock OpenFold's
EvoformerBlock at AF2 widths with ``torch.utils.flop_counter.FlopCounterMode`` on the meta device
(no compute, no GPU), the attention cores' share analytically (q k^T and p v: 4 Q K C FLOPs per
batch and head forward, twice that backward), and a lower bound on the step's HBM traffic: each
of the block's sub-modules reads its residual stream once forward and writes the new stream
(fp32, 8 bytes an element), and backward reads the stream and its gradient and writes the
gradient (12 bytes), i.e. every sub-module fused whole with nothing else leaving the chip (the
row attention also reads the pair for its bias, the outer product mean the MSA). At the H100
SXM's dense bf16 peak (989 TFLOP/s) and HBM3 bandwidth (3.35 TB/s) that gives the time a step
cannot beat. With ``--kernels`` (a ``profile_block_step.py`` kernel table), the measured step is
set against it: its kernels grouped by kind (attention, other Triton kernels, cuBLAS GEMMs,
PyTorch's elementwise / copy / reduction kernels), their time and, for the attention kernels and
the step, the FLOP rate they reach. A diagnostic: it writes no results file.
"""
import argparse
import re
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_dap as bd  # noqa: E402

PEAK_FLOPS = 989.4e12  # H100 SXM, dense bf16
PEAK_BYTES = 3.35e12   # H100 SXM, HBM3


def step_flops(n_seq: int, n_res: int) -> float:
    """Model FLOPs of one forward + backward of stock OpenFold's EvoformerBlock (meta device)."""
    from openfold.model.evoformer import EvoformerBlock

    block = EvoformerBlock(**bd.block_dims(False), msa_dropout=0.15, pair_dropout=0.25,
                           inf=1e9, eps=1e-10).to("meta").train()
    d = bd.block_dims(False)
    m = torch.empty(n_seq, n_res, d["c_m"], device="meta", requires_grad=True)
    z = torch.empty(n_res, n_res, d["c_z"], device="meta", requires_grad=True)
    counter = FlopCounterMode(display=False)
    with counter:
        mo, zo = block(m, z, msa_mask=torch.ones(n_seq, n_res, device="meta"),
                       pair_mask=torch.ones(n_res, n_res, device="meta"), chunk_size=None)
        (mo.sum() + zo.sum()).backward()
    return float(counter.get_total_flops())


def attention_flops(n_seq: int, n_res: int) -> float:
    """Model FLOPs of the four attention cores (q k^T, p v), forward and backward."""
    d = bd.block_dims(False)
    hm, cm = d["no_heads_msa"], d["c_hidden_msa_att"]
    hz, cz = d["no_heads_pair"], d["c_hidden_pair_att"]
    fwd = (4 * n_seq * hm * n_res ** 2 * cm        # MSA row attention
           + 4 * n_res * hm * n_seq ** 2 * cm      # MSA column attention
           + 2 * 4 * n_res * hz * n_res ** 2 * cz)  # triangle attention, both nodes
    return 3.0 * fwd


def min_bytes(n_seq: int, n_res: int) -> float:
    """The residual-stream traffic lower bound of the module docstring."""
    d = bd.block_dims(False)
    msa, pair = n_seq * n_res * d["c_m"], n_res * n_res * d["c_z"]
    per_stream = 8 + 12  # fp32: forward read + write, backward read x, read dx, write dx
    msa_modules = 3 * per_stream + (4 + 12)  # row, column, transition; the OPM reads m
    pair_modules = 6 * per_stream + 12       # OPM update, 2 x tri-mul, 2 x tri-att, transition;
    return float(msa * msa_modules + pair * pair_modules)  # the row attention reads z


_KINDS = [
    ("attention (Triton)", re.compile(r"^_attention_")),
    ("other Triton kernels", re.compile(r"^_")),
    ("cuBLAS GEMMs", re.compile(r"nvjet|gemm|cutlass|splitKreduce")),
    ("PyTorch elementwise / copy / reduction", re.compile(r".")),
]


def kernel_kinds(path: Path, size: str):
    """(step ms, {kind: (ms, launches)}) of the table for `size` in a profile_block_step file."""
    text = path.read_text()
    part = text.split(f"whole step captured, {size}:")[1].split("\n== ")[0]
    step_ms = float(part.split()[0])
    kinds = {k: [0.0, 0] for k, _ in _KINDS}
    for line in part.splitlines():
        mt = re.match(r"\s+([\d.]+)\s+[\d.]+%\s+(\d+)\s+(.*)$", line)
        if not mt:
            continue
        ms, calls, name = float(mt[1]), int(mt[2]), mt[3]
        kind = next(k for k, rx in _KINDS if rx.search(name))
        kinds[kind][0] += ms
        kinds[kind][1] += calls
    return step_ms, kinds


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="128x256,512x384")
    p.add_argument("--kernels", type=Path, default=None)
    a = p.parse_args(argv)
    for size in a.sizes.split(","):
        n_seq, n_res = (int(v) for v in size.split("x"))
        flops, att, nbytes = step_flops(n_seq, n_res), attention_flops(n_seq, n_res), \
            min_bytes(n_seq, n_res)
        t_c, t_m = flops / PEAK_FLOPS * 1e3, nbytes / PEAK_BYTES * 1e3
        print(f"== {size}: {flops / 1e12:.3f} TFLOP per step ({att / 1e12:.3f} in the attention "
              f"cores); >= {nbytes / 1e9:.2f} GB of HBM traffic. At the peaks: compute "
              f"{t_c:.2f} ms, memory {t_m:.2f} ms: no step under {max(t_c, t_m):.2f} ms")
        if a.kernels is None:
            continue
        step_ms, kinds = kernel_kinds(a.kernels, size)
        print(f"   measured {step_ms:.3f} ms ({a.kernels.name}): {flops / step_ms / 1e9:.0f} "
              f"TFLOP/s, {100 * max(t_c, t_m) / step_ms:.1f}% of the roofline time")
        for kind, (ms, calls) in kinds.items():
            rate = (f", {att / ms / 1e9:.0f} TFLOP/s of attention-core FLOPs"
                    if kind.startswith("attention") and ms else "")
            print(f"   {ms:8.3f} ms {calls:4d} launches  {kind}{rate}")


if __name__ == "__main__":
    main()
