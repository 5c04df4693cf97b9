"""Ops behind fastfold-plugin's patched OpenFold forwards.

Each op lives in its own file, ``kernels/<op>.py``, with ``<op>_reference`` (plain PyTorch,
OpenFold's math in OpenFold's order) and ``<op>`` (Triton kernels behind an autograd Function).
``get_ops(backend)`` returns the table the patched forwards call; see docs/design.md for the
signatures. This package never imports OpenFold.
"""
import importlib
from typing import Dict, Tuple

BACKENDS = ("reference", "triton")

# op name -> module in this package; the module defines `<op>` and `<op>_reference`.
_OP_MODULES: Dict[str, str] = {
    "attention": "attention",
    "attention_packed": "attention",
    "softmax": "softmax",
    "layer_norm": "layer_norm",
    "layer_norm_torch": "layer_norm",
    "layer_norm_fanout": "layer_norm",
    "transition": "transition",
    "triangle_multiplication": "triangle_multiplication",
    "triangle_multiplication_sharded": "triangle_multiplication",
    "outer_product_mean": "outer_product_mean",
    "outer_product_mean_rows": "outer_product_mean",
    "outer_product_mean_projections": "outer_product_mean",
    "global_attention": "global_attention",
    "dropout_add": "dropout_add",
    "cast_fanout": "cast_fanout",
    "linear": "linear",
    "linear_packed": "linear",
}

class _OpTable:
    """The ops of one backend, resolved on first use (a file is imported only when needed)."""

    def __init__(self, backend: str):
        self.backend = backend

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        fn = op_pair(name)[0 if self.backend == "reference" else 1]
        setattr(self, name, fn)
        return fn

    def __repr__(self) -> str:
        return f"<fastfold_plugin ops: {self.backend}>"


_TABLES: Dict[str, _OpTable] = {}


def op_pair(name: str) -> Tuple[object, object]:
    """(reference, triton) implementations of op `name`."""
    if name not in _OP_MODULES:
        raise AttributeError(f"unknown op {name!r}; known ops: {sorted(_OP_MODULES)}")
    mod = importlib.import_module(f"{__name__}.{_OP_MODULES[name]}")
    return getattr(mod, f"{name}_reference"), getattr(mod, name)


def get_ops(backend: str) -> _OpTable:
    """The op table for `backend` ("reference" or "triton"), one per backend."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {BACKENDS}")
    if backend not in _TABLES:
        _TABLES[backend] = _OpTable(backend)
    return _TABLES[backend]
