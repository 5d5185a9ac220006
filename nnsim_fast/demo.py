"""The seed paper's experiments in miniature: ``nnsim-fast demo``.

Small ResNets are trained with different seeds on three tasks (:mod:`nnsim_fast.datasets`:
A plays CIFAR-10, B CIFAR-100, C SVHN).  Each model is sketched on its own task's test split
with one sketch seed, and at every residual block, for every pair of models, the demo computes:

* CKA and NBS of the feature-only, gradient-only and features∘gradients (Hadamard) kernels
  (paper fig. 1) and checks the paper's three desiderata from the numbers;
* the Task2Vec and Fisher–Rao norm distance baselines (fig. 2, 3);
* block x block similarity heatmaps for pairs of tasks (fig. 5);
* the kernel-mean-embedding quantities of every (trained-on, evaluated-on) pair (fig. 4, 6);
* kernel ridge regression accuracy from sketched kernels (appendix G), next to linear probes
  trained for one epoch and to convergence.

Everything lands in ``results.json``, ``report.md`` and PNG figures under the output directory;
trained weights are cached in ``<out>/models`` so a second run skips training.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from . import __version__, ops
from .baselines import fisher_rao_distance, fisher_rao_norm, task2vec_distance, task2vec_embedding
from .compare import mean_embedding_norm
from .datasets import TASK_NAMES, Task, load_tasks
from .extract import eval_mode, features_and_gradients, sketch_model
from .indices import cka_matrix, nbs_matrix
from .krr import SketchedKRR, onehot, sketch_targets
from .models import SmallResNet, TrainConfig, accuracy, load_or_train

__all__ = [
    "DemoSettings", "MODES", "KINDS", "INDICES", "TASK_PAIRS", "settings_for", "run_demo",
    "evaluate_desiderata", "pair_statistics", "features_and_gradients", "sketched_krr_accuracy",
    "linear_probe_accuracy", "format_desiderata",
]

MODES = ("full", "quick", "tiny")
KINDS = ("feature", "gradient", "hadamard")
KIND_LABELS = {"feature": "features only", "gradient": "gradients only",
               "hadamard": "features∘gradients"}
INDICES = ("cka", "nbs")
#: Unordered task pairs, same-task pairs first; keys are written "A-B".
TASK_PAIRS: Tuple[Tuple[str, str], ...] = (
    ("A", "A"), ("B", "B"), ("C", "C"), ("A", "B"), ("A", "C"), ("B", "C"))
MEAN_EMBEDDING_QUANTITIES = ("norm", "frobenius_factor", "trace_factor", "ratio_frobenius",
                             "ratio_trace", "log_ratio_frobenius")
_BATCH = 256
_TASK_COLOURS = {"A": "tab:blue", "B": "tab:orange", "C": "tab:green"}


@dataclass(frozen=True)
class DemoSettings:
    """What one demo mode runs.

    ``seeds_per_task`` models per task; sketches with ``m`` buckets; models trained with
    ``train``; ``n_train`` / ``n_test`` cut the splits (None: whole); Task2Vec uses the first
    ``task2vec_samples`` test images of each model's task; linear probes to convergence run
    L-BFGS for at most ``probe_iterations`` iterations.
    """

    mode: str
    seeds_per_task: int
    m: int
    train: TrainConfig
    n_train: Optional[int] = None
    n_test: Optional[int] = None
    task2vec_samples: Optional[int] = 300
    probe_iterations: int = 100


def settings_for(mode: str) -> DemoSettings:
    """The settings of ``mode``: ``"full"`` (5 models per task, m = 512, the paper's m),
    ``"quick"`` (3 per task, m = 128, same training so cached weights are shared) or ``"tiny"``
    (2 per task on small subsets with a narrow network: a smoke test of the pipeline)."""
    train = TrainConfig(epochs=6, batch_size=64, lr=3e-3, weight_decay=1e-4,
                        channels=(16, 16, 32, 32))
    if mode == "full":
        return DemoSettings("full", 5, 512, train)
    if mode == "quick":
        return DemoSettings("quick", 3, 128, train)
    if mode == "tiny":
        return DemoSettings("tiny", 2, 32, replace(train, epochs=3, channels=(4, 4, 8, 8)),
                            n_train=240, n_test=96, task2vec_samples=48, probe_iterations=30)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


# ------------------------------------------------------------------ batching and statistics

def _indexed_batches(x: torch.Tensor, y: torch.Tensor, batch: int = _BATCH) -> List[Tuple]:
    """``(dataset index, x, y)`` batches: each sample's bucket then depends on its index only."""
    rows = torch.arange(x.shape[0])
    return [(idx, x[idx], y[idx]) for idx in rows.split(batch)]


def _pairs(x: torch.Tensor, y: torch.Tensor, limit: Optional[int] = None,
           batch: int = _BATCH) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    x, y = x[:limit], y[:limit]
    return list(zip(x.split(batch), y.split(batch)))


def _bar(iterable: Iterable, total: Optional[int], desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
    values = [float(v) for v in values]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


def _pair_key(a: str, b: str) -> str:
    return f"{a}-{b}"


@dataclass
class DemoModel:
    """A trained demo model and where it came from."""

    task: str
    replicate: int
    seed: int
    model: SmallResNet
    trained_now: bool
    path: str
    test_accuracy: float = float("nan")

    @property
    def label(self) -> str:
        return f"{self.task}{self.replicate}"


# ------------------------------------------------------------------------------ analysis parts

def sketched_krr_accuracy(model: nn.Module, task: Task, layers: Sequence[str], m: int,
                          seed: int) -> List[float]:
    """Test accuracy, per layer in [0, 1], of kernel ridge regression on sketched kernels.

    The training split is sketched into ``m`` buckets (Algorithm 1, the Hadamard kernel
    ``K~ = (F~ F~^T) o (G~ G~^T)``); the one-hot targets are sketched into the same buckets
    without signs (the matching target sketch for this kernel, see :mod:`nnsim_fast.krr`);
    a test point's kernel against bucket b is ``(F~_b . f) (G~_b . g)``.  alpha is chosen by
    leave-one-bucket-out error.
    """
    rep = sketch_model(model, _indexed_batches(task.x_train, task.y_train), layers=list(layers),
                       m=m, seed=seed, dtype=torch.float64, progress=False)
    buckets, _ = ops.sketch_hash(task.x_train.shape[0], m, seed)
    targets = sketch_targets(onehot(task.y_train, task.num_classes), buckets, m)
    test = features_and_gradients(model, task.x_test, layers)
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


def _pooled_features(model: SmallResNet, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    with torch.no_grad(), eval_mode(model):
        maps = [model.features(chunk) for chunk in x.split(_BATCH)]
    return {name: torch.cat([m[name].mean(dim=(2, 3)) for m in maps]).to(torch.float64)
            for name in model.block_names}


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
        optimizer = torch.optim.Adam([weight, bias], lr=1e-2)
        for rows in torch.randperm(xtr.shape[0], generator=generator).split(64):
            loss = F.cross_entropy(xtr[rows] @ weight + bias, train_y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    else:
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
    with torch.no_grad():
        predicted = (xte @ weight + bias).argmax(dim=1)
    return float((predicted == test_y).double().mean())


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
        means, stds = [], []
        for matrix in matrices:
            mean, std = _mean_std([float(matrix[i, j]) for i, j in pairs])
            means.append(mean)
            stds.append(std)
        out[_pair_key(a, b)] = {"mean": means, "std": stds, "n": len(pairs)}
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
        return c[_pair_key(*sorted((t, u)))]

    d1_parts, d1 = [], True
    for t in TASK_NAMES:
        others = max(cross(t, u) for u in TASK_NAMES if u != t)
        ok = c[_pair_key(t, t)] > others
        d1 = d1 and ok
        d1_parts.append(f"{t}-{t} {c[_pair_key(t, t)]:.3f} {'>' if ok else '<='} {others:.3f}")
    d2 = c["A-B"] > c["A-C"] and c["A-B"] > c["B-C"]
    d3 = c["A-C"] > c["B-C"]
    return {
        "d1": {"pass": bool(d1), "detail": "; ".join(d1_parts)},
        "d2": {"pass": bool(d2), "detail": f"A-B {c['A-B']:.3f} vs A-C {c['A-C']:.3f}, "
                                           f"B-C {c['B-C']:.3f}"},
        "d3": {"pass": bool(d3), "detail": f"A-C {c['A-C']:.3f} vs B-C {c['B-C']:.3f}"},
    }


def _blockwise_desiderata(stats: Dict[str, Dict[str, List[float]]], sign: float = 1.0
                          ) -> Dict[str, int]:
    """How many layers satisfy each desideratum on their own (layer-wise task-pair means)."""
    layers = len(next(iter(stats.values()))["mean"])
    counts = {"d1": 0, "d2": 0, "d3": 0}
    for layer in range(layers):
        verdict = evaluate_desiderata({k: sign * v["mean"][layer] for k, v in stats.items()})
        for key in counts:
            counts[key] += int(verdict[key]["pass"])
    return counts


def _model_matrix(stack: torch.Tensor, index: str) -> torch.Tensor:
    """``[R, R]`` similarity of ``R`` centred kernels ``[R, m, m]`` with each other."""
    if index == "cka":
        return cka_matrix(stack, stack, centered=False)
    return nbs_matrix(stack, centered=False)


def _cross_matrix(Ks_a: torch.Tensor, Ks_b: torch.Tensor, index: str) -> torch.Tensor:
    """Layer x layer similarity of two models' centred kernels ``[L, m, m]``."""
    if index == "cka":
        return cka_matrix(Ks_a, Ks_b, centered=False)
    return nbs_matrix(Ks_a, Ks_b, centered=False)


def _task_pair_means(matrix: torch.Tensor, tasks: Sequence[str]) -> Dict[str, float]:
    stats = pair_statistics([matrix], tasks)
    return {key: value["mean"][0] for key, value in stats.items()}


# ------------------------------------------------------------------------------ the run

class _Log:
    def __init__(self, enabled: bool, stream=None) -> None:
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.enabled:
            elapsed = time.perf_counter() - self.start
            print(f"[{elapsed:6.1f}s] {message}", file=self.stream, flush=True)


def _train_models(tasks: Dict[str, Task], settings: DemoSettings, seed: int, cache_dir: str,
                  log: _Log, bars: bool) -> List[DemoModel]:
    jobs = [(name, k) for name in TASK_NAMES for k in range(settings.seeds_per_task)]
    models: List[DemoModel] = []
    for name, k in _bar(jobs, len(jobs), "models", bars):
        task = tasks[name]
        model_seed = 1000 * seed + 100 * TASK_NAMES.index(name) + k
        model, trained, path = load_or_train(
            name, task.num_classes, task.x_train, task.y_train, settings.train, model_seed,
            cache_dir, data_tag=f"{task.description}|{task.x_train.shape[0]}")
        entry = DemoModel(name, k, model_seed, model, trained, path)
        entry.test_accuracy = accuracy(model, task.x_test, task.y_test)
        log(f"  {entry.label}: {'trained' if trained else 'loaded from cache'}, "
            f"test accuracy {entry.test_accuracy:.3f}")
        models.append(entry)
    return models


def _drop_mean_embedding(rep) -> None:
    # The exact mean embedding is d_g x d_f per layer; drop it once its norms are read.
    for layer in rep.layers.values():
        layer.mean_psi = None


def _mean_embedding_rows(rep, layers: Sequence[str]) -> Dict[str, List[float]]:
    rows: Dict[str, List[float]] = {q: [] for q in MEAN_EMBEDDING_QUANTITIES}
    for name in layers:
        values = mean_embedding_norm(rep, name)
        for q in MEAN_EMBEDDING_QUANTITIES:
            rows[q].append(float(values[q]))
    return rows


def run_demo(out: str, mode: str = "full", seed: int = 0, *, progress: Optional[bool] = None,
             verbose: bool = True, threads: Optional[int] = 1, figures: bool = True,
             summary: bool = True) -> Dict[str, Any]:
    """Run the demo and write ``results.json``, ``report.md`` and figures under ``out``.

    Args:
        out: output directory (created); trained weights are cached in ``out/models``.
        mode: ``"full"``, ``"quick"`` or ``"tiny"`` (see :func:`settings_for`).
        seed: sketch seed of every representation, and base of the model seeds (model
            replicate k of task index t has seed ``1000 * seed + 100 * t + k``).
        progress: tqdm bars (default: when stderr is a terminal).
        verbose: step lines on stderr.
        threads: torch CPU threads during the run (restored afterwards); None leaves them.
            One is the default: the 8x8 convolutions are too small to gain from more, and on
            a shared machine extra threads mostly wait for each other.
        figures: write the PNG figures (needs matplotlib).
        summary: print the desiderata verdicts and the output paths on stdout.

    Returns:
        The results dictionary that was written to ``results.json``.
    """
    settings = settings_for(mode)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    bars = sys.stderr.isatty() if progress is None else bool(progress)
    log = _Log(verbose)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        results = _run(out, settings, seed, log, bars, figures)
    finally:
        torch.set_num_threads(previous_threads)
    if summary:
        print(format_desiderata(results))
        print(f"wrote {os.path.join(out, 'results.json')}, {os.path.join(out, 'report.md')}"
              + (f" and {len(results['figures'])} figures" if results["figures"] else ""))
    return results


def _run(out: str, settings: DemoSettings, seed: int, log: _Log, bars: bool,
         figures: bool) -> Dict[str, Any]:
    timings: Dict[str, float] = {}
    clock = time.perf_counter()
    steps = 8

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 2)
        clock = now

    log(f"[1/{steps}] tasks: loading digits and generating shapes")
    tasks = load_tasks()
    if settings.n_train is not None or settings.n_test is not None:
        tasks = {k: t.subset(settings.n_train, settings.n_test) for k, t in tasks.items()}
    lap("data")

    log(f"[2/{steps}] models: {settings.seeds_per_task} per task x {len(tasks)} tasks "
        f"(cache: {os.path.join(out, 'models')})")
    models = _train_models(tasks, settings, seed, os.path.join(out, "models"), log, bars)
    layers = list(models[0].model.block_names)
    labels = [entry.label for entry in models]
    model_tasks = [entry.task for entry in models]
    lap("train")

    log(f"[3/{steps}] sketching every model on its own task's test split "
        f"(m={settings.m}, seed={seed}) and on the other tasks (mean embeddings)")
    own_reps = []
    mean_embedding: Dict[str, Dict[str, Dict[str, List[List[float]]]]] = {
        s: {t: {q: [] for q in MEAN_EMBEDDING_QUANTITIES} for t in TASK_NAMES} for s in TASK_NAMES}
    jobs = [(entry, target) for entry in models for target in TASK_NAMES]
    for entry, target in _bar(jobs, len(jobs), "sketches", bars):
        data = tasks[target]
        rep = sketch_model(entry.model, _indexed_batches(data.x_test, data.y_test), layers=layers,
                           m=settings.m, seed=seed, dtype=torch.float64, mean_embedding=True,
                           progress=False)
        rows = _mean_embedding_rows(rep, layers)
        for q, values in rows.items():
            mean_embedding[entry.task][target][q].append(values)
        _drop_mean_embedding(rep)
        if target == entry.task:
            own_reps.append(rep)
    lap("sketch")

    log(f"[4/{steps}] model x model similarity at every block: "
        f"{len(KINDS)} kernels x {len(INDICES)} indices")
    # Block x block heatmaps (step 5) compare replicate 0 of each task across tasks, and
    # replicates 0 and 1 within a task.
    first = {entry.task: i for i, entry in enumerate(models) if entry.replicate == 0}
    second = {entry.task: i for i, entry in enumerate(models) if entry.replicate == 1}
    heatmap_pairs = [(first["A"], first["B"]), (first["A"], first["C"]), (first["B"], first["C"])]
    heatmap_pairs += [(first[t], second[t]) for t in TASK_NAMES if t in second]
    heatmap_jobs = {("feature", "cka"), ("gradient", "cka"), ("hadamard", "cka"),
                    ("hadamard", "nbs")}
    similarity: Dict[str, Dict[str, Any]] = {}
    heatmaps: Dict[str, Dict[str, Any]] = {}
    heatmap_seconds = 0.0
    for kind in KINDS:
        # One kernel per (model, block), bucket-centred as nnsim_fast.similarity does, so the
        # indices below run on them uncentred.
        kernels = torch.stack([rep.kernels(layers, kind=kind, centering="buckets")
                               for rep in own_reps])                   # [R, L, m, m]
        similarity[kind] = {}
        for index in INDICES:
            matrices = [_model_matrix(kernels[:, layer], index)
                        for layer in _bar(range(len(layers)), len(layers), f"{kind} {index}", bars)]
            stats = pair_statistics(matrices, model_tasks)
            closeness = {key: statistics.fmean(v["mean"]) for key, v in stats.items()}
            similarity[kind][index] = {
                "matrices": [m.tolist() for m in matrices],
                "pairs": stats,
                "closeness": closeness,
                "desiderata": evaluate_desiderata(closeness),
                "layers_passing": _blockwise_desiderata(stats),
            }
            if (kind, index) in heatmap_jobs:
                started = time.perf_counter()
                heatmaps[f"{kind}/{index}"] = {
                    f"{labels[i]}-{labels[j]}": _cross_matrix(kernels[i], kernels[j], index).tolist()
                    for i, j in heatmap_pairs}
                heatmap_seconds += time.perf_counter() - started
        del kernels
    lap("similarity")
    timings["similarity"] = round(timings["similarity"] - heatmap_seconds, 2)
    timings["heatmaps"] = round(heatmap_seconds, 2)
    log(f"[5/{steps}] block x block matrices (computed with the kernels of step 4) for "
        f"{', '.join(next(iter(heatmaps.values())))}")

    log(f"[6/{steps}] baselines: Task2Vec (diagonal Fisher) and Fisher-Rao norms")
    embeddings, fr_norms = [], []
    for entry in _bar(models, len(models), "baselines", bars):
        task = tasks[entry.task]
        data = _pairs(task.x_test, task.y_test, settings.task2vec_samples)
        generator = torch.Generator().manual_seed(seed)
        embedding = task2vec_embedding(entry.model, data, generator=generator, chunk_size=128)
        # Heads differ in width across tasks (10 vs 20 classes); compare the shared body.
        body = sum(p.numel() for n, p in entry.model.named_parameters() if not n.startswith("head."))
        embeddings.append(embedding[:body])
        fr_norms.append(fisher_rao_norm(entry.model, _pairs(task.x_test, task.y_test),
                                        labels="expected", depth=entry.model.main_path_depth()))
    R = len(models)
    t2v = torch.ones(R, R, dtype=torch.float64)
    frd = torch.zeros(R, R, dtype=torch.float64)
    for i in range(R):
        for j in range(R):
            if i != j:
                t2v[i, j] = 1.0 - task2vec_distance(embeddings[i], embeddings[j])
                frd[i, j] = fisher_rao_distance(fr_norms[i], fr_norms[j])
    t2v_close = _task_pair_means(t2v, model_tasks)
    frd_means = _task_pair_means(frd, model_tasks)
    baselines = {
        "task2vec": {"similarity": t2v.tolist(), "closeness": t2v_close,
                     "desiderata": evaluate_desiderata(t2v_close),
                     "note": "cosine similarity (1 - Task2Vec cosine distance) of the diagonal "
                             "Fisher of the shared body (head excluded), labels drawn from the "
                             "model, on the first "
                             f"{settings.task2vec_samples or 'all'} test images of the model's "
                             "task"},
        "fisher_rao": {"norms": fr_norms, "distance": frd.tolist(), "mean_distance": frd_means,
                       "desiderata": evaluate_desiderata({k: -v for k, v in frd_means.items()}),
                       "note": "distance |n1 - n2| / sqrt(n1 n2); smaller = closer, the "
                               "desiderata are checked on the negated distance"},
    }
    lap("baselines")

    log(f"[7/{steps}] kernel ridge regression from sketched kernels and linear probes")
    krr: Dict[str, Dict[str, Any]] = {}
    per_task: Dict[str, Dict[str, List[List[float]]]] = {
        t: {"krr": [], "probe_one_epoch": [], "probe_converged": []} for t in TASK_NAMES}
    for entry in _bar(models, len(models), "krr+probes", bars):
        task = tasks[entry.task]
        per_task[entry.task]["krr"].append(
            sketched_krr_accuracy(entry.model, task, layers, settings.m, seed))
        train_features = _pooled_features(entry.model, task.x_train)
        test_features = _pooled_features(entry.model, task.x_test)
        for key, one_epoch in (("probe_one_epoch", True), ("probe_converged", False)):
            per_task[entry.task][key].append([
                linear_probe_accuracy(train_features[name], task.y_train, test_features[name],
                                      task.y_test, task.num_classes, one_epoch=one_epoch,
                                      seed=entry.seed, iterations=settings.probe_iterations)
                for name in layers])
    for t in TASK_NAMES:
        summary: Dict[str, Any] = {}
        for key, runs in per_task[t].items():
            columns = list(zip(*runs))
            summary[key] = {"mean": [_mean_std(c)[0] for c in columns],
                            "std": [_mean_std(c)[1] for c in columns], "runs": runs}
        summary["model_accuracy"] = _mean_std([e.test_accuracy for e in models if e.task == t])
        krr[t] = summary
    lap("krr")

    me_summary: Dict[str, Dict[str, Dict[str, Dict[str, List[float]]]]] = {}
    for s in TASK_NAMES:
        me_summary[s] = {}
        for t in TASK_NAMES:
            me_summary[s][t] = {}
            for q in MEAN_EMBEDDING_QUANTITIES:
                columns = list(zip(*mean_embedding[s][t][q]))
                me_summary[s][t][q] = {"mean": [_mean_std(c)[0] for c in columns],
                                       "std": [_mean_std(c)[1] for c in columns]}
    # The paper's reading of eq. 19: the CKA-normalised ratio should be largest on the data the
    # model was trained on.
    me_checks = {}
    for s in TASK_NAMES:
        scores = {t: statistics.fmean(me_summary[s][t]["ratio_frobenius"]["mean"])
                  for t in TASK_NAMES}
        # ">=": tasks A and B share their images, so their values tie exactly.
        me_checks[s] = {"ratio_frobenius_block_mean": scores,
                        "own_task_highest": bool(scores[s] >= max(scores.values()))}

    results: Dict[str, Any] = {
        "version": __version__,
        "config": {"mode": settings.mode, "seed": seed, "m": settings.m,
                   "seeds_per_task": settings.seeds_per_task,
                   "train": asdict(settings.train), "n_train": settings.n_train,
                   "n_test": settings.n_test, "task2vec_samples": settings.task2vec_samples,
                   "sketch": {"dtype": "float64", "spatial": "flatten", "beta": 0.5,
                              "centering": "buckets", "data": "each model on its own task's "
                              "test split"},
                   "threads": torch.get_num_threads(),
                   "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                   "torch": torch.__version__, "native_ops": ops.native_available()},
        "tasks": {name: task.summary() for name, task in tasks.items()},
        "layers": layers,
        "models": [{"label": e.label, "task": e.task, "seed": e.seed,
                    "test_accuracy": e.test_accuracy, "trained_now": e.trained_now,
                    "weights": os.path.relpath(e.path, out) if e.path else ""} for e in models],
        "similarity": similarity,
        "heatmaps": heatmaps,
        "baselines": baselines,
        "mean_embedding": {"per_pair": me_summary, "checks": me_checks},
        "krr": krr,
        "timings": timings,
        "figures": [],
    }
    log(f"[8/{steps}] writing results.json, report.md" + (" and figures" if figures else ""))
    if figures:
        results["figures"] = write_figures(results, out)
    lap("outputs")
    timings["total"] = round(sum(v for k, v in timings.items() if k != "total"), 2)
    _write_json(results, os.path.join(out, "results.json"))
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as handle:
        handle.write(format_report(results))
    return results


def write_figures(results: Dict[str, Any], out: str) -> List[str]:
    """Write the demo's PNG figures from a results dictionary; returns their file names.

    ``fig1_similarity.png`` (paper fig. 1), ``fig2_task2vec.png`` and ``fig3_fisher_rao.png``
    (fig. 2, 3), ``fig4_mean_embedding.png`` (fig. 4), ``fig5_block_heatmaps.png`` (fig. 5),
    ``fig6_mean_embedding_ratios.png`` (fig. 6) and ``figG_krr.png`` (appendix G).
    """
    from . import plot

    layers = results["layers"]
    short = [name.replace("block", "b") for name in layers]
    written: List[str] = []

    def save(figure, name: str) -> None:
        plot.save_figure(figure, os.path.join(out, name), dpi=100)
        written.append(name)

    panels = []
    for kind in KINDS:
        for index in INDICES:
            stats = results["similarity"][kind][index]["pairs"]
            for t in TASK_NAMES:
                series, styles = {}, {}
                for u in TASK_NAMES:
                    key = _pair_key(*sorted((t, u)))
                    if key in stats:
                        series[f"{t} vs {u}"] = (stats[key]["mean"], stats[key]["std"])
                        # One colour per compared task in every panel; same-task pairs bold.
                        styles[f"{t} vs {u}"] = {"color": _TASK_COLOURS[u],
                                                 "linewidth": 2.4 if u == t else 1.3}
                panels.append({"layers": short, "series": series, "styles": styles,
                               "xlabel": None, "legend": True,
                               "title": f"{KIND_LABELS[kind]}, {index.upper()}, {t}"})
    save(plot.curve_grid(panels, ncols=len(INDICES) * len(TASK_NAMES), panel_size=(2.6, 2.1),
                         suptitle="Similarity of block-matched model pairs (mean ± std over "
                                  "pairs); A ~ CIFAR-10, B ~ CIFAR-100, C ~ SVHN"),
         "fig1_similarity.png")

    labels = [m["label"] for m in results["models"]]
    t2v = results["baselines"]["task2vec"]["similarity"]
    save(plot.heatmap(t2v, labels, labels, title="Task2Vec cosine similarity (whole model)",
                      annotate=len(labels) <= 16, fmt="{:.2f}"), "fig2_task2vec.png")
    frd = results["baselines"]["fisher_rao"]["distance"]
    top = max(max(row) for row in frd)
    save(plot.heatmap(frd, labels, labels, title="Fisher-Rao norm distance (lower = closer)",
                      vmin=0.0, vmax=top if top > 0 else 1.0, annotate=len(labels) <= 16,
                      fmt="{:.2f}", cmap="magma", colorbar_label="distance"),
         "fig3_fisher_rao.png")

    me = results["mean_embedding"]["per_pair"]
    names = {"norm": "‖μ‖", "frobenius_factor": "‖K‖_F / N²", "trace_factor": "√Tr K / N",
             "ratio_frobenius": "‖μ‖ / (‖K‖_F / N²)", "ratio_trace": "‖μ‖ / (√Tr K / N)"}
    for quantities, file_name, title in (
            (("norm", "frobenius_factor", "trace_factor"), "fig4_mean_embedding.png",
             "Kernel mean embedding: model trained on S, evaluated on T"),
            (("ratio_frobenius", "ratio_trace"), "fig6_mean_embedding_ratios.png",
             "‖μ‖ over the CKA and NBS normalisers (eq. 19)")):
        panels = []
        for q in quantities:
            for s in TASK_NAMES:
                # A and B share their images, so their curves coincide: B is drawn dashed on top.
                legend = {t: f"T={t}" + (" (A's images)" if t == "B" else "") for t in TASK_NAMES}
                series = {legend[t]: (me[s][t][q]["mean"], me[s][t][q]["std"]) for t in TASK_NAMES}
                styles = {legend[t]: {"color": _TASK_COLOURS[t],
                                     "linewidth": 2.4 if t == s else 1.3,
                                     "linestyle": (0, (3, 2)) if t == "B" else "-"}
                          for t in TASK_NAMES}
                panels.append({"layers": short, "series": series, "styles": styles,
                               "logy": True, "ylim": None,
                               "title": f"{names[q]}, S={s}", "xlabel": None})
        save(plot.curve_grid(panels, ncols=len(TASK_NAMES), panel_size=(3.0, 2.3),
                             suptitle=title), file_name)

    panels = []
    for kind, index in (("hadamard", "cka"), ("feature", "cka")):
        for pair, matrix in results["heatmaps"][f"{kind}/{index}"].items():
            panels.append({"matrix": matrix, "row_labels": short, "col_labels": short,
                           "title": f"{KIND_LABELS[kind]}\n{pair.replace('-', ' vs ')}"})
    save(plot.heatmap_grid(panels, ncols=max(len(panels) // 2, 1), panel_size=(2.5, 2.4),
                           suptitle="Block x block CKA (rows: first model)"),
         "fig5_block_heatmaps.png")

    panels = []
    styles = {"KRR (sketched)": {}, "probe, 1 epoch": {"linestyle": ":"},
              "probe, converged": {"linestyle": "--"},
              "model": {"linestyle": "-", "marker": "", "color": "grey"}}
    for t in TASK_NAMES:
        entry = results["krr"][t]
        model_mean = entry["model_accuracy"][0]
        series = {"KRR (sketched)": (entry["krr"]["mean"], entry["krr"]["std"]),
                  "probe, 1 epoch": (entry["probe_one_epoch"]["mean"],
                                     entry["probe_one_epoch"]["std"]),
                  "probe, converged": (entry["probe_converged"]["mean"],
                                       entry["probe_converged"]["std"]),
                  "model": ([model_mean] * len(layers), None)}
        panels.append({"layers": short, "series": series, "styles": styles,
                       "title": f"task {t} ({results['tasks'][t]['num_classes']} classes)",
                       "ylabel": "test accuracy", "xlabel": None})
    save(plot.curve_grid(panels, ncols=len(TASK_NAMES), panel_size=(3.2, 2.6),
                         suptitle="Kernel ridge regression on sketched kernels vs linear probes"),
         "figG_krr.png")
    return written


def _write_json(results: Dict[str, Any], path: str) -> None:
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(clean(results), handle, indent=1)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ text outputs

def _verdict(entry: Dict[str, Any]) -> str:
    return "PASS" if entry["pass"] else "FAIL"


def _desiderata_rows(results: Dict[str, Any]) -> List[Tuple[str, str, Dict[str, float],
                                                              Dict[str, Any], str]]:
    rows = []
    layers = len(results["layers"])
    for kind in KINDS:
        for index in INDICES:
            entry = results["similarity"][kind][index]
            passing = entry["layers_passing"]
            note = f"{passing['d1']}/{layers}, {passing['d2']}/{layers}, {passing['d3']}/{layers}"
            rows.append((KIND_LABELS[kind], index.upper(), entry["closeness"],
                         entry["desiderata"], note))
    t2v = results["baselines"]["task2vec"]
    rows.append(("Task2Vec", "cosine", t2v["closeness"], t2v["desiderata"], "whole model"))
    frd = results["baselines"]["fisher_rao"]
    rows.append(("Fisher-Rao norm", "distance (lower = closer)", frd["mean_distance"],
                 frd["desiderata"], "whole model"))
    return rows


def format_desiderata(results: Dict[str, Any]) -> str:
    """The terminal table: each representation x index, task-pair values and PASS/FAIL verdicts."""
    keys = [_pair_key(a, b) for a, b in TASK_PAIRS]
    header = f"{'representation':<20} {'index':<8} " + " ".join(f"{k:>6}" for k in keys) + \
        "   (1)   (2)   (3)"
    lines = ["Desiderata of the seed paper (DESIGN section 7), from block-matched model pairs:",
             "  (1) same task, different init > different tasks   (2) A-B > A-C and A-B > B-C"
             "   (3) A-C > B-C",
             "  A plays CIFAR-10, B CIFAR-100, C SVHN; values are means over model pairs and "
             "blocks.", header, "-" * len(header)]
    for rep, index, values, verdicts, _ in _desiderata_rows(results):
        index = "FR dist" if index.startswith("distance") else index
        cells = " ".join(f"{values.get(k, float('nan')):6.3f}" for k in keys)
        marks = " ".join(f"{_verdict(verdicts[d]):>5}" for d in ("d1", "d2", "d3"))
        lines.append(f"{rep:<20} {index:<8} {cells}  {marks}")
    return "\n".join(lines)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def _pm(mean: float, std: float, digits: int = 3) -> str:
    if mean is None or (isinstance(mean, float) and not math.isfinite(mean)):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _num(value: float) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
        return f"{value:.3e}"
    return f"{value:.4f}"


def format_report(results: Dict[str, Any]) -> str:
    """``report.md``: the run's configuration, timings and every table of the demo."""
    cfg = results["config"]
    layers = results["layers"]
    keys = [_pair_key(a, b) for a, b in TASK_PAIRS]
    parts = [f"# nnsim-fast demo report ({cfg['mode']})", ""]
    parts.append(f"nnsim-fast {results['version']}, torch {cfg['torch']}, native ops: "
                 f"{cfg['native_ops']}, {cfg['threads']} CPU thread(s). Sketch: m = {cfg['m']}, "
                 f"seed {cfg['seed']}, {cfg['sketch']['dtype']}, spatial "
                 f"{cfg['sketch']['spatial']}, beta {cfg['sketch']['beta']}, kernels centred "
                 f"over buckets; {cfg['sketch']['data']}. {cfg['seeds_per_task']} models per task.")
    parts.append("")
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in results["timings"].items())
    parts.append(f"Timings: {timing}.")
    parts += ["", "## Tasks", ""]
    parts.append(_table(["task", "plays", "classes", "train", "test", "description"], [
        [n, t["role"], t["num_classes"], t["n_train"], t["n_test"], t["description"]]
        for n, t in results["tasks"].items()]))
    parts += ["", "## Models", ""]
    train = cfg["train"]
    parts.append(f"SmallResNet, block widths {tuple(train['channels'])}, {len(layers)} residual "
                 f"blocks; Adam (lr {train['lr']}, weight decay {train['weight_decay']}, cosine "
                 f"schedule), {train['epochs']} epochs, batch {train['batch_size']}.")
    parts.append("")
    rows = []
    for t in TASK_NAMES:
        accs = [m["test_accuracy"] for m in results["models"] if m["task"] == t]
        rows.append([t, len(accs), _pm(*_mean_std(accs)),
                     ", ".join(f"{a:.3f}" for a in accs)])
    parts.append(_table(["task", "models", "test accuracy", "per model"], rows))

    parts += ["", "## Desiderata", "",
              "Mean similarity of block-matched model pairs, averaged over blocks (same-task "
              "pairs: distinct models). (1) every T-T above every T-U; (2) A-B above A-C and "
              "B-C; (3) A-C above B-C. The last column counts the blocks at which (1), (2), (3) "
              "hold on their own.", ""]
    rows = []
    for rep, index, values, verdicts, note in _desiderata_rows(results):
        rows.append([rep, index] + [f"{values.get(k, float('nan')):.3f}" for k in keys] +
                    [_verdict(verdicts[d]) for d in ("d1", "d2", "d3")] + [note])
    parts.append(_table(["representation", "index"] + keys + ["(1)", "(2)", "(3)", "blocks"],
                        rows))

    parts += ["", "## Similarity per block", "",
              "Mean ± std over model pairs of each task pair (paper fig. 1).", ""]
    for kind in KINDS:
        for index in INDICES:
            stats = results["similarity"][kind][index]["pairs"]
            parts += [f"### {KIND_LABELS[kind]}, {index.upper()}", ""]
            parts.append(_table(["pair"] + layers, [
                [k] + [_pm(m, s) for m, s in zip(stats[k]["mean"], stats[k]["std"])]
                for k in keys if k in stats]))
            parts.append("")

    parts += ["## Block × block similarity", "",
              "Rows: blocks of the first model, columns: blocks of the second (paper fig. 5).",
              ""]
    for name, maps in results["heatmaps"].items():
        kind, index = name.split("/")
        for pair, matrix in maps.items():
            parts += [f"### {KIND_LABELS[kind]}, {index.upper()}: {pair}", ""]
            parts.append(_table([""] + layers, [[layers[i]] + [f"{v:.3f}" for v in row]
                                                 for i, row in enumerate(matrix)]))
            parts.append("")

    base = results["baselines"]
    parts += ["## Baselines", "", "Task2Vec: " + base["task2vec"]["note"] + ".", ""]
    parts.append(_table(["pair", "Task2Vec similarity", "Fisher-Rao distance"], [
        [k, f"{base['task2vec']['closeness'][k]:.3f}",
         f"{base['fisher_rao']['mean_distance'][k]:.3f}"] for k in keys]))
    parts.append("")
    parts.append(_table(["model", "Fisher-Rao norm"], [
        [m["label"], f"{n:.3f}"] for m, n in zip(results["models"], base["fisher_rao"]["norms"])]))

    parts += ["", "## Kernel mean embedding", "",
              "Each model sketched on every task's test split (rows: trained on → evaluated "
              "on), features∘gradients kernel; mean over the models of the source task (paper "
              "fig. 4, 6; eq. 19). `norm` is ‖μ_p‖, `frobenius_factor` ‖K‖_F/N² (from the "
              "sketched kernel), `trace_factor` √Tr K / N, `ratio_frobenius` and `ratio_trace` "
              "their ratios with ‖μ_p‖.", ""]
    me = results["mean_embedding"]["per_pair"]
    for q in MEAN_EMBEDDING_QUANTITIES:
        parts += [f"### {q}", ""]
        parts.append(_table(["trained on → evaluated on"] + layers, [
            [f"{s} → {t}"] + [_num(v) for v in me[s][t][q]["mean"]]
            for s in TASK_NAMES for t in TASK_NAMES]))
        parts.append("")
    parts.append("Tasks A and B share their test images, and the representation is label-free "
                 "(expected gradients under the model's own predictive), so a model evaluated "
                 "on A and on B gives the same numbers: these tables separate the digit images "
                 "from the shapes, not the two label spaces.")
    parts.append("")
    checks = results["mean_embedding"]["checks"]
    parts.append("Is `ratio_frobenius` (block mean) largest on the model's own task? " + ", ".join(
        f"{s}: {'yes' if c['own_task_highest'] else 'no'}" for s, c in checks.items()) + ".")

    parts += ["", "## Kernel ridge regression (appendix G)", "",
              "Test accuracy (mean ± std over the models of a task) of KRR on the sketched "
              "features∘gradients kernel of the training split (m buckets, unsigned target "
              "sketch, alpha by leave-one-bucket-out), and of logistic-regression probes on the "
              "block's globally pooled features after one epoch and at convergence.", ""]
    rows = []
    for t in TASK_NAMES:
        entry = results["krr"][t]
        for i, name in enumerate(layers):
            rows.append([t, name, _pm(entry["krr"]["mean"][i], entry["krr"]["std"][i]),
                         _pm(entry["probe_one_epoch"]["mean"][i],
                             entry["probe_one_epoch"]["std"][i]),
                         _pm(entry["probe_converged"]["mean"][i],
                             entry["probe_converged"]["std"][i]),
                         _pm(*entry["model_accuracy"])])
    parts.append(_table(["task", "block", "KRR", "probe, 1 epoch", "probe, converged",
                         "model"], rows))
    if results["figures"]:
        parts += ["", "## Figures", ""]
        parts += [f"![{os.path.splitext(f)[0]}]({f})" for f in results["figures"]]
    parts.append("")
    return "\n".join(parts)
