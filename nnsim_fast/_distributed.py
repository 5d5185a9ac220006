"""Summing a representation across the ranks of a ``torch.distributed`` group.

The ranks first exchange a description of what they hold (settings, options,
layer structure, row intervals) and every rank checks the whole exchange by
the same rules, so a mismatch raises the same ``ValueError`` on every rank --
no rank goes on to a collective that the others never join (a hang) or joins
with tensors of another shape (an abort in the backend).
"""
from __future__ import annotations

from typing import Dict, List

import torch

from .state import COMPARED_META, RowSet, zeros_like_structure


def _describe(rep) -> Dict:
    return {"m": rep.m, "seed": rep.seed, "sparsity": rep.sparsity, "options": dict(rep.options),
            "dtype": str(rep.dtype), "compared": {k: rep.meta.get(k) for k in COMPARED_META},
            "row_keys": rep.row_keys, "n": rep.n, "broken": rep._broken,
            "layers": [[name, layer.structure()] for name, layer in rep.layers.items()],
            "intervals": rep.rows.intervals}


def _agree(gathered: List[Dict], key: str, pool: List[int]) -> None:
    values = [gathered[r][key] for r in pool]
    if any(v != values[0] for v in values[1:]):
        shown = {r: gathered[r][key] for r in pool}
        what = "settings (beta, target, spatial, tokens)" if key == "compared" else key
        raise ValueError(f"ranks disagree on {what}: {shown}")


def check(gathered: List[Dict]) -> Dict:
    """The agreed structure, or a ValueError (the same on every rank)."""
    broken = {r: d["broken"] for r, d in enumerate(gathered) if d["broken"]}
    if broken:
        raise ValueError(f"ranks {sorted(broken)} hold unusable representations: {broken}")
    everyone = list(range(len(gathered)))
    for key in ("m", "seed", "sparsity", "options", "dtype", "compared"):
        _agree(gathered, key, everyone)
    active = [r for r in everyone if gathered[r]["n"] > 0]
    if active:
        _agree(gathered, "layers", active)
        _agree(gathered, "row_keys", active)
    layers = gathered[active[0]]["layers"] if active else gathered[0]["layers"]
    for r in everyone:
        if gathered[r]["layers"] and gathered[r]["layers"] != layers:
            raise ValueError(f"rank {r} holds layers {[n for n, _ in gathered[r]['layers']]} with "
                             f"another structure than the ranks with rows "
                             f"({[n for n, _ in layers]})")
    union, total = RowSet(), 0
    for d in gathered:
        rows = RowSet(d["intervals"])
        union, total = union.union(rows), total + rows.count()
    if union.count() != total:
        raise ValueError("ranks sketched overlapping rows; each sample must be counted once (key "
                         "rows by dataset index, e.g. with a DistributedSampler or "
                         "IndexedDataset, so repeats can be dropped)")
    return {"layers": layers, "rows": union, "n": sum(d["n"] for d in gathered),
            "row_keys": gathered[active[0]]["row_keys"] if active else None}


def all_reduce(rep, group=None) -> None:
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("all_reduce needs an initialised torch.distributed process group")
    gathered: List = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, _describe(rep), group=group)
    agreed = check(gathered)
    if not rep.layers and agreed["layers"]:
        zeros_like_structure(rep, {name: {"dims": s["dims"], "feature_shape": s["feature_shape"]}
                                   for name, s in agreed["layers"]})
    tensors: List[torch.Tensor] = [rep.sketch_ones]
    for name, _ in agreed["layers"]:
        tensors.extend(rep.layers[name].values.values())
    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    rep.n, rep.rows, rep.row_keys = agreed["n"], agreed["rows"], agreed["row_keys"]
