"""nnsim_fast against peer CKA packages on two ResNet-18-shaped models: time, memory, error.

    python benchmarks/peers.py                       # the full comparison (see --help)
    python benchmarks/peers.py --run TOOL --n N ...  # one measurement; prints one JSON line

The driver trains nothing it measures: it builds the two models once (model A: a
ResNet-18-shaped CNN for 32x32 inputs at its random initialisation; model B: the same
initialisation trained briefly on generated 32x32 images), saves their weights, then runs
every (tool, N) in a FRESH Python process (``--run``) and reads back one JSON line with
the tool's layer x layer CKA matrix, its wall time and its peak resident memory.  Each
worker first builds everything the tool needs before it is timed -- imports, both models,
the N evaluation images, the DataLoader -- and records its resident memory at that point
(the baseline); the time covers the tool's whole job (its forward passes over the data for
both models and the CKA matrix).  The peak is the kernel's high-water mark of resident
memory (``VmHWM``), restarted at the baseline through ``/proc/self/clear_refs`` so that it
covers the job alone.  ``resource.getrusage``'s ``ru_maxrss`` is recorded too but not
used: Linux carries it across fork and exec, so in a process spawned by the driver it
starts at the driver's own resident size.

Tools (all compare the same four residual-stage outputs, each flattened to C*H*W features
per image, on the same images in the same order, in batches of the same size):

``exact``           the reference: :func:`nnsim_fast.extract.exact_model` (features only)
                    and ``similarity(kind="feature")``, every N x N pair in float64;
                    centred CKA, and the debiased (unbiased-HSIC) CKA from the same rows.
``exact_hadamard``  the same with gradients, ``kind="hadamard"`` (the reference of the
                    paper's kernel; a backward pass per batch and twice the features' GEMMs).
``nnsim``           the default path: ``sketch_model(..., m, gradients=False)`` for each
                    model and ``similarity(kind="feature")`` (default estimator).
``nnsim_hadamard``  the paper's kernel: ``sketch_model`` with gradients and
                    ``similarity(kind="hadamard")`` -- no peer computes it.
``pytorch_cka``     ``cka.compute_cka`` (minibatch CKA, unbiased HSIC per batch).
``torch_cka``       ``torch_cka.CKA(...).compare`` (minibatch CKA, unbiased HSIC per batch).
``ckatorch``        ``ckatorch``'s minibatch estimator (``ckatorch.hsic1`` on each batch's
                    float64 Gram matrices, summed over batches, the ratio at the end: its
                    documented ``CKA_minibatch``); its ``CKA`` class cannot take these
                    models (see :data:`PEER_NOTES`), which each run records.
``forward``         both models' forward passes over the data and nothing else (inference
                    mode, no hooks): the floor under every tool's time.

Errors are computed by the driver against the ``exact`` run at the same N (``--render``
rewrites the Markdown from the JSON alone).  A worker that fails reports its error as the
row's status; torch-cka's own NaN assertion, which fires after its matrix is stored, is
recorded and the stored matrix judged.  Results go to a JSON file and a Markdown file
(``--json``, ``--markdown``).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from importlib import metadata
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch.utils.data import DataLoader, TensorDataset

import harness  # first: it finds a checkout's nnsim_fast when none is installed
from nnsim_fast import compare_models, estimators, similarity, sketch_model
from nnsim_fast.datasets import render_shapes
from nnsim_fast.extract import exact_model
from nnsim_fast.models import TrainConfig, accuracy, resnet18_cifar, train_classifier

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.abspath(__file__)

TOOLS = ("exact", "exact_hadamard", "joint", "joint_hadamard", "nnsim", "nnsim_hadamard",
         "pytorch_cka", "torch_cka", "ckatorch", "forward")
PEERS = ("pytorch_cka", "torch_cka", "ckatorch")
REFERENCES = ("exact", "exact_hadamard")
#: The row the targets judge: nnsim_fast's path when both models are at hand, as they are
#: for every peer (``compare_models``); the sketch rows are reported beside it.
OURS = "joint"
#: Rows run once per N whatever --repeats says (the slow ones no target depends on).
ONCE = REFERENCES + ("nnsim_hadamard", "joint_hadamard")
#: Rows that are not CKA estimates: the exact references and the forward-pass floor.
NOT_ESTIMATES = REFERENCES + ("forward",)
#: The importable module and the distribution name of each tool outside nnsim_fast.
PEER_PACKAGES = {"pytorch_cka": ("cka", "pytorch-cka"), "torch_cka": ("torch_cka", "torch-cka"),
                 "ckatorch": ("ckatorch", "ckatorch")}
LABELS = {
    "exact": "exact (reference)",
    "exact_hadamard": "exact, hadamard (reference)",
    "joint": "nnsim_fast compare_models (both models at hand)",
    "joint_hadamard": "nnsim_fast compare_models, hadamard (paper kernel)",
    "nnsim": "nnsim_fast sketch (one model at a time, m={m})",
    "nnsim_hadamard": "nnsim_fast hadamard (paper kernel, m={m})",
    "pytorch_cka": "pytorch-cka",
    "torch_cka": "torch-cka",
    "ckatorch": "ckatorch",
    "forward": "forward passes only (floor)",
}
#: Which exact matrix a tool's numbers are judged against (its kernel).
REFERENCE_OF = {"nnsim_hadamard": "exact_hadamard", "exact_hadamard": "exact_hadamard",
                "joint_hadamard": "exact_hadamard"}

NUM_CLASSES = 10
INIT_SEED = 0
TRAIN_DATA_SEED = 1001
EVAL_DATA_SEED = 2002
IMAGE_CHUNK = 1000
MIB = float(1 << 20)

# Targets, checked by evaluate_targets: the (speed, accuracy) and a memory check.
TARGET_SPEED_RATIO = 1.2           # nnsim time within 1.2x the fastest peer's (features)
TARGET_MEMORY_GROWTH = 1.2         # working memory at the largest N <= 1.2 x at the smallest

#: What each tool supports, from its source (versions recorded in the JSON).  Not measured
#: here unless the tables say so.
CAPABILITIES = {
    "columns": ("kernels", "indices", "gradients", "streaming (memory in N)", "GPU", "debiased",
                "different data per model", "error bars", "float64 index math"),
    "nnsim": ("feature, gradient, hadamard (K_f o K_g, the paper's), sum, khatri_rao, psi, transport",
              "CKA, NBS (plug-in)", "yes (expected loss gradients, one backward per batch)",
              "yes: compare_models holds one block of rows (<= 512 samples); the sketch an "
              "m x d matrix per layer, independent of N, mergeable, resumable",
              "yes (CUDA kernels; not measured here)", "yes (debiased=True)",
              "yes (each model/dataset its own sketch; different rows fall back to the plug-in "
              "estimator with a warning)", "yes (standard error per entry)", "yes"),
    "pytorch_cka": ("linear (features)", "CKA", "no", "yes: per-batch HSIC sums (B x B Grams)",
                    "yes (device, CUDA streams)", "always (unbiased HSIC per batch)",
                    "no (both models see the same batches)", "no", "no (float32 sums)"),
    "torch_cka": ("linear (features)", "CKA", "no", "yes: per-batch HSIC sums (B x B Grams)",
                  "yes (device)", "always (unbiased HSIC per batch)",
                  "no (two loaders zipped, equal batch shapes asserted)", "no", "no (float32)"),
    "ckatorch": ("linear (minibatch); linear and RBF on all N at once (cka_base)", "CKA", "no",
                 "minibatch estimator yes; its CKA class keeps only the last batch",
                 "yes (device)", "yes (minibatch HSIC_1; cka_base(unbiased=True))",
                 "no", "no", "yes"),
}
#: How the two families of estimators use the data (method facts, independent of the run).
METHOD_NOTE = (
    "The three peers compute the minibatch CKA of Nguyen et al.: the unbiased HSIC (Song et al.) of "
    "each batch's B x B Gram matrices, summed over the batches, and the ratio of the sums. It uses only "
    "the pairs of images inside a batch (about N(B-1)/2 of the N(N-1)/2 pairs), so it equals the "
    "debiased CKA of all N only when one batch holds all the data; otherwise it is another, noisier "
    "estimate of the same population quantity, and the plain centred CKA of all N differs from both by "
    "the bias of the biased HSIC (numbers below). It needs both models on the same batches, and only "
    "features. nnsim_fast's compare_models, its path when both models are at hand, also runs both models "
    "over the same batches, but pools consecutive batches into blocks of up to 512 images, uses every "
    "pair, triple and quadruple of images inside a block with one weight per block, and the exact "
    "per-image terms, to estimate the centred CKA of all N (debiased=True: the debiased one) with an "
    "error bar; its error falls as 1 / sqrt(N x block). Its sketch path (sketch_model + similarity, "
    "one model at a time) targets the same quantity: it folds all N images into m CountSketch buckets "
    "per layer and removes "
    "the collision bias; its error depends on m and on the layers' effective rank (below), not on how "
    "many pairs it sees, and it reports a standard error per entry. That is what keeps its memory "
    "independent of N and lets one sketch per model and dataset be compared with any other, with "
    "gradients and the paper's kernel. The exact reference keeps every row and costs about "
    "N^2 x (sum of the layer widths) multiply-adds per model.")
#: What reading each peer's source showed; reported with the results.
PEER_NOTES = {
    "pytorch_cka": "flattens every output to C*H*W; Grams and HSIC sums in the features' dtype "
                   "(float32); clamps CKA to [0, 1] (hides negative estimates); hooks removed "
                   "on exit; runs under torch.inference_mode.",
    "torch_cka": "flattens to C*H*W; float32; runs both models WITHOUT no_grad (autograd "
                 "graphs are built and kept per batch); hooks are never removed; divides by "
                 "min(len(loader1), len(loader1)) batches (the second loader is never counted).",
    "ckatorch": "its CKA class passes each hooked output straight to cka_batch, which needs "
                "3-D [batch, n, d] tensors and takes CKA over the middle axis (tokens) within "
                "each sample; a 4-D conv map (or a 2-D [B, d] output) raises, and a tuple batch "
                "(x, y) is mapped onto forward's argument names (y has none). Its batch loop "
                "ASSIGNS cka_epoch[i, j] = cka_batch(...) instead of accumulating, so only the "
                "last batch counts, and it repeats the whole pass epochs=10 times by default. "
                "The row here therefore drives its estimator functions (hsic1 on float64 Grams, "
                "the documented CKA_minibatch) with plain forward hooks and flatten(1), computing each "
                "layer's Gram matrix once per batch (its cka_batch would recompute both Grams for "
                "every layer pair), which if anything favours its time.",
}


# --------------------------------------------------------------------------- data and models

def generated_images(n: int, seed: int):
    """``n`` generated 32x32 RGB images in [0, 1] and their 10-class labels.

    The shape and texture classes of :func:`nnsim_fast.datasets.render_shapes` (8x8, with
    random pose, contrast and noise), upsampled 4x bilinearly, tinted with a random colour
    over a random background colour, plus pixel noise; built in chunks so that the
    temporaries stay small next to the result.
    """
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randperm(n, generator=generator) % NUM_CLASSES
    images = torch.empty(n, 3, 32, 32)
    for start in range(0, n, IMAGE_CHUNK):
        rows = labels[start:start + IMAGE_CHUNK]
        small = torch.from_numpy(render_shapes(rows.tolist(), seed + start))[:, None]
        large = torch.nn.functional.interpolate(small, scale_factor=4, mode="bilinear",
                                                align_corners=False)
        tint = 0.3 + 0.7 * torch.rand(len(rows), 3, 1, 1, generator=generator)
        background = 0.3 * torch.rand(len(rows), 3, 1, 1, generator=generator)
        noise = 0.05 * torch.randn(len(rows), 3, 32, 32, generator=generator)
        images[start:start + len(rows)] = (background + tint * large + noise).clamp_(0.0, 1.0)
    return images, labels


def build_model(width: int) -> torch.nn.Module:
    torch.manual_seed(INIT_SEED)
    return resnet18_cifar(NUM_CLASSES, width=width).eval()


def prepare_models(width: int, train_samples: int, epochs: int, path: str) -> Dict[str, object]:
    """Model A (initialisation) and model B (A trained briefly), saved to ``path``."""
    model_a = build_model(width)
    model_b = build_model(width)
    x, y = generated_images(train_samples, TRAIN_DATA_SEED)
    config = TrainConfig(epochs=epochs, batch_size=64, lr=3e-3)
    start = time.perf_counter()
    losses = train_classifier(model_b, x, y, config, seed=INIT_SEED)
    seconds = time.perf_counter() - start
    held_x, held_y = generated_images(1000, TRAIN_DATA_SEED + 7)
    torch.save({"a": model_a.state_dict(), "b": model_b.state_dict()}, path)
    return {"model_a": f"resnet18_cifar(10, width={width}), initialisation seed {INIT_SEED}",
            "model_b": f"model A trained {epochs} epoch(s) on {train_samples} generated images "
                       f"(Adam, lr 3e-3 cosine, batch 64)",
            "train_losses": [round(v, 4) for v in losses], "train_seconds": round(seconds, 1),
            "held_out_accuracy": {"a": round(accuracy(model_a, held_x, held_y), 4),
                                  "b": round(accuracy(model_b, held_x, held_y), 4)}}


def load_models(width: int, weights: Optional[str]):
    """The two models; without ``weights`` two random initialisations (seeds 0 and 1)."""
    model_a, model_b = build_model(width), build_model(width)
    if weights:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model_a.load_state_dict(state["a"])
        model_b.load_state_dict(state["b"])
    else:
        torch.manual_seed(INIT_SEED + 1)
        model_b = resnet18_cifar(NUM_CLASSES, width=width).eval()
    return model_a.eval(), model_b.eval()


# --------------------------------------------------------------------------- one measurement

def _status_bytes(field: str) -> int:
    """A memory figure of this process image from /proc/self/status (kB there)."""
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> bool:
    """Start a new high-water mark at the current RSS (Linux >= 4.0); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _cpu_seconds() -> float:
    """User + system CPU time of this process so far (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _getrusage_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # KiB on Linux


def _as_lists(matrix) -> List[List[Optional[float]]]:
    """A matrix as JSON lists; NaN and infinite entries become null (standard JSON)."""
    values = torch.as_tensor(matrix, dtype=torch.float64).tolist()
    return [[v if math.isfinite(v) else None for v in line] for line in values]


@contextlib.contextmanager
def flattened_outputs(model: torch.nn.Module, layers: Sequence[str], store: Dict[str, torch.Tensor]):
    """Forward hooks that keep each named layer's output flattened to ``[B, C*H*W]``."""
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(
        lambda _module, _inputs, output, name=name: store.__setitem__(name, output.flatten(1)))
        for name in layers]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def run_exact(ctx, gradients: bool, kind: str) -> Dict:
    start = time.perf_counter()
    reps = [exact_model(model, ctx["loader"], ctx["layers"], gradients=gradients,
                        max_rows=ctx["n"], progress=False) for model in ctx["models"]]
    result = similarity(*reps, index="cka", kind=kind)
    seconds = time.perf_counter() - start
    debiased = similarity(*reps, index="cka", kind=kind, debiased=True)
    for rep in reps:
        rep.close()
    return {"seconds": seconds, "matrix": _as_lists(result.matrix), "layers_a": result.layers_a,
            "layers_b": result.layers_b, "debiased_matrix": _as_lists(debiased.matrix)}


def run_nnsim(ctx, gradients: bool, kind: str) -> Dict:
    start = time.perf_counter()
    reps = [sketch_model(model, ctx["loader"], ctx["layers"], m=ctx["m"], seed=0,
                         gradients=gradients, progress=False) for model in ctx["models"]]
    passes = time.perf_counter() - start
    with warnings.catch_warnings(record=True):       # kept in result.warnings
        warnings.simplefilter("always")
        result = similarity(*reps, index="cka", kind=kind)
        seconds = time.perf_counter() - start
        debiased = similarity(*reps, index="cka", kind=kind, debiased=True)
    ranks = {side: dict(zip(ctx["layers"], estimators.effective_rank(rep.grams(ctx["layers"], kind))
                            .tolist())) for side, rep in zip("AB", reps)}
    return {"seconds": seconds, "pass_seconds": passes, "matrix": _as_lists(result.matrix),
            "layers_a": result.layers_a, "layers_b": result.layers_b,
            "standard_errors": _as_lists(result.error),
            "warnings": list(result.warnings), "effective_rank": ranks,
            "debiased_matrix": _as_lists(debiased.matrix),
            "debiased_standard_errors": _as_lists(debiased.error)}


def run_joint(ctx, kind: str) -> Dict:
    start = time.perf_counter()
    result = compare_models(*ctx["models"], ctx["loader"], ctx["layers"], ctx["layers"], kind=kind,
                            progress=False)
    seconds = time.perf_counter() - start
    rows, columns = result.positions
    debiased, debiased_error = result.pairs.cka(debiased=True)
    return {"seconds": seconds, "matrix": _as_lists(result.matrix), "block": result.block,
            "layers_a": result.layers_a, "layers_b": result.layers_b,
            "standard_errors": _as_lists(result.error),
            "debiased_matrix": _as_lists(debiased[rows][:, columns]),
            "debiased_standard_errors": _as_lists(debiased_error[rows][:, columns])}


def run_pytorch_cka(ctx) -> Dict:
    from cka import compute_cka
    start = time.perf_counter()
    matrix = compute_cka(*ctx["models"], ctx["loader"], layers=ctx["layers"], device="cpu",
                         progress=False)[0]
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "matrix": _as_lists(matrix), "layers_a": list(ctx["layers"]),
            "layers_b": list(ctx["layers"])}


def run_torch_cka(ctx) -> Dict:
    from torch_cka import CKA
    start = time.perf_counter()
    comparison = CKA(*ctx["models"], model1_name="A", model2_name="B",
                     model1_layers=list(ctx["layers"]), model2_layers=list(ctx["layers"]),
                     device="cpu")
    peer_error = None
    try:
        comparison.compare(ctx["loader"], ctx["loader"])
    except AssertionError as error:   # its NaN check runs after the matrix is stored
        peer_error = f"AssertionError: {error}"
    exported = comparison.export()
    seconds = time.perf_counter() - start
    out = {"seconds": seconds, "matrix": _as_lists(exported["CKA"]),
           "layers_a": exported["model1_layers"], "layers_b": exported["model2_layers"]}
    if peer_error:
        out["peer_error"] = peer_error
    return out


def _ckatorch_class_check(ctx) -> str:
    """What ckatorch's own CKA class does with these models (on 8 images; untimed)."""
    from ckatorch import CKA
    images = ctx["loader"].dataset.tensors[0][:8]
    loader = DataLoader(TensorDataset(images), batch_size=8)
    try:
        CKA(*ctx["models"], layers=list(ctx["layers"]), first_name="A", second_name="B")(
            loader, epochs=1)
    except Exception as error:  # the point is to record how it fails
        return f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    return "ran"


def run_ckatorch(ctx) -> Dict:
    from ckatorch import hsic1
    layers, (model_a, model_b) = list(ctx["layers"]), ctx["models"]
    count = len(layers)
    start = time.perf_counter()
    cross = torch.zeros(count, count, dtype=torch.float64)
    self_a = torch.zeros(count, dtype=torch.float64)
    self_b = torch.zeros(count, dtype=torch.float64)
    with flattened_outputs(model_a, layers, {}) as out_a, \
            flattened_outputs(model_b, layers, {}) as out_b, torch.no_grad():
        for x, _ in ctx["loader"]:
            model_a(x)
            model_b(x)
            grams_a = [(f.double() @ f.double().T)[None] for f in (out_a[k] for k in layers)]
            grams_b = [(f.double() @ f.double().T)[None] for f in (out_b[k] for k in layers)]
            for i, gram_a in enumerate(grams_a):
                self_a[i] += hsic1(gram_a, gram_a).sum()
                for j, gram_b in enumerate(grams_b):
                    cross[i, j] += hsic1(gram_a, gram_b).sum()
            for j, gram_b in enumerate(grams_b):
                self_b[j] += hsic1(gram_b, gram_b).sum()
    matrix = cross / torch.sqrt(torch.outer(self_a, self_b))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "matrix": _as_lists(matrix), "layers_a": layers, "layers_b": layers,
            "class_check": _ckatorch_class_check(ctx)}


def run_forward(ctx) -> Dict:
    """Both models' forward passes over the data and nothing else: the floor every tool pays."""
    start = time.perf_counter()
    with torch.inference_mode():
        for x, _ in ctx["loader"]:
            for model in ctx["models"]:
                model(x)
    return {"seconds": time.perf_counter() - start}


RUNNERS: Dict[str, Callable[[Dict], Dict]] = {
    "exact": lambda ctx: run_exact(ctx, gradients=False, kind="feature"),
    "exact_hadamard": lambda ctx: run_exact(ctx, gradients=True, kind="hadamard"),
    "joint": lambda ctx: run_joint(ctx, kind="feature"),
    "joint_hadamard": lambda ctx: run_joint(ctx, kind="hadamard"),
    "nnsim": lambda ctx: run_nnsim(ctx, gradients=False, kind="feature"),
    "nnsim_hadamard": lambda ctx: run_nnsim(ctx, gradients=True, kind="hadamard"),
    "pytorch_cka": run_pytorch_cka,
    "torch_cka": run_torch_cka,
    "ckatorch": run_ckatorch,
    "forward": run_forward,
}


def _import_tool(tool: str) -> None:
    """Import a peer before the baseline, so that its import memory is not counted as work."""
    if tool in PEER_PACKAGES:
        __import__(PEER_PACKAGES[tool][0])


def run_one(args) -> Dict:
    """One (tool, N) measurement in this process: setup, baseline, the timed job, the peak."""
    if args.threads:
        torch.set_num_threads(args.threads)
    _import_tool(args.run)
    models = load_models(args.width, args.weights)
    images, labels = generated_images(args.n, EVAL_DATA_SEED)
    loader = DataLoader(TensorDataset(images, labels), batch_size=args.batch, shuffle=False)
    ctx = {"models": models, "loader": loader, "layers": list(models[0].block_names),
           "n": args.n, "m": args.m}
    gc.collect()
    setup_peak, baseline = _status_bytes("VmHWM"), _status_bytes("VmRSS")
    reset = _reset_peak_rss()
    cpu = _cpu_seconds()
    out = RUNNERS[args.run](ctx)
    cpu = _cpu_seconds() - cpu
    peak = _status_bytes("VmHWM")
    with torch.no_grad():
        dims = {name: int(value[0].numel()) for name, value in models[0].features(images[:1]).items()}
    out.update({
        "tool": args.run, "n": args.n, "width": args.width, "batch": args.batch, "m": args.m,
        "torch_threads": torch.get_num_threads(), "feature_dims": dims,
        "baseline_rss_mib": round(baseline / MIB, 1), "setup_peak_rss_mib": round(setup_peak / MIB, 1),
        "peak_rss_mib": round(peak / MIB, 1), "working_mib": round((peak - baseline) / MIB, 1),
        "peak_reset_after_setup": reset, "peak_during_setup": not reset and peak <= setup_peak,
        "getrusage_maxrss_mib": round(_getrusage_peak_bytes() / MIB, 1)})
    out["seconds"] = round(out["seconds"], 3)
    if "pass_seconds" in out:
        out["pass_seconds"] = round(out["pass_seconds"], 3)
    out["cpu_seconds"] = round(cpu, 3)
    return out


# --------------------------------------------------------------------------- the driver

def installed_tools(tools: Sequence[str]) -> Dict[str, Optional[str]]:
    """Each tool's version (nnsim_fast's for ours), or None where a peer is not installed."""
    versions: Dict[str, Optional[str]] = {}
    for tool in tools:
        module, distribution = PEER_PACKAGES.get(tool, ("nnsim_fast", "nnsim-fast"))
        try:
            __import__(module)
            versions[tool] = metadata.version(distribution)
        except ImportError:
            versions[tool] = None
        except metadata.PackageNotFoundError:
            versions[tool] = "source checkout"
    return versions


def source_revision() -> Optional[Dict[str, object]]:
    """The checkout's commit and whether nnsim_fast differs from it (None outside git)."""
    root = os.path.dirname(HERE)
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "--short=12", "HEAD"],
                                capture_output=True, text=True, timeout=60)
        status = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "nnsim_fast"],
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0 or status.returncode != 0:
        return None
    return {"commit": commit.stdout.strip(), "nnsim_fast_modified": bool(status.stdout.strip())}


def worker_command(tool: str, n: int, args, weights: Optional[str]) -> List[str]:
    command = [sys.executable, SCRIPT, "--run", tool, "--n", str(n), "--width", str(args.width),
               "--batch", str(args.batch), "--m", str(args.m)]
    if weights:
        command += ["--weights", weights]
    if args.threads:
        command += ["--threads", str(args.threads)]
    return command


_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][^\\/\s'\":,()]+)+[\\/]([^\\/\s'\":,()]+)")


def clean_message(text: str) -> str:
    """One line of an error for the report: the last non-empty line, paths cut to file names."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return _PATH.sub(r"\1", lines[-1])[:300] if lines else ""


def spawn(command: List[str], timeout: Optional[float]) -> Dict:
    """Run one worker in a fresh process; its last stdout line is its JSON result."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "message": f"no result within {timeout} s"}
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0 or not lines:
        return {"status": "error",
                "message": clean_message(done.stderr) or f"exit code {done.returncode}"}
    result = json.loads(lines[-1])
    result.setdefault("status", "ok")
    return result


def _planned(tool: str, n: int, args) -> bool:
    limit = {"exact_hadamard": args.exact_hadamard_max_n,
             "nnsim_hadamard": args.nnsim_hadamard_max_n,
             "joint_hadamard": args.nnsim_hadamard_max_n}.get(tool)
    return limit is None or n <= limit


def _repeats(args) -> List[int]:
    """Runs per size: ``--repeats`` aligned with ``--sizes`` (the last value fills in)."""
    given = list(args.repeats) or [1]
    return [given[min(i, len(given) - 1)] for i in range(len(args.sizes))]


def collect(args, tools: Sequence[str], weights: Optional[str], progress) -> List[Dict]:
    """Every planned (tool, N) run, ``repeats`` times, tools interleaved within a round."""
    runs: List[Dict] = []
    for n, repeats in zip(args.sizes, _repeats(args)):
        for repeat in range(repeats):
            for tool in tools:
                if not _planned(tool, n, args) or (repeat and tool in ONCE):
                    continue
                start = time.perf_counter()
                result = spawn(worker_command(tool, n, args, weights), args.timeout)
                result.update({"tool": tool, "n": n, "repeat": repeat,
                               "process_seconds": round(time.perf_counter() - start, 1)})
                progress(f"{tool:15s} N={n:<6d} repeat {repeat}: {result['status']} "
                         f"{result.get('seconds', '')} s, peak {result.get('peak_rss_mib', '')} MiB")
                runs.append(result)
    return runs


def _tensor(matrix) -> torch.Tensor:
    """JSON lists (null for a non-finite entry) back to a float64 tensor with NaN there."""
    return torch.tensor([[math.nan if v is None else v for v in line] for line in matrix],
                        dtype=torch.float64)


def _abs_errors(matrix, reference) -> Optional[Dict[str, float]]:
    """Max and mean |matrix - reference|; a non-finite entry makes both None and is counted
    (``max_finite``: the largest error among the finite entries, for the record)."""
    if matrix is None or reference is None:
        return None
    diff = (_tensor(matrix) - _tensor(reference)).abs()
    finite = torch.isfinite(diff)
    bad = int((~finite).sum())
    if bad:
        worst = round(float(diff[finite].max()), 5) if bool(finite.any()) else None
        return {"max": None, "mean": None, "non_finite": bad, "max_finite": worst}
    return {"max": round(float(diff.max()), 5), "mean": round(float(diff.mean()), 5), "non_finite": 0}


def _z_scores(matrix, reference, errors) -> Optional[Dict[str, float]]:
    """|estimate - exact| / standard error: how honest nnsim_fast's error bars were.

    An infinite standard error (no usable estimate) covers any error; a zero one claims an
    exact value, so an entry that is off with it counts as outside (``zero_se_off``).
    """
    if errors is None or reference is None:
        return None
    diff = (_tensor(matrix) - _tensor(reference)).abs()
    bars = _tensor(errors)
    usable = torch.isfinite(bars) & (bars > 0)
    z = diff[usable] / bars[usable]
    return {"max_z": round(float(z.max()), 2) if z.numel() else None,
            "within_2se": round(float((diff <= 2 * bars).double().mean()), 3),
            "max_standard_error": round(float(bars[torch.isfinite(bars)].max()), 5),
            "infinite_se": int((~torch.isfinite(bars)).sum()),
            "zero_se_off": int(((bars == 0) & (diff > 1e-9)).sum())}


def _max_error(row: Dict) -> float:
    """A row's max error against exact centred CKA; infinite when some entry was not finite."""
    errors = row.get("error_vs_centred") or {}
    return math.inf if errors.get("max") is None else errors["max"]


def summarise(runs: List[Dict], sizes: Sequence[int], tools: Sequence[str]) -> List[Dict]:
    """One row per (tool, N): medians over repeats, errors against the exact run at that N."""
    rows = []
    for n in sizes:
        exact = {ref: next((r for r in runs if r["tool"] == ref and r["n"] == n
                            and r["status"] == "ok"), None) for ref in REFERENCES}
        for tool in tools:
            mine = [r for r in runs if r["tool"] == tool and r["n"] == n]
            if mine:
                rows.append(_row(tool, n, mine, exact))
    return rows


def _median(runs: List[Dict], key: str) -> Optional[float]:
    values = [r[key] for r in runs if r.get(key) is not None]
    return round(statistics.median(values), 3) if values else None


def _row(tool: str, n: int, mine: List[Dict], exact: Dict[str, Optional[Dict]]) -> Dict:
    ok = [r for r in mine if r["status"] == "ok"]
    row = {"tool": tool, "n": n, "runs": len(mine), "ok": len(ok)}
    if not ok:
        row["status"] = mine[0]["status"]
        row["message"] = mine[0].get("message")
        return row
    row.update({
        "status": "ok", "seconds": _median(ok, "seconds"),
        "seconds_samples": [r["seconds"] for r in ok], "cpu_seconds": _median(ok, "cpu_seconds"),
        "pass_seconds": _median(ok, "pass_seconds"),
        "peak_rss_mib": _median(ok, "peak_rss_mib"), "baseline_rss_mib": _median(ok, "baseline_rss_mib"),
        "working_mib": _median(ok, "working_mib"),
        "peak_during_setup": any(r["peak_during_setup"] for r in ok),
        "feature_dims": ok[0]["feature_dims"]})
    if "block" in ok[0]:
        row["block"] = ok[0]["block"]
    if "matrix" in ok[0]:
        row.update(_judged(tool, ok[0], exact))
    return row


def _judged(tool: str, first: Dict, exact: Dict[str, Optional[Dict]]) -> Dict:
    """A run's matrix (the first repeat's; all repeats compute the same) and its errors."""
    reference = exact[REFERENCE_OF.get(tool, "exact")]
    centred = reference and reference["matrix"]
    debiased = reference and reference["debiased_matrix"]
    row = {"reference": REFERENCE_OF.get(tool, "exact") if reference else None,
           "error_vs_centred": _abs_errors(first["matrix"], centred),
           "error_vs_debiased": _abs_errors(first["matrix"], debiased),
           "matrix": first["matrix"], "layers_a": first["layers_a"], "layers_b": first["layers_b"]}
    if "standard_errors" in first:
        row["standard_errors"] = first["standard_errors"]
        row["error_bars"] = _z_scores(first["matrix"], centred, first["standard_errors"])
        row["debiased_error_vs_debiased"] = _abs_errors(first["debiased_matrix"], debiased)
        row["debiased_error_bars"] = _z_scores(first["debiased_matrix"], debiased,
                                               first["debiased_standard_errors"])
        row["warnings"] = first.get("warnings", [])
        row["effective_rank"] = first.get("effective_rank")
    if tool in REFERENCES:
        row["debiased_matrix"] = first["debiased_matrix"]
    for key in ("class_check", "peer_error"):
        if key in first:
            row[key] = first[key]
    return row


def _lookup(rows: List[Dict], tool: str, n: int) -> Optional[Dict]:
    return next((r for r in rows if r["tool"] == tool and r["n"] == n and r["status"] == "ok"), None)


def _verdict(met: Optional[bool]) -> str:
    return "NOT MEASURED" if met is None else ("met" if met else "MISSED")


def evaluate_targets(rows: List[Dict], sizes: Sequence[int]) -> List[Dict]:
    """The issue's targets at each N (accuracy, speed) and the memory check, from the numbers."""
    targets = []
    for n in sizes:
        targets += [_accuracy_target(rows, n), _speed_target(rows, n)]
    targets.append(_memory_target(rows, sizes))
    return targets


def _accuracy_target(rows: List[Dict], n: int) -> Dict:
    ours = _lookup(rows, OURS, n)
    peers = [r for r in (_lookup(rows, p, n) for p in PEERS) if r and r.get("error_vs_centred")]
    met, detail = None, "no nnsim_fast or peer result against exact"
    if ours and ours.get("error_vs_centred") and peers:
        best = min(peers, key=_max_error)
        met = _max_error(ours) <= _max_error(best)
        detail = (f"nnsim_fast compare_models {_error_text(ours['error_vs_centred'])} vs most "
                  f"accurate peer {LABELS[best['tool']]} {_error_text(best['error_vs_centred'])}, "
                  "against exact centred CKA")
        sketch = _lookup(rows, "nnsim", n)
        if sketch and sketch.get("error_vs_centred"):
            detail += (f" (for reference, the sketch of one model at a time: "
                       f"{_error_text(sketch['error_vs_centred'])})")
    return {"target": f"accuracy at N={n}: at least as accurate as the best peer (max abs err vs exact "
                      "centred CKA)", "n": n, "met": met, "detail": detail}


def _time_text(row: Dict) -> str:
    samples = row["seconds_samples"]
    if len(samples) == 1:
        return f"{row['seconds']:.1f} s (1 run)"
    return f"{row['seconds']:.1f} s (median of {len(samples)}, {min(samples):.1f}-{max(samples):.1f})"


def _speed_target(rows: List[Dict], n: int) -> Dict:
    ours = _lookup(rows, OURS, n)
    timed = [r for r in (_lookup(rows, p, n) for p in PEERS) if r]
    met, detail = None, "no nnsim_fast or peer time"
    if ours and timed:
        fastest = min(timed, key=lambda r: r["seconds"])
        ratio = ours["seconds"] / fastest["seconds"]
        met = ratio <= TARGET_SPEED_RATIO
        detail = (f"nnsim_fast compare_models {_time_text(ours)} vs fastest peer {LABELS[fastest['tool']]} "
                  f"{_time_text(fastest)}: {ratio:.2f}x (target <= {TARGET_SPEED_RATIO:g}x)")
        floor = _lookup(rows, "forward", n)
        if floor:
            detail += (f"; above the {floor['seconds']:.1f} s of the forward passes alone: "
                       f"nnsim_fast {ours['seconds'] - floor['seconds']:.1f} s, "
                       f"{LABELS[fastest['tool']]} {fastest['seconds'] - floor['seconds']:.1f} s")
        if ours.get("cpu_seconds") and fastest.get("cpu_seconds"):
            detail += (f"; CPU time {ours['cpu_seconds']:.1f} s vs {fastest['cpu_seconds']:.1f} s "
                       f"({ours['cpu_seconds'] / fastest['cpu_seconds']:.2f}x)")
    return {"target": f"speed at N={n}: within {TARGET_SPEED_RATIO:g}x the fastest peer's time (features)",
            "n": n, "met": met,
            "detail": detail}


def _memory_target(rows: List[Dict], sizes: Sequence[int]) -> Dict:
    small, large = min(sizes), max(sizes)
    low, high = _lookup(rows, OURS, small), _lookup(rows, OURS, large)
    met, detail = None, "needs nnsim_fast at two sizes"
    if low and high and small != large:
        ratio = high["working_mib"] / max(low["working_mib"], 1.0)
        met = ratio <= TARGET_MEMORY_GROWTH
        detail = (f"peak RSS above the model/data baseline: {low['working_mib']:.0f} MiB at N={small}, "
                  f"{high['working_mib']:.0f} MiB at N={large} ({ratio:.2f}x for {large / small:.0f}x "
                  f"the data; target <= {TARGET_MEMORY_GROWTH}x)")
    return {"target": "memory flat in N (nnsim_fast compare_models)",
            "n": None, "met": met, "detail": detail}


# --------------------------------------------------------------------------- report

def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _label(tool: str, m: int) -> str:
    return LABELS[tool].format(m=m)


def _error_cells(errors: Optional[Dict[str, float]]) -> List[str]:
    if not errors:
        return ["—", "—"]
    if errors["max"] is None:
        return [f"non-finite ({errors['non_finite']} entries)", "—"]
    return [f"{errors['max']:.4f}", f"{errors['mean']:.4f}"]


def _error_text(errors: Dict) -> str:
    if errors["max"] is None:
        return (f"non-finite in {errors['non_finite']} entries (max abs err "
                f"{_fmt(errors.get('max_finite'), 4)} elsewhere)")
    return f"max abs err {errors['max']:.4f} (mean {errors['mean']:.4f})"


TABLE_HEADER = ("tool", "N", "time s", "runs (min-max s)", "vs fastest peer", "above forward floor s",
                "CPU s", "peak RSS MiB", "above baseline MiB", "max abs err vs centred",
                "mean abs err vs centred", "max abs err vs debiased", "mean abs err vs debiased")


def _time_cells(row: Dict, rows: List[Dict]) -> List[str]:
    peers = [r for r in rows if r["tool"] in PEERS and r["n"] == row["n"] and r["status"] == "ok"]
    floor = _lookup(rows, "forward", row["n"])
    samples = row["seconds_samples"]
    return [f"{row['seconds']:.1f}", f"{len(samples)} ({min(samples):.1f}-{max(samples):.1f})",
            f"{row['seconds'] / min(r['seconds'] for r in peers):.2f}x" if peers else "—",
            f"{row['seconds'] - floor['seconds']:.1f}" if floor and row["tool"] != "forward" else "—",
            _fmt(row.get("cpu_seconds"), 1)]


def format_table(report: Dict) -> str:
    m, rows = report["settings"]["m"], report["rows"]
    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|---|" + "---:|" * (len(TABLE_HEADER) - 1)]
    for row in rows:
        label = _label(row["tool"], m)
        if row["status"] != "ok":
            cells = [label, str(row["n"]), f"{row['status']}: {row.get('message', '')}"]
            lines.append("| " + " | ".join(cells + [""] * (len(TABLE_HEADER) - 3)) + " |")
            continue
        cells = [label, str(row["n"])] + _time_cells(row, rows) + [
            f"{row['peak_rss_mib']:.0f}",
            f"{row['working_mib']:.0f}" + (" (setup)" if row["peak_during_setup"] else "")]
        if row["tool"] in NOT_ESTIMATES:
            cells += ["0 (reference)", "", "0 (reference)", ""] if row["tool"] in REFERENCES else [""] * 4
        else:
            cells += _error_cells(row.get("error_vs_centred")) + _error_cells(row.get("error_vs_debiased"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_error_bars(report: Dict) -> str:
    lines = ["| row | N | max standard error | max abs err / SE | entries within 2 SE | SE 0 but off | "
             "debiased: max abs err vs exact debiased | debiased: within 2 SE |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in report["rows"]:
        if row.get("error_bars") is None:
            continue
        bars, debiased = row["error_bars"], row.get("debiased_error_bars") or {}
        lines.append(f"| {_label(row['tool'], report['settings']['m'])} | {row['n']} | "
                     f"{bars['max_standard_error']:.4f} | {_fmt(bars['max_z'], 2)} | "
                     f"{bars['within_2se']:.0%} | {bars['zero_se_off']} | "
                     f"{_fmt((row.get('debiased_error_vs_debiased') or {}).get('max'), 4)} | "
                     f"{_fmt(debiased.get('within_2se'), 3)} |")
    return "\n".join(lines)


def format_ranks(report: Dict) -> str:
    """Effective ranks of the layers' centred kernels as nnsim_fast estimated them."""
    lines = []
    for row in report["rows"]:
        ranks = row.get("effective_rank")
        if row["status"] != "ok" or not ranks:
            continue
        text = "; ".join(f"model {side}: " + ", ".join(f"{k} {v:.0f}" for k, v in values.items())
                         for side, values in ranks.items())
        lines.append(f"- {_label(row['tool'], report['settings']['m'])}, N={row['n']}: {text}.")
    return "\n".join(lines)


def _diff_text(a, b) -> str:
    """Max |a - b| over the finite entries, and how many entries were not finite."""
    diff = (_tensor(a) - _tensor(b)).abs()
    finite = torch.isfinite(diff)
    text = f"{float(diff[finite].max()):.4f}" if bool(finite.any()) else "—"
    bad = int((~finite).sum())
    return text + (f", {bad} entries not finite" if bad else "")


#: Why a float32 peer differs from the float64 row of the same estimator.
FLOAT32_CAUSE = {"pytorch_cka": "float32 Grams and HSIC sums, then a clip to [0, 1]",
                 "torch_cka": "float32 Grams and HSIC sums"}


def _estimand_line(report: Dict, n: int) -> Optional[str]:
    """What the minibatch peers estimate at this N, in numbers from the run."""
    rows, batch = report["rows"], report["settings"]["batch"]
    exact = _lookup(rows, "exact", n)
    if not exact:
        return None
    text = (f"- N={n} ({math.ceil(n / batch)} batch(es) of at most {batch}): exact centred and exact "
            f"debiased CKA differ by up to {_diff_text(exact['matrix'], exact['debiased_matrix'])}.")
    for tool in (OURS, "nnsim"):
        ours = _lookup(rows, tool, n)
        if ours and ours.get("error_vs_centred"):
            text += (f" {_label(tool, report['settings']['m'])}: "
                     f"{_error_text(ours['error_vs_centred'])} against the centred CKA of all N, "
                     f"which it targets; {_error_text(ours['error_vs_debiased'])} against the "
                     "debiased one.")
    for row in (_lookup(rows, p, n) for p in PEERS):
        if row and row.get("error_vs_debiased"):
            text += (f" {LABELS[row['tool']]}: {_error_text(row['error_vs_debiased'])} against the "
                     f"debiased CKA of all N, {_error_text(row['error_vs_centred'])} against the "
                     "centred one.")
    float64 = _lookup(rows, "ckatorch", n)
    for tool, cause in FLOAT32_CAUSE.items():
        row = _lookup(rows, tool, n)
        if row and float64 and "matrix" in row and "matrix" in float64:
            text += (f" {LABELS[tool]} differs from the float64 ckatorch row (the same estimator on the "
                     f"same batches) by up to {_diff_text(row['matrix'], float64['matrix'])} ({cause}).")
    return text


def _why_accuracy(report: Dict, n: int) -> str:
    rows = report["rows"]
    ours, exact = _lookup(rows, OURS, n), _lookup(rows, "exact", n)
    peers = [r for r in (_lookup(rows, p, n) for p in PEERS) if r and r.get("error_vs_centred")]
    best = min(peers, key=_max_error)
    bars = ours.get("error_bars") or {}
    text = (f"- Accuracy at N={n}: nnsim_fast compare_models's entries are off by up to "
            f"{_fmt(ours['error_vs_centred']['max'], 4)} with standard errors up to "
            f"{_fmt(bars.get('max_standard_error'), 4)} (largest |err| / SE {_fmt(bars.get('max_z'), 2)}, "
            f"{_fmt(bars.get('within_2se'), 2)} of the entries within 2 SE). The minibatch peers "
            f"compute every within-batch pair exactly and are off by up to "
            f"{_fmt(best['error_vs_centred']['max'], 4)} ({LABELS[best['tool']]}) against the centred "
            "CKA of all N")
    if exact:
        text += (f"; their own estimand, a debiased CKA, differs from it by up to "
                 f"{_diff_text(exact['matrix'], exact['debiased_matrix'])} here")
    return text + "."


def _why_speed(report: Dict, n: int) -> str:
    rows = report["rows"]
    ours, floor = _lookup(rows, OURS, n), _lookup(rows, "forward", n)
    fastest = min((r for r in (_lookup(rows, p, n) for p in PEERS) if r), key=lambda r: r["seconds"])
    if not floor:
        return (f"- Speed at N={n}: nnsim_fast {ours['seconds']:.1f} s, {LABELS[fastest['tool']]} "
                f"{fastest['seconds']:.1f} s (no forward-pass floor was measured).")
    text = (f"- Speed at N={n}: both models' forward passes alone take {floor['seconds']:.1f} s "
            f"({floor['runs']} run(s)); on top of them nnsim_fast compare_models spends "
            f"{ours['seconds'] - floor['seconds']:.1f} s")
    text += f" (its Gram products over blocks of {ours.get('block', '?')} samples)"
    below = " (below the floor: run-to-run noise)" if fastest["seconds"] < floor["seconds"] else ""
    return (text + f" and {LABELS[fastest['tool']]} {fastest['seconds'] - floor['seconds']:.1f} s{below} "
            f"(its B x B Gram matrices per batch); CPU time {_fmt(ours.get('cpu_seconds'), 1)} s "
            f"against {_fmt(fastest.get('cpu_seconds'), 1)} s.")


def format_why(report: Dict) -> str:
    """For each missed target, the numbers that explain it."""
    lines = []
    for target in report["targets"]:
        if target["met"] is not False or target.get("n") is None:
            continue
        why = _why_accuracy if target["target"].startswith("accuracy") else _why_speed
        lines.append(why(report, target["n"]))
    return "\n".join(lines) or "- every measured target is met."


def format_estimands(report: Dict) -> str:
    lines = [_estimand_line(report, n) for n in report["settings"]["sizes"]]
    return "\n".join(line for line in lines if line)


def _row_notes(row: Dict, label: str, floor: Optional[Dict]) -> List[str]:
    notes = []
    if row.get("peer_error"):
        notes.append(f"- {label}: the package raised `{row['peer_error']}` after computing its "
                     "matrix; the matrix it stored is the one judged.")
    if row.get("warnings"):
        notes.append(f"- {label}: nnsim_fast warned: {row['warnings'][0]}")
    bars = row.get("error_bars") or {}
    if bars.get("zero_se_off"):
        notes.append(f"- {label}: {bars['zero_se_off']} entries came with standard error 0 yet differ "
                     "from the exact value (an estimated trace <= 0 made the estimator treat the "
                     "layer's kernel as zero).")
    if floor and row["tool"] != "forward" and row.get("seconds") is not None \
            and row["seconds"] < floor["seconds"]:
        notes.append(f"- {label}: {row['seconds']:.1f} s, below the {floor['seconds']:.1f} s of the "
                     f"forward passes alone at this N ({floor['runs']} run(s)): run-to-run noise on "
                     "this machine is at least that large.")
    return notes


def format_run_notes(report: Dict) -> str:
    """What the run itself recorded: peer failures, resolution warnings, error-bar failures,
    times below the forward-pass floor."""
    notes = []
    for row in report["rows"]:
        label = f"{_label(row['tool'], report['settings']['m'])}, N={row['n']}"
        if row["status"] == "ok":
            notes += _row_notes(row, label, _lookup(report["rows"], "forward", row["n"]))
    checks = [r for r in report["rows"] if r.get("class_check")]
    if checks:
        notes.append(f"- ckatorch's own `CKA` class on these models (8 images, untimed): "
                     f"`{checks[0]['class_check']}`.")
    return "\n".join(notes) or "- nothing to note."


def format_matrices(report: Dict) -> str:
    """The reference matrices, so that the errors can be read against the values."""
    lines = []
    for row in report["rows"]:
        if row["tool"] not in REFERENCES or row["status"] != "ok":
            continue
        for key, what in (("matrix", "centred"), ("debiased_matrix", "debiased")):
            values = "; ".join(" ".join(f"{v:.3f}" for v in line) for line in row[key])
            lines.append(f"- {_label(row['tool'], 0)}, N={row['n']}, {what} CKA (rows: model A "
                         f"{', '.join(row['layers_a'])}; columns: model B): {values}")
    return "\n".join(lines)


def format_capabilities(versions: Dict[str, Optional[str]]) -> str:
    columns = CAPABILITIES["columns"]
    lines = ["| package | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for tool in ("nnsim", "pytorch_cka", "torch_cka", "ckatorch"):
        name = "nnsim_fast" if tool == "nnsim" else LABELS[tool]
        version = versions.get(tool) or "not installed"
        lines.append(f"| {name} {version} | " + " | ".join(CAPABILITIES[tool]) + " |")
    return "\n".join(lines)


def _source_text(source: Optional[Dict]) -> str:
    if not source:
        return ""
    return (f" (nnsim_fast from commit {source['commit']}"
            + (", with uncommitted changes" if source["nnsim_fast_modified"] else "") + ")")


def _setup_lines(report: Dict) -> List[str]:
    host, settings, models = report["host"], report["settings"], report["models"]
    dims = next((r["feature_dims"] for r in report["rows"] if r.get("feature_dims")), {})
    versions = ", ".join(f"{'nnsim_fast' if t == 'nnsim' else LABELS[t]} {v or 'not installed'}"
                         for t, v in report["versions"].items() if t in ("nnsim",) + PEERS)
    return [
        f"- Machine: {host['cpu_model']}; {host['cores_usable']} usable of {host['cores_online']} cores; "
        f"{host['memory_total_gib']} GiB memory; torch {host['torch_version']} "
        f"({settings['threads'] or host['torch_threads']} threads); Python {host['python_version']}; "
        f"load average {host['load_average']} at the start, {report['load_average_end']} at the end.",
        f"- Versions: {versions}{_source_text(report.get('source'))}.",
        f"- Models: {models['model_a']} (A) and {models['model_b']} (B); training losses "
        f"{models.get('train_losses')}, held-out accuracy {models.get('held_out_accuracy')}.",
        f"- Data: N generated 32x32 RGB images (seed {settings['eval_data_seed']}), the same for "
        f"every tool, DataLoader batch {settings['batch']}, no shuffling (the images are generated in random "
        "class order, so consecutive batches are random subsets, as compare_models needs); N = "
        f"{', '.join(map(str, settings['sizes']))}; runs per tool: "
        + ", ".join(f"{r} at N={n}" for n, r in zip(settings["sizes"], settings["repeats"]))
        + " (each in a fresh process; medians; the exact references and the nnsim_fast hadamard rows "
        "once per N); the hadamard rows "
        f"up to N={settings['exact_hadamard_max_n']} (exact) and "
        + (f"up to N={settings['nnsim_hadamard_max_n']}" if settings.get("nnsim_hadamard_max_n")
           else "at every N") + " (nnsim_fast).",
        f"- Layers: the four residual stages of both models, layer x layer (4 x 4); every tool "
        f"flattens a stage's [C, H, W] map to C*H*W features per image "
        f"({', '.join(f'{k} {v}' for k, v in dims.items())}), and so does the reference.",
    ]


TABLE_NOTE = (
    "Time: the tool's whole job in a fresh process (both models' forward passes over the N images, "
    "plus backward passes for the hadamard rows, and the CKA matrix), median of the runs; 'forward "
    "passes only' is the floor every tool pays (both models, inference mode, no hooks), and 'above "
    "forward floor' is a row's time minus it; CPU s: the process's user + system time during the job "
    "(median), less sensitive than wall time to other load on the machine. Peak RSS: the process's "
    'high-water mark of resident memory during the job (`VmHWM`, restarted after setup; `ru_maxrss` '
    "from `getrusage` starts at the spawning process's size on Linux, so it is recorded in the JSON "
    'but not used); above baseline: that peak minus the resident memory after imports, both models, '
    "the images and the DataLoader were built ('(setup)': the peak could not be restarted and came "
    'before the job). Errors: absolute difference from the exact matrix at the same N over the 4 x 4 '
    "layer pairs; 'centred' is the plain centred CKA (H K H over all N pairs, float64), the quantity "
    "nnsim_fast's default estimator and the issue's targets refer to; 'debiased' is the CKA of the "
    'unbiased HSIC (Song et al.) over all N. Hadamard rows are judged against the exact hadamard '
    "reference; vs fastest peer = time / fastest peer's time at that N.")


def format_report(report: Dict) -> str:
    parts = [
        "## Peers: CKA packages side by side",
        "",
        f"Produced by `{report['command']}` on {report['host']['date_utc']} (run time "
        f"{report['run_seconds']:.0f} s); `--render` rewrites this file from `results/peers.json`.",
        "",
        *_setup_lines(report),
        "",
        format_table(report),
        "",
        TABLE_NOTE,
        "",
        "### Targets",
        "",
        "\n".join(f"- {t['target']}: **{_verdict(t['met'])}**. {t['detail']}." for t in report["targets"]),
        "",
        "Why, in the run's numbers:",
        "",
        format_why(report),
        "",
        "### What each tool estimates",
        "",
        METHOD_NOTE,
        "",
        format_estimands(report),
        "",
        "### nnsim_fast's error bars against the exact errors",
        "",
        format_error_bars(report),
        "",
        "Effective rank (Tr A)^2 / |A|_F^2 of each layer's centred kernel, as estimated from the "
        "sketches (how many directions the kernel spreads its energy over):",
        "",
        format_ranks(report),
        "",
        "### Notes recorded by the run",
        "",
        format_run_notes(report),
        "",
        "### Reference values",
        "",
        format_matrices(report),
        "",
        "### What each package supports (from its source)",
        "",
        format_capabilities(report["versions"]),
        "",
        "### What the peers do (read from their source)",
        "",
        "\n".join(f"- {LABELS[t]}: {note}" for t, note in PEER_NOTES.items()),
    ]
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000],
                        help="numbers of images N (default: 2000 10000)")
    parser.add_argument("--width", type=int, default=32,
                        help="first-stage channels of the ResNet-18 (64 is the original; default 32)")
    parser.add_argument("--batch", type=int, default=250, help="DataLoader batch size for every tool")
    parser.add_argument("--m", type=int, default=512, help="nnsim_fast sketch size")
    parser.add_argument("--tools", default=",".join(TOOLS),
                        help=f"comma-separated subset of {', '.join(TOOLS)}")
    parser.add_argument("--repeats", type=int, nargs="+", default=[3, 1],
                        help="runs per (tool, N), one value for all sizes or one per size; medians "
                             "reported (the exact references and the nnsim_fast hadamard row run once; "
                             "default: 3 at the first size, 1 after)")
    parser.add_argument("--train-samples", type=int, default=2000,
                        help="generated images model B is trained on")
    parser.add_argument("--train-epochs", type=int, default=1)
    parser.add_argument("--random-models", action="store_true",
                        help="compare two random initialisations instead (no training)")
    parser.add_argument("--exact-hadamard-max-n", type=int, default=2000,
                        help="largest N for the exact hadamard reference (its cost grows as N^2)")
    parser.add_argument("--nnsim-hadamard-max-n", type=int, default=None,
                        help="largest N for nnsim_fast's hadamard row (default: every N)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per worker")
    parser.add_argument("--json", default=os.path.join(HERE, "results", "peers.json"))
    parser.add_argument("--markdown", default=os.path.join(HERE, "PEERS.md"))
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: recompute the targets from the rows in --json and "
                             "rewrite it and --markdown")
    worker = parser.add_argument_group("one measurement (used by the driver)")
    worker.add_argument("--run", choices=TOOLS, help="run one tool in this process, print JSON")
    worker.add_argument("--n", type=int, default=2000)
    worker.add_argument("--weights", default=None, help="weights file of both models")
    return parser


def _command_line(argv: Sequence[str]) -> str:
    return " ".join(["python benchmarks/peers.py"] + [shlex.quote(a) for a in argv])


def drive(args, argv: Sequence[str]) -> Dict:
    """The full comparison: prepare the models, run every (tool, N), write JSON + Markdown."""
    def progress(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = sorted(set(tools) - set(TOOLS))
    if unknown:
        raise SystemExit(f"unknown tools {unknown}; choose from {', '.join(TOOLS)}")
    versions = installed_tools(tools)
    skipped = [t for t in tools if versions[t] is None]
    for tool in skipped:
        progress(f"{tool}: not installed, skipped")
    tools = [t for t in tools if versions[t] is not None]
    started, host, source = time.perf_counter(), harness.host_info(), source_revision()
    with tempfile.TemporaryDirectory(prefix="peers-") as work:
        weights = None
        if args.random_models:
            models = {"model_a": f"resnet18_cifar(10, width={args.width}), seed {INIT_SEED}",
                      "model_b": f"resnet18_cifar(10, width={args.width}), seed {INIT_SEED + 1}"}
        else:
            weights = os.path.join(work, "models.pt")
            models = prepare_models(args.width, args.train_samples, args.train_epochs, weights)
            progress(f"models ready: {models}")
        runs = collect(args, tools, weights, progress)
    rows = summarise(runs, args.sizes, tools)
    report = {
        "command": _command_line(argv), "host": host, "load_average_end": harness.host_info()["load_average"],
        "run_seconds": round(time.perf_counter() - started, 1),
        "settings": {"sizes": args.sizes, "width": args.width, "batch": args.batch, "m": args.m,
                     "repeats": _repeats(args), "threads": args.threads, "tools": tools,
                     "skipped_not_installed": skipped, "exact_hadamard_max_n": args.exact_hadamard_max_n,
                     "nnsim_hadamard_max_n": args.nnsim_hadamard_max_n,
                     "eval_data_seed": EVAL_DATA_SEED, "spatial": "flatten (C*H*W)"},
        "versions": versions, "source": source, "models": models, "rows": rows,
        "targets": evaluate_targets(rows, args.sizes), "capabilities": CAPABILITIES,
        "peer_notes": PEER_NOTES, "runs": [{k: v for k, v in r.items() if "matrix" not in k
                                            and "standard_errors" not in k} for r in runs]}
    _write(report, args.json, args.markdown)
    return report


def _write(report: Dict, json_path: Optional[str], markdown_path: Optional[str]) -> None:
    for path, text in ((json_path, json.dumps(report, indent=1) + "\n"),
                       (markdown_path, format_report(report))):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(text)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.run:
        try:
            result = run_one(args)
        except Exception as error:  # reported as the row's status, not as a crash of the driver
            result = {"status": "error", "message": clean_message(f"{type(error).__name__}: {error}")}
        print(json.dumps(result), flush=True)
        return 0
    if args.render:
        with open(args.json, encoding="utf-8") as handle:
            report = json.load(handle)
        report["targets"] = evaluate_targets(report["rows"], report["settings"]["sizes"])
        _write(report, args.json, args.markdown)
        return 0
    report = drive(args, argv)
    if not args.quiet:
        print(format_table(report))
        print("\n".join(f"{t['target']}: {_verdict(t['met'])}. {t['detail']}" for t in report["targets"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
