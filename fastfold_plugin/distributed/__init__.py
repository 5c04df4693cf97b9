"""Dynamic Axial Parallelism (DAP): one protein's MSA and pair tensors split across processes.

Start with ``torchrun``, then ``ctx = fastfold_plugin.distributed.init(dap_size=N)``; build
models with ``config.globals.dap_size = N`` under ``fastfold_plugin.register()``, or pass
``dap=ctx`` to ``fastfold_plugin.enable``. docs/dap.md describes the launch, the sharding of each
sub-module and the contract (full inputs and outputs on every rank, single-process gradients).

Importing this package imports neither Colossal-AI nor anything that touches CUDA.
"""
from .comm import (
    DAPCommError,
    Pending,
    add_runs,
    all_gather,
    all_gather_start,
    all_to_all,
    all_to_all_,
    all_to_all_start,
    col_to_row,
    col_to_row_,
    col_to_row_start,
    copy_runs,
    dense,
    exchange_blocks,
    gather,
    gather_into_,
    group_rank,
    group_size,
    reduce_scatter,
    reduce_scatter_start,
    row_to_col,
    row_to_col_,
    row_to_col_fanout,
    row_to_col_start,
    scatter,
    sum_grads,
)
from .groups import (
    DEFAULT_TIMEOUT,
    DAPContext,
    DAPInitError,
    GradHooks,
    check_context,
    check_rng_synced,
    current,
    dap_context_for,
    init,
    make_context,
    register_data_parallel_hooks,
    shutdown,
)
from .padding import pad_to, pad_to_multiple, padded_length, unpad
from .sampler import DAPSampler

__all__ = [
    "DAPCommError", "Pending", "add_runs", "all_gather", "all_gather_start", "all_to_all", "all_to_all_",
    "all_to_all_start", "col_to_row", "col_to_row_", "col_to_row_start", "copy_runs", "dense",
    "exchange_blocks", "gather", "gather_into_", "group_rank", "group_size", "reduce_scatter",
    "reduce_scatter_start", "row_to_col", "row_to_col_", "row_to_col_fanout", "row_to_col_start", "scatter",
    "sum_grads",
    "DEFAULT_TIMEOUT", "DAPContext", "DAPInitError", "GradHooks", "check_context",
    "check_rng_synced", "current", "dap_context_for", "init", "make_context",
    "register_data_parallel_hooks",
    "shutdown", "pad_to", "pad_to_multiple", "padded_length", "unpad", "DAPSampler",
]
