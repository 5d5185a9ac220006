"""A demo run: the stages in order, timed, and the results written."""
from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict
from typing import Any, Dict, List, Optional

import torch

from ... import ops
from ..._version import __version__
from ..._checks import check_int, check_optional_int
from ..scores import similarity_options
from . import stages
from .exact_check import exact_stage, largest_difference
from .figures import write_figures
from .joint_stage import joint_cka
from .report import format_desiderata, format_report
from .settings import INDICES, KINDS, DemoSettings, settings_for

__all__ = ["run_demo", "write_json"]

_STEPS = 9


class _Timer:
    """Seconds spent in each named stage."""

    def __init__(self) -> None:
        self.timings: Dict[str, float] = {}
        self.clock = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self.clock, 2)
        self.clock = now


def _json_value(value):
    # numpy and torch scalars (and 0-d arrays) as the plain numbers they hold.
    item = getattr(value, "item", None)
    if item is not None and getattr(value, "ndim", 0) == 0:
        return item()
    raise TypeError(f"cannot write a {type(value).__name__} to JSON")


def write_json(results: Dict[str, Any], path: str) -> None:
    """Write ``results`` to ``path`` through a temporary file (non-finite floats as null or
    "inf"/"-inf", numpy scalars as numbers)."""
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
        json.dump(clean(results), handle, indent=1, default=_json_value)
    os.replace(tmp, path)


def _config(settings: DemoSettings, seed: int) -> Dict[str, Any]:
    centering = {"paper": "buckets", "plugin": "data"}.get(settings.estimator, "data")
    return {"mode": settings.mode, "seed": seed, "m": settings.m,
            "seeds_per_task": settings.seeds_per_task,
            "train": asdict(settings.train), "n_train": settings.n_train,
            "n_test": settings.n_test, "task2vec_samples": settings.task2vec_samples,
            "data": "files" if settings.data_root else "bundled",
            "model": ({"name": "ResNet-18", "width": settings.width} if settings.width
                      else {"name": "SmallResNet"}),
            "sketch": {"dtype": "float64", "spatial": settings.spatial, "beta": 0.5,
                       "centering": centering, "estimator": settings.estimator,
                       "debiased": settings.debiased,
                       "data": "each model on its own task's test split"},
            "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "torch": torch.__version__, "native_ops": ops.native_available()}


def _models_summary(models, out: str) -> List[Dict[str, Any]]:
    return [{"label": e.label, "task": e.task, "seed": e.seed, "test_accuracy": e.test_accuracy,
             "trained_now": e.trained_now,
             "weights": os.path.relpath(e.path, out) if e.path else ""} for e in models]


def _estimator_words(settings: DemoSettings) -> str:
    if settings.estimator == "joint":
        return ("CKA: joint estimator, every model over the same batches; NBS: plug-in on the "
                "sketches")
    return f"{settings.estimator} estimator"


def _analyse(settings: DemoSettings, seed: int, out: str, log: stages.Log, bars: bool,
             timer: _Timer) -> Dict[str, Any]:
    """Stages 1-7; returns the results without timings and figures."""
    source = (f"reading CIFAR-10, CIFAR-100 and SVHN from {settings.data_root}"
              if settings.data_root else "loading digits and generating shapes")
    log(f"[1/{_STEPS}] tasks: {source}")
    tasks = stages.load_task_data(settings)
    timer.lap("data")

    cache = os.path.join(out, "models")
    log(f"[2/{_STEPS}] models: {settings.seeds_per_task} per task x {len(tasks)} tasks "
        f"(cache: {cache})")
    models = stages.train_models(tasks, settings, seed, cache, log, bars)
    layers = list(models[0].model.block_names)
    timer.lap("train")

    log(f"[3/{_STEPS}] sketching every model on its own task's test split "
        f"(m={settings.m}, seed={seed}) and on the other tasks (mean embeddings)")
    own_reps, raw_mean_embedding = stages.sketch_models(models, tasks, layers, settings, seed,
                                                        bars)
    timer.lap("sketch")

    log(f"[4/{_STEPS}] model x model similarity at every block: "
        f"{len(KINDS)} kernels x {len(INDICES)} indices ({_estimator_words(settings)})")
    joint = (joint_cka(models, tasks, layers, settings, seed, stages.heatmap_pairs(models), bars)
             if settings.estimator == "joint" else None)
    similarity, heatmaps, heatmap_seconds, warnings = stages.similarity_stage(
        own_reps, models, layers, settings, bars, joint)
    for warning in warnings:
        log(f"  warning: {warning}")
    timer.lap("similarity")
    timer.timings["similarity"] = round(timer.timings["similarity"] - heatmap_seconds, 2)
    timer.timings["heatmaps"] = round(heatmap_seconds, 2)
    log(f"[5/{_STEPS}] block x block matrices (computed with the similarities of step 4) for "
        f"{', '.join(next(iter(heatmaps.values())))}")

    log(f"[6/{_STEPS}] the same similarities over all N x N pairs (exact, float64), "
        f"against the estimates")
    exact = exact_stage(models, tasks, layers, settings, similarity, bars)
    log(f"  largest |estimate - exact|: {largest_difference(exact):.3f}")
    timer.lap("exact")

    log(f"[7/{_STEPS}] baselines: Task2Vec (diagonal Fisher) and Fisher-Rao norms")
    baselines = stages.baselines_stage(models, tasks, settings, seed, bars)
    timer.lap("baselines")

    log(f"[8/{_STEPS}] kernel ridge regression from sketched kernels and linear probes")
    krr = stages.krr_stage(models, tasks, layers, settings, seed, bars)
    timer.lap("krr")
    me_summary, me_checks = stages.summarise_mean_embedding(raw_mean_embedding)
    return {"version": __version__, "config": _config(settings, seed),
            "tasks": {name: task.summary() for name, task in tasks.items()}, "layers": layers,
            "models": _models_summary(models, out), "similarity": similarity,
            "heatmaps": heatmaps, "exact": exact, "baselines": baselines,
            "mean_embedding": {"per_pair": me_summary, "checks": me_checks}, "krr": krr,
            "warnings": warnings}


def _write_outputs(results: Dict[str, Any], out: str, figures: bool, log: stages.Log,
                   timer: _Timer) -> None:
    log(f"[9/{_STEPS}] writing results.json, report.md" + (" and figures" if figures else ""))
    results["figures"] = write_figures(results, out) if figures else []
    timer.lap("outputs")
    timer.timings["total"] = round(sum(v for k, v in timer.timings.items() if k != "total"), 2)
    results["timings"] = timer.timings
    write_json(results, os.path.join(out, "results.json"))
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as handle:
        handle.write(format_report(results))


def _run(out: str, settings: DemoSettings, seed: int, log: stages.Log, bars: bool,
         figures: bool) -> Dict[str, Any]:
    timer = _Timer()
    results = _analyse(settings, seed, out, log, bars, timer)
    results["timings"] = timer.timings
    _write_outputs(results, out, figures, log, timer)
    return results


def _checked(seed, threads, settings: DemoSettings):
    seed, threads = check_int(seed, "seed", 0), check_optional_int(threads, "threads", 1)
    if stages.uses_library_estimator(settings):
        similarity_options(settings.estimator, settings.debiased)   # refuses what is missing
    return seed, threads


def run_demo(out: str, mode: str = "full", seed: int = 0, *, progress: Optional[bool] = None,
             verbose: bool = True, threads: Optional[int] = 1, figures: bool = True,
             summary: bool = True, data_root: Optional[str] = None,
             settings: Optional[DemoSettings] = None) -> Dict[str, Any]:
    """Run the demo and write ``results.json``, ``report.md`` and figures under ``out``.

    Args:
        out: output directory (created); trained weights are cached in ``out/models``.
        mode: ``"full"``, ``"quick"`` or ``"tiny"`` (see :func:`settings_for`).
        seed: sketch seed of every representation, and base of the model seeds (model
            replicate k of task index t has seed ``1000 * seed + 100 * t + k``).
        progress: tqdm bars (default: when stderr is a terminal).
        verbose: step lines on stderr.
        threads: torch CPU threads during the run (restored afterwards); None leaves them.
            One is the default: the small convolutions gain little from more, and on a
            shared machine extra threads mostly wait for each other.
        figures: write the PNG figures (needs matplotlib).
        summary: print the desiderata verdicts and the output paths on stdout.
        data_root: a folder with CIFAR-10, CIFAR-100 and SVHN files (see
            :mod:`nnsim_fast.datasets`): the paper's datasets and ResNet-18 instead of the
            bundled tasks.
        settings: run these settings (see :func:`settings_for` and ``with_overrides``)
            instead of those of ``mode`` and ``data_root``.

    Returns:
        The results dictionary that was written to ``results.json``.
    """
    settings = settings if settings is not None else settings_for(mode, data_root)
    seed, threads = _checked(seed, threads, settings)
    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    bars = sys.stderr.isatty() if progress is None else bool(progress)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        results = _run(out, settings, seed, stages.Log(verbose), bars, figures)
    finally:
        torch.set_num_threads(previous_threads)
    if summary:
        print(format_desiderata(results))
        print(f"wrote {os.path.join(out, 'results.json')}, {os.path.join(out, 'report.md')}"
              + (f" and {len(results['figures'])} figures" if results["figures"] else ""))
    return results

