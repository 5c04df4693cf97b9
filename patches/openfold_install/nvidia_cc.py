"""`get_nvidia_cc()` for OpenFold's setup.py.

OpenFold's setup.py does `from scripts.utils import get_nvidia_cc`, a module its PyPI sdist does
not ship. `install.py` copies this file to `<tmp>/scripts/utils.py` and puts `<tmp>` on
PYTHONPATH while pip builds OpenFold. setup.py compiles the CUDA extension for exactly the
compute capability returned here (instead of its default list 3.7/5.2/6.1/7.0/8.0, which current
nvcc rejects); a CPU build ignores it.
"""
import os
import re
from typing import Optional, Tuple


def _parse_arch(entry: str) -> Optional[Tuple[int, int]]:
    """"9.0", "9.0a", "8.6+PTX" -> (9, 0), (9, 0), (8, 6); None if unreadable."""
    m = re.match(r"^(\d+)\.(\d+)", entry.strip())
    return (int(m.group(1)), int(m.group(2))) if m else None


def get_nvidia_cc() -> Tuple[Optional[Tuple[int, int]], Optional[str]]:
    """((major, minor), None) for the GPU to build for, else (None, reason).

    The GPU is torch's device 0. With no GPU visible (building on a machine without one), the
    first entry of TORCH_CUDA_ARCH_LIST (e.g. "9.0") is used when it is set.
    """
    try:
        import torch
    except ImportError as exc:  # setup.py imports torch first, so this is a broken environment
        return None, f"torch is not importable: {exc}"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a build without CUDA"
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        return (int(major), int(minor)), None
    entries = os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(";", " ").split()
    if entries:
        cc = _parse_arch(entries[0])
        if cc is not None:
            return cc, None
        return None, f"TORCH_CUDA_ARCH_LIST={entries[0]!r} is not of the form 9.0"
    return None, "no CUDA GPU visible; set TORCH_CUDA_ARCH_LIST (e.g. 9.0) to build for one"
