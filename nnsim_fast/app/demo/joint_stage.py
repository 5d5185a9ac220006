"""The demo's CKA from one joint pass (``--estimator joint``, the default).

Every model runs over the same shuffled batches of test rows, each on its own task's row of a
given index (the rows pair up by index across tasks, as for the sketches and the exact check),
and :func:`nnsim_fast.extract.joint.joint_similarities` estimates the centred CKA of every pair
of (model, block) from exact within-block kernel entries (docs/joint.md).  NBS has no such
estimator; the demo takes it from the sketches.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import nn

from ...extract.joint import joint_similarities
from .settings import KINDS, DemoSettings

__all__ = ["joint_cka"]

#: Rows per batch of the joint pass; consecutive batches are pooled into blocks.
BATCH = 64


class _OwnTask(nn.Module):
    """A model that reads its own task's entry of a batch holding every task's rows."""

    def __init__(self, net: nn.Module, task: str) -> None:
        super().__init__()
        self.net, self.task = net, task

    def forward(self, **rows: torch.Tensor) -> torch.Tensor:
        return self.net(rows[self.task])


def _batches(tasks: Dict[str, Any], seed: int) -> List[Dict[str, torch.Tensor]]:
    count = next(iter(tasks.values())).x_test.shape[0]
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return [{name: task.x_test[rows] for name, task in tasks.items()}
            for rows in order.split(BATCH)]


def joint_cka(models: Sequence[Any], tasks: Dict[str, Any], layers: List[str],
              settings: DemoSettings, seed: int, heatmap_pairs: Sequence[Tuple[int, int]],
              bars: bool) -> Dict[str, Dict[str, Any]]:
    """Per kind: ``matrices`` (per block, ``[R, R]`` over models), their ``errors``, and
    ``heatmaps`` (block x block matrices of ``heatmap_pairs``), all float64 tensors.  One pass
    per kind, in an order shuffled by ``seed``."""
    wrapped = [_OwnTask(entry.model, entry.task) for entry in models]
    names = [f"net.{layer}" for layer in layers]
    batches = _batches(tasks, seed)
    out: Dict[str, Dict[str, Any]] = {}
    for kind in KINDS:
        # Pairs (0, j) name every model's rows in the shared sums; all pairs come from them.
        results = joint_similarities(wrapped, batches, [names] * len(wrapped),
                                     [(0, j) for j in range(len(wrapped))], kind=kind,
                                     debiased=settings.debiased, spatial=settings.spatial,
                                     dtype=torch.float64, progress=bars)
        matrix, error = results[0].pairs.cka(settings.debiased)
        rows = [result.positions[1] for result in results]
        by_block = [[model_rows[block] for model_rows in rows] for block in range(len(layers))]
        out[kind] = {
            "matrices": [matrix[own][:, own] for own in by_block],
            "errors": [error[own][:, own] for own in by_block],
            "heatmaps": {(i, j): matrix[rows[i]][:, rows[j]] for i, j in heatmap_pairs}}
    return out
