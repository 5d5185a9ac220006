"""The stages of a demo run, one function each: data, models, sketches, similarity,
baselines, kernel ridge regression and mean embeddings.

Each stage takes what earlier stages produced and returns plain data (tensors, lists,
dicts of numbers); :func:`nnsim_fast.app.demo.run.run_demo` calls them in order.
"""
from __future__ import annotations

import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ...baselines import fisher_rao_distance, fisher_rao_norm, task2vec_distance, task2vec_embedding
from ... import estimators
from ...compare import mean_embedding_norm, similarity_matrix
from ...datasets import TASK_NAMES, Task, load_paper_tasks, load_tasks
from ...extract import sketch_model
from ...models import accuracy, load_or_train, resnet18_cifar
from ..scores import score_pair, similarity_options
from .analysis import (batch_pairs, blockwise_desiderata, cross_matrix, evaluate_desiderata,
                       indexed_batches, linear_probe_accuracy, mean_std, model_matrix,
                       pair_statistics, pooled_features, sketched_krr_accuracy, task_pair_means)
from .settings import INDICES, KIND_LABELS, KINDS, MEAN_EMBEDDING_QUANTITIES, DemoSettings

__all__ = ["DemoModel", "Log", "progress_bar", "load_task_data", "train_models", "sketch_models",
           "similarity_stage", "baselines_stage", "krr_stage", "summarise_mean_embedding",
           "uses_library_estimator"]

#: The (kind, index) pairs whose block x block matrices are kept (paper fig. 5).
HEATMAP_JOBS = (("feature", "cka"), ("gradient", "cka"), ("hadamard", "cka"),
                ("hadamard", "nbs"))
# The estimators that are a centring of the sketched kernels followed by the plain index: the
# demo computes them for all model pairs at once from stacked kernels.
_STACKED_CENTERING = {"paper": "buckets", "plugin": "data"}


@dataclass
class DemoModel:
    """A trained demo model and where it came from."""

    task: str
    replicate: int
    seed: int
    model: nn.Module
    trained_now: bool
    path: str
    test_accuracy: float = float("nan")

    @property
    def label(self) -> str:
        return f"{self.task}{self.replicate}"


class Log:
    """Step lines on stderr with the time since the run started (or nothing)."""

    def __init__(self, enabled: bool, stream=None) -> None:
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.enabled:
            elapsed = time.perf_counter() - self.start
            print(f"[{elapsed:6.1f}s] {message}", file=self.stream, flush=True)


def progress_bar(iterable: Iterable, total: Optional[int], desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


# ------------------------------------------------------------------ data and models

def load_task_data(settings: DemoSettings) -> Dict[str, Task]:
    """The three tasks: bundled, or the paper's datasets read from ``settings.data_root``."""
    if settings.data_root is not None:
        return _common_test_size(load_paper_tasks(settings.data_root, settings.n_train,
                                                  settings.n_test))
    tasks = load_tasks()
    if settings.n_train is not None or settings.n_test is not None:
        tasks = {k: t.subset(settings.n_train, settings.n_test) for k, t in tasks.items()}
    return _common_test_size(tasks)


def _common_test_size(tasks: Dict[str, Task]) -> Dict[str, Task]:
    """Test splits cut to one length: models are compared each on its own task's test split
    with rows paired by index, which the estimators (and the exact index) need."""
    smallest = min(t.x_test.shape[0] for t in tasks.values())
    return {k: t.subset(None, smallest) for k, t in tasks.items()}


def _architecture(task: Task, settings: DemoSettings) -> Tuple[Any, str]:
    """``(build or None for the default SmallResNet, the data tag naming the cache entry)``."""
    tag = f"{task.description}|{task.x_train.shape[0]}"
    if settings.width is None:
        return None, tag
    width, classes = settings.width, task.num_classes
    return (lambda: resnet18_cifar(classes, width=width)), f"resnet18-w{width}|{tag}"


def train_models(tasks: Dict[str, Task], settings: DemoSettings, seed: int, cache_dir: str,
                 log: Log, bars: bool) -> List[DemoModel]:
    """``settings.seeds_per_task`` models per task, trained or loaded from ``cache_dir``."""
    jobs = [(name, k) for name in TASK_NAMES for k in range(settings.seeds_per_task)]
    models: List[DemoModel] = []
    for name, k in progress_bar(jobs, len(jobs), "models", bars):
        task = tasks[name]
        model_seed = 1000 * seed + 100 * TASK_NAMES.index(name) + k
        build, tag = _architecture(task, settings)
        model, trained, path = load_or_train(
            name, task.num_classes, task.x_train, task.y_train, settings.train, model_seed,
            cache_dir, data_tag=tag, build=build)
        entry = DemoModel(name, k, model_seed, model, trained, path)
        entry.test_accuracy = accuracy(model, task.x_test, task.y_test)
        log(f"  {entry.label}: {'trained' if trained else 'loaded from cache'}, "
            f"test accuracy {entry.test_accuracy:.3f}")
        models.append(entry)
    return models


# ------------------------------------------------------------------ sketches

def _mean_embedding_rows(rep, layers: Sequence[str]) -> Dict[str, List[float]]:
    rows: Dict[str, List[float]] = {q: [] for q in MEAN_EMBEDDING_QUANTITIES}
    for name in layers:
        values = mean_embedding_norm(rep, name)
        for q in MEAN_EMBEDDING_QUANTITIES:
            rows[q].append(float(values[q]))
    return rows


def _drop_mean_embedding(rep) -> None:
    # The exact mean embedding is d_g x d_f per layer; drop it once its norms are read.
    for layer in rep.layers.values():
        layer.mean_psi = None


def _sketch_extras(settings: DemoSettings) -> Dict[str, Any]:
    # The default statistics (psi included) serve both the estimators and the unbiased
    # Frobenius factor of the mean-embedding ratios.  The demo holds every model's float64
    # representation at once (15 of them, 4 blocks each), so its psi halves keep m buckets:
    # at the library's default 4 m they alone would take 8 GiB; docs/demo.md says so.
    return {"psi_buckets": settings.m}


def sketch_models(models: Sequence[DemoModel], tasks: Dict[str, Task], layers: List[str],
                  settings: DemoSettings, seed: int, bars: bool):
    """Sketch every model on every task's test split.

    Returns ``(representations of each model on its own task, mean-embedding rows
    {trained on: {evaluated on: {quantity: [per model: per layer]}}})``.
    """
    own_reps = []
    raw = {s: {t: {q: [] for q in MEAN_EMBEDDING_QUANTITIES} for t in TASK_NAMES}
           for s in TASK_NAMES}
    jobs = [(entry, target) for entry in models for target in TASK_NAMES]
    for entry, target in progress_bar(jobs, len(jobs), "sketches", bars):
        data = tasks[target]
        rep = sketch_model(entry.model, indexed_batches(data.x_test, data.y_test), layers=layers,
                           m=settings.m, seed=seed, dtype=torch.float64,
                           spatial=settings.spatial, mean_embedding=True, progress=False,
                           **_sketch_extras(settings))
        for q, values in _mean_embedding_rows(rep, layers).items():
            raw[entry.task][target][q].append(values)
        _drop_mean_embedding(rep)
        if target == entry.task:
            own_reps.append(rep)
    return own_reps, raw


# ------------------------------------------------------------------ similarity

def uses_library_estimator(settings: DemoSettings) -> bool:
    """Whether similarities go through ``nnsim_fast.similarity`` pair by pair (estimators
    beyond a plain centring, or debiased indices) rather than stacked kernels."""
    return settings.debiased or settings.estimator not in _STACKED_CENTERING


def heatmap_pairs(models: Sequence[DemoModel]) -> List[Tuple[int, int]]:
    """Replicate 0 of each task against the other tasks', and replicates 0 and 1 of a task."""
    first = {entry.task: i for i, entry in enumerate(models) if entry.replicate == 0}
    second = {entry.task: i for i, entry in enumerate(models) if entry.replicate == 1}
    pairs = [(first["A"], first["B"]), (first["A"], first["C"]), (first["B"], first["C"])]
    return pairs + [(first[t], second[t]) for t in TASK_NAMES if t in second]


def _entry(matrices: Sequence[torch.Tensor], tasks: Sequence[str]) -> Dict[str, Any]:
    stats = pair_statistics(matrices, tasks)
    closeness = {key: statistics.fmean(v["mean"]) for key, v in stats.items()}
    return {"matrices": [m.tolist() for m in matrices], "pairs": stats, "closeness": closeness,
            "desiderata": evaluate_desiderata(closeness),
            "layers_passing": blockwise_desiderata(stats)}


def _stacked(own_reps, models, layers, settings, bars):
    """Every (kind, index) from stacked centred kernels: all model pairs at once."""
    labels, tasks = [e.label for e in models], [e.task for e in models]
    pairs = heatmap_pairs(models)
    similarity: Dict[str, Dict[str, Any]] = {}
    heatmaps: Dict[str, Dict[str, Any]] = {}
    heatmap_seconds = 0.0
    centering = _STACKED_CENTERING[settings.estimator]
    for kind in KINDS:
        kernels = torch.stack([rep.kernels(layers, kind=kind, centering=centering)
                               for rep in own_reps])                   # [R, L, m, m]
        similarity[kind] = {}
        for index in INDICES:
            matrices = [model_matrix(kernels[:, layer], index) for layer in
                        progress_bar(range(len(layers)), len(layers), f"{kind} {index}", bars)]
            similarity[kind][index] = _entry(matrices, tasks)
            if (kind, index) in HEATMAP_JOBS:
                started = time.perf_counter()
                heatmaps[f"{kind}/{index}"] = {
                    f"{labels[i]}-{labels[j]}": cross_matrix(kernels[i], kernels[j], index).tolist()
                    for i, j in pairs}
                heatmap_seconds += time.perf_counter() - started
        del kernels
    return similarity, heatmaps, heatmap_seconds, []


def _model_matrices(own_reps, layers, kind: str, index: str, options):
    """``[R, R]`` per block (block-matched), each model's sketch summarised once, and the
    library's warnings as messages."""
    matrices, errors = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for layer in layers:
            matrix, error = similarity_matrix(own_reps, layer, index, kind, with_error=True,
                                              **options)
            matrices.append(matrix)
            errors.append(error)
    notes = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    return matrices, (None if any(e is None for e in errors) else errors), notes


def _library(own_reps, models, layers, settings, bars):
    """Every (kind, index) through the library's estimator, with its error bars and warnings."""
    labels, tasks = [e.label for e in models], [e.task for e in models]
    similarity: Dict[str, Dict[str, Any]] = {kind: {} for kind in KINDS}
    heatmaps: Dict[str, Dict[str, Any]] = {}
    notes: List[str] = []
    jobs = [(kind, index) for kind in KINDS for index in INDICES]
    for kind, index in progress_bar(jobs, len(jobs), "similarity", bars):
        # The debiased HSIC is a CKA option; NBS has no debiased form.
        options = similarity_options(settings.estimator, settings.debiased and index == "cka")
        matrices, errors, found = _model_matrices(own_reps, layers, kind, index, options)
        entry = _entry(matrices, tasks)
        if errors is not None:
            entry["errors"] = [e.tolist() for e in errors]
        similarity[kind][index] = entry
        notes.extend(found)
        if (kind, index) in HEATMAP_JOBS:
            scores = {(i, j): score_pair(own_reps[i], own_reps[j], index, kind, options)
                      for i, j in heatmap_pairs(models)}
            heatmaps[f"{kind}/{index}"] = {f"{labels[i]}-{labels[j]}": score.matrix.tolist()
                                           for (i, j), score in scores.items()}
            notes.extend(w for score in scores.values() for w in score.warnings)
    return similarity, heatmaps, 0.0, list(dict.fromkeys(notes))    # each warning once


def _estimate(grams_a, grams_b, index: str, debiased: bool):
    if index == "cka":
        return estimators.cka_matrix(grams_a, grams_b, debiased=debiased)
    return estimators.nbs_matrix(grams_a, grams_b), None


def _estimator_notes(kind: str, grams, errors, m: int) -> List[str]:
    notes = []
    worst = max(float(e.max()) for e in errors) if errors else 0.0
    if worst > estimators.RESOLUTION_TOLERANCE:
        notes.append(f"{KIND_LABELS[kind]}: m={m} is too small for some model pairs and blocks: "
                     f"standard error up to {worst:.3g} (> {estimators.RESOLUTION_TOLERANCE})")
    rank = max(float(estimators.effective_rank(g).max()) for g in grams)
    if rank > m:
        notes.append(f"{KIND_LABELS[kind]}: NBS from sketches is biased upwards when a block's "
                     f"effective rank exceeds m={m} (largest here: {rank:.0f})")
    return notes


def _default_kind(own_reps, layers, kind: str, settings, pairs, indices=INDICES):
    """One kind: each model's Gram summary built once, every model pair and block from the
    stack, the heatmaps' pairs from the same summaries (what similarity() would give)."""
    grams = [rep.grams(layers, kind) for rep in own_reps]
    out, maps, errors = {}, {}, []
    for index in indices:
        debiased = settings.debiased and index == "cka"
        results = [_estimate(stacked, stacked, index, debiased) for stacked in
                   (estimators.stack_grams([g[layer] for g in grams]) for layer in range(len(layers)))]
        out[index] = ([matrix for matrix, _ in results],
                      None if results[0][1] is None else [error for _, error in results])
        errors += out[index][1] or []
        maps[index] = {(i, j): _estimate(grams[i], grams[j], index, debiased)[0] for i, j in pairs}
    return out, maps, _estimator_notes(kind, grams, errors, own_reps[0].m)


def _default_estimator(own_reps, models, layers, settings, bars, joint=None):
    """Every (kind, index) with the sketch estimator, with its error bars and warnings; with
    ``joint`` (:func:`~.joint_stage.joint_cka`'s results) CKA comes from there instead."""
    labels, tasks = [e.label for e in models], [e.task for e in models]
    pairs = heatmap_pairs(models)
    similarity: Dict[str, Dict[str, Any]] = {kind: {} for kind in KINDS}
    heatmaps: Dict[str, Dict[str, Any]] = {}
    notes: List[str] = []
    indices = INDICES if joint is None else tuple(i for i in INDICES if i != "cka")
    for kind in progress_bar(KINDS, len(KINDS), "similarity", bars):
        out, maps, found = _default_kind(own_reps, layers, kind, settings, pairs, indices)
        if joint is not None:
            out["cka"] = (joint[kind]["matrices"], joint[kind]["errors"])
            maps["cka"] = joint[kind]["heatmaps"]
        notes += found
        for index, (matrices, errors) in out.items():
            entry = _entry(matrices, tasks)
            if errors is not None:
                entry["errors"] = [e.tolist() for e in errors]
            similarity[kind][index] = entry
            if (kind, index) in HEATMAP_JOBS:
                heatmaps[f"{kind}/{index}"] = {f"{labels[i]}-{labels[j]}": maps[index][(i, j)].tolist()
                                               for i, j in pairs}
    return similarity, heatmaps, 0.0, notes


def similarity_stage(own_reps, models: Sequence[DemoModel], layers: List[str],
                     settings: DemoSettings, bars: bool, joint=None):
    """Model x model similarity at every block for every kernel kind and index (``joint``:
    the CKA of :func:`~.joint_stage.joint_cka`, for ``estimator="joint"``).

    Returns ``(similarity {kind: {index: entry}}, block x block heatmaps, seconds spent on the
    heatmaps, warnings)``.
    """
    if settings.estimator in ("sketch", "joint"):
        return _default_estimator(own_reps, models, layers, settings, bars, joint)
    if uses_library_estimator(settings):
        return _library(own_reps, models, layers, settings, bars)
    return _stacked(own_reps, models, layers, settings, bars)


# ------------------------------------------------------------------ baselines

def _baseline_statistics(models: Sequence[DemoModel], tasks: Dict[str, Task],
                         settings: DemoSettings, seed: int, bars: bool):
    embeddings, norms = [], []
    for entry in progress_bar(models, len(models), "baselines", bars):
        task = tasks[entry.task]
        data = batch_pairs(task.x_test, task.y_test, settings.task2vec_samples)
        generator = torch.Generator().manual_seed(seed)
        embedding = task2vec_embedding(entry.model, data, generator=generator, chunk_size=128)
        # Heads differ in width across tasks (10 vs 20 classes); compare the shared body.
        body = sum(p.numel() for n, p in entry.model.named_parameters() if not n.startswith("head."))
        embeddings.append(embedding[:body])
        norms.append(fisher_rao_norm(entry.model, batch_pairs(task.x_test, task.y_test),
                                     labels="expected", depth=entry.model.main_path_depth()))
    return embeddings, norms


def _baseline_matrices(embeddings, norms) -> Tuple[torch.Tensor, torch.Tensor]:
    count = len(embeddings)
    task2vec = torch.ones(count, count, dtype=torch.float64)
    fisher_rao = torch.zeros(count, count, dtype=torch.float64)
    for i in range(count):
        for j in range(count):
            if i != j:
                task2vec[i, j] = 1.0 - task2vec_distance(embeddings[i], embeddings[j])
                fisher_rao[i, j] = fisher_rao_distance(norms[i], norms[j])
    return task2vec, fisher_rao


def baselines_stage(models: Sequence[DemoModel], tasks: Dict[str, Task],
                    settings: DemoSettings, seed: int, bars: bool) -> Dict[str, Any]:
    """Task2Vec (diagonal Fisher, cosine) and Fisher-Rao norm distances of every model pair."""
    embeddings, norms = _baseline_statistics(models, tasks, settings, seed, bars)
    t2v, frd = _baseline_matrices(embeddings, norms)
    model_tasks = [entry.task for entry in models]
    t2v_close = task_pair_means(t2v, model_tasks)
    frd_means = task_pair_means(frd, model_tasks)
    return {
        "task2vec": {"similarity": t2v.tolist(), "closeness": t2v_close,
                     "desiderata": evaluate_desiderata(t2v_close),
                     "note": "cosine similarity (1 - Task2Vec cosine distance) of the diagonal "
                             "Fisher of the shared body (head excluded), labels drawn from the "
                             "model, on the first "
                             f"{settings.task2vec_samples or 'all'} test images of the model's "
                             "task"},
        "fisher_rao": {"norms": norms, "distance": frd.tolist(), "mean_distance": frd_means,
                       "desiderata": evaluate_desiderata({k: -v for k, v in frd_means.items()}),
                       "note": "distance |n1 - n2| / sqrt(n1 n2); smaller = closer, the "
                               "desiderata are checked on the negated distance"},
    }


# ------------------------------------------------------------------ KRR and probes

def _krr_runs(entry: DemoModel, task: Task, layers: List[str], settings: DemoSettings,
              seed: int) -> Dict[str, List[float]]:
    runs = {"krr": sketched_krr_accuracy(entry.model, task, layers, settings.m, seed,
                                         spatial=settings.spatial)}
    train_features = pooled_features(entry.model, task.x_train)
    test_features = pooled_features(entry.model, task.x_test)
    for key, one_epoch in (("probe_one_epoch", True), ("probe_converged", False)):
        runs[key] = [linear_probe_accuracy(train_features[name], task.y_train,
                                           test_features[name], task.y_test, task.num_classes,
                                           one_epoch=one_epoch, seed=entry.seed,
                                           iterations=settings.probe_iterations)
                     for name in layers]
    return runs


def _columns_mean_std(runs: Sequence[Sequence[float]]) -> Dict[str, List[float]]:
    columns = list(zip(*runs))
    return {"mean": [mean_std(c)[0] for c in columns], "std": [mean_std(c)[1] for c in columns]}


def krr_stage(models: Sequence[DemoModel], tasks: Dict[str, Task], layers: List[str],
              settings: DemoSettings, seed: int, bars: bool) -> Dict[str, Dict[str, Any]]:
    """Per task and block: KRR on sketched kernels and linear probes, mean and std over the
    task's models, beside the models' own test accuracy."""
    per_task = {t: {"krr": [], "probe_one_epoch": [], "probe_converged": []} for t in TASK_NAMES}
    for entry in progress_bar(models, len(models), "krr+probes", bars):
        for key, values in _krr_runs(entry, tasks[entry.task], layers, settings, seed).items():
            per_task[entry.task][key].append(values)
    krr: Dict[str, Dict[str, Any]] = {}
    for t in TASK_NAMES:
        krr[t] = {key: {**_columns_mean_std(runs), "runs": runs}
                  for key, runs in per_task[t].items()}
        krr[t]["model_accuracy"] = mean_std([e.test_accuracy for e in models if e.task == t])
    return krr


# ------------------------------------------------------------------ mean embeddings

def summarise_mean_embedding(raw) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Mean and std over models of each mean-embedding quantity, and whether the
    CKA-normalised ratio is largest on the model's own task (the paper's reading of eq. 19)."""
    summary = {s: {t: {q: _columns_mean_std(raw[s][t][q]) for q in MEAN_EMBEDDING_QUANTITIES}
                   for t in TASK_NAMES} for s in TASK_NAMES}
    checks = {}
    for s in TASK_NAMES:
        scores = {t: statistics.fmean(summary[s][t]["ratio_frobenius"]["mean"])
                  for t in TASK_NAMES}
        # ">=": with the bundled tasks A and B share their images, so their values tie.
        checks[s] = {"ratio_frobenius_block_mean": scores,
                     "own_task_highest": bool(scores[s] >= max(scores.values()))}
    return summary, checks
