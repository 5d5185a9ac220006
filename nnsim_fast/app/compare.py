"""``nnsim-fast compare``: layer x layer similarity of your models on your inputs.

Two ways to name the models:

* ``--model pkg.mod:factory --weights a.pt [b.pt ...] [--layers ...]``: one architecture,
  one state_dict per model; every pair of models is compared (one file: the model's own
  layer x layer matrix);
* ``--model-a SPEC [--weights-a FILE] [--layers-a ...] --model-b SPEC [--weights-b FILE]
  [--layers-b ...]``: two models, possibly of different architectures, compared once.

Every input is checked before the first model is built: the output folder, the data file
(before any model module is imported), the weights files, the device and the estimator
options.  By default (CKA of any kernel but ``transport``, no sketch size given) every model
runs over the same shuffled batches in one pass and each pair's CKA comes from exact
within-block kernel entries (:func:`resolve_estimator`); otherwise each model is sketched on
the same inputs with the same sketch (dataset indices travel with the batches).  The results
go to ``similarity.json``, one CSV per pair, a long-form ``similarity.csv`` and PNG heatmaps.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from . import inputs
from ..options import JOINT_KINDS
from .errors import UsageError, one_line
from .scores import Score, effective_options, format_value, score_pair, similarity_options

__all__ = ["ModelJob", "model_jobs", "run_compare"]


@dataclass
class ModelJob:
    """One model to sketch, and the options it came from (for error messages)."""

    label: str
    spec: str
    spec_option: str
    kwargs: Dict[str, Any]
    weights: Optional[str]
    weights_option: str
    layers: Optional[List[str]]
    layers_option: str


def _labels_for(paths: Sequence[str]) -> List[str]:
    stems = [os.path.splitext(os.path.basename(p))[0] or f"model{i}" for i, p in enumerate(paths)]
    if len(set(stems)) == len(stems):
        return stems
    return [f"{i}_{stem}" for i, stem in enumerate(stems)]


def _single_form(args: argparse.Namespace) -> List[ModelJob]:
    if not args.weights:
        raise UsageError("--model needs --weights (one state_dict file per model)")
    kwargs = inputs.factory_kwargs(args.model_kwargs, "--model-kwargs")
    inputs.factory_spec(args.model, "--model")
    return [ModelJob(label, args.model, "--model", kwargs, path, "--weights", args.layers,
                     "--layers") for label, path in zip(_labels_for(args.weights), args.weights)]


def _pair_form(args: argparse.Namespace) -> List[ModelJob]:
    for option in ("weights", "layers", "model_kwargs"):
        if getattr(args, option) is not None:
            flag = "--" + option.replace("_", "-")
            raise UsageError(f"{flag} goes with --model; with --model-a/--model-b use "
                             f"{flag}-a and {flag}-b")
    jobs = []
    for side in ("a", "b"):
        spec = getattr(args, f"model_{side}")
        inputs.factory_spec(spec, f"--model-{side}")
        weights = getattr(args, f"weights_{side}")
        name = (os.path.splitext(os.path.basename(weights))[0] if weights
                else spec.rsplit(":", 1)[-1])
        jobs.append(ModelJob(name, spec, f"--model-{side}",
                             inputs.factory_kwargs(getattr(args, f"model_kwargs_{side}"),
                                                   f"--model-kwargs-{side}"),
                             weights, f"--weights-{side}", getattr(args, f"layers_{side}"),
                             f"--layers-{side}"))
    if jobs[0].label == jobs[1].label:
        for job, side in zip(jobs, "ab"):
            job.label = f"{side}_{job.label}"
    return jobs


_PAIR_OPTIONS = ("model_a", "model_b", "weights_a", "weights_b", "layers_a", "layers_b",
                 "model_kwargs_a", "model_kwargs_b")


def model_jobs(args: argparse.Namespace) -> List[ModelJob]:
    """The models the arguments name, in the single-architecture or the two-model form."""
    pair_given = [name for name in _PAIR_OPTIONS if getattr(args, name) is not None]
    if args.model is not None:
        if pair_given:
            raise UsageError(f"--model and --{pair_given[0].replace('_', '-')} are two ways to "
                             "name the models: use --model with --weights, or --model-a and "
                             "--model-b")
        return _single_form(args)
    if args.model_a is None or args.model_b is None:
        raise UsageError("name the models with --model and --weights, or with both --model-a "
                         "and --model-b")
    return _pair_form(args)


def model_pairs(count: int) -> List[Tuple[int, int]]:
    """Which models to compare: every pair, or a single model with itself."""
    if count == 1:
        return [(0, 0)]
    return [(i, j) for i in range(count) for j in range(i + 1, count)]


# ------------------------------------------------------------------------------ checks

def _device(name: str):
    import torch

    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except Exception as error:  # unknown names, or CUDA absent (torch raises assorted types)
        raise UsageError(f"--device {name!r} is not usable: {one_line(error)}") from None
    return device


@dataclass
class Plan:
    """Everything checked and loaded before the first model is built."""

    jobs: List[ModelJob]
    x: Any
    y: Any
    device: Any
    options: Dict[str, Any]


#: Sketch buckets when ``--m`` is not given and a sketch is made.
DEFAULT_M = 512


def resolve_estimator(args: argparse.Namespace) -> None:
    """Fill in the default estimator: ``joint`` (every model over the same batches, CKA from
    exact within-block kernel entries: the lowest error measured, docs/joint.md) whenever it
    can give what was asked -- CKA of a kind other than ``transport``, no sketch size, no
    centring option -- and otherwise the library's sketch, or for ``transport`` (which has no
    collision-corrected form) the plug-in on data-centred sketches.  ``args.m`` gets its
    default when a sketch is made."""
    if args.estimator is None:
        sketch_asked = args.m is not None or args.psi_buckets is not None
        joint_fits = args.index == "cka" and args.kind in JOINT_KINDS and args.centering is None
        if joint_fits and not sketch_asked:
            args.estimator = "joint"
        else:
            args.estimator = "plugin" if args.kind == "transport" else "sketch"
    if args.estimator != "joint" and args.m is None:
        args.m = DEFAULT_M


def _check_joint(args: argparse.Namespace) -> None:
    if args.estimator != "joint":
        return
    if args.index != "cka":
        raise UsageError("--estimator joint gives CKA only (NBS needs the kernels' spectra): "
                         "drop --index nbs or use another estimator")
    if args.kind not in JOINT_KINDS:
        raise UsageError(f"--estimator joint cannot form the {args.kind} kernel (it needs the "
                         "whole N x N kernel); choose another --kind or estimator")
    given = [option for option, value in (("--m", args.m), ("--psi-buckets", args.psi_buckets))
             if value is not None]
    if given:
        raise UsageError(f"--estimator joint keeps no sketch: drop {' and '.join(given)} or "
                         "choose --estimator sketch")


def plan(args: argparse.Namespace) -> Plan:
    """Check every argument in the order that costs least, and import no user code."""
    jobs = model_jobs(args)
    resolve_estimator(args)
    _check_joint(args)
    options = similarity_options(args.estimator, args.debiased, args.centering)
    inputs.prepare_output_dir(args.out)
    x, y = inputs.load_data(args.data)
    if args.target == "labels" and y is None:
        raise UsageError(f"--target labels needs labels in --data {args.data!r} (a tuple (x, y) "
                         "or a dict with 'y')")
    for job in jobs:
        if job.weights is not None and not os.path.isfile(job.weights):
            raise UsageError(f"{job.weights_option}: no such file {job.weights!r}")
    return Plan(jobs, x, y, _device(args.device), options)


# ------------------------------------------------------------------------------ sketching

def _batches(x, y, batch_size: int) -> List[Any]:
    import torch

    rows = torch.arange(x.shape[0])
    # Dataset indices travel with each batch, so a sample's bucket never depends on batching.
    if y is None:
        return [{"x": x[idx], "index": idx} for idx in rows.split(batch_size)]
    return [(idx, x[idx], y[idx]) for idx in rows.split(batch_size)]


def _built_model(job: ModelJob, build: Callable[[], Any], work: Plan, args):
    from ..extract import resolve_layers

    model = build()
    if job.weights is not None:
        inputs.load_weights(model, job.weights, job.weights_option)
    model.to(work.device)
    try:
        layers = resolve_layers(model, job.layers)
    except ValueError as error:
        raise UsageError(f"{job.layers_option}: {one_line(error)}") from None
    inputs.check_model_runs(model, work.x, work.y, job.label, args.data,
                            labels_needed=args.target == "labels")
    return model, layers


def sketch_job(job: ModelJob, build: Callable[[], Any], work: Plan, args):
    """Build, load and check one model, then sketch it on the data."""
    import torch

    from ..extract import sketch_model

    model, layers = _built_model(job, build, work, args)
    if not args.no_progress:
        source = f" ({job.weights})" if job.weights else ""
        print(f"sketching {job.label}{source} on {work.x.shape[0]} inputs, layers {layers}",
              file=sys.stderr, flush=True)
    # Statistics some kinds need; everything else is the library's default, which also keeps
    # what its default estimator needs.
    extra = {"khatri_rao": {"product": True}, "psi": {"psi": True}}.get(args.kind, {})
    try:
        return sketch_model(model, _batches(work.x, work.y, args.batch_size), layers=layers,
                            m=args.m, psi_buckets=args.psi_buckets, seed=args.seed,
                            beta=args.beta, target=args.target,
                            spatial=args.spatial, dtype=getattr(torch, args.dtype),
                            progress=False if args.no_progress else None, **extra)
    except (RuntimeError, ValueError, TypeError, IndexError, FloatingPointError) as error:
        raise UsageError(f"sketching {job.label} on --data {args.data!r} (inputs "
                         f"{tuple(work.x.shape)}) failed: {type(error).__name__}: "
                         f"{one_line(error)}") from None


def _factories(work: Plan) -> List[Callable[[], Any]]:
    """Each job's model factory; each one is imported once, after every check."""
    factories: Dict[Tuple[str, str], Callable[[], Any]] = {}
    out = []
    for job in work.jobs:
        key = (job.spec, json.dumps(job.kwargs, sort_keys=True, default=str))
        if key not in factories:
            factories[key] = inputs.import_factory(job.spec, job.kwargs, job.spec_option)
        out.append(factories[key])
    return out


def sketch_all(work: Plan, args) -> List[Any]:
    """One representation per model."""
    return [sketch_job(job, build, work, args) for job, build in zip(work.jobs, _factories(work))]


def joint_scores(work: Plan, args) -> List[Score]:
    """``--estimator joint``: every model over the same batches in one pass, in one shuffled
    order (seeded by ``--seed``: the estimator needs batches that are random subsets), and
    each pair of models from the same sums."""
    import torch

    from ..extract.joint import joint_similarities

    built = [_built_model(job, build, work, args)
             for job, build in zip(work.jobs, _factories(work))]
    order = torch.randperm(work.x.shape[0], generator=torch.Generator().manual_seed(args.seed))
    batches = _batches(work.x[order], None if work.y is None else work.y[order], args.batch_size)
    pairs = model_pairs(len(work.jobs))
    if not args.no_progress:
        print(f"comparing {', '.join(job.label for job in work.jobs)} on {work.x.shape[0]} inputs "
              "in one pass", file=sys.stderr, flush=True)
    try:
        results = joint_similarities([model for model, _ in built], batches,
                                     [layers for _, layers in built], pairs, kind=args.kind,
                                     debiased=args.debiased, beta=args.beta, target=args.target,
                                     spatial=args.spatial, dtype=getattr(torch, args.dtype),
                                     progress=False if args.no_progress else None)
    except (RuntimeError, ValueError, TypeError, IndexError, FloatingPointError) as error:
        raise UsageError(f"comparing the models on --data {args.data!r} failed: "
                         f"{type(error).__name__}: {one_line(error)}") from None
    return [Score(result.matrix, result.layers_a, result.layers_b, result.error, [], "joint")
            for result in results]


# ------------------------------------------------------------------------------ outputs

def _safe_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)


def _write_matrix_csv(path: str, corner: str, rows: Sequence[str], cols: Sequence[str],
                      matrix: List[List[float]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([corner] + list(cols))
        for layer, row in zip(rows, matrix):
            writer.writerow([layer] + [f"{v:.6f}" for v in row])


def pair_entry(label_a: str, label_b: str, score: Score, out: str) -> Dict[str, Any]:
    """The JSON record of one pair, with its CSV file(s) written."""
    name = f"{_safe_name(label_a)}__{_safe_name(label_b)}"
    entry: Dict[str, Any] = {"a": label_a, "b": label_b, "layers_a": score.layers_a,
                             "layers_b": score.layers_b, "matrix": score.matrix.tolist(),
                             "file": f"{name}.csv", "estimator": score.estimator}
    corner = f"{label_a} \\ {label_b}"
    _write_matrix_csv(os.path.join(out, entry["file"]), corner, score.layers_a, score.layers_b,
                      entry["matrix"])
    if score.error is not None:
        entry["error"] = score.error.tolist()
        entry["error_file"] = f"{name}_error.csv"
        _write_matrix_csv(os.path.join(out, entry["error_file"]), corner, score.layers_a,
                          score.layers_b, entry["error"])
    if score.warnings:
        entry["warnings"] = list(score.warnings)
    return entry


def _long_rows(pairs: Sequence[Dict[str, Any]]) -> List[List[str]]:
    rows = []
    for entry in pairs:
        for i, layer_a in enumerate(entry["layers_a"]):
            for j, layer_b in enumerate(entry["layers_b"]):
                row = [entry["a"], layer_a, entry["b"], layer_b, f"{entry['matrix'][i][j]:.6f}"]
                if "error" in entry:
                    row.append(f"{entry['error'][i][j]:.6f}")
                rows.append(row)
    return rows


def write_tables(results: Dict[str, Any], out: str) -> None:
    """``similarity.csv`` (one row per layer pair) and ``similarity.json``."""
    header = ["model_a", "layer_a", "model_b", "layer_b", results["index"]]
    if any("error" in entry for entry in results["pairs"]):
        header.append("error")
    with open(os.path.join(out, "similarity.csv"), "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(_long_rows(results["pairs"]))
    with open(os.path.join(out, "similarity.json"), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=1)


def draw_heatmaps(results: Dict[str, Any], out: str) -> List[str]:
    """One PNG heatmap per pair; an absent matplotlib skips them with a warning."""
    from .. import plot

    figures = []
    title = f"{results['index'].upper()} ({results['kind']})"
    try:
        for entry in results["pairs"]:
            name = os.path.splitext(entry["file"])[0] + ".png"
            plot.heatmap(entry["matrix"], entry["layers_a"], entry["layers_b"],
                         title=f"{title}: {entry['a']} vs {entry['b']}", xlabel=entry["b"],
                         ylabel=entry["a"],
                         annotate=max(len(entry["layers_a"]), len(entry["layers_b"])) <= 16,
                         path=os.path.join(out, name))
            figures.append(name)
    except ImportError as error:
        print(f"nnsim-fast compare: warning: heatmaps skipped ({one_line(error)})",
              file=sys.stderr)
    return figures


def format_matrix(rows: Sequence[str], cols: Sequence[str], matrix,
                  error: Optional[Sequence[Sequence[float]]] = None) -> str:
    """A fixed-width table; each cell ``value`` or ``value ± error``."""
    cells = [[format_value(v, None if error is None else error[i][j]) for j, v in enumerate(row)]
             for i, row in enumerate(matrix)]
    width = max([8] + [len(c) + 1 for c in cols] + [len(c) + 1 for row in cells for c in row])
    lead = max(len(r) for r in rows) + 2
    lines = [" " * lead + "".join(f"{c:>{width}}" for c in cols)]
    for name, row in zip(rows, cells):
        lines.append(f"{name:<{lead}}" + "".join(f"{c:>{width}}" for c in row))
    return "\n".join(lines)


def print_summary(results: Dict[str, Any], out: str, figures: Sequence[str]) -> None:
    """The matrices (with error bars when known), layer-matched diagonals, warnings."""
    index = results["index"].upper()
    pairs = results["pairs"]
    for entry in pairs:
        print(f"\n{index} ({results['kind']} kernel, {results['estimator']} estimator), "
              f"rows: {entry['a']}, columns: {entry['b']}")
        print(format_matrix(entry["layers_a"], entry["layers_b"], entry["matrix"],
                            entry.get("error")))
        for warning in entry.get("warnings", []):
            print(f"nnsim-fast compare: warning: {entry['a']} vs {entry['b']}: {warning}",
                  file=sys.stderr)
    if len(results["models"]) > 1 and all(e["layers_a"] == e["layers_b"] for e in pairs):
        print(f"\nlayer-matched {index} (diagonals):")
        diagonal = [[row[k] for k, row in enumerate(e["matrix"])] for e in pairs]
        errors = ([[row[k] for k, row in enumerate(e["error"])] for e in pairs]
                  if all("error" in e for e in pairs) else None)
        print(format_matrix([f"{e['a']} vs {e['b']}" for e in pairs], pairs[0]["layers_a"],
                            diagonal, errors))
    print(f"\nwrote {os.path.join(out, 'similarity.json')}, similarity.csv, "
          f"{len(pairs)} pair CSV file(s)" +
          (f" and {len(figures)} heatmap(s)" if figures else ""))


def _settings(args, work: Plan) -> Dict[str, Any]:
    from ..psi import default_psi_buckets
    sketch = {} if args.estimator == "joint" else {
        "m": args.m, "psi_buckets": args.psi_buckets or default_psi_buckets(args.m)}
    return {"index": args.index, "kind": args.kind, **effective_options(work.options), **sketch,
            "seed": args.seed, "beta": args.beta, "target": args.target,
            "spatial": args.spatial, "n": int(work.x.shape[0]),
            "models": [{"label": job.label, "model": job.spec, "weights": job.weights}
                       for job in work.jobs]}


def _score(reps, jobs: Sequence[ModelJob], i: int, j: int, args, options) -> Score:
    try:
        return score_pair(reps[i], reps[j], args.index, args.kind, options)
    except (RuntimeError, ValueError, TypeError) as error:
        raise UsageError(f"comparing {jobs[i].label} with {jobs[j].label} failed: "
                         f"{type(error).__name__}: {one_line(error)}") from None


def run_compare(args: argparse.Namespace) -> int:
    """The compare command: check, sketch, compare, write, print."""
    work = plan(args)
    if args.estimator == "joint":
        scores = joint_scores(work, args)
    else:
        reps = sketch_all(work, args)
        scores = [_score(reps, work.jobs, i, j, args, work.options)
                  for i, j in model_pairs(len(work.jobs))]
    results = _settings(args, work)
    results["pairs"] = [pair_entry(work.jobs[i].label, work.jobs[j].label, score, args.out)
                        for (i, j), score in zip(model_pairs(len(work.jobs)), scores)]
    write_tables(results, args.out)
    figures = [] if args.no_plots else draw_heatmaps(results, args.out)
    print_summary(results, args.out, figures)
    return 0
