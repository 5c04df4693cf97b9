"""How long torch takes to sum a kernel's per-program partials, by their layout.

    python benchmarks/probe_partial_sums.py

The row-pass kernels (LayerNorm backward, the transition's backward passes, the Linear's bias
gradient) leave fp32 partial sums per program, which one torch sum reduces. Timed here, replayed
in a CUDA graph (``triton.testing.do_bench_cudagraph``), at the shapes the Evoformer block's
step gives them: partials [programs, C] summed over the programs (a reduction across rows) vs
[C, programs] (along contiguous memory); and a bf16 batched-GEMM result summed in fp32 by a
cast then a sum vs one sum with ``dtype=torch.float32``.
"""
import torch
import triton.testing as tt

CASES = [((2, 2112, 256), 1), ((2, 256, 2112), 2), ((2, 2112, 128), 1), ((2, 128, 2112), 2),
         ((528, 1024), 0), ((1024, 528), 1), ((132, 256), 0), ((256, 132), 1), ((8, 640, 128), 0)]


def _us(fn) -> float:
    return tt.do_bench_cudagraph(fn, rep=50) * 1000


def main() -> None:
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    for shape, dim in CASES:
        x = torch.randn(shape, device="cuda")
        print(f"{str(shape):18s} sum({dim}): {_us(lambda x=x, d=dim: x.sum(d)):.2f} us")
    xb = torch.randn(8, 640, 128, device="cuda").to(torch.bfloat16)
    print(f"bf16 (8, 640, 128) .float().sum(0): {_us(lambda: xb.float().sum(0)):.2f} us")
    print(f"bf16 (8, 640, 128) .sum(0, dtype=float32): "
          f"{_us(lambda: xb.sum(0, dtype=torch.float32)):.2f} us")


if __name__ == "__main__":
    main()
