"""The demo's check of its own estimates: every similarity again over all N x N pairs.

The demo's test splits are small enough (hundreds of rows) for the library's exact path
(:func:`nnsim_fast.extract.exact_model`, ``estimator="exact"``), so each run measures how
far the estimator it used lands from the quantity that estimator names, on its own models
and data, and whether the desiderata read the same from the exact values.
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Dict, List, Optional, Sequence

import torch

from ...compare import similarity_matrix
from ...extract import exact_model
from .analysis import evaluate_desiderata, indexed_batches, pair_statistics
from .settings import INDICES, KINDS, DemoSettings
from .stages import progress_bar

__all__ = ["exact_stage"]


def _exact_representations(models, tasks, layers: List[str], settings: DemoSettings):
    # Same pass as the sketches (layers, pooling, dtype, dataset indices as row keys).
    return [exact_model(entry.model, indexed_batches(tasks[entry.task].x_test,
                                                     tasks[entry.task].y_test),
                        layers=layers, spatial=settings.spatial, dtype=torch.float64,
                        progress=False)
            for entry in models]


def _pairs_of(matrix: torch.Tensor) -> torch.Tensor:
    rows, cols = torch.triu_indices(matrix.shape[0], matrix.shape[1], offset=1)
    return matrix[rows, cols]


def _comparison(exact: Sequence[torch.Tensor], estimate: Sequence[Sequence[Sequence[float]]],
                errors: Optional[Sequence], tasks: Sequence[str]) -> Dict[str, Any]:
    """Distinct model pairs at every block: |estimate - exact|, and the share within two
    reported standard errors (when the estimator reports them)."""
    gaps, covered = [], []
    for layer, matrix in enumerate(exact):
        difference = _pairs_of(torch.tensor(estimate[layer], dtype=torch.float64) - matrix).abs()
        gaps.append(difference)
        if errors is not None:
            bars = _pairs_of(torch.tensor(errors[layer], dtype=torch.float64))
            covered.append(difference <= 2.0 * bars)
    gaps_all = torch.cat(gaps)
    stats = pair_statistics(exact, tasks)
    closeness = {key: statistics.fmean(v["mean"]) for key, v in stats.items()}
    return {"matrices": [m.tolist() for m in exact],
            "max_abs_difference": float(gaps_all.max()) if gaps_all.numel() else 0.0,
            "mean_abs_difference": float(gaps_all.mean()) if gaps_all.numel() else 0.0,
            "max_abs_difference_per_block": [float(g.max()) if g.numel() else 0.0 for g in gaps],
            "within_two_stderr": (float(torch.cat(covered).double().mean()) if covered
                                  else None),
            "closeness": closeness, "desiderata": evaluate_desiderata(closeness)}


def exact_stage(models, tasks, layers: List[str], settings: DemoSettings,
                similarity: Dict[str, Dict[str, Any]], bars: bool) -> Dict[str, Any]:
    """Exact model x model similarity at every block, against the estimates of the
    similarity stage: ``{kind: {index: comparison}}`` plus the row count."""
    reps = _exact_representations(models, tasks, layers, settings)
    try:
        out: Dict[str, Any] = {"n": int(reps[0].n)}
        jobs = [(kind, index) for kind in KINDS for index in INDICES]
        for kind, index in progress_bar(jobs, len(jobs), "exact", bars):
            entry = similarity[kind][index]
            exact = [similarity_matrix(reps, layer, index, kind, estimator="exact",
                                       debiased=settings.debiased and index == "cka")
                     for layer in layers]
            out.setdefault(kind, {})[index] = _comparison(
                exact, entry["matrices"], entry.get("errors"), [e.task for e in models])
        return out
    finally:
        for rep in reps:
            rep.close()


def largest_difference(check: Dict[str, Any]) -> float:
    """The largest |estimate - exact| over kinds, indices, blocks and model pairs."""
    values = [check[kind][index]["max_abs_difference"] for kind in KINDS for index in INDICES
              if kind in check]
    return max(values) if values else math.nan
