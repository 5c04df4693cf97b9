"""A sampler that gives each DAP group one sample: a DistributedSampler over the data axis only."""
from typing import Optional, Sized

from torch.utils.data import DistributedSampler

from .groups import DAPContext


class DAPSampler(DistributedSampler):
    """``DistributedSampler`` over the data-parallel axis of `ctx`.

    Every rank of one DAP group gets the same indices (they split one protein between them);
    different DAP groups get disjoint shares of the dataset, as plain data parallelism would.
    Call ``set_epoch(epoch)`` each epoch, as with ``DistributedSampler``.
    """

    def __init__(self, dataset: Sized, ctx: DAPContext, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, num_replicas: Optional[int] = None):
        if num_replicas is not None and num_replicas != ctx.dp_size:
            raise ValueError(f"DAPSampler: num_replicas={num_replicas} but the data-parallel size "
                             f"is {ctx.dp_size}; leave num_replicas out")
        super().__init__(dataset, num_replicas=ctx.dp_size, rank=ctx.dp_rank, shuffle=shuffle,
                         seed=seed, drop_last=drop_last)
