"""The pass over the data, shared by every consumer of per-batch statistics.

:class:`Pass` runs the loop -- read a batch, skip it if a resumed checkpoint
holds it, run it through the model (:func:`~nnsim_fast.extract.step.batch_statistics`),
hand the result to a sink -- for any sink with the ``update(features,
gradients=None, *, rows=None, feature_shapes=None, label="")`` protocol: a
sketched :class:`~nnsim_fast.sketch.Representation` (:func:`sketch_model`), an
exact :class:`~nnsim_fast.exact.ExactRepresentation` (:func:`exact_model`) or
an in-memory collector (:func:`features_and_gradients`).
"""
from __future__ import annotations

import itertools
import os
import sys
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .._checks import check_bool, check_int, check_optional_int
from ..sketch import Representation, SketchSpec
from .batches import Batch, check_data, read_batch
from .checkpoint import Checkpointer, Skip
from .distributed import DistributedPlan, finish
from .probe import LayerProbe, eval_mode, model_device
from .step import Extraction, Statistics, autograd_mode, batch_statistics

__all__ = ["Pass", "sketch_model", "exact_model", "features_and_gradients"]


class _NoBar:
    def update(self, count: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(data, progress: Optional[bool], desc: str = "sketching"):
    if progress is None:
        progress = sys.stderr.isatty()
    if not check_bool(progress, "progress"):
        return _NoBar()
    total = None
    # A DataLoader's sampler knows how many samples this process will see (a
    # DistributedSampler shard, a subset); fall back to the dataset's length.
    for source in (getattr(data, "sampler", None), getattr(data, "dataset", None)):
        try:
            total = len(source)
            break
        except TypeError:
            continue
    from tqdm.auto import tqdm
    return tqdm(total=total, unit=" samples", unit_scale=True, desc=desc,
                dynamic_ncols=True)


class _Monitor:
    """Checks across batches: a layer's width stays fixed, and its gradient is not all zero."""

    def __init__(self) -> None:
        self.widths: Dict[str, Tuple[int, Tuple[int, ...]]] = {}
        self.peaks: Dict[str, Tensor] = {}

    def observe(self, stats: Statistics, label: str) -> None:
        for name, f in stats.features.items():
            self._check_width(name, f.shape[1], stats.shapes[name], label)
        for name, g in (stats.gradients or {}).items():
            if g.numel():
                # Kept on the device (no sync per batch); read once at the end.
                peak = g.detach().abs().amax()
                self.peaks[name] = torch.maximum(self.peaks[name], peak) \
                    if name in self.peaks else peak

    def _check_width(self, name: str, width: int, shape: Tuple[int, ...], label: str) -> None:
        first_width, first_shape = self.widths.setdefault(name, (width, shape))
        if width == first_width:
            return
        if len(shape) == 2:
            hint = ("tokens='flatten' keeps every token, so the width follows the sequence "
                    "length: use tokens='mean' or 'first', or pad every batch to one length")
        else:
            hint = ("the width follows the input size: use spatial='mean' for feature maps, or "
                    "give every batch inputs of one size")
        raise ValueError(f"layer {name!r} gives {width} features per sample in {label} (output "
                         f"shape {list(shape)}) but {first_width} in the first batch (shape "
                         f"{list(first_shape)}); {hint}")

    def warn_zero_gradients(self) -> None:
        dead = [name for name, peak in self.peaks.items() if float(peak) == 0.0]
        if dead:
            warnings.warn(
                f"layers {dead}: the gradient is identically zero on every sample, so these "
                "layers do not reach the loss (an unused branch, a detach(), a no_grad block); "
                "their gradient-based kernels are zero and similarities with them meaningless",
                RuntimeWarning, stacklevel=4)


class Pass:
    """One pass of ``model`` over ``data`` feeding ``sink`` (see the module docstring).

    ``batches`` counts the batches consumed whose rows are in the sink (or, for
    skipped ones, in the resumed checkpoint): it is exact when the pass fails.
    """

    def __init__(self, model: nn.Module, extraction: Extraction, sink,
                 plan: Optional[DistributedPlan] = None, skip: Optional[Skip] = None) -> None:
        self.model, self.extraction, self.sink = model, extraction, sink
        self.plan, self.skip = plan, skip
        self.device = model_device(model)
        self.monitor = _Monitor()
        self.batches = 0

    def run(self, data, max_batches: Optional[int] = None, progress: Optional[bool] = False,
            after_batch: Optional[Callable[[int], None]] = None) -> None:
        extraction = self.extraction
        bar = _progress_bar(data, progress)
        try:
            with autograd_mode(extraction.gradients), eval_mode(self.model), \
                    LayerProbe(self.model, extraction.layers, extraction.gradients,
                               extraction.default_layers) as probe:
                for raw in itertools.islice(data, max_batches):
                    bar.update(self._step(probe, raw))
                    if after_batch is not None:
                        after_batch(self.batches)
        finally:
            bar.close()
        if self.skip is not None:
            self.skip.finish(self.batches)
        self.monitor.warn_zero_gradients()

    def _step(self, probe: LayerProbe, raw) -> int:
        label = f"batch {self.batches}"
        batch = read_batch(raw, label)
        if self.skip is None or not self.skip.take(self.batches, batch.size):
            self._add(probe, batch, label)
        self.batches += 1
        return batch.size

    def _add(self, probe: LayerProbe, batch: Batch, label: str) -> None:
        if batch.size == 0:      # nothing to add (and many models refuse empty inputs)
            return
        rows, keep = batch.rows(label), None
        if self.plan is not None:
            rows, keep = self.plan.rows(self.batches, rows, batch.size)
        stats = batch_statistics(self.model, probe, batch.to(self.device), self.extraction, label)
        if keep is not None:
            stats, rows = stats.select(keep), rows[keep]
        self.monitor.observe(stats, label)
        self.sink.update(stats.features, stats.gradients, rows=rows, feature_shapes=stats.shapes,
                         label=label)


# --------------------------------------------------------------------------- sketch_model

def sketch_model(model: nn.Module, data, layers: Optional[Sequence[str]] = None,
                 m: int = 512, seed: int = 0, beta: float = 0.5, sparsity: int = 1, *,
                 target: str = "expected", loss_fn: Optional[Callable] = None,
                 output_fn: Optional[Callable] = None, spatial: str = "flatten",
                 tokens: str = "mean", gradients: bool = True,
                 dtype: torch.dtype = torch.float32, device=None, product: bool = False,
                 mean_embedding: bool = False, psi: bool = True, psi_dim: Optional[int] = None,
                 psi_buckets: Optional[int] = None, max_batches: Optional[int] = None,
                 progress: Optional[bool] = None,
                 into: Optional[Representation] = None, distributed: bool = False, group=None,
                 checkpoint: Optional[Union[str, os.PathLike]] = None,
                 checkpoint_every: Optional[int] = None) -> Representation:
    """Sketch a model's features and expected gradients at ``layers`` over ``data``.

    One forward and one backward pass per batch (forward only with
    ``gradients=False``), in eval mode (flags restored after); concurrent calls
    on one model run one at a time (:mod:`nnsim_fast.extract.probe`).  The
    extraction options ``layers``, ``beta``, ``target``, ``loss_fn``,
    ``output_fn``, ``spatial``, ``tokens`` and ``gradients`` are described in
    :class:`~nnsim_fast.extract.step.Extraction`; models and batches in
    docs/models.md.

    Args:
        data: a DataLoader or any iterable of batches: ``x``, ``(x, y)``,
            ``(index, x, y)``, a dict with ``x`` / ``y`` / ``index``, or a dict of
            keyword arguments for the model (see :mod:`nnsim_fast.extract.batches`).
            With indices, a sample's bucket and sign depend on its dataset index,
            so shuffling, batch size and sharding do not change the sketch.
        m, seed, sparsity: the sketch (buckets, seed, hash blocks per row);
            compare models sketched with the same three.
        dtype, device: accumulator precision (float32 or float64) and place
            (default: the model's device).
        psi, psi_dim, psi_buckets, product, mean_embedding: which statistics to keep (see
            :class:`~nnsim_fast.sketch.Representation`); ``psi`` (the default
            estimator's TensorSketch halves of ``psi = g f^T``) is on by default.
        max_batches: stop after this many batches.
        progress: show a progress bar (default: when stderr is a terminal).
        into: add to an existing representation (same settings) instead of a new one.
        distributed: each rank of the initialised ``torch.distributed`` group
            sketches its shard (``data`` a DataLoader over a DistributedSampler);
            a sample repeated across ranks by the sampler's padding is counted
            once, and every rank returns the summed representation.
        group: the process group for ``distributed`` (default: the world).
        checkpoint: a file path; the partial representation is written there
            atomically every ``checkpoint_every`` batches, when a batch or the
            loader fails, and at the end.  A rerun with the same arguments and the
            same batches in the same order resumes after the last batch written
            (reading but not computing the batches before it) and gives the result
            of an uninterrupted run; data that does not match the checkpoint is
            an error.  With ``distributed``, each rank writes ``path.rank<r>``.
        checkpoint_every: batches between checkpoints (default: only at the end).

    Returns:
        A :class:`~nnsim_fast.sketch.Representation`.
    """
    with torch.inference_mode(False):
        extraction = Extraction.build(model, layers, beta=beta, target=target, loss_fn=loss_fn,
                                      output_fn=output_fn, spatial=spatial, tokens=tokens,
                                      gradients=gradients)
        check_data(data)
        limit = check_optional_int(max_batches, "max_batches", 1)
        rep = _representation(model, extraction, into, device, dict(
            m=m, seed=seed, sparsity=sparsity, dtype=dtype, psi=psi, psi_dim=psi_dim,
            psi_buckets=psi_buckets, product=product, mean_embedding=mean_embedding))
        plan = DistributedPlan.build(data, group) if check_bool(distributed, "distributed") else None
        saver = Checkpointer.build(checkpoint, checkpoint_every, into=into,
                                   suffix=plan.suffix if plan else "",
                                   settings=_settings(rep, extraction, limit, plan))
        return _sketch(model, data, extraction, rep, plan, saver, limit, progress, group)


def _representation(model: nn.Module, extraction: Extraction, into, device,
                    options: Dict) -> Representation:
    """A new, empty representation for these settings, or ``into`` checked against it."""
    meta = extraction.meta()
    fresh = Representation(options.pop("m"), options.pop("seed"), options.pop("sparsity"),
                           beta=meta.pop("beta"), gradients=extraction.gradients,
                           device=device if device is not None else model_device(model),
                           meta=meta, **options)
    if into is None:
        return fresh
    if not isinstance(into, Representation):
        raise TypeError(f"into must be a Representation, got {type(into).__name__}")
    SketchSpec.mergeable(into, fresh, what="sketch into")
    if into.layers and list(into.layers) != list(extraction.layers):
        raise ValueError(f"into holds layers {list(into.layers)}; this call probes "
                         f"{list(extraction.layers)}")
    return into


def _settings(rep: Representation, extraction: Extraction, limit: Optional[int],
              plan: Optional[DistributedPlan]) -> Dict:
    """Everything a checkpoint must agree on to be resumed."""
    return {"m": rep.m, "seed": rep.seed, "sparsity": rep.sparsity, "dtype": str(rep.dtype),
            **rep.options, **extraction.meta(), "max_batches": limit,
            "distributed": plan is not None, "world_size": plan.world if plan else 1}


def _sketch(model, data, extraction: Extraction, rep: Representation,
            plan: Optional[DistributedPlan], saver: Optional[Checkpointer], limit: Optional[int],
            progress, group) -> Representation:
    skip = None
    if saver is not None:
        resumed = saver.resume(rep.device, data, limit)
        if resumed is not None:
            rep, done, complete = resumed
            if complete:
                return finish(rep, plan, group)
            skip = Skip(saver.path, done, rep.n, plan)
    run = Pass(model, extraction, rep, plan, skip)
    try:
        run.run(data, limit, progress,
                None if saver is None else lambda batches: saver.after_batch(rep, batches))
    except BaseException:
        if saver is not None:
            saver.after_failure(rep, run.batches)
        raise
    if rep.n == 0 and plan is None:
        raise ValueError("data yielded no samples")
    if saver is not None:
        saver.save(rep, run.batches, complete=True)
    return finish(rep, plan, group)


# --------------------------------------------------------------------------- exact_model

def exact_model(model: nn.Module, data, layers: Optional[Sequence[str]] = None, *,
                beta: float = 0.5, target: str = "expected", loss_fn: Optional[Callable] = None,
                output_fn: Optional[Callable] = None, spatial: str = "flatten",
                tokens: str = "mean", gradients: bool = True, dtype: torch.dtype = torch.float32,
                device=None, max_rows: int = 20000,
                storage: Optional[Union[str, os.PathLike]] = None,
                max_batches: Optional[int] = None, progress: Optional[bool] = None):
    """Every row of the features (and gradients) :func:`sketch_model` would sketch.

    The same pass and options as :func:`sketch_model` (see
    :class:`~nnsim_fast.extract.step.Extraction`), feeding an
    :class:`~nnsim_fast.exact.ExactRepresentation` (``dtype``, ``device``,
    ``max_rows`` and ``storage`` are its constructor's arguments) for exact
    indices over all N x N pairs: the reference for a sketch, or a way to
    choose ``m`` on a subset.  Its temporary files are removed if the pass fails.
    """
    from ..exact import ExactRepresentation
    with torch.inference_mode(False):
        extraction = Extraction.build(model, layers, beta=beta, target=target, loss_fn=loss_fn,
                                      output_fn=output_fn, spatial=spatial, tokens=tokens,
                                      gradients=gradients)
        check_data(data)
        limit = check_optional_int(max_batches, "max_batches", 1)
        rep = ExactRepresentation(dtype=dtype, device=device, max_rows=max_rows, storage=storage,
                                  meta=extraction.meta())
        try:
            Pass(model, extraction, rep).run(data, limit, progress)
            if rep.n == 0:
                raise ValueError("data yielded no samples")
        except BaseException:
            rep.close()
            raise
        return rep


# --------------------------------------------------------------------------- unsketched

class _Collector:
    """A sink that keeps every row in memory, float64."""

    def __init__(self) -> None:
        self.n = 0
        self.rows: Dict[str, Tuple[List[Tensor], List[Tensor]]] = {}

    def update(self, features, gradients=None, *, rows=None, feature_shapes=None, label=""):
        for name, f in features.items():
            kept = self.rows.setdefault(name, ([], []))
            kept[0].append(f.detach().to(torch.float64))
            if gradients is not None:
                kept[1].append(gradients[name].detach().to(torch.float64))
        self.n += next(iter(features.values())).shape[0]

    def result(self) -> Dict[str, Tuple[Tensor, Optional[Tensor]]]:
        return {name: (torch.cat(fs), torch.cat(gs) if gs else None)
                for name, (fs, gs) in self.rows.items()}


def features_and_gradients(model: nn.Module, x: Tensor, layers: Sequence[str],
                           beta: float = 0.5, *, spatial: str = "flatten", tokens: str = "mean",
                           batch: int = 256, target: str = "expected",
                           y: Optional[Tensor] = None, loss_fn: Optional[Callable] = None,
                           output_fn: Optional[Callable] = None
                           ) -> Dict[str, Tuple[Tensor, Tensor]]:
    """Per-sample features and expected gradients, unsketched: ``{layer: (f, g)}``, float64 ``[N, d]``.

    The same quantities :func:`sketch_model` sketches (same options, same
    pass), kept per sample -- for small N, tests, or a test point's own ``f``
    and ``g`` (e.g. kernel ridge regression against sketched buckets).
    """
    with torch.inference_mode(False):
        extraction = Extraction.build(model, layers, beta=beta, target=target, loss_fn=loss_fn,
                                      output_fn=output_fn, spatial=spatial, tokens=tokens)
        size = check_int(batch, "batch", 1)
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a tensor of inputs, got {type(x).__name__}")
        chunks = list(x.split(size))
        data = chunks if y is None else list(zip(chunks, torch.as_tensor(y).split(size)))
        collector = _Collector()
        Pass(model, extraction, collector).run(data)
        if collector.n == 0:
            raise ValueError("x holds no samples")
        return collector.result()
