"""All-to-alls by copy engines: DAP's axis switches through symmetric memory on GPUs.

NCCL moves data with SMs: an all-to-all beside compute takes SMs from it, and alone it reached
~235 GB/s for the 10-50 MB switches of a training block on two H200s (NVLink), where a
copy-engine write into a peer's memory reached ~380 GB/s (``benchmarks/probe_collectives.py``).
Here each all-to-all whose blocks are contiguous on one side runs as peer ``cudaMemcpyAsync``s
between two device-side barriers of the group, on a side stream:

- *push* (the blocks of x are contiguous, or are once x is, e.g. the columns -> rows switch
  [*, S, N/P, C], split along its leading dim): every rank copies block q of x straight into
  rank q's receive slot;
  the result is then unpacked from the slot (as NCCL's path unpacks its receive buffer);
- *pull* (the result's blocks are contiguous, e.g. rows -> columns [*, S, N/P, C], gathered
  along its leading dim): every rank packs the blocks it sends into its own slot (as NCCL's
  path packs its send buffer), and copies block r of rank q's slot straight into the result.

The slots are symmetric-memory buffers, each with its own side stream and barrier signals,
made on first use and kept (a rendezvous is a collective, too slow per call) in a pool per
(group, device); a slot is held from the launch to the finish, so all-to-alls in flight at once
(an async switch beside synchronous ones) use different slots. Every rank takes the same slot
for the same call (same program order), and agrees on whether a slot could be made. Inside a
CUDA graph capture no slot is made (a new one would need a collective and an allocation): a call
finds a free slot made by the warm-up steps, or uses NCCL, on every rank alike; a replay then
uses the slots the capture took, so no eager all-to-all of the group may be in flight while a
graph replays (a training step is either captured or eager). A peer that does
not reach a barrier within the DAP context's timeout traps the device (the process ends with a
CUDA error; nothing hangs).

``FASTFOLD_PLUGIN_DAP_COPY_ENGINE=0`` keeps NCCL (as for the triangle multiplication's inference
all-gathers). Used by ``comm``'s all-to-alls; CPU tensors and other layouts go to NCCL / gloo.
"""
import logging
import math
import os
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

_ENABLED = os.environ.get("FASTFOLD_PLUGIN_DAP_COPY_ENGINE", "1") != "0"
_MIN_BYTES = 1 << 20  # smaller all-to-alls stay with NCCL (two barriers cost more than they save)
_DEFAULT_TIMEOUT_MS = 600_000  # a barrier's wait for the peers, then it traps the device
_TIMEOUT_MS: Dict[str, int] = {}  # by group name: the DAP context's timeout (``set_timeout``)


def set_timeout(group, seconds: float) -> None:
    """How long the copy-engine all-to-alls of `group` wait for a peer at a barrier before they
    trap the device (``DAPContext`` sets its process-group timeout; else 10 minutes)."""
    _TIMEOUT_MS[group.group_name] = max(1, int(1000 * seconds))


def _slot_bytes(need: int) -> int:
    """A slot's size for `need` bytes: a power-of-two number of MiB (few distinct sizes)."""
    mib = -(-need // 2**20)
    return 2**20 * (1 << (mib - 1).bit_length())


class _Slot:
    def __init__(self, buf: torch.Tensor, hdl, nbytes: int):
        self.buf, self.hdl, self.nbytes = buf, hdl, nbytes
        self.stream = torch.cuda.Stream(buf.device)
        self.busy = False

    def block(self, rank: int, q: int, shape, dtype: torch.dtype) -> torch.Tensor:
        """Block q (of the group's P blocks of `shape`) of rank `rank`'s slot."""
        return self.hdl.get_buffer(rank, tuple(shape), dtype, q * math.prod(shape))


class _Pool:
    _pools: Dict[tuple, Optional["_Pool"]] = {}

    def __init__(self, group, device: torch.device):
        self.group, self.device = group, device
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.slots: List[_Slot] = []
        self.broken = False
        self.timeout_ms = _TIMEOUT_MS.get(group.group_name, _DEFAULT_TIMEOUT_MS)

    @classmethod
    def get(cls, group, device: torch.device) -> Optional["_Pool"]:
        key = (group.group_name, tuple(dist.get_process_group_ranks(group)), device.index)
        if key not in cls._pools:
            cls._pools[key] = cls(group, device)
        pool = cls._pools[key]
        return None if pool.broken else pool

    def acquire(self, nbytes: int) -> Optional[_Slot]:
        """The smallest free slot of at least `nbytes` (made if none is free, outside a capture),
        or None."""
        free = [s for s in self.slots if not s.busy and s.nbytes >= nbytes]
        if free:
            slot = min(free, key=lambda s: s.nbytes)
            slot.busy = True
            return slot
        if torch.cuda.is_current_stream_capturing():
            return None
        slot = self._make(_slot_bytes(nbytes))
        if slot is not None:
            slot.busy = True
        return slot

    def _make(self, nbytes: int) -> Optional[_Slot]:
        import torch.distributed._symmetric_memory as symm_mem

        buf = hdl = problem = None
        try:
            buf = symm_mem.empty(nbytes, dtype=torch.uint8, device=self.device)
        except Exception as e:  # noqa: BLE001 - any failure to set up: NCCL from now on
            problem = e
        if self._everyone(problem is None):
            try:
                hdl = symm_mem.rendezvous(buf, self.group)
            except Exception as e:  # noqa: BLE001
                problem = e
            if self._everyone(hdl is not None):
                slot = _Slot(buf, hdl, nbytes)
                self.slots.append(slot)
                return slot
        self.broken = True
        logging.getLogger("fastfold_plugin").warning(
            "DAP all-to-all: symmetric memory unavailable on %s (%s); switches use NCCL",
            "this rank" if problem else "a peer", problem if problem else "see its log")
        return None

    def _everyone(self, ok: bool) -> bool:
        flag = torch.tensor([int(ok)], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item())

    def release(self) -> None:
        self.slots.clear()


class _Event:
    """``wait()`` orders the current stream after the exchange's side stream."""

    def __init__(self, event: torch.cuda.Event, device: torch.device):
        self.event, self.device = event, device

    def wait(self) -> None:
        torch.cuda.current_stream(self.device).wait_event(self.event)


def _mode(shape, s: int, g: int, nbytes: int, p: int) -> Optional[str]:
    """How an all-to-all of a tensor of `shape` (split along dim `s`, gathered along `g`) goes by
    copy engines: "push" when x's blocks are contiguous (x made contiguous: every dim before
    `s` is 1), else "pull" when the result's are (every dim before `g` is 1), else None (NCCL);
    None too for one rank or below ``_MIN_BYTES``."""
    if p == 1 or nbytes < _MIN_BYTES:
        return None
    if all(d == 1 for d in shape[:s]):
        return "push"
    if all(d == 1 for d in shape[:g]):
        return "pull"
    return None


class PeerAllToAll:
    """One all-to-all of x (split along `s` into the group's P blocks, block q to rank q; the
    blocks received concatenated along `g`) by copy engines. ``launch`` issues it (or returns
    None: NCCL then); ``finish()`` (after ``work.wait()``) returns the result."""

    def __init__(self, pool: _Pool, slot: _Slot, x: torch.Tensor, s: int, g: int, push: bool):
        self.pool, self.slot, self.x, self.g, self.push = pool, slot, x, g, push
        p, r = pool.size, pool.rank
        xb = x.chunk(p, s)
        shape = list(x.shape)
        shape[s] //= p
        shape[g] *= p
        self.out_shape, self.block_shape = shape, xb[0].shape
        cur = torch.cuda.current_stream(x.device)
        side = slot.stream
        if push:  # x's blocks into the peers' slots (x packed first where it is strided,
            # as NCCL's path packs it)
            from .comm import dense

            self.x = x = dense(x)
            self.xb = xb = x.chunk(p, s)
            side.wait_stream(cur)
            with torch.cuda.stream(side):
                slot.hdl.barrier(channel=0, timeout_ms=pool.timeout_ms)  # every slot is free
                for q in range(p):
                    if q != r:
                        slot.block(q, r, self.block_shape, x.dtype).copy_(xb[q])
                slot.hdl.barrier(channel=0, timeout_ms=pool.timeout_ms)  # every block arrived
        else:  # packed into this rank's slot; the peers' blocks pulled into the result
            from .comm import copy_runs

            self.out = torch.empty(shape, dtype=x.dtype, device=x.device)
            ob = self.out.chunk(p, g)
            for q in range(p):
                copy_runs(ob[q] if q == r else slot.block(r, q, self.block_shape, x.dtype),
                          xb[q])
            side.wait_stream(cur)
            with torch.cuda.stream(side):
                slot.hdl.barrier(channel=0, timeout_ms=pool.timeout_ms)  # every rank has packed
                for q in range(p):
                    if q != r:
                        ob[q].copy_(slot.block(q, r, self.block_shape, x.dtype))
                slot.hdl.barrier(channel=0, timeout_ms=pool.timeout_ms)  # every pull is done
        # (x's blocks and the result are held here until finish(), which runs after the current
        # stream has waited for this event: their memory is not reused while the side stream
        # still reads or writes it)
        done = torch.cuda.Event()
        done.record(side)
        self.work = _Event(done, x.device)

    @classmethod
    def launch(cls, x: torch.Tensor, s: int, g: int, group) -> Optional["PeerAllToAll"]:
        """The exchange, issued; None where copy engines do not apply (not CUDA, turned off, a
        small tensor, neither side's blocks contiguous, no slot)."""
        if not (_ENABLED and x.is_cuda and group is not None):
            return None
        mode = _mode(tuple(x.shape), s, g, x.numel() * x.element_size(),
                     dist.get_world_size(group))
        if mode is None:
            return None
        push = mode == "push"
        pool = _Pool.get(group, x.device)
        slot = None if pool is None else pool.acquire(x.numel() * x.element_size())
        if slot is None:
            return None
        try:
            return cls(pool, slot, x, s, g, push)
        except BaseException:
            slot.busy = False  # (nothing was issued on the side stream)
            raise

    def __del__(self):
        # Dropped without finish() (a Pending never waited, an exception between launch and
        # wait): the side stream may still read x or write the result, whose memory goes back to
        # the allocator now; order the current stream after it. The slot stays held (freeing it
        # here, at a time garbage collection picks, could make the ranks' slot choices differ).
        if getattr(self, "slot", None) is not None and getattr(self, "work", None) is not None:
            try:
                self.work.wait()
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass

    def finish(self) -> torch.Tensor:
        """The result (call after ``work.wait()``); frees the slot."""
        from .comm import copy_runs

        if self.push:
            p, r = self.pool.size, self.pool.rank
            out = torch.empty(self.out_shape, dtype=self.x.dtype, device=self.x.device)
            for q, ob in enumerate(out.chunk(p, self.g)):
                copy_runs(ob, self.xb[q] if q == r
                          else self.slot.block(r, q, self.block_shape, self.x.dtype))
            self.xb = None
        else:
            out = self.out
            self.out = None
        self.slot.busy = False
        self.slot = self.x = None
        return out


def slot_bytes() -> int:
    """The symmetric memory this process holds for the copy-engine all-to-alls (which torch's
    allocator statistics do not count)."""
    return sum(s.nbytes for pool in _Pool._pools.values() if pool is not None
               for s in pool.slots)


def release() -> None:
    """Free the slots (``shutdown`` calls this before it destroys the process groups)."""
    if _Pool._pools and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # no copy into a buffer about to be unmapped is in flight
    for pool in _Pool._pools.values():
        if pool is not None:
            pool.release()
    _Pool._pools.clear()
    _TIMEOUT_MS.clear()
