"""Process groups for DAP x data parallelism, and the DAP context the patched forwards read.

Layout: the world (``torchrun`` processes) is a ``colossalai.cluster.ProcessGroupMesh`` of shape
``(dp_size, dap_size)``: global rank = dp_rank * dap_size + dap_rank, so the processes of one
DAP group are consecutive ranks (one node's GPUs when dap_size divides the GPUs per node). Axis 1
groups are the DAP groups (one protein split across them), axis 0 groups the data-parallel
groups (one process per DAP group, each DAP group reading its own sample).

Launch choices (deliberate):

- ``colossalai.launch_from_torch`` is not called. It creates the process group without a
  timeout and reseeds every rank with the same seed (1024). :func:`init` creates the group itself
  with a timeout, then builds the ``ProcessGroupMesh`` on it; the mesh's sub-groups are created
  with the same timeout.
- Importing ``colossalai`` sets ``CUDA_DEVICE_MAX_CONNECTIONS=1`` in the environment. :func:`init`
  imports it lazily and restores the variable to what it was, so that the plugin does not change
  how the user's process schedules CUDA work. (Importing fastfold_plugin imports nothing from
  colossalai.)
- Seeds are the caller's: pass ``seed`` to :func:`init` to seed torch with ``seed + dp_rank`` (the
  same stream on every rank of a DAP group, as DAP dropout needs, different streams across data-
  parallel groups), or seed torch identically on the ranks of each DAP group yourself.
"""
import datetime
import os
import sys
from typing import List, Optional, Union

import torch
import torch.distributed as dist

from . import peer
from .comm import DAPCommError, _guard, group_rank, group_size

DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)


class DAPInitError(RuntimeError):
    """The process group could not be formed (a rank never joined within the timeout, or the
    launch environment is incomplete)."""


class DAPContext:
    """What a DAP-patched module needs: its DAP process group, rank and size, the async flag, and
    the data-parallel coordinates of this process.

    Attributes:
        group: the DAP process group (None for a group of one process).
        size, rank: DAP group size and this process's rank in it.
        async_comm: overlap the collectives with independent compute (start/wait primitives);
            False runs every collective synchronously (same results).
        dp_group, dp_size, dp_rank: the data-parallel group this process belongs to (one process
            per DAP group), its size and this process's rank in it.
        timeout: the process-group timeout (None when the group was made elsewhere).
        mesh: the ``ProcessGroupMesh`` (None when the groups were made elsewhere).
    """

    def __init__(self, group=None, async_comm: bool = True, dp_group=None, mesh=None,
                 timeout: Optional[datetime.timedelta] = None):
        self.group = group
        self.size = group_size(group)
        self.rank = group_rank(group)
        self.async_comm = bool(async_comm)
        self.dp_group = dp_group
        self.dp_size = group_size(dp_group)
        self.dp_rank = group_rank(dp_group)
        self.mesh = mesh
        self.timeout = timeout
        if group is not None and timeout is not None:
            peer.set_timeout(group, timeout.total_seconds())  # (its barriers' wait)

    @classmethod
    def from_group(cls, group, async_comm: bool = True) -> "DAPContext":
        """A DAP context on an existing process group (no data parallelism)."""
        return cls(group=group, async_comm=async_comm)

    def with_async(self, async_comm: bool) -> "DAPContext":
        """The same groups with the async flag set to `async_comm`."""
        return DAPContext(self.group, async_comm, self.dp_group, self.mesh, self.timeout)

    def __deepcopy__(self, memo) -> "DAPContext":
        # process groups are shared, never copied: a copied model stays on the same groups
        return self

    def __copy__(self) -> "DAPContext":
        return self

    def __repr__(self) -> str:
        return (f"DAPContext(size={self.size}, rank={self.rank}, async_comm={self.async_comm}, "
                f"dp_size={self.dp_size}, dp_rank={self.dp_rank})")


_current: Optional[DAPContext] = None


def _timed_mesh_class():
    """ProcessGroupMesh whose sub-groups carry the world's timeout.

    colossalai 0.5.0's ProcessGroupMesh creates its groups with ``dist.new_group(ranks)``, which
    gives them torch's default timeout (30 min gloo, 10 min NCCL), not the world's. This subclass
    passes the timeout through (it overrides ``_get_group``, the one place groups are made)."""
    env_before = os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")
    try:
        from colossalai.cluster import ProcessGroupMesh
    finally:
        if env_before is None:
            os.environ.pop("CUDA_DEVICE_MAX_CONNECTIONS", None)
        else:
            os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = env_before

    class TimedProcessGroupMesh(ProcessGroupMesh):
        def __init__(self, *size: int, timeout: datetime.timedelta):
            self._timeout = timeout
            super().__init__(*size)

        def _get_group(self, ranks_in_group: List[int], backend: Optional[str] = None):
            from torch.distributed.distributed_c10d import GroupMember

            ranks_in_group = sorted(ranks_in_group)
            key = tuple(ranks_in_group)
            if key not in self._ranks_to_group:
                group = dist.new_group(ranks_in_group, backend=backend, timeout=self._timeout)
                self._ranks_to_group[key] = group
                if group is not GroupMember.NON_GROUP_MEMBER:
                    self._group_to_ranks[group] = key
            return self._ranks_to_group[key]

    return TimedProcessGroupMesh


def _as_timedelta(timeout: Union[float, datetime.timedelta]) -> datetime.timedelta:
    if isinstance(timeout, datetime.timedelta):
        return timeout
    return datetime.timedelta(seconds=float(timeout))


def init(dap_size: int, timeout: Union[float, datetime.timedelta] = DEFAULT_TIMEOUT,
         backend: Optional[str] = None, async_comm: bool = True,
         seed: Optional[int] = None) -> DAPContext:
    """Create the process groups for DAP x data parallelism; returns this process's DAPContext.

    Call once per process after a ``torchrun`` launch (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR
    and MASTER_PORT in the environment), before building or enabling models with
    ``config.globals.dap_size = dap_size``. If torch.distributed is already initialised (e.g. by
    ``colossalai.launch_from_torch``), its default group is used as it is (with whatever timeout it
    was made with) and only the mesh's sub-groups get `timeout`.

    Args:
        dap_size: processes per protein; must divide the world size (data-parallel size =
            world size / dap_size).
        timeout: seconds (or a timedelta) that a collective - and the initial rendezvous - may
            wait for a peer; a rank that died or never joined makes the others raise
            (DAPInitError / DAPCommError) after at most this long instead of hanging.
        backend: "nccl" with CUDA, "gloo" without (default).
        async_comm: default async flag of the returned context.
        seed: if given, torch is seeded with ``seed + dp_rank`` on every rank.
    """
    global _current
    timeout = _as_timedelta(timeout)
    if dap_size < 1:
        raise ValueError(f"dap_size must be >= 1, got {dap_size}")
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
                   if k not in os.environ]
        if missing:
            raise DAPInitError(
                f"fastfold_plugin.distributed.init: {', '.join(missing)} not set; launch with "
                f"`torchrun --nproc-per-node N script.py` (or set the torch.distributed "
                f"environment variables yourself)")
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        try:
            dist.init_process_group(backend=backend, timeout=timeout)
        except (RuntimeError, TimeoutError) as e:  # DistStoreError: a rank never joined
            raise DAPInitError(
                f"rank {os.environ.get('RANK')}: the process group of {os.environ.get('WORLD_SIZE')} "
                f"processes did not form within {timeout.total_seconds():g} s (a rank died or "
                f"never started?). Cause: {e}") from e
    ctx = make_context(dap_size, timeout, async_comm)
    if seed is not None:
        torch.manual_seed(seed + ctx.dp_rank)
    _current = ctx
    return ctx


def make_context(dap_size: int, timeout: Union[float, datetime.timedelta] = DEFAULT_TIMEOUT,
                 async_comm: bool = True) -> DAPContext:
    """A (dp_size, dap_size) ProcessGroupMesh on the existing default process group, and this
    process's DAPContext on it. Every rank must call it (it creates process groups). :func:`init`
    calls it once; call it again for contexts of other DAP sizes (e.g. to compare sizes in one
    launch). Does not change :func:`current`."""
    timeout = _as_timedelta(timeout)
    if not dist.is_initialized():
        raise DAPInitError("make_context needs torch.distributed initialised; call "
                           "fastfold_plugin.distributed.init first")
    world = dist.get_world_size()
    if dap_size < 1 or world % dap_size != 0:
        raise ValueError(f"dap_size {dap_size} does not divide the world size {world}; launch a "
                         f"multiple of {dap_size} processes")
    mesh = _timed_mesh_class()(world // dap_size, dap_size, timeout=timeout)
    dap_group = mesh.get_group_along_axis(1)
    dp_group = mesh.get_group_along_axis(0)
    return DAPContext(group=dap_group if dap_size > 1 else None, async_comm=async_comm,
                      dp_group=dp_group if world // dap_size > 1 else None, mesh=mesh,
                      timeout=timeout)


def current() -> Optional[DAPContext]:
    """The context made by :func:`init` in this process (None before)."""
    return _current


def dap_context_for(dap_size: int) -> DAPContext:
    """The context to use for a model built with ``config.globals.dap_size = dap_size``.

    Raises if :func:`init` was not called or was called with another DAP size."""
    if _current is None:
        raise RuntimeError(
            f"config.globals.dap_size = {dap_size} but the DAP process groups do not exist: launch "
            f"with torchrun and call fastfold_plugin.distributed.init(dap_size={dap_size}) before "
            f"building the model")
    if _current.size != dap_size:
        raise ValueError(
            f"config.globals.dap_size = {dap_size} does not match the DAP groups made by "
            f"fastfold_plugin.distributed.init(dap_size={_current.size}); use the same size")
    return _current


def check_context(ctx: DAPContext, dap_size: Optional[int] = None) -> None:
    """Reject a context whose size disagrees with `dap_size` (e.g. config.globals.dap_size)."""
    if not isinstance(ctx, DAPContext):
        raise TypeError(f"dap= expects a fastfold_plugin.distributed.DAPContext, got "
                        f"{type(ctx).__name__}")
    if dap_size is not None and dap_size != ctx.size:
        raise ValueError(f"config.globals.dap_size = {dap_size} but the DAP context has "
                         f"{ctx.size} processes")


def shutdown() -> None:
    """Destroy the groups made by :func:`init` and the default process group (first freeing the
    symmetric memory the all-to-alls' copy engines and the sharded triangle multiplication's
    inference all-gathers keep)."""
    global _current
    trimul = sys.modules.get("fastfold_plugin.kernels.triangle_multiplication")
    if trimul is not None:
        trimul.release_peer_buffers()
    peer.release()
    if _current is not None and _current.mesh is not None:
        _current.mesh.destroy_mesh_process_groups()
    _current = None
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# RNG agreement inside a DAP group (dropout masks are drawn full-size on every rank)

def _rng_fingerprint(device: torch.device) -> torch.Tensor:
    state = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()
    s = state.to(torch.int64)
    w = torch.arange(1, s.numel() + 1, dtype=torch.int64)
    return torch.stack([(s * w).sum() % 1000000007, s.sum()]).to(device)


def check_rng_synced(ctx: DAPContext, device: torch.device) -> None:
    """Raise unless every rank of the DAP group has the same torch RNG state for `device`.

    DAP dropout draws each full-size mask on every rank and keeps the local block, so the ranks
    of a group must draw the same numbers. Skipped while a CUDA graph is being captured: torch's
    CUDA generator does not report its state then, and the comparison is read on the host (the
    eager warm-up before a capture checks it)."""
    if ctx.size == 1 or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return
    fp = _rng_fingerprint(device)
    lo, hi = fp.clone(), fp.clone()
    _guard("RNG check", ctx.group, lambda: dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=ctx.group))
    _guard("RNG check", ctx.group, lambda: dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=ctx.group))
    if not torch.equal(lo, hi):
        raise RuntimeError(
            "DAP training with dropout: the torch RNG state differs between the ranks of a DAP "
            "group, so their dropout masks would differ. Seed every rank of a DAP group "
            "identically (fastfold_plugin.distributed.init(..., seed=S) does torch.manual_seed(S + "
            "dp_rank)) and draw the same random numbers on each of them.")


# ----------------------------------------------------------------------------------------------
# Data parallelism

class GradHooks:
    """Handles of the gradient hooks from :func:`register_data_parallel_hooks`."""

    def __init__(self, handles):
        self._handles = list(handles)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __len__(self) -> int:
        return len(self._handles)


def register_data_parallel_hooks(model: torch.nn.Module, ctx: DAPContext) -> GradHooks:
    """Average every parameter gradient over the data-parallel group during ``backward()``.

    A tensor hook on each parameter all-reduces the incoming gradient over ``ctx.dp_group`` and
    divides by its size, so ``backward()`` leaves the data-parallel mean in ``.grad`` with no
    extra call (gradient accumulation over several backward passes stays correct). DAP's own
    reduction (the sum over the DAP group of the gradients of weights applied to shards) happens
    inside the DAP forwards' backward, before these hooks. No-op when dp_size == 1.

    The hooks fire in autograd's order, which is the same on every rank because every rank runs
    the same graph. (``torch.nn.parallel.DistributedDataParallel(model,
    process_group=ctx.dp_group)`` is an alternative with bucketing.)
    """
    if ctx.dp_size == 1:
        return GradHooks([])
    group, n = ctx.dp_group, ctx.dp_size

    def hook(g):
        g = g.clone()
        _guard("data-parallel gradient all-reduce", group,
               lambda: dist.all_reduce(g, op=dist.ReduceOp.SUM, group=group))
        return g.div_(n)

    return GradHooks(p.register_hook(hook) for p in model.parameters() if p.requires_grad)


__all__ = ["DAPContext", "DAPInitError", "DAPCommError", "init", "make_context", "current",
           "dap_context_for",
           "check_context", "shutdown", "check_rng_synced", "register_data_parallel_hooks",
           "GradHooks", "DEFAULT_TIMEOUT"]
