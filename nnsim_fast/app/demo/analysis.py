"""The demo's measurements, each a plain function of models, data or matrices.

Kernel ridge regression from sketched kernels and linear probes (appendix G), task-pair
statistics of model x model similarity matrices, and the paper's three desiderata.
"""
from __future__ import annotations

import statistics
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from ... import ops
from ...datasets import TASK_NAMES, Task
from ...extract import eval_mode, features_and_gradients, sketch_model
from ...indices import cka_matrix, nbs_matrix
from ...krr import SketchedKRR, onehot, sketch_targets
from .settings import BATCH, TASK_PAIRS

__all__ = ["indexed_batches", "batch_pairs", "mean_std", "pair_key", "sketched_krr_accuracy",
           "pooled_features", "linear_probe_accuracy", "pair_statistics", "evaluate_desiderata",
           "blockwise_desiderata", "model_matrix", "cross_matrix", "task_pair_means"]


# ------------------------------------------------------------------ batching and statistics

def indexed_batches(x: torch.Tensor, y: torch.Tensor, batch: int = BATCH) -> List[Tuple]:
    """``(dataset index, x, y)`` batches: each sample's bucket then depends on its index only."""
    rows = torch.arange(x.shape[0])
    return [(idx, x[idx], y[idx]) for idx in rows.split(batch)]


def batch_pairs(x: torch.Tensor, y: torch.Tensor, limit: Optional[int] = None,
                batch: int = BATCH) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """``(x, y)`` batches of the first ``limit`` samples (None: all)."""
    x, y = x[:limit], y[:limit]
    return list(zip(x.split(batch), y.split(batch)))


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and population standard deviation (NaN, NaN for no values; std 0 for one)."""
    values = [float(v) for v in values]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


def pair_key(a: str, b: str) -> str:
    return f"{a}-{b}"


# ------------------------------------------------------------------ appendix G

def sketched_krr_accuracy(model: nn.Module, task: Task, layers: Sequence[str], m: int,
                          seed: int, spatial: str = "flatten") -> List[float]:
    """Test accuracy, per layer in [0, 1], of kernel ridge regression on sketched kernels.

    The training split is sketched into ``m`` buckets (Algorithm 1, the Hadamard kernel
    ``K~ = (F~ F~^T) o (G~ G~^T)``); the one-hot targets are sketched into the same buckets
    without signs (the matching target sketch for this kernel, see :mod:`nnsim_fast.krr`);
    a test point's kernel against bucket b is ``(F~_b . f) (G~_b . g)``.  alpha is chosen by
    leave-one-bucket-out error.
    """
    rep = sketch_model(model, indexed_batches(task.x_train, task.y_train), layers=list(layers),
                       m=m, seed=seed, dtype=torch.float64, spatial=spatial, psi=False,
                       progress=False)
    buckets, _ = ops.sketch_hash(task.x_train.shape[0], m, seed)
    targets = sketch_targets(onehot(task.y_train, task.num_classes), buckets, m)
    test = features_and_gradients(model, task.x_test, layers, spatial=spatial)
    accuracies = []
    for name in layers:
        layer = rep.layer(name)
        f_test, g_test = test[name]
        k_star = (f_test @ layer.sketch_f.to(torch.float64).T) * \
                 (g_test @ layer.sketch_g.to(torch.float64).T)
        krr = SketchedKRR().fit(rep.kernel(name, kind="hadamard"), targets)
        predicted = krr.predict_labels(k_star)
        accuracies.append(float((predicted == task.y_test).double().mean()))
    return accuracies


def pooled_features(model: nn.Module, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Every stage's output averaged over positions, float64 ``[N, channels]``."""
    with torch.no_grad(), eval_mode(model):
        maps = [model.features(chunk) for chunk in x.split(BATCH)]
    return {name: torch.cat([m[name].mean(dim=(2, 3)) for m in maps]).to(torch.float64)
            for name in model.block_names}


def _fit_one_epoch(xtr, train_y, weight, bias, generator) -> None:
    optimizer = torch.optim.Adam([weight, bias], lr=1e-2)
    for rows in torch.randperm(xtr.shape[0], generator=generator).split(64):
        loss = F.cross_entropy(xtr[rows] @ weight + bias, train_y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _fit_converged(xtr, train_y, weight, bias, iterations: int, weight_decay: float) -> None:
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=iterations,
                                  tolerance_grad=1e-9, tolerance_change=1e-12,
                                  history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(xtr @ weight + bias, train_y) + \
            weight_decay * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)


def linear_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                          test_y: torch.Tensor, num_classes: int, *, one_epoch: bool,
                          seed: int = 0, iterations: int = 100,
                          weight_decay: float = 1e-4) -> float:
    """Test accuracy in [0, 1] of a logistic-regression probe on fixed features ``[N, d]``.

    Features are standardised with the training statistics.  ``one_epoch=True``: one pass of
    Adam (lr 0.01, batches of 64, order from ``seed``) -- a cheap fine-tune of a linear head.
    ``one_epoch=False``: full-batch L-BFGS with a small L2 penalty until its tolerances or
    ``iterations`` -- the probe trained to convergence.
    """
    mean = train_x.mean(0)
    scale = train_x.std(0).clamp_min(1e-8)
    xtr = ((train_x - mean) / scale).to(torch.float64)
    xte = ((test_x - mean) / scale).to(torch.float64)
    generator = torch.Generator().manual_seed(seed)
    weight = torch.zeros(xtr.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    if one_epoch:
        _fit_one_epoch(xtr, train_y, weight, bias, generator)
    else:
        _fit_converged(xtr, train_y, weight, bias, iterations, weight_decay)
    with torch.no_grad():
        predicted = (xte @ weight + bias).argmax(dim=1)
    return float((predicted == test_y).double().mean())


# ------------------------------------------------------------------ task pairs and desiderata

def pair_statistics(matrices: Sequence[torch.Tensor], tasks: Sequence[str]
                    ) -> Dict[str, Dict[str, List[float]]]:
    """Per-layer mean and std of model-pair similarities, grouped by task pair.

    Args:
        matrices: one ``[R, R]`` model x model matrix per layer.
        tasks: the task of each of the R models.

    Returns:
        ``{"A-B": {"mean": [per layer], "std": [per layer], "n": pairs}, ...}`` for every
        pair of :data:`TASK_PAIRS` that has at least one model pair (for a same-task pair:
        distinct models ``i < j``).
    """
    out: Dict[str, Dict[str, Any]] = {}
    for a, b in TASK_PAIRS:
        pairs = [(i, j) for i in range(len(tasks)) for j in range(len(tasks))
                 if tasks[i] == a and tasks[j] == b and (a != b or i < j)]
        if not pairs:
            continue
        stats = [mean_std([float(matrix[i, j]) for i, j in pairs]) for matrix in matrices]
        out[pair_key(a, b)] = {"mean": [s[0] for s in stats], "std": [s[1] for s in stats],
                               "n": len(pairs)}
    return out


def evaluate_desiderata(closeness: Dict[str, float]) -> Dict[str, Dict[str, Any]]:
    """The seed paper's three desiderata on task-pair closeness values (higher = closer).

    ``closeness`` maps the keys of :data:`TASK_PAIRS` ("A-A", ..., "B-C") to numbers.

    1. same task, different init > different tasks: for every task T, ``T-T`` exceeds every
       ``T-U`` with U != T;
    2. ``A-B`` exceeds both ``A-C`` and ``B-C`` (CIFAR-10/100 closer than either with SVHN);
    3. ``A-C`` exceeds ``B-C`` (the two 10-class tasks closer than CIFAR-100 and SVHN).

    Returns ``{"d1": {"pass": bool, "detail": str}, "d2": ..., "d3": ...}``.
    """
    c = {key: float(value) for key, value in closeness.items()}

    def cross(t: str, u: str) -> float:
        return c[pair_key(*sorted((t, u)))]

    d1_parts, d1 = [], True
    for t in TASK_NAMES:
        others = max(cross(t, u) for u in TASK_NAMES if u != t)
        ok = c[pair_key(t, t)] > others
        d1 = d1 and ok
        d1_parts.append(f"{t}-{t} {c[pair_key(t, t)]:.3f} {'>' if ok else '<='} {others:.3f}")
    d2 = c["A-B"] > c["A-C"] and c["A-B"] > c["B-C"]
    d3 = c["A-C"] > c["B-C"]
    return {
        "d1": {"pass": bool(d1), "detail": "; ".join(d1_parts)},
        "d2": {"pass": bool(d2), "detail": f"A-B {c['A-B']:.3f} vs A-C {c['A-C']:.3f}, "
                                           f"B-C {c['B-C']:.3f}"},
        "d3": {"pass": bool(d3), "detail": f"A-C {c['A-C']:.3f} vs B-C {c['B-C']:.3f}"},
    }


def blockwise_desiderata(stats: Dict[str, Dict[str, List[float]]], sign: float = 1.0
                         ) -> Dict[str, int]:
    """How many layers satisfy each desideratum on their own (layer-wise task-pair means)."""
    layers = len(next(iter(stats.values()))["mean"])
    counts = {"d1": 0, "d2": 0, "d3": 0}
    for layer in range(layers):
        verdict = evaluate_desiderata({k: sign * v["mean"][layer] for k, v in stats.items()})
        for key in counts:
            counts[key] += int(verdict[key]["pass"])
    return counts


def model_matrix(stack: torch.Tensor, index: str) -> torch.Tensor:
    """``[R, R]`` similarity of ``R`` centred kernels ``[R, m, m]`` with each other."""
    if index == "cka":
        return cka_matrix(stack, stack, centered=False)
    return nbs_matrix(stack, centered=False)


def cross_matrix(kernels_a: torch.Tensor, kernels_b: torch.Tensor, index: str) -> torch.Tensor:
    """Layer x layer similarity of two models' centred kernels ``[L, m, m]``."""
    if index == "cka":
        return cka_matrix(kernels_a, kernels_b, centered=False)
    return nbs_matrix(kernels_a, kernels_b, centered=False)


def task_pair_means(matrix: torch.Tensor, tasks: Sequence[str]) -> Dict[str, float]:
    """Mean of a whole-model ``[R, R]`` matrix over the model pairs of each task pair."""
    stats = pair_statistics([matrix], tasks)
    return {key: value["mean"][0] for key, value in stats.items()}
