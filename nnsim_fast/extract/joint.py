"""Two models on the same batches: CKA from the exact kernel blocks of every batch.

:func:`compare_models` runs both models over ``data`` in one loop (each batch
through model A, then model B), forms the ``b x b`` kernel of every probed
layer on a block of consecutive batches, exactly, and feeds the blocks to
:class:`~nnsim_fast.pairs.BatchPairs`, which estimates the centred CKA of all N
samples (or the debiased one) from the pairs, triples and quadruples of
samples inside a block, plus exact per-sample sums.  Nothing of a block is
kept after it, so memory does not grow with N.

Compared with :func:`~nnsim_fast.sketch_model` + :func:`~nnsim_fast.similarity`
it needs both models at the same time and one dataset, gives CKA only (NBS
needs the kernels' spectra), and its error shrinks with ``N x block size``
instead of depending on ``m`` and the layers' effective rank; the loader's
batches must be random subsets of the data (shuffle, or data in random order).
"""
from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .._checks import check_bool, check_choice, check_optional_int
from ..compare import SimilarityResult
from ..options import JOINT_KINDS
from ..pairs import BatchPairs, check_groups
from .batches import check_data, read_batch
from .driver import _Monitor, _progress_bar
from .probe import LayerProbe, eval_mode, model_device
from .step import Extraction, Statistics, autograd_mode, batch_statistics

__all__ = ["compare_models", "joint_similarities"]

#: Kinds that are linear kernels of per-sample vectors (``x x^T`` summed over
#: the vectors): centring is invariant to a fixed shift of the vectors, which
#: is used to keep the blocks' entries small (see :class:`_Kernels`).
_LINEAR = {"feature": ("f",), "gradient": ("g",), "sum": ("f", "g"), "khatri_rao": ("fg",)}

#: The automatic block: rows held and kernel blocks each within this many bytes ...
BLOCK_BYTES = 256 << 20
#: ... and at most this many samples (the error falls as 1 / sqrt(N x block), the Gram
#: products cost N x block x width multiply-adds per model).
MAX_BLOCK = 512


def compare_models(model_a: nn.Module, model_b: nn.Module, data,
                   layers_a: Optional[Sequence[str]] = None,
                   layers_b: Optional[Sequence[str]] = None, *, kind: str = "hadamard",
                   debiased: bool = False, beta: float = 0.5, target: str = "expected",
                   loss_fn: Optional[Callable] = None, output_fn: Optional[Callable] = None,
                   spatial: str = "flatten", tokens: str = "mean",
                   dtype: torch.dtype = torch.float32, block: Optional[int] = None,
                   groups: Optional[int] = None,
                   max_batches: Optional[int] = None,
                   progress: Optional[bool] = None) -> SimilarityResult:
    """CKA of every layer of ``model_a`` with every layer of ``model_b``, in one joint pass.

    Both models see every batch of ``data`` (forward, plus backward unless
    ``kind="feature"``), in eval mode, with the extraction options of
    :func:`~nnsim_fast.sketch_model` (one set for both models).  The estimate
    targets the centred CKA over all N x N pairs (``debiased=True``: the CKA of
    the unbiased HSIC) of the kernel ``kind``; see :mod:`nnsim_fast.pairs`.

    Args:
        model_a, model_b: the models (may be the same object: its layers are
            then compared with each other, from one pass).
        data: batches as for :func:`~nnsim_fast.sketch_model`; they must be
            random subsets of the data (a shuffled loader, or data in random
            order; blocks that hold far fewer distinct labels than random subsets
            would raise a warning).  With one block holding all the data the
            result is exact.
        layers_a, layers_b: probed layers of each model (default: its children).
        kind: any of :data:`nnsim_fast.options.JOINT_KINDS` (every kind but
            ``"transport"``).
        dtype: precision of the per-block Gram products (float32 or float64);
            the sums over tuples are float64.
        block: consecutive whole batches are pooled into blocks of up to this
            many samples (a larger batch is a block of its own), whose pairs all
            enter the estimate: its error falls as ``1 / sqrt(N x block)`` and the
            Gram products cost ``N x block x width`` per model.  Default: as many
            as fit in :data:`BLOCK_BYTES` of rows and of ``block x block``
            kernels, up to :data:`MAX_BLOCK`.
        groups: groups of blocks for the standard errors (default 64).

    Returns:
        a :class:`~nnsim_fast.compare.SimilarityResult` with ``estimator="joint"``,
        ``n`` (samples seen), ``block`` (samples in the largest block) and
        ``error``: the standard error against the all-N value, from swapping each
        group's tuples for those inside half blocks (:mod:`nnsim_fast.pairs`; 0
        when one block held every sample).
        ``pairs`` (the :class:`~nnsim_fast.pairs.BatchPairs` sums) and
        ``positions`` (the rows of ``layers_a`` and ``layers_b`` in them) give
        the other estimand without another pass:
        ``matrix, error = result.pairs.cka(debiased=True)``, then
        ``matrix[rows][:, columns]``.
    """
    options = dict(kind=kind, debiased=debiased, beta=beta, target=target, loss_fn=loss_fn,
                   output_fn=output_fn, spatial=spatial, tokens=tokens, dtype=dtype, block=block,
                   groups=groups, max_batches=max_batches, progress=progress)
    return joint_similarities([model_a, model_b], data, [layers_a, layers_b], [(0, 1)],
                              **options)[0]


def joint_similarities(models: Sequence[nn.Module], data, layers: Sequence, pairs: Sequence[Tuple[int, int]],
                       *, kind: str = "hadamard", debiased: bool = False, dtype=torch.float32,
                       block: Optional[int] = None, groups: Optional[int] = None,
                       max_batches: Optional[int] = None, progress: Optional[bool] = None,
                       **extraction) -> List[SimilarityResult]:
    """:func:`compare_models` for several models in ONE pass: each model runs once per batch
    (one run per distinct model object) and every ``(i, j)`` of ``pairs`` comes from the same
    sums, ``layers[i]`` against ``layers[j]``.  ``extraction``: the options of
    :func:`~nnsim_fast.sketch_model` (``beta``, ``target``, ``loss_fn``, ``output_fn``,
    ``spatial``, ``tokens``).  The rows of all models' layers share the block budget."""
    kind = check_choice(kind, "kind", JOINT_KINDS)
    debiased = check_bool(debiased, "debiased")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if len(models) != len(layers) or not models:
        raise ValueError(f"give one layer list (or None) per model: {len(models)} models, "
                         f"{len(layers)} layer lists")
    pairs = [tuple(pair) for pair in pairs]
    if not pairs or any(len(pair) != 2 or not all(0 <= k < len(models) for k in pair)
                        for pair in pairs):
        raise ValueError(f"pairs must be (i, j) positions among the {len(models)} models, got "
                         f"{pairs}")
    with torch.inference_mode(False):
        sides = _sides(models, layers, dict(extraction, gradients=kind != "feature"))
        check_data(data)
        limit = check_optional_int(max_batches, "max_batches", 1)
        kernels = _Kernels(sides, kind, dtype)
        sums = BatchPairs(len(kernels.keys), check_groups(groups))
        blocks = _Blocks(check_optional_int(block, "block", 1), kernels, sums)
        _run(sides, data, limit, progress, blocks)
        if sums.n == 0:
            raise ValueError("data yielded no samples")
        matrix, error = sums.cka(debiased)
        results = []
        for i, j in pairs:
            rows, columns = kernels.positions(i), kernels.positions(j)
            result = SimilarityResult(matrix[rows][:, columns], sides.names[i], sides.names[j],
                                      error=error[rows][:, columns], estimator="joint",
                                      index="cka", kind=kind, debiased=debiased)
            result.n, result.block = sums.n, blocks.largest
            result.pairs, result.positions = sums, (rows, columns)
            results.append(result)
        return results


class _Sides:
    """The models to run (one run per distinct model object) and each side's layer names."""

    def __init__(self, runs: List[Tuple[nn.Module, Extraction]], names: List[List[str]],
                 run_of_side: List[int]) -> None:
        self.runs, self.names, self.run_of_side = runs, names, run_of_side


def _sides(models: Sequence[nn.Module], layers: Sequence, options: Dict) -> _Sides:
    names = [list(Extraction.build(model, chosen, **options).layers)
             for model, chosen in zip(models, layers)]
    distinct: List[nn.Module] = []
    run_of_side = []
    for model in models:
        found = next((k for k, seen in enumerate(distinct) if seen is model), None)
        if found is None:
            distinct.append(model)
            found = len(distinct) - 1
        run_of_side.append(found)
    runs = []
    for run, model in enumerate(distinct):
        union = list(dict.fromkeys(name for side, side_names in enumerate(names)
                                   if run_of_side[side] == run for name in side_names))
        runs.append((model, Extraction.build(model, union, **options)))
    return _Sides(runs, names, run_of_side)


class _Kernels:
    """Each probed layer's ``b x b`` kernel on a block, one entry per (run, layer).

    For the linear kinds the vectors are shifted by the first block's mean
    (fixed for the whole pass): ``H K H`` and therefore every centred quantity
    is unchanged, and the entries the estimator sums no longer carry the
    vectors' large common mean (post-ReLU features), which lowers its variance.
    """

    def __init__(self, sides: _Sides, kind: str, dtype: torch.dtype) -> None:
        self.kind, self.dtype = kind, dtype
        self.keys: List[Tuple[int, str]] = []
        for side, names in enumerate(sides.names):
            for name in names:
                key = (sides.run_of_side[side], name)
                if key not in self.keys:
                    self.keys.append(key)
        self.index = {key: position for position, key in enumerate(self.keys)}
        self.sides = sides
        self.shifts: Dict[Tuple[int, str, str], Tensor] = {}

    def positions(self, side: int) -> List[int]:
        run = self.sides.run_of_side[side]
        return [self.index[(run, name)] for name in self.sides.names[side]]

    def blocks(self, stats) -> Tensor:
        """``[L, b, b]`` kernels of every key on this block (``stats[run]``)."""
        blocks = [self._block(stats[run], run, name) for run, name in self.keys]
        return torch.stack([block.to(device=blocks[0].device, dtype=torch.float64)
                            for block in blocks])

    def _block(self, stats, run: int, name: str) -> Tensor:
        f = stats.features[name].to(self.dtype)            # detached by _run
        g = None if stats.gradients is None else stats.gradients[name].to(self.dtype)
        if self.kind in ("hadamard", "psi"):
            return _gram(f) * _gram(g)
        if self.kind == "khatri_rao" and f.shape[1] != g.shape[1]:
            raise ValueError(f"kind='khatri_rao' needs features and gradients of one width; "
                             f"layer {name!r} has {f.shape[1]} and {g.shape[1]}")
        vectors = {"f": f, "g": g, "fg": f * g if self.kind == "khatri_rao" else None}
        out = None
        for which in _LINEAR[self.kind]:
            x = vectors[which]
            key = (run, name, which)
            if key not in self.shifts:
                self.shifts[key] = x.mean(dim=0)
            x = x - self.shifts[key]
            out = _gram(x) if out is None else out + _gram(x)
        return out


def _gram(x: Tensor) -> Tensor:
    """``x x^T`` from three of its four half-by-half tiles (the fourth is a transpose): a
    fifth less work than one GEMM, exactly symmetric."""
    rows = x.shape[0]
    if rows < 128:
        return x @ x.T
    half = rows // 2
    top, bottom = x[:half], x[half:]
    out = torch.empty(rows, rows, dtype=x.dtype, device=x.device)
    out[:half, :half] = top @ top.T
    cross = top @ bottom.T
    out[:half, half:] = cross
    out[half:, :half] = cross.T
    out[half:, half:] = bottom @ bottom.T
    return out


class _Blocks:
    """Consecutive whole batches pooled into blocks of up to ``size`` samples (more pairs per
    sample for the estimator; a larger batch is a block of its own); ``size=None`` picks it
    from the first batch's row sizes."""

    def __init__(self, size: Optional[int], kernels: _Kernels, pairs: BatchPairs) -> None:
        self.size, self.kernels, self.pairs = size, kernels, pairs
        self.pending: List[List[Statistics]] = []
        self.count = 0
        self.largest = 0         # samples in the largest block formed
        self.labels = _LabelMix()

    def add(self, stats: List[Statistics], batch: int, labels) -> None:
        if self.size is None:
            self.size = _auto_block(stats, batch, len(self.kernels.keys))
        self.pending.append(stats)
        self.count += batch
        self.labels.add(labels)
        if self.count + batch > self.size:    # the next batch of this size would not fit
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        self.labels.close_block()
        joined = [_concatenated([held[run] for held in self.pending])
                  for run in range(len(self.pending[0]))]
        self.largest = max(self.largest, self.count)
        self.pending, self.count = [], 0
        self.pairs.add(self.kernels.blocks(joined))


class _LabelMix:
    """Whether the blocks look like random subsets, judged from the labels when the batches
    carry class labels: a block holding far fewer distinct labels than a random subset of its
    size would (expected count from the overall label frequencies) means data grouped by
    class, which biases the within-block estimator.  A warning, not an error: labels cannot
    prove an order random, only sometimes show that it is not."""

    def __init__(self) -> None:
        self.block: Dict[int, int] = {}
        self.blocks: List[Tuple[int, int]] = []          # (distinct labels, samples)
        self.counts: Dict[int, int] = {}

    def add(self, labels) -> None:
        if isinstance(labels, Tensor) and labels.dim() == 1 and not labels.is_floating_point():
            for value in labels.tolist():
                self.block[value] = self.block.get(value, 0) + 1
                self.counts[value] = self.counts.get(value, 0) + 1

    def close_block(self) -> None:
        if self.block:
            self.blocks.append((len(self.block), sum(self.block.values())))
        self.block = {}

    def warn_if_grouped(self) -> None:
        if len(self.counts) < 4 or len(self.blocks) < 2:
            return
        total = sum(self.counts.values())
        p = torch.tensor([count / total for count in self.counts.values()], dtype=torch.float64)
        ratios = sorted(distinct / float((1 - (1 - p) ** size).sum())
                        for distinct, size in self.blocks)
        typical = ratios[len(ratios) // 2]
        if typical < 0.5:
            warnings.warn(
                f"the blocks of consecutive batches hold {typical:.0%} of the distinct labels a "
                "random subset of their size would (median): the data look grouped by class, "
                "and within-block pairs then misrepresent the pairs of all N; shuffle the loader "
                "(shuffle=True)", RuntimeWarning, stacklevel=4)


def _auto_block(stats: List[Statistics], batch: int, kernels: int) -> int:
    """Rows held (both models' features and gradients) and the block's ``L`` float64
    kernels each within :data:`BLOCK_BYTES`; at most :data:`MAX_BLOCK`, at least a batch."""
    row = sum(t.element_size() * t[0].numel() for held in stats
              for group in (held.features, held.gradients or {}) for t in group.values())
    by_rows = BLOCK_BYTES // max(row, 1)
    by_kernels = int(math.isqrt(BLOCK_BYTES // (8 * 2 * kernels)))
    return max(batch, min(MAX_BLOCK, by_rows, by_kernels))


def _concatenated(parts: List[Statistics]) -> Statistics:
    if len(parts) == 1:
        return parts[0]
    gradients = None if parts[0].gradients is None else \
        {name: torch.cat([p.gradients[name] for p in parts]) for name in parts[0].gradients}
    return Statistics({name: torch.cat([p.features[name] for p in parts])
                       for name in parts[0].features}, gradients, parts[0].shapes)


def _run(sides: _Sides, data, limit: Optional[int], progress, blocks: _Blocks) -> None:
    gradients = sides.runs[0][1].gradients
    monitors = [_Monitor() for _ in sides.runs]
    bar = _progress_bar(data, progress, desc="comparing")
    try:
        with autograd_mode(gradients), contextlib.ExitStack() as stack:
            probes = []
            for model, extraction in sides.runs:
                stack.enter_context(eval_mode(model))
                probes.append(stack.enter_context(LayerProbe(
                    model, extraction.layers, extraction.gradients, extraction.default_layers)))
            for position, raw in enumerate(itertools.islice(data, limit)):
                label = f"batch {position}"
                batch = read_batch(raw, label)
                if batch.size:
                    stats = []
                    for (model, extraction), probe, monitor in zip(sides.runs, probes, monitors):
                        stats.append(_detached(batch_statistics(
                            model, probe, batch.to(model_device(model)), extraction, label)))
                        monitor.observe(stats[-1], label)
                    blocks.add(stats, batch.size, batch.labels)
                bar.update(batch.size)
            blocks.flush()
        blocks.labels.warn_if_grouped()
    finally:
        bar.close()
    for monitor in monitors:
        monitor.warn_zero_gradients()


def _detached(stats: Statistics) -> Statistics:
    def plain(tensors):
        return None if tensors is None else {k: v.detach() for k, v in tensors.items()}
    return Statistics(plain(stats.features), plain(stats.gradients), stats.shapes)
