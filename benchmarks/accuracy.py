"""Sketched similarity against the exact value, on real networks.  Writes benchmarks/ACCURACY.md.

    python benchmarks/accuracy.py            # the full run (about 30 minutes on 2 cores)
    python benchmarks/accuracy.py --quick    # tiny sizes (well under a minute); prints the report

Every estimator of :func:`nnsim_fast.similarity` (``"sketch"``, the default, with its standard
errors; ``"plugin"`` with data, bucket or no centring; ``"paper"``, Algorithm 1 with the authors'
bucket centring) is compared, layer pair by layer pair, with the exact index over all N x N
sample pairs in float64 (``estimator="exact"`` on an
:class:`~nnsim_fast.exact.ExactRepresentation`), for CKA, debiased CKA and NBS of the paper's
kernel K = K_f o K_g (``kind="hadamard"``) and of the feature kernel K_f.  CKA is compared on
every layer pair of every model pair; NBS, whose exact value needs eigendecompositions of N x N
kernels, on the same layer of the two trained models.

Networks (four models each: random init, an early checkpoint, two trained from different seeds):

* ``cnn``: the demo's small residual CNN (:class:`~nnsim_fast.models.SmallResNet`, block widths
  16, 16, 32, 32) on 8 x 8 generated shapes (:func:`~nnsim_fast.datasets.render_shapes`);
* ``resnet18``: :func:`~nnsim_fast.models.resnet18_cifar` (the paper's shape at a reduced width)
  on 32 x 32 colour images made from the same generated shapes.

The probed layers and pooling are the library's defaults (the model's direct children, feature
maps flattened).  Features and expected gradients are extracted once per model
(:func:`~nnsim_fast.extract.exact_model`); every sketch is then built by feeding the stored rows
(``iter_rows``) to :meth:`~nnsim_fast.sketch.Representation.update` with the settings
:func:`~nnsim_fast.sketch_model` uses by default, which gives the same sketch as re-running the
model (checked in every run).  All models' layers go into one representation per (m, seed), so
that one call of ``similarity`` gives every layer pair of every model pair; the run checks that
this equals ``similarity(rep_a, rep_b)`` on separately built representations.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import re
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import harness  # first: it finds a checkout's nnsim_fast when none is installed
from nnsim_fast import Representation, cka, estimators, similarity
from nnsim_fast.datasets import render_shapes
from nnsim_fast.exact import MAX_DENSE_N, ExactRepresentation, exact_kernel, exact_similarity
from nnsim_fast.extract import exact_model, sketch_model
from nnsim_fast.models import SmallResNet, TrainConfig, accuracy, resnet18_cifar, train_classifier
from nnsim_fast.psi import default_psi_buckets

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

BETA = 0.5
#: The promise checked here: the default estimate within this of the exact value.
TOLERANCE = 0.03
MODELS = ("init", "early", "trained-s0", "trained-s1")
#: NBS is compared on the two trained models only: each exact NBS needs N x N
#: eigendecompositions and an SVD per model pair and layer (seconds each at N = 2,000).
NBS_MODELS = ("trained-s0", "trained-s1")
KIND_LABELS = {"hadamard": "K_f∘K_g", "feature": "K_f"}
DEFAULT_KEY = "cka|hadamard|sketch"
#: Rows held in RAM by each merged exact representation; the rest goes to a temporary file.
EXACT_RAM_BYTES = 4 << 30


# --------------------------------------------------------------------------- what is measured

@dataclasses.dataclass(frozen=True)
class Variant:
    """One way of calling ``similarity`` on sketches: kind, index and estimator (with centring)."""

    kind: str
    index: str
    debiased: bool
    estimator: str
    centering: Optional[str] = None

    @property
    def key(self) -> str:
        where = self.estimator + (f"/{self.centering}" if self.centering else "")
        return f"{self.index}{'-debiased' if self.debiased else ''}|{self.kind}|{where}"

    @property
    def target(self) -> str:
        """The exact quantity the estimate is judged against: the data-centred index."""
        return exact_key(self.index, self.kind, "debiased" if self.debiased else "centred")

    @property
    def uncentred_target(self) -> Optional[str]:
        """The uncentred index, what bucket or no centring tends to, as a second reference (CKA
        only: an exact NBS costs eigendecompositions of N x N kernels)."""
        if self.centering in ("none", "buckets") and not self.debiased and self.index == "cka":
            return exact_key(self.index, self.kind, "uncentred")
        return None


def exact_key(index: str, kind: str, centring: str) -> str:
    return f"{index}|{kind}|{centring}"


DEFAULT = Variant("hadamard", "cka", False, "sketch")
ESTIMATORS = (("sketch", None), ("plugin", "data"), ("plugin", "none"), ("paper", "buckets"))
#: Debiased CKA: U-centring removes any row/column constant, so bucket and no centring give
#: one number; the plug-in with data-centred factors differs (for hadamard) and is kept.
DEBIASED_ESTIMATORS = (("sketch", None), ("plugin", "data"), ("paper", "buckets"))
NBS_ESTIMATORS = DEBIASED_ESTIMATORS


def contrast_variants(feature: bool) -> List[Variant]:
    out = [Variant("hadamard", "cka", False, "paper", "buckets"),
           Variant("hadamard", "cka", False, "plugin", "data")]
    if feature:
        out += [Variant("feature", "cka", False, "sketch"),
                Variant("feature", "cka", False, "paper", "buckets")]
    return out


def full_variants() -> List[Variant]:
    out = []
    for kind in ("hadamard", "feature"):
        out += [Variant(kind, "cka", False, e, c) for e, c in ESTIMATORS]
        out += [Variant(kind, "cka", True, e, c) for e, c in DEBIASED_ESTIMATORS]
    return out


def nbs_variants() -> List[Variant]:
    return [Variant(kind, "nbs", False, e, c) for kind in ("hadamard", "feature")
            for e, c in NBS_ESTIMATORS]


@dataclasses.dataclass(frozen=True)
class SizePlan:
    """Sketch sizes and seeds at one N, and which estimators run at which m."""

    n: int
    m: Tuple[int, ...]
    seeds: Tuple[int, ...]
    contrast_m: Tuple[int, ...] = ()
    full_m: Tuple[int, ...] = ()
    nbs_m: Tuple[int, ...] = ()
    feature_contrast: bool = True
    seed_counts: Tuple[Tuple[int, int], ...] = ()    # (m, seeds): fewer seeds, to bound the run time

    def seeds_at(self, m: int) -> Tuple[int, ...]:
        return self.seeds[:dict(self.seed_counts).get(m, len(self.seeds))]

    def variants(self, m: int) -> List[Variant]:
        out = [DEFAULT]
        if m in self.contrast_m or m in self.full_m:
            out += contrast_variants(self.feature_contrast or m in self.full_m)
        if m in self.full_m:
            out += full_variants()
        if m in self.nbs_m:
            out += nbs_variants()
        unique: Dict[str, Variant] = {}
        for variant in out:
            unique.setdefault(variant.key, variant)
        return list(unique.values())

    def exact_targets(self) -> List[str]:
        keys: Dict[str, None] = {}
        for m in self.m:
            for variant in self.variants(m):
                keys[variant.target] = None
                # The uncentred reference costs a whole exact pass: only where every estimator runs.
                if variant.uncentred_target and m in self.full_m:
                    keys[variant.uncentred_target] = None
        return list(keys)


@dataclasses.dataclass(frozen=True)
class Network:
    """A network family: how its models are built and trained, and its input images."""

    name: str
    title: str
    build: Callable[[], nn.Module]
    images: Callable[[np.ndarray, int], torch.Tensor]
    train: TrainConfig
    early_epochs: int
    n_train: int


@dataclasses.dataclass(frozen=True)
class Plan:
    networks: Tuple[Network, ...]
    sizes: Tuple[SizePlan, ...]
    target_m: int
    batch: int
    n_test: int
    quick: bool


# --------------------------------------------------------------------------- data and models

def shape_labels(n: int, seed: int) -> np.ndarray:
    """Balanced labels of the ten shape classes, in a seeded random order."""
    return np.random.default_rng(seed).permutation(np.arange(n) % 10)


def small_images(labels: np.ndarray, seed: int) -> torch.Tensor:
    """The demo's 8 x 8 grey shapes, ``[N, 1, 8, 8]``."""
    return torch.from_numpy(render_shapes(labels, seed)).unsqueeze(1)


def colour_images(labels: np.ndarray, seed: int) -> torch.Tensor:
    """32 x 32 colour images ``[N, 3, 32, 32]`` in [0, 1]: the shapes upsampled, tinted with a
    random colour per image, plus pixel noise (so that no two channels are copies)."""
    base = torch.from_numpy(render_shapes(labels, seed)).unsqueeze(1)
    big = F.interpolate(base, size=32, mode="bilinear", align_corners=False)
    generator = torch.Generator().manual_seed(seed + 1)
    colour = 0.4 + 0.6 * torch.rand(len(labels), 3, 1, 1, generator=generator)
    noise = 0.05 * torch.randn(len(labels), 3, 32, 32, generator=generator)
    return (big * colour + noise).clamp(0.0, 1.0)


def networks(quick: bool, width: int) -> Tuple[Network, ...]:
    config = TrainConfig(epochs=2 if quick else 6, batch_size=64, lr=3e-3, weight_decay=1e-4)
    channels = (4, 4, 8, 8) if quick else (16, 16, 32, 32)
    cnn = Network("cnn", f"SmallResNet {channels} on 8x8 shapes",
                  lambda: SmallResNet(10, channels=channels, in_channels=1), small_images,
                  dataclasses.replace(config, channels=channels), 1 if quick else 2, 256 if quick else 1400)
    resnet = Network("resnet18", f"ResNet-18 (width {width}) on 32x32 images",
                     lambda: resnet18_cifar(10, width=width), colour_images,
                     dataclasses.replace(config, epochs=2 if quick else 4, channels=()), 1,
                     128 if quick else 2000)
    return cnn, resnet


def make_plan(quick: bool, width: int) -> Plan:
    if quick:
        sizes = (SizePlan(128, (32, 64), (0, 1, 2), contrast_m=(32, 64), full_m=(64,), nbs_m=(64,)),
                 SizePlan(256, (64,), (0, 1, 2), contrast_m=(64,), feature_contrast=False))
        return Plan(networks(True, 2), sizes, 64, 64, 256, True)
    # The default estimator reads the psi halves, at default_psi_buckets(m) buckets: 512, 1024,
    # 2048 for m = 128, 256, 512 (and 2048 again above), so larger m would repeat m = 512's sketch.
    sizes = (SizePlan(2000, (128, 256, 512), (0, 1, 2), contrast_m=(128, 256, 512), full_m=(512,),
                      nbs_m=(512,)),
             SizePlan(10000, (512,), (0, 1, 2), contrast_m=(512,), feature_contrast=False))
    return Plan(networks(False, width), sizes, 512, 500, 1000, False)


def train_models(network: Network, log) -> Tuple[Dict[str, nn.Module], Dict[str, object]]:
    """The four models of a network and their test accuracies."""
    x = network.images(shape_labels(network.n_train, 11), 12)
    y = torch.from_numpy(shape_labels(network.n_train, 11))
    x_test = network.images(shape_labels(1000, 21), 22)
    y_test = torch.from_numpy(shape_labels(1000, 21))
    recipes = {"init": (0, 0), "early": (0, network.early_epochs),
               "trained-s0": (0, network.train.epochs), "trained-s1": (1, network.train.epochs)}
    models, info = {}, {}
    for name, (seed, epochs) in recipes.items():
        torch.manual_seed(seed)
        model = network.build()
        start = time.perf_counter()
        if epochs:
            train_classifier(model, x, y, dataclasses.replace(network.train, epochs=epochs), seed)
        model.eval()
        models[name] = model
        info[name] = {"seed": seed, "epochs": epochs, "test_accuracy": accuracy(model, x_test, y_test),
                      "train_seconds": round(time.perf_counter() - start, 1)}
        log(f"  {network.name} {name}: {epochs} epochs, test accuracy "
            f"{info[name]['test_accuracy']:.3f}")
    return models, info


def evaluation_batches(network: Network, n: int, batch: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    labels = shape_labels(n, 31)
    x, y = network.images(labels, 32), torch.from_numpy(labels)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


# --------------------------------------------------------------------------- representations

def merged_name(model: str, layer: str) -> str:
    return f"{model}:{layer}"


def merge_exact(reps: Dict[str, ExactRepresentation], n: int, batch: int) -> ExactRepresentation:
    """One exact representation holding the first ``n`` rows of every model's layers, so that
    one exact pass computes every layer pair of every model pair."""
    keys = [(model, layer) for model, rep in reps.items() for layer in rep.layer_names]
    merged = ExactRepresentation(max_rows=n, ram_bytes=EXACT_RAM_BYTES)
    streams = [reps[model].iter_rows(layer, batch) for model, layer in keys]
    for parts in itertools.islice(zip(*streams), n // batch):
        merged.update({merged_name(*key): part[1] for key, part in zip(keys, parts)},
                      {merged_name(*key): part[2] for key, part in zip(keys, parts)})
    return merged


def sketch_rows(exact: ExactRepresentation, m: int, seed: int, batch: int,
                layers: Optional[Sequence[str]] = None,
                rename: Callable[[str], str] = str) -> Representation:
    """A sketched representation fed with the stored rows, with ``sketch_model``'s defaults
    (float32 accumulators, sparsity 1, psi halves on)."""
    names = list(layers or exact.layer_names)
    rep = Representation(m, seed, beta=BETA)
    for parts in zip(*(exact.iter_rows(name, batch) for name in names)):
        rep.update({rename(name): part[1] for name, part in zip(names, parts)},
                   {rename(name): part[2] for name, part in zip(names, parts)})
    return rep


def sketch_model_agreement(model: nn.Module, exact: ExactRepresentation,
                           batches: Sequence, batch: int) -> float:
    """Largest relative difference between the kernels of ``sketch_model`` run on the model and
    of the stored rows fed to ``Representation.update`` (first batch, m = 64)."""
    direct = sketch_model(model, batches, m=64, seed=0, max_batches=1, progress=False)
    fed = Representation(64, 0, beta=BETA)
    names = exact.layer_names
    first = [next(exact.iter_rows(name, batch)) for name in names]
    fed.update({n: p[1] for n, p in zip(names, first)}, {n: p[2] for n, p in zip(names, first)})
    worst = 0.0
    for kind in ("feature", "psi"):
        a, b = direct.kernels(names, kind=kind), fed.kernels(names, kind=kind)
        worst = max(worst, float((a - b).norm() / b.norm()))
    return worst


# --------------------------------------------------------------------------- estimates

def quiet_similarity(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return similarity(*args, **kwargs)


def nbs_pairs(layers: Sequence[str]) -> List[Tuple[List[str], List[str]]]:
    """Per layer, the ``layers=`` argument comparing it in the two :data:`NBS_MODELS` (one entry
    each: a larger table would add eigendecompositions for entries not used)."""
    a, b = NBS_MODELS
    return [([merged_name(a, layer)], [merged_name(b, layer)]) for layer in layers]


def estimate(rep, variant: Variant, pairs: Sequence) -> Dict[str, object]:
    """One variant on one merged representation: CKA for every layer pair ``[RL, RL]``; NBS for
    the layers of ``pairs`` (``[L]``; each costs eigendecompositions of m x m matrices)."""
    options = dict(kind=variant.kind, debiased=variant.debiased)
    if variant.estimator != "exact":
        options.update(estimator=variant.estimator, centering=variant.centering)
    if variant.index == "cka":
        result = quiet_similarity(rep, rep, "cka", **options)
        error = None if result.error is None else result.error.numpy()
        return {"value": result.matrix.numpy(), "error": error, "warnings": result.warnings}
    values = [float(quiet_similarity(rep, rep, "nbs", layers=pair, **options).matrix[0, 0])
              for pair in pairs]
    return {"value": np.array(values), "error": None, "warnings": []}


def exact_values(merged: ExactRepresentation, key: str, pairs: Sequence) -> np.ndarray:
    index, kind, centring = key.split("|")
    if index == "cka":
        matrix, _, _ = exact_similarity(merged, merged, "cka", kind, debiased=centring == "debiased",
                                        centered=centring != "uncentred")
        return matrix.numpy()
    return np.array([float(exact_similarity(merged, merged, "nbs", kind, layers=pair,
                                            centered=centring != "uncentred")[0][0, 0])
                     for pair in pairs])


def dense_check(merged: ExactRepresentation, exact: np.ndarray, layers: Sequence[str]
                ) -> Optional[Dict[str, object]]:
    """The exact CKA of K_f o K_g (streamed sums, centred afterwards) against the CKA of the dense
    N x N kernels centred explicitly, on the same layer of the two trained models.  Centring a
    sum of products loses the digits that a kernel's mean takes: this says how many."""
    if merged.n > MAX_DENSE_N:
        return None
    names = merged.layer_names
    diffs = {}
    for layer in layers:
        a, b = (merged_name(model, layer) for model in NBS_MODELS)
        dense = cka(exact_kernel(merged, a, "hadamard"), exact_kernel(merged, b, "hadamard"), centered=False)
        diffs[layer] = abs(dense - float(exact[names.index(a), names.index(b)]))
    return {"models": list(NBS_MODELS), "max_abs_diff": max(diffs.values()), "by_layer": diffs}


def effective_ranks(rep: Representation, names: Sequence[str]) -> Dict[str, Dict[str, float]]:
    out = {}
    for kind in ("hadamard", "feature"):
        ranks = estimators.effective_rank(rep.grams(list(names), kind))
        out[kind] = {name: round(float(r), 1) for name, r in zip(names, ranks)}
    return out


# --------------------------------------------------------------------------- error statistics

def model_pairs(count: int) -> List[Tuple[int, int]]:
    return [(i, j) for i in range(count) for j in range(i + 1, count)]


def blocks(matrix: np.ndarray, count: int, layers: int) -> np.ndarray:
    """``[..., RL, RL]`` -> ``[..., P, L, L]``: the layer x layer block of each model pair."""
    return np.stack([matrix[..., i * layers:(i + 1) * layers, j * layers:(j + 1) * layers]
                     for i, j in model_pairs(count)], axis=-3)


def matched(values: np.ndarray, count: int, layers: int) -> np.ndarray:
    """``[..., P, L]``: each model pair's CKA at the same layer, from ``[..., RL, RL]``."""
    return np.diagonal(blocks(values, count, layers), axis1=-2, axis2=-1)


def order_agreement(exact: np.ndarray, estimates: np.ndarray, layer_names: Sequence[str]
                    ) -> Dict[str, object]:
    """Do the estimates rank the model pairs as the exact values do, layer by layer?

    ``exact`` ``[P, L]``, ``estimates`` ``[S, P, L]``.  A flip is two model pairs in the other
    order; ``largest_flipped_gap`` is the largest exact difference of a flipped couple (a flip
    of two nearly equal exact values means little)."""
    flips, gaps, taus = [], [], []
    couples = list(itertools.combinations(range(exact.shape[0]), 2))
    for layer in range(exact.shape[1]):
        for seed in range(estimates.shape[0]):
            d_exact = np.array([exact[p, layer] - exact[q, layer] for p, q in couples])
            d_est = np.array([estimates[seed, p, layer] - estimates[seed, q, layer] for p, q in couples])
            flipped = d_exact * d_est < 0
            decided = (d_exact != 0) & (d_est != 0)
            taus.append(float((np.sign(d_exact * d_est)[decided]).mean()) if decided.any() else 1.0)
            for couple in np.flatnonzero(flipped):
                flips.append({"layer": layer_names[layer], "seed": seed})
                gaps.append(float(abs(d_exact[couple])))
    return {"preserved": not flips, "flips": len(flips),
            "flipped_layers": sorted({flip["layer"] for flip in flips}),
            "largest_flipped_gap": max(gaps) if gaps else 0.0,
            "preserved_beyond_tolerance": all(gap <= TOLERANCE for gap in gaps),
            "min_kendall_tau": min(taus), "couples": len(couples) * exact.shape[1] * estimates.shape[0]}


def error_summary(errors: np.ndarray) -> Dict[str, object]:
    """``errors`` ``[S, P, ...]`` (seeds, model pairs, layer pairs): signed and absolute errors."""
    mean = errors.mean(axis=0)
    out = {"bias": float(errors.mean()), "rms_bias": float(np.sqrt((mean ** 2).mean())),
           "max_abs_bias": float(np.abs(mean).max()),
           "max_abs": float(np.abs(errors).max()), "rmse": float(np.sqrt((errors ** 2).mean())),
           "max_abs_by_seed": [float(v) for v in np.abs(errors).reshape(errors.shape[0], -1).max(1)],
           "max_abs_by_model_pair": [float(v) for v in
                                     np.abs(errors).swapaxes(0, 1).reshape(errors.shape[1], -1).max(1)]}
    out["sd"] = float(np.sqrt(errors.var(axis=0, ddof=1).mean())) if errors.shape[0] > 1 else None
    return out


def coverage(errors: np.ndarray, stderr: np.ndarray) -> Dict[str, object]:
    """How often the reported standard error covers the actual error.  Entries with an infinite
    stderr (the estimator declines: an estimated self-HSIC <= 0) are counted apart."""
    finite = np.isfinite(stderr)
    within = {k: float((np.abs(errors[finite]) <= k * stderr[finite]).mean()) if finite.any() else None
              for k in (2, 3)}
    return {"within_2se": within[2], "within_3se": within[3], "infinite_se": int((~finite).sum()),
            "entries": int(finite.size),
            "median_se": float(np.median(stderr[finite])) if finite.any() else None,
            "max_se": float(stderr[finite].max()) if finite.any() else None}


def summarise(variant: Variant, runs: List[Dict[str, object]], exact: Dict[str, np.ndarray],
              count: int, layer_names: Sequence[str]) -> Dict[str, object]:
    """Statistics of one variant at one (N, m) over its seeds, against the exact values.

    CKA: every layer pair of every pair of the ``count`` models; NBS: matched layers of the
    :data:`NBS_MODELS` pair (one model pair, so no order to compare)."""
    layers = len(layer_names)
    values = np.stack([run["value"] for run in runs])
    if variant.index == "nbs":
        def pick(v):
            return v[..., None, :]                          # [..., L] -> one model pair
    else:
        def pick(v):
            return blocks(v, count, layers)
    errors = pick(values) - pick(exact[variant.target])
    out = {"target": variant.target, "seeds": len(runs), "vs_target": error_summary(errors),
           "order": None if variant.index == "nbs" else order_agreement(
               matched(exact[variant.target], count, layers), matched(values, count, layers),
               layer_names)}
    if variant.uncentred_target in exact:
        out["vs_uncentred"] = error_summary(pick(values) - pick(exact[variant.uncentred_target]))
    if runs[0]["error"] is not None:
        out["coverage"] = coverage(errors, pick(np.stack([run["error"] for run in runs])))
    return out


def worst_pairs(runs: List[Dict[str, object]], exact: np.ndarray, names: Sequence[str],
                ranks: Dict[str, float], count: int, limit: int = 8) -> List[Dict[str, object]]:
    """The layer pairs (across models) with the largest error of a CKA estimate."""
    values = np.stack([run["value"] for run in runs])
    stderr = None if runs[0]["error"] is None else np.stack([run["error"] for run in runs])
    layers = len(names) // count
    rows = []
    for i, j in model_pairs(count):
        for a, b in itertools.product(range(layers), repeat=2):
            u, v = i * layers + a, j * layers + b
            rows.append({"a": names[u], "b": names[v], "exact": float(exact[u, v]),
                         "mean_estimate": float(values[:, u, v].mean()),
                         "max_abs_error": float(np.abs(values[:, u, v] - exact[u, v]).max()),
                         "mean_stderr": None if stderr is None else float(stderr[:, u, v].mean()),
                         "rank_a": ranks.get(names[u]), "rank_b": ranks.get(names[v])})
    rows.sort(key=lambda row: -row["max_abs_error"])
    return rows[:limit]


def default_analysis(runs: List[Dict[str, object]], exact: np.ndarray, names: Sequence[str],
                     count: int) -> Dict[str, object]:
    """Why the default estimate misses TOLERANCE where it does: noise or bias, whether its own
    error bars (and the library's resolution warning) saw it, and which layers are involved."""
    layers = len(names) // count
    values = blocks(np.stack([run["value"] for run in runs]), count, layers)
    stderr = blocks(np.stack([run["error"] for run in runs]), count, layers)
    errors = values - blocks(exact, count, layers)
    flagged = ~(stderr <= estimators.RESOLUTION_TOLERANCE)
    missed = np.abs(errors) > TOLERANCE
    involved: Dict[str, int] = {}
    for _, p, a, b in zip(*np.nonzero(missed)):
        i, j = model_pairs(count)[p]
        for name in {names[i * layers + a].split(":", 1)[1], names[j * layers + b].split(":", 1)[1]}:
            involved[name] = involved.get(name, 0) + 1
    z = np.abs(errors)[np.isfinite(stderr) & (stderr > 0)] / stderr[np.isfinite(stderr) & (stderr > 0)]
    return {"entries": int(errors.size), "missed": int(missed.sum()),
            "missed_flagged": int((missed & flagged).sum()),
            "flagged": int(flagged.sum()), "resolution_tolerance": estimators.RESOLUTION_TOLERANCE,
            "max_abs_unflagged": float(np.abs(errors[~flagged]).max()) if (~flagged).any() else None,
            "max_z": float(z.max()) if z.size else None,
            "layers_in_misses": dict(sorted(involved.items(), key=lambda item: -item[1]))}


# --------------------------------------------------------------------------- one network, one N

class Log:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.start:7.1f} s] {message}", file=sys.stderr, flush=True)


def rounded(array: np.ndarray, digits: int = 6) -> list:
    """Rows of a matrix for the JSON; a non-finite value (an infinite stderr) becomes null."""
    return [[float(f"{v:.{digits}g}") if math.isfinite(v) else None for v in row]
            for row in np.asarray(array, dtype=np.float64)]


def exact_stage(merged: ExactRepresentation, size: SizePlan, groups, log) -> Tuple[Dict, Dict]:
    exact, seconds = {}, {}
    for key in size.exact_targets():
        start = time.perf_counter()
        exact[key] = exact_values(merged, key, groups)
        seconds[key] = round(time.perf_counter() - start, 1)
        log(f"    exact {key}: {seconds[key]} s")
    return exact, seconds


def sketch_stage(merged: ExactRepresentation, size: SizePlan, plan: Plan, groups, log
                 ) -> Tuple[Dict[Tuple[str, int], List[Dict]], Dict[str, Dict], float]:
    runs: Dict[Tuple[str, int], List[Dict]] = {}
    ranks: Dict[str, Dict] = {}
    seconds = 0.0
    for m in size.m:
        variants = size.variants(m)
        for seed in size.seeds_at(m):
            start = time.perf_counter()
            rep = sketch_rows(merged, m, seed, plan.batch)
            built = time.perf_counter() - start
            for variant in variants:
                runs.setdefault((variant.key, m), []).append(estimate(rep, variant, groups))
            if m == plan.target_m and seed == size.seeds[0]:
                ranks = effective_ranks(rep, merged.layer_names)
            seconds += time.perf_counter() - start
            log(f"    m={m} seed={seed}: sketch {built:.1f} s, {len(variants)} estimators "
                f"{time.perf_counter() - start - built:.1f} s")
    return runs, ranks, seconds


def separate_check(merged: ExactRepresentation, models: Sequence[str], layers: Sequence[str],
                   runs: Dict, plan: Plan, size: SizePlan) -> Optional[float]:
    """``similarity(rep_a, rep_b)`` of two separately sketched models against the merged run's
    block (the same numbers, or the merged shortcut would not stand for the user's call)."""
    if plan.target_m not in size.m:
        return None
    a, b = models[-2], models[-1]
    seed = size.seeds[0]
    reps = [sketch_rows(merged, plan.target_m, seed, plan.batch,
                        layers=[merged_name(model, layer) for layer in layers],
                        rename=lambda name: name.split(":", 1)[1]) for model in (a, b)]
    separate = quiet_similarity(reps[0], reps[1]).matrix.numpy()
    count = len(layers)
    block = runs[(DEFAULT_KEY, plan.target_m)][0]["value"]
    i, j = models.index(a), models.index(b)
    block = block[i * count:(i + 1) * count, j * count:(j + 1) * count]
    return float(np.abs(separate - block).max())


def evaluate_size(merged: ExactRepresentation, size: SizePlan, plan: Plan, models: Sequence[str],
                  layers: Sequence[str], log) -> Dict[str, object]:
    groups = nbs_pairs(layers)
    log(f"  N = {size.n}: exact indices")
    exact, exact_seconds = exact_stage(merged, size, groups, log)
    start = time.perf_counter()
    check = dense_check(merged, exact[DEFAULT.target], layers)
    log(f"  N = {size.n}: dense-kernel check of the exact values {time.perf_counter() - start:.1f} s")
    log(f"  N = {size.n}: sketches")
    runs, ranks, sketch_seconds = sketch_stage(merged, size, plan, groups, log)
    names = merged.layer_names
    variants = {variant.key: variant for m in size.m for variant in size.variants(m)}
    results: Dict[str, Dict[str, object]] = {}
    for (key, m), seed_runs in runs.items():
        results.setdefault(key, {})[str(m)] = summarise(variants[key], seed_runs, exact, len(models),
                                                        layers)
    out = {"n": size.n, "m": list(size.m), "seeds": {str(m): list(size.seeds_at(m)) for m in size.m},
           "psi_buckets": {str(m): default_psi_buckets(m) for m in size.m},
           "names": names, "exact": {key: rounded(value.reshape(-1, value.shape[-1]))
                                     for key, value in exact.items()},
           "exact_seconds": exact_seconds, "sketch_seconds": round(sketch_seconds, 1),
           "variants": {key: dataclasses.asdict(variant) for key, variant in variants.items()},
           "results": results, "effective_rank": ranks,
           "effective_rank_m": plan.target_m if plan.target_m in size.m else None,
           "separate_vs_merged": separate_check(merged, models, layers, runs, plan, size),
           "exact_dense_check": check}
    if (DEFAULT_KEY, plan.target_m) in runs:
        target_runs = runs[(DEFAULT_KEY, plan.target_m)]
        out["default_raw"] = {"m": plan.target_m,
                              "estimate": [rounded(run["value"]) for run in target_runs],
                              "stderr": [rounded(run["error"]) for run in target_runs],
                              "warnings": target_runs[0]["warnings"]}
        out["default_analysis"] = default_analysis(target_runs, exact[DEFAULT.target], names, len(models))
    out["worst_pairs"] = {key: worst_pairs(seed_runs, exact[variants[key].target], names,
                                           ranks.get(variants[key].kind, {}), len(models))
                          for (key, m), seed_runs in runs.items()
                          if m == plan.target_m and variants[key].index == "cka"}
    return out


def run_network(network: Network, plan: Plan, log) -> Dict[str, object]:
    log(f"{network.name}: training")
    models, info = train_models(network, log)
    n_max = max(size.n for size in plan.sizes)
    batches = evaluation_batches(network, n_max, plan.batch)
    log(f"{network.name}: extracting features and gradients of {n_max} inputs")
    start = time.perf_counter()
    reps = {name: exact_model(model, batches, progress=False) for name, model in models.items()}
    extract_seconds = time.perf_counter() - start
    layers = reps["init"].layer_names
    agreement = sketch_model_agreement(models["trained-s0"], reps["trained-s0"], batches, plan.batch)
    widths = {layer: list(reps["init"].widths(layer)) for layer in layers}
    merged = {size.n: merge_exact(reps, size.n, plan.batch) for size in plan.sizes}
    for rep in reps.values():
        rep.close()
    out = {"title": network.title, "models": info, "layers": layers, "widths": widths,
           "train": dataclasses.asdict(network.train), "n_train": network.n_train,
           "extract_seconds": round(extract_seconds, 1), "sketch_model_agreement": agreement,
           "sizes": {}}
    for size in plan.sizes:
        try:
            out["sizes"][str(size.n)] = evaluate_size(merged[size.n], size, plan, list(MODELS), layers,
                                                      log)
        finally:
            merged[size.n].close()
    return out


# --------------------------------------------------------------------------- the whole run

def verdict(results: Dict[str, object]) -> Dict[str, object]:
    """The target: the default estimate within TOLERANCE of exact at target m on every layer pair
    of every model pair, and the model pairs in the exact order at every layer.  Order: no two
    model pairs whose exact values differ by more than TOLERANCE swapped; closer couples are
    ties at the target's accuracy (their flips are counted and shown, with their largest gap)."""
    m = str(results["target_m"])
    rows, met = [], True
    for name, network in results["networks"].items():
        for n, size in network["sizes"].items():
            entry = size["results"].get(DEFAULT_KEY, {}).get(m)
            if entry is None:
                continue
            within = entry["vs_target"]["max_abs"] <= TOLERANCE
            ordered = entry["order"]["preserved_beyond_tolerance"]
            met = met and within and ordered
            rows.append({"network": name, "n": int(n), "max_abs": entry["vs_target"]["max_abs"],
                         "within": within, "order_preserved": ordered,
                         "strict_flips": entry["order"]["flips"],
                         "largest_flipped_gap": entry["order"]["largest_flipped_gap"]})
    return {"m": int(m), "tolerance": TOLERANCE, "met": met and bool(rows), "rows": rows}


def plan_summary(plan: Plan) -> Dict[str, object]:
    return {"batch": plan.batch, "target_m": plan.target_m, "models": list(MODELS),
            "sizes": [{**dataclasses.asdict(size),
                       "variants": {str(m): [v.key for v in size.variants(m)] for m in size.m},
                       "exact_targets": size.exact_targets()} for size in plan.sizes]}


def run(plan: Plan, command: str) -> Dict[str, object]:
    log = Log()
    torch.manual_seed(0)
    results: Dict[str, object] = {"command": command, "quick": plan.quick, "host": harness.host_info(),
                                  "beta": BETA, "tolerance": TOLERANCE, "target_m": plan.target_m,
                                  "plan": plan_summary(plan), "networks": {}}
    for network in plan.networks:
        results["networks"][network.name] = run_network(network, plan, log)
    results["verdict"] = verdict(results)
    results["seconds"] = round(time.perf_counter() - log.start, 1)
    log(f"done: target {'met' if results['verdict']['met'] else 'NOT met'}")
    return results


# --------------------------------------------------------------------------- report

def fmt(value: Optional[float], digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    return [line(header), "|" + "|".join("---" for _ in header) + "|"] + [line(row) for row in rows]


def label(key: str) -> str:
    """``cka-debiased|hadamard|plugin/data`` -> ``debiased CKA, K_f∘K_g, plugin/data``."""
    index, kind, estimator = key.split("|")
    name = "debiased CKA" if index == "cka-debiased" else index.upper()
    return f"{name}, {KIND_LABELS[kind]}, {estimator}"


def pair_labels(results: Dict[str, object]) -> List[str]:
    models = results["plan"]["models"]
    return [f"{models[i]} vs {models[j]}" for i, j in model_pairs(len(models))]


def yes(flag: bool) -> str:
    return "yes" if flag else "**no**"


def headline_rows(results: Dict[str, object]) -> List[List[str]]:
    """Per network, N and model pair: max |error| over layer pairs and seeds at the target m."""
    m = str(results["target_m"])
    contrast = ("cka|hadamard|paper/buckets", "cka|hadamard|plugin/data")
    rows = []
    for name, network in results["networks"].items():
        for n, size in network["sizes"].items():
            res = size["results"]
            if m not in res.get(DEFAULT_KEY, {}):
                continue
            default = res[DEFAULT_KEY][m]["vs_target"]["max_abs_by_model_pair"]
            others = [res.get(key, {}).get(m) for key in contrast]
            for p, label in enumerate(pair_labels(results)):
                rows.append([name, n, label, fmt(default[p]), yes(default[p] <= TOLERANCE)]
                            + [fmt(o["vs_target"]["max_abs_by_model_pair"][p]) if o else "–"
                               for o in others])
    return rows


def order_rows(results: Dict[str, object]) -> List[List[str]]:
    m = str(results["target_m"])
    keys = (DEFAULT_KEY, "cka|hadamard|paper/buckets", "cka|hadamard|plugin/data")
    rows = []
    for name, network in results["networks"].items():
        for n, size in network["sizes"].items():
            cells = [name, n]
            for key in keys:
                entry = size["results"].get(key, {}).get(m)
                if entry is None:
                    cells.append("–")
                    continue
                order = entry["order"]
                flips = f"{order['flips']} flip" + ("" if order["flips"] == 1 else "s")
                cells.append(f"{yes(order['preserved'])} / {yes(order['preserved_beyond_tolerance'])} "
                             f"({flips}, largest exact gap {fmt(order['largest_flipped_gap'])})")
            rows.append(cells)
    return rows


def target_section(results: Dict[str, object]) -> List[str]:
    v = results["verdict"]
    m = v["m"]
    lines = [f"## Target: `similarity(rep_a, rep_b)` within {v['tolerance']} of exact at m = {m}",
             "",
             f"The representations are `sketch_model`'s default at m = {m}: the m × d sketches of "
             f"features and gradients at m = {m} buckets, the two psi halves that the default "
             f"estimator reads at `psi_buckets` = {default_psi_buckets(m)} (docs/estimators.md, "
             "section 6).", "",
             f"**Verdict: {'met' if v['met'] else 'NOT met'}.** Default estimator (`estimator=\"sketch\"`, "
             f"`kind=\"hadamard\"`, `index=\"cka\"`): largest |estimate − exact| over every layer pair "
             f"(each layer of one model against each layer of the other) and every sketch seed, per "
             f"model pair; the paper's estimator and the data-centred plug-in for contrast.", ""]
    lines += table(["network", "N", "model pair", "default max |err|", f"≤ {v['tolerance']}",
                    "paper (buckets) max |err|", "plugin (data) max |err|"], headline_rows(results))
    lines += ["", "Order of the six model pairs, ranked by CKA at each layer (the same layer in both "
              "models), compared with their exact order, over all layers and seeds. Cell: strictly "
              f"preserved / preserved for every couple whose exact values differ by more than "
              f"{v['tolerance']} (the verdict's criterion: closer couples are ties at the target's "
              "accuracy), with the number of flips and the largest exact gap of a flipped couple:", ""]
    lines += table(["network", "N", "default: order", "paper (buckets)", "plugin (data)"],
                   order_rows(results))
    lines += ["", "The verdict is a statement about the seeds of this run: the sketch's error is random, "
              "and its tail on low-rank layers is the floor of any sketch of the sample axis "
              "(docs/estimators.md, section 6), so more seeds find larger values; "
              "`benchmarks/psi_buckets.py` measures that tail over more seeds. With both models at "
              "hand, `compare_models` (the default of `nnsim-fast compare` and of the demo for CKA) "
              "has no such floor: benchmarks/PEERS.md and docs/joint.md."]
    return lines + [""] + smallest_m_lines(results) + [""]


def smallest_m_lines(results: Dict[str, object]) -> List[str]:
    """The smallest m of the run at which the default met the tolerance on every layer pair."""
    tolerance = results["tolerance"]
    lines = [f"Smallest m of this run with the default estimate within {tolerance} of exact on every "
             "layer pair of every model pair and seed:", ""]
    for name, network in results["networks"].items():
        for n, size in network["sizes"].items():
            per_m = size["results"].get(DEFAULT_KEY, {})
            good = [int(m) for m, entry in per_m.items() if entry["vs_target"]["max_abs"] <= tolerance]
            tried = ", ".join(f"{m}: {fmt(entry['vs_target']['max_abs'])}" for m, entry in per_m.items())
            lines.append(f"- {name}, N = {n}: {'m = ' + str(min(good)) if good else 'none'} "
                         f"(max |err| by m: {tried})")
    return lines


def sweep_section(results: Dict[str, object]) -> List[str]:
    """The default estimator against m: worst error, seed-to-seed sd and error-bar coverage."""
    lines = ["## The default estimator against m", "",
             "Cell: max |err| over every layer pair, model pair and seed / seed-to-seed sd (pooled) / "
             "fraction of errors within 2 reported standard errors (finite ones).", ""]
    sizes = sorted({m for network in results["networks"].values() for size in network["sizes"].values()
                    for m in size["m"]})
    rows = []
    for name, network in results["networks"].items():
        for n, size in network["sizes"].items():
            per_m = size["results"].get(DEFAULT_KEY, {})
            cells = [name, n]
            for m in sizes:
                entry = per_m.get(str(m))
                cells.append("–" if entry is None else
                             f"{fmt(entry['vs_target']['max_abs'])} / {fmt(entry['vs_target']['sd'])} / "
                             f"{fmt(entry['coverage']['within_2se'], 2)}")
            rows.append(cells)
    lines += table(["network", "N"] + [f"m = {m} (psi {default_psi_buckets(m)})" for m in sizes],
                   rows) + [""]
    return lines + floor_lines(results)


def floor_lines(results: Dict[str, object]) -> List[str]:
    """How the default's seed-to-seed sd falls with the psi halves' buckets in this run, against
    the 1/sqrt(buckets) law of a sample-axis sketch's floor (docs/estimators.md, section 6)."""
    top = results["target_m"]
    ratios, predicted = [], None
    for name, network in results["networks"].items():
        for n, size in network["sizes"].items():
            per_m = size["results"].get(DEFAULT_KEY, {})
            low_m = min((int(m) for m in per_m), default=None)
            if str(top) not in per_m or low_m is None or low_m >= top:
                continue
            low, high = per_m[str(low_m)]["vs_target"]["sd"], per_m[str(top)]["vs_target"]["sd"]
            if low is None or not high:
                continue
            a, b = default_psi_buckets(low_m), default_psi_buckets(top)
            ratios.append(f"{name}, N = {n}: {low / high:.2f} from {a} to {b} buckets")
            predicted = math.sqrt(b / a)
    if not ratios:
        return []
    return ["How the pooled seed-to-seed sd falls with the psi halves' buckets in this run: "
            + "; ".join(ratios) + f". A 1/sqrt(buckets) law predicts {predicted:.2f}: it is the "
            "floor of any sketch of the sample axis, reached on low-rank layers (docs/estimators.md, "
            "section 6); high-rank pairs fall faster (like 1/buckets), the TensorSketch's "
            "feature-axis error not at all.", ""]


def analysis_rows(results: Dict[str, object]) -> List[List[str]]:
    rows = []
    for name, network in results["networks"].items():
        for n, size in network["sizes"].items():
            a = size.get("default_analysis")
            if not a:
                continue
            entry = size["results"][DEFAULT_KEY][str(results["target_m"])]
            layers = ", ".join(f"{layer} ({count})" for layer, count in a["layers_in_misses"].items())
            rows.append([name, n, f"{entry['vs_target']['bias']:+.4f}", fmt(entry["vs_target"]["sd"], 4),
                         fmt(entry["coverage"]["median_se"], 4), f"{a['flagged']} / {a['entries']}",
                         f"{a['missed']} ({a['missed_flagged']} flagged)", fmt(a["max_abs_unflagged"]),
                         fmt(a["max_z"], 1), layers or "–"])
    return rows


def worst_table(rows: List[Dict[str, object]]) -> List[str]:
    header = ["layer a", "layer b", "exact", "mean estimate", "max |err|", "mean stderr", "eff. rank a",
              "eff. rank b"]
    return table(header, [[row["a"], row["b"], fmt(row["exact"]), fmt(row["mean_estimate"]),
                           fmt(row["max_abs_error"]), fmt(row["mean_stderr"]), fmt(row["rank_a"], 0),
                           fmt(row["rank_b"], 0)] for row in rows])


def diagnosis_section(results: Dict[str, object]) -> List[str]:
    """Where the default misses (or comes closest): noise or bias, and the worst layer pairs."""
    m = results["target_m"]
    tolerance = results["tolerance"]
    lines = [f"## The default estimate's errors in detail, and where they exceed {tolerance} (m = {m})", "",
             f"Per network and N, over every layer pair of every model pair and every seed: mean signed "
             f"error (bias), seed-to-seed sd, median reported stderr; entries whose stderr exceeds the "
             f"library's resolution threshold (those `similarity` names in its `ResolutionWarning`); "
             f"entries off by more than {tolerance}, and how many of them were flagged; the largest "
             f"error among unflagged entries; the largest |err| / stderr; the layers (of either model) "
             f"in the misses, with counts.", ""]
    lines += table(["network", "N", "bias", "sd", "median stderr", "stderr > threshold",
                    f"|err| > {tolerance}", "max |err| unflagged", "max |err| / stderr",
                    "layers in misses"], analysis_rows(results))
    lines += ["", "Effective rank (Tr A)² / ‖A‖²_F of each layer's data-centred kernel (the library's "
              "unbiased estimate from the sketch, `estimators.effective_rank`, seed 0; per layer in the "
              "next section). The worst layer pairs of the default estimate:", ""]
    for name, network in results["networks"].items():
        for n, size in network["sizes"].items():
            rows = (size.get("worst_pairs") or {}).get(DEFAULT_KEY)
            if rows:
                lines += [f"**{name}, N = {n}**", ""] + worst_table(rows) + [""]
    lines += ["The worst layer pairs of the feature-kernel estimate (`kind=\"feature\"`, default "
              "estimator):", ""]
    for name, network in results["networks"].items():
        for n, size in network["sizes"].items():
            rows = (size.get("worst_pairs") or {}).get("cka|feature|sketch")
            if rows:
                lines += [f"**{name}, N = {n}**", ""] + worst_table(rows[:5]) + [""]
    return lines


def rank_section(results: Dict[str, object]) -> List[str]:
    lines = ["## Effective rank per layer", "",
             f"Hadamard (K_f∘K_g) and feature kernels, estimated from the m = {results['target_m']} "
             "sketch; mean over the four models (min–max).", ""]
    for name, network in results["networks"].items():
        for n, size in network["sizes"].items():
            ranks = size.get("effective_rank") or {}
            if not ranks:
                continue
            rows = []
            for layer in network["layers"]:
                cells = [layer]
                for kind in ("hadamard", "feature"):
                    values = [ranks[kind][merged_name(model, layer)] for model in results["plan"]["models"]]
                    cells.append(f"{np.mean(values):.0f} ({min(values):.0f}–{max(values):.0f})")
                rows.append(cells)
            lines += [f"**{name}, N = {n}**", ""] + table(["layer", "hadamard", "feature"], rows) + [""]
    return lines


def cell(entry: Optional[Dict[str, object]], field: str = "vs_target") -> str:
    if entry is None or field not in entry:
        return "–"
    e = entry[field]
    spread = "–" if e["sd"] is None else fmt(e["sd"])
    return f"{fmt(e['max_abs'])} ({e['bias']:+.3f}, {spread})"


def estimator_tables(results: Dict[str, object]) -> List[str]:
    lines = ["## Every estimator", "",
             "Cell: max |err| over layer pairs, model pairs and seeds (mean signed error, seed-to-seed "
             "sd pooled over layer pairs). Errors against the exact data-centred index (debiased rows: "
             "the exact debiased CKA); rows marked *vs uncentred* compare the same estimates with the "
             "exact uncentred index, which bucket and no centring approach. NBS: the same layer of the two "
             "trained models only. "
             "`plugin/buckets` is `paper/buckets` (one code path).", ""]
    for name, network in results["networks"].items():
        for n, size in network["sizes"].items():
            ms = [str(m) for m in size["m"]]
            rows = []
            for key, per_m in size["results"].items():
                rows.append([label(key)] + [cell(per_m.get(m)) for m in ms])
                if any("vs_uncentred" in (per_m.get(m) or {}) for m in ms):
                    rows.append([f"{label(key)} *vs uncentred*"]
                                + [cell(per_m.get(m), "vs_uncentred") for m in ms])
            lines += [f"**{name}, N = {n}**", ""] + table(["estimator"] + [f"m = {m}" for m in ms], rows)
            lines += [""]
    return lines


def coverage_table(results: Dict[str, object]) -> List[str]:
    lines = ["## Standard errors of the default estimator", "",
             "Fraction of (layer pair, model pair, seed) with |estimate − exact| ≤ 2 × reported stderr "
             "(≤ 3 ×) among those with a finite stderr, the median reported stderr, and how many "
             "entries had an infinite stderr (no usable estimate at this m; the call warns).", ""]
    rows = []
    for name, network in results["networks"].items():
        for n, size in network["sizes"].items():
            for key, per_m in size["results"].items():
                for m, entry in per_m.items():
                    if "coverage" not in entry:
                        continue
                    c = entry["coverage"]
                    rows.append([name, n, label(key), m, fmt(c["within_2se"]), fmt(c["within_3se"]),
                                 fmt(c["median_se"], 4), f"{c['infinite_se']} / {c['entries']}"])
    return lines + table(["network", "N", "estimator", "m", "≤ 2 se", "≤ 3 se", "median se", "inf se"],
                         rows) + [""]


def order_table(results: Dict[str, object]) -> List[str]:
    lines = ["## Order of model pairs, every estimator", "",
             "Flips / couples compared (layers × seeds × pairs of model pairs), smallest Kendall τ "
             "over (layer, seed), largest exact gap of a flipped couple.", ""]
    rows = []
    for name, network in results["networks"].items():
        for n, size in network["sizes"].items():
            for key, per_m in size["results"].items():
                for m, entry in per_m.items():
                    o = entry["order"]
                    if o is None:
                        continue
                    rows.append([name, n, label(key), m, f"{o['flips']} / {o['couples']}",
                                 fmt(o["min_kendall_tau"], 2), fmt(o["largest_flipped_gap"])])
    return lines + table(["network", "N", "estimator", "m", "flips", "min τ", "largest flipped gap"],
                         rows) + [""]


def setup_section(results: Dict[str, object]) -> List[str]:
    host = results["host"]
    lines = ["## Setup", "",
             f"Command: `{results['command']}`  ",
             f"Date: {host['date_utc']}; wall time of the run: {results['seconds']} s  ",
             f"Machine: {host['cpu_model']}, {host['cores_usable']} usable cores, "
             f"{host['memory_total_gib']} GiB, torch {host['torch_version']} "
             f"({host['torch_threads']} threads), native ops: {host['native_ops']}, load average "
             f"{host['load_average']}", "",
             f"Expected gradients with β = {results['beta']}; default layers (the model's direct "
             "children) and pooling (feature maps flattened); sketches with `sketch_model`'s defaults "
             "(float32 accumulators, sparsity 1, psi halves on). Sizes, seeds and which estimators run "
             "at which m:", ""]
    for size in results["plan"]["sizes"]:
        lines.append(f"- N = {size['n']}: m = {', '.join(map(str, size['m']))}; sketch seeds "
                     f"{', '.join(map(str, size['seeds']))}"
                     + "".join(f" (only the first {count} at m = {m})" for m, count in size["seed_counts"])
                     + f"; contrast estimators at m = {', '.join(map(str, size['contrast_m'])) or '–'}; "
                     f"every estimator and centring at m = {', '.join(map(str, size['full_m'])) or '–'}; "
                     f"NBS at m = {', '.join(map(str, size['nbs_m'])) or '–'}; exact "
                     f"{', '.join(size['exact_targets'])}.")
    lines.append("")
    for name, network in results["networks"].items():
        accs = ", ".join(f"{model} {info['test_accuracy']:.2f} ({info['epochs']} ep.)"
                         for model, info in network["models"].items())
        widths = ", ".join(f"{layer} {w[0]}" for layer, w in network["widths"].items())
        separate = "; ".join(f"N = {n}: {size['separate_vs_merged']:.1e}"
                             for n, size in network["sizes"].items()
                             if size["separate_vs_merged"] is not None)
        dense = "; ".join(f"N = {n}: {size['exact_dense_check']['max_abs_diff']:.1e}"
                          for n, size in network["sizes"].items() if size.get("exact_dense_check"))
        lines += [f"- **{name}**: {network['title']}; trained on {network['n_train']} images "
                  f"(Adam, lr {network['train']['lr']}, batch {network['train']['batch_size']}); test "
                  f"accuracy {accs}. Widths d_f = d_g: {widths}. Extraction of all inputs: "
                  f"{network['extract_seconds']} s. `sketch_model` vs rows fed to `update`: relative "
                  f"kernel difference {network['sketch_model_agreement']:.1e}. Separately sketched "
                  f"`similarity(rep_a, rep_b)` vs the merged representation, max |diff|: {separate}. "
                  f"Exact CKA (streamed) vs CKA of the dense, explicitly centred N x N kernels "
                  f"(K_f∘K_g, same layer of {' and '.join(NBS_MODELS)}), max |diff|: {dense or '–'}."]
    return lines + [""]


def markdown(results: Dict[str, object]) -> str:
    lines = ["# Accuracy of sketched similarity against the exact value", "",
             "Every sketched estimate below is compared with the exact index over all N × N pairs "
             "(float64, `estimator=\"exact\"`) on the same rows; errors are estimate − exact. Generated "
             "by `benchmarks/accuracy.py` from `results/accuracy.json` of the same run.", ""]
    lines += target_section(results)
    lines += sweep_section(results)
    lines += diagnosis_section(results)
    lines += rank_section(results)
    lines += coverage_table(results)
    lines += estimator_tables(results)
    lines += order_table(results)
    lines += setup_section(results)
    lines += ["![max |err| and sd of the default, paper and plug-in CKA against m](results/accuracy.png)", ""]
    return "\n".join(lines)


def plot(results: Dict[str, object], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(results["networks"])
    fig, axes = plt.subplots(2, len(names), figsize=(5 * len(names), 7), squeeze=False)
    keys = (DEFAULT_KEY, "cka|hadamard|paper/buckets", "cka|hadamard|plugin/data")
    first_n = str(results["plan"]["sizes"][0]["n"])
    ticks = sorted({m for size in results["plan"]["sizes"] for m in size["m"]})
    for column, name in enumerate(names):
        for n, size in results["networks"][name]["sizes"].items():
            style, marker = ("-", "o") if n == first_n else ("--", "s")
            for key, colour in zip(keys, ("tab:blue", "tab:red", "tab:orange")):
                per_m = size["results"].get(key, {})
                for row, stat in enumerate(("max_abs", "sd")):
                    points = [(int(m), e["vs_target"][stat]) for m, e in per_m.items()
                              if e["vs_target"][stat] is not None]
                    if points:
                        axes[row, column].plot(*zip(*points), marker=marker, linestyle=style,
                                               color=colour, label=f"{key.split('|')[2]}, N = {n}")
        for row, title in enumerate(("max |estimate − exact|", "seed-to-seed sd")):
            ax = axes[row, column]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(ticks, [str(m) for m in ticks])
            ax.minorticks_off()
            ax.set_xlabel("buckets m")
            ax.set_title(f"{name}: {title} (CKA, K_f∘K_g)", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
        axes[0, column].axhline(TOLERANCE, color="grey", linewidth=0.8, linestyle=":")
        axes[0, column].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny networks and sizes (under a minute); prints the report unless "
                             "output paths are given")
    parser.add_argument("--width", type=int, default=8, help="first-stage width of the ResNet-18")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own; 1 with --quick, which is then "
                             "fast even on a busy machine)")
    parser.add_argument("--report-from", default=None, metavar="JSON",
                        help="no measurement: write the report (and figure) from a JSON of an earlier run")
    parser.add_argument("--markdown", default=None, help="report (default benchmarks/ACCURACY.md)")
    parser.add_argument("--json", default=None, help="numbers (default benchmarks/results/accuracy.json)")
    parser.add_argument("--plot", default=None, help="figure (default benchmarks/results/accuracy.png)")
    return parser


def finite(value):
    """``value`` with every non-finite float (an infinite stderr: no usable estimate) as None."""
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def json_text(results: Dict[str, object]) -> str:
    text = json.dumps(finite(results), indent=1, allow_nan=False)
    # A list of plain values (a matrix row, per-seed numbers) on one line instead of one per line.
    return re.sub(r"\[([^\[\]{}\"]*)\]", lambda match: "[" + " ".join(match.group(1).split()) + "]", text)


def write(results: Dict[str, object], args) -> str:
    # The report is made from the JSON text, so that every number in it is one the JSON holds.
    text = json_text(results)
    report = markdown(json.loads(text))
    for path, content in ((args.json, text), (args.markdown, report)):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(content)
    if args.plot:
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        plot(json.loads(text), args.plot)
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.width < 1 or (args.threads is not None and args.threads < 1):
        raise SystemExit("--width and --threads must be positive")
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    if not args.quick:
        args.markdown = args.markdown or os.path.join(HERE, "ACCURACY.md")
        args.json = args.json or os.path.join(HERE, "results", "accuracy.json")
        args.plot = args.plot or os.path.join(HERE, "results", "accuracy.png")
    if args.report_from:
        with open(args.report_from, encoding="utf-8") as handle:
            results = json.load(handle)
        results["verdict"] = verdict(results)     # derived from the measured numbers, not measured
        args.json = None                  # the numbers stay those of the run that measured them
        write(results, args)
        return 0
    command = " ".join(["python benchmarks/accuracy.py"] + (["--quick"] if args.quick else [])
                       + ([f"--width {args.width}"] if args.width != 8 else [])
                       + ([f"--threads {args.threads}"] if args.threads else []))
    results = run(make_plan(args.quick, args.width), command)
    report = write(results, args)
    if not (args.markdown or args.json):
        print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
