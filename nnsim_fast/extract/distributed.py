"""The rows each rank of a ``torch.distributed`` group sketches, known before the pass."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["DistributedPlan"]


class DistributedPlan:
    """Dataset indices of this rank's batches; ``-1`` marks a row another rank owns.

    With a ``DistributedSampler`` (no ``drop_last``), rank r's p-th sample sits at
    position ``r + p * world`` of the padded global order, and positions at or
    past ``len(dataset)`` repeat earlier samples: those rows are dropped, so no
    sample counts twice and nothing is exchanged.  Other samplers must give each
    sample to one rank only (checked when the ranks' rows are summed).
    """

    def __init__(self, batches: List[List[int]], rank: int, world: int) -> None:
        self.batches, self.rank, self.world = batches, rank, world

    @property
    def suffix(self) -> str:
        """Each rank checkpoints to its own file."""
        return f".rank{self.rank}"

    @classmethod
    def build(cls, data, group=None) -> "DistributedPlan":
        import torch.distributed as dist
        from torch.utils.data.distributed import DistributedSampler
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("distributed=True needs an initialised torch.distributed process "
                               "group (e.g. launched with torchrun and init_process_group)")
        batch_sampler = getattr(data, "batch_sampler", None)
        sampler = getattr(data, "sampler", None)
        if batch_sampler is None or not isinstance(sampler, DistributedSampler):
            raise TypeError("distributed=True needs a torch DataLoader whose sampler is a "
                            "DistributedSampler (its order is the same on every pass, so each "
                            "row's dataset index is known)")
        world, rank, size = sampler.num_replicas, sampler.rank, len(sampler.dataset)
        plan, position = [], 0
        for batch in batch_sampler:
            kept = []
            for index in batch:
                padded = not sampler.drop_last and rank + position * world >= size
                kept.append(-1 if padded else int(index))
                position += 1
            plan.append(kept)
        return cls(plan, dist.get_rank(group), dist.get_world_size(group))

    def rows(self, batch_index: int, rows: Optional[Tensor], size: int
             ) -> Tuple[Tensor, Optional[Tensor]]:
        """``(rows, keep)``: the batch's dataset indices and the mask of rows this rank
        owns (None when it owns them all)."""
        if batch_index >= len(self.batches) or len(self.batches[batch_index]) != size:
            raise RuntimeError(f"batch {batch_index} does not match the DataLoader's batch "
                               "sampler; the loader must yield its batches in sampler order")
        planned = torch.tensor(self.batches[batch_index], dtype=torch.int64)
        keep = planned >= 0
        if rows is not None and not torch.equal(rows.cpu()[keep], planned[keep]):
            raise RuntimeError(f"batch {batch_index}: the batch's own indices differ from the "
                               "batch sampler's")
        return planned.clamp_min(0), (None if bool(keep.all()) else keep)

    def kept(self, batch_index: int, size: int) -> int:
        """How many rows of a batch this rank adds."""
        if batch_index >= len(self.batches):
            return size
        return sum(1 for row in self.batches[batch_index] if row >= 0)


def finish(rep, plan: Optional[DistributedPlan], group) -> object:
    """Sum the ranks' representations (every rank returns the same one)."""
    if plan is not None:
        rep.all_reduce(group)
        if rep.n == 0:
            raise ValueError("data yielded no samples on any rank")
    return rep
