"""Kernel tests run the Triton kernels on the GPU, or in Triton's CPU interpreter without one.

Triton picks interpreter or compiler when a kernel module is imported (``@triton.jit`` reads
TRITON_INTERPRET at decoration time), so this must run before any kernel module is imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
