"""Padding to a multiple of the DAP group size: the one place that pads and unpads.

DAP splits an axis (N_res, N_seq) into equal shards, so the axis is padded at its end to the next
multiple of the group size once per stack forward, and cut back at the end. Padded positions carry
mask 0 and the DAP forwards leave them out of every key set, so they never reach a real position.
"""
from typing import Dict, Sequence, Union

import torch
import torch.nn.functional as F


def padded_length(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= n (n >= 0, multiple >= 1)."""
    if multiple < 1:
        raise ValueError(f"padding multiple must be >= 1, got {multiple}")
    return -(-n // multiple) * multiple


def pad_to_multiple(x: torch.Tensor, dims: Union[int, Sequence[int]], multiple: int,
                    value: float = 0.0) -> torch.Tensor:
    """Pad `x` at the end of each dim in `dims` to a multiple of `multiple`.

    Returns `x` itself when nothing needs padding (no copy). Differentiable: the gradient of the
    padded tensor is cut back to `x`'s shape.
    """
    dims = [dims] if isinstance(dims, int) else list(dims)
    return pad_to(x, {d: padded_length(x.shape[d], multiple) for d in dims}, value)


def pad_to(x: torch.Tensor, sizes: Dict[int, int], value: float = 0.0) -> torch.Tensor:
    """Pad `x` at the end of each dim `d` in `sizes` to length `sizes[d]` (>= the current one)."""
    nd = x.dim()
    pad = [0] * (2 * nd)
    for d, target in sizes.items():
        d = d % nd
        extra = target - x.shape[d]
        if extra < 0:
            raise ValueError(f"cannot pad dim {d} of size {x.shape[d]} down to {target}")
        # F.pad lists (left, right) pairs from the last dim backwards
        pad[2 * (nd - 1 - d) + 1] = extra
    if not any(pad):
        return x
    return F.pad(x, pad, value=value)


def unpad(x: torch.Tensor, sizes: Dict[int, int]) -> torch.Tensor:
    """Cut `x` back to length `sizes[d]` along each dim `d` (a view; no copy)."""
    for d, n in sizes.items():
        if x.shape[d] != n:
            x = x.narrow(d, 0, n)
    return x
