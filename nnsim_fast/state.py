"""The per-layer statistics of a sketched representation, declared once.

Every statistic a :class:`~nnsim_fast.sketch.Representation` keeps for a layer is
one row of :data:`STATS`: its name, the option that switches it on, its shape
(in symbolic dimensions), whether it is an exact float64 sum or a sketch in the
accumulator dtype, and what it holds.  Allocation, copying, device moves,
merging, all-reduce, saving, loading and file validation all loop over this
table, so a new statistic is one new row here and one line in
:func:`batch_terms`.

Notation: ``S`` is the ``m x N`` sketch of the sample axis (see
:mod:`nnsim_fast.ops`), ``F`` (``N x df``) and ``G`` (``N x dg``) the layer's
features and expected gradients, ``psi_i = g_i (x) f_i`` the feature map of the
paper's kernel ``K = K_f o K_g``, and ``T_h`` (``h = 0, 1``) two independent
TensorSketches of ``psi`` (:mod:`nnsim_fast.psi`).  Sums run over the rows seen.
``S_p`` is the same hash with ``mp`` (``psi_buckets``) buckets, the resolution of the psi
halves.  Nothing here depends on N: memory is ``O(m * (df + dg) + 2 mp w)`` per layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["Stat", "STATS", "WIDE", "GROUPS", "COMPARED_META", "LayerStats", "RowSet", "stat_shape",
           "enabled_stats", "batch_terms", "zeros_like_structure"]

#: Settings (in a representation's ``meta``) that must agree for two representations'
#: rows to be summed.
COMPARED_META = ("beta", "target", "spatial", "tokens")

#: Options that switch groups of statistics on (``features`` is always on).
GROUPS = ("features", "gradients", "psi", "product", "mean_embedding")


@dataclass(frozen=True)
class Stat:
    name: str
    group: str                 # the option (GROUPS) that enables it
    shape: Tuple[str, ...]     # symbolic: "m", "mp" (psi buckets), "df", "dg", "w" (psi width),
    #                            "h" (= 2 halves), "M" (= WIDE buckets)
    exact: bool                # float64 exact sum (True) or sketch in the accumulator dtype
    doc: str


STATS: Tuple[Stat, ...] = (
    Stat("sketch_f", "features", ("m", "df"), False, "S F"),
    Stat("sum_f", "features", ("df",), True, "sum_i f_i (data centring)"),
    Stat("sqnorm_f", "features", (), True, "sum_i |f_i|^2 = Tr K_f"),
    Stat("sketch_sqnorm_f", "features", ("m",), True, "S (|f_i|^2)_i (diagonal of K_f, sketched)"),
    Stat("quartic_f", "features", (), True, "sum_i |f_i|^4 = sum_i K_f[i, i]^2"),
    Stat("sketch_g", "gradients", ("m", "dg"), False, "S G"),
    Stat("sum_g", "gradients", ("dg",), True, "sum_i g_i"),
    Stat("sqnorm_g", "gradients", (), True, "sum_i |g_i|^2 = Tr K_g"),
    Stat("sketch_sqnorm_g", "gradients", ("m",), True, "S (|g_i|^2)_i"),
    Stat("quartic_g", "gradients", (), True, "sum_i |g_i|^4"),
    Stat("trace", "gradients", (), True, "sum_i |f_i|^2 |g_i|^2 = Tr K, K = K_f o K_g"),
    Stat("quartic_psi", "gradients", (), True, "sum_i |f_i|^4 |g_i|^4 = sum_i K[i, i]^2"),
    # The psi halves have their own bucket count mp (psi_buckets, a multiple of m): the same
    # hash at a finer resolution, so the default estimator's sample-axis error is that of mp
    # buckets while the m x d sketches of F and G stay at m (docs/estimators.md, section 6).
    Stat("sketch_psi", "psi", ("h", "mp", "w"), False, "S_p T_h(Psi), h = 0, 1"),
    Stat("sum_psi", "psi", ("h", "w"), True, "sum_i T_h(psi_i)"),
    # Each half's own row norms: with them the half's centring is exact (the large common
    # mean's energy cancels within the half; docs/estimators.md section 8).
    Stat("sqnorm_psih", "psi", ("h",), True, "sum_i |T_h psi_i|^2"),
    Stat("sketch_sqnorm_psih", "psi", ("h", "mp"), True, "S_p (|T_h psi_i|^2)_i"),
    Stat("sketch_sqnorm_psi", "psi", ("mp",), True, "S_p (|f_i|^2 |g_i|^2)_i (diagonal of K)"),
    Stat("psi_ones", "psi", ("mp",), True, "S_p 1 (the same for every layer)"),
    Stat("psi_counts", "psi", ("mp",), True, "rows per bucket of S_p (the same for every layer)"),
    Stat("wide_sqnorm_psih", "psi", ("h", "M"), True, "S' (|T_h psi_i|^2)_i"),
    Stat("sketch_fg", "product", ("m", "df"), False, "S (F o G)"),
    Stat("sum_fg", "product", ("df",), True, "sum_i f_i o g_i"),
    Stat("sqnorm_fg", "product", (), True, "sum_i |f_i o g_i|^2"),
    Stat("sketch_sqnorm_fg", "product", ("m",), True, "S (|f_i o g_i|^2)_i"),
    Stat("quartic_fg", "product", (), True, "sum_i |f_i o g_i|^4"),
    Stat("mean_psi", "mean_embedding", ("dg", "df"), True, "sum_i g_i f_i^T (exact mean embedding)"),
    # The estimators' diagonal control variate and error bars (docs/estimators.md, sections
    # 4 and 7): row norms through a wide independent CountSketch S' (WIDE buckets), and the
    # keys' own statistics, kept per layer so that every table operation covers them.
    Stat("wide_sqnorm_f", "features", ("M",), True, "S' (|f_i|^2)_i"),
    Stat("wide_sqnorm_g", "gradients", ("M",), True, "S' (|g_i|^2)_i"),
    Stat("wide_sqnorm_psi", "gradients", ("M",), True, "S' (|f_i|^2 |g_i|^2)_i"),
    Stat("wide_sqnorm_fg", "product", ("M",), True, "S' (|f_i o g_i|^2)_i"),
    Stat("wide_ones", "features", ("M",), True, "S' 1 (the same for every layer)"),
    Stat("counts", "features", ("m",), True, "rows per bucket of S (the same for every layer)"),
)
#: Buckets of the wide sketch S' of the row norms: 512 KiB per statistic in float64.
WIDE = 1 << 16
_BY_NAME = {stat.name: stat for stat in STATS}


def stat_shape(stat: Stat, dims: Mapping[str, int]) -> Tuple[int, ...]:
    constant = {"h": 2, "M": WIDE}
    return tuple(constant[d] if d in constant else int(dims[d]) for d in stat.shape)


def enabled_stats(options: Mapping[str, object]) -> List[Stat]:
    """The statistics a representation with these options keeps, in table order."""
    on = {"features": True, "gradients": bool(options.get("gradients")),
          "psi": bool(options.get("gradients")) and bool(options.get("psi_dim")),
          "product": bool(options.get("product")),
          "mean_embedding": bool(options.get("mean_embedding"))}
    return [stat for stat in STATS if on[stat.group]]


class LayerStats:
    """The statistics of one layer: ``layer.sketch_f`` etc. (None when not kept).

    ``dims`` holds the layer's widths (``df``, ``dg``, ``w``); ``feature_shape``
    the per-sample shape of the probed output.
    """

    __slots__ = ("values", "dims", "feature_shape")

    def __init__(self, values: Dict[str, torch.Tensor], dims: Dict[str, int],
                 feature_shape: Tuple[int, ...] = ()) -> None:
        self.values = values
        self.dims = dims
        self.feature_shape = tuple(feature_shape)

    @classmethod
    def zeros(cls, stats: Sequence[Stat], dims: Mapping[str, int], dtype: torch.dtype, device,
              feature_shape: Tuple[int, ...] = ()) -> "LayerStats":
        values = {s.name: torch.zeros(stat_shape(s, dims), device=device,
                                      dtype=torch.float64 if s.exact else dtype) for s in stats}
        return cls(values, {k: int(v) for k, v in dims.items() if k not in ("m", "mp")},
                   feature_shape)

    def __getattr__(self, name: str):
        if name in _BY_NAME:
            return self.values.get(name)
        raise AttributeError(f"LayerStats has no attribute {name!r}")

    def __setattr__(self, name: str, value) -> None:
        if name in _BY_NAME:
            if value is None:
                self.values.pop(name, None)
            else:
                self.values[name] = value
        else:
            object.__setattr__(self, name, value)

    def tensors(self) -> Dict[str, torch.Tensor]:
        """The statistics kept, by name, in table order."""
        return dict(self.values)

    def map(self, fn) -> "LayerStats":
        """A new LayerStats with ``fn(tensor)`` applied to every statistic."""
        return LayerStats({k: fn(v) for k, v in self.values.items()}, dict(self.dims),
                          self.feature_shape)

    def structure(self) -> Dict[str, object]:
        """What must agree for two layers' statistics to be summed."""
        return {"dims": dict(self.dims), "stats": {k: list(v.shape) for k, v in self.values.items()},
                "feature_shape": list(self.feature_shape)}


def zeros_like_structure(rep, structure: Mapping[str, Mapping]) -> None:
    """Give an empty representation zero statistics with the given layer structure
    (``{name: {"dims": {...}, "feature_shape": [...]}}``)."""
    stats = enabled_stats(rep.options)
    for name, info in structure.items():
        dims = dict(info["dims"], m=rep.m, mp=rep.options["psi_buckets"])
        rep.layers[name] = LayerStats.zeros(stats, dims, rep.dtype, rep.device,
                                            tuple(info["feature_shape"]))


# --------------------------------------------------------------------------- batches

#: Products summed in the data's precision before a float64 accumulation (``row_sums``).
SUM_BLOCK = 128


def row_sums(x: torch.Tensor, float64: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Column sums ``[d]`` and squared row norms ``[B]`` of a batch ``[B, d]``, in float64.

    float64 rows, or any rows with ``float64=True`` (a representation with float64
    accumulators), are summed in float64.  Otherwise rows are summed in blocks of at most
    ``SUM_BLOCK`` terms in their own precision (float32 at least), and the block sums in
    float64: relative error at most about ``SUM_BLOCK * eps32`` (1.5e-5) for the norms
    (positive terms), and that much of the sum of magnitudes for the column sums, near
    the data's own rounding (the typical error is far smaller), without a float64 copy of
    the batch (which cost more than the sketch).  A non-finite block (squares beyond the
    float32 range) falls back to float64.
    """
    if float64 or x.dtype == torch.float64 or x.shape[0] == 0 or x.shape[1] == 0:
        x64 = x.to(torch.float64)
        return x64.sum(0), x64.square().sum(1)
    x = x if x.dtype == torch.float32 else x.to(torch.float32)
    batch, dim = x.shape
    whole = dim - dim % SUM_BLOCK
    parts = [torch.linalg.vector_norm(x[:, :whole].reshape(batch, -1, SUM_BLOCK), dim=2)] if whole else []
    if whole < dim:
        parts.append(torch.linalg.vector_norm(x[:, whole:], dim=1, keepdim=True))
    norms = torch.cat(parts, 1).to(torch.float64).square().sum(1)
    full = batch - batch % SUM_BLOCK
    column = x[full:].to(torch.float64).sum(0)
    if full:
        column = column + x[:full].reshape(-1, SUM_BLOCK, dim).sum(1).to(torch.float64).sum(0)
    if not (bool(torch.isfinite(norms).all()) and bool(torch.isfinite(column).all())):
        x64 = x.to(torch.float64)
        return x64.sum(0), x64.square().sum(1)
    return column, norms


def batch_terms(f: torch.Tensor, g: Optional[torch.Tensor], psi_rows, names: Sequence[str],
                float64: bool = False) -> Tuple[Dict[str, torch.Tensor], Dict[str, object]]:
    """One batch's contribution to every statistic in ``names``.

    Returns ``(exact, scattered)``: ``exact`` maps each exact sum to its batch
    total (float64); ``scattered`` maps each sketched statistic to the per-row
    values to scatter into it (``[B, d]`` in the data's dtype for the matrix
    sketches, ``[B]`` float64 for the sketched diagonals, and a pair of
    ``[B, w]`` rows for ``sketch_psi``).  Norms and column sums come from
    :func:`row_sums` (float64 accumulation, all in float64 with ``float64=True``; finite
    for float32 data of any finite size).
    """
    wanted = set(names)
    sums, norms = {}, {}
    sums["f"], norms["f"] = row_sums(f, float64)
    if g is not None:
        sums["g"], norms["g"] = row_sums(g, float64)
        norms["psi"] = norms["f"] * norms["g"]
        if wanted & {"sketch_fg", "mean_psi"}:       # options that need the rows in float64
            f64, g64 = f.to(torch.float64), g.to(torch.float64)
        if "sketch_fg" in wanted:
            fg = f64 * g64
            sums["fg"], norms["fg"] = fg.sum(0), fg.square().sum(1)
    exact: Dict[str, torch.Tensor] = {}
    scattered: Dict[str, object] = {"sketch_f": f}
    if g is not None:
        scattered["sketch_g"] = g
    for key, norm in norms.items():
        if key in sums:
            exact[f"sum_{key}"] = sums[key]
        exact["trace" if key == "psi" else f"sqnorm_{key}"] = norm.sum()
        exact[f"quartic_{key}"] = norm.square().sum()
        scattered[f"sketch_sqnorm_{key}"] = norm
        scattered[f"wide_sqnorm_{key}"] = norm
    scattered["wide_ones"] = torch.ones_like(norms["f"])
    scattered["counts"] = scattered["wide_ones"]      # counted from the keys (one per row)
    if "sketch_fg" in wanted:
        scattered["sketch_fg"] = fg
    if "mean_psi" in wanted:
        exact["mean_psi"] = g64.T @ f64
    if "sketch_psi" in wanted:
        half_sums, half_norms = zip(*(row_sums(half, float64) for half in psi_rows))
        exact["sum_psi"] = torch.stack(half_sums)
        scattered["sketch_psi"] = psi_rows
        half_norms = torch.stack(half_norms)                                         # [2, B]
        exact["sqnorm_psih"] = half_norms.sum(1)
        scattered["sketch_sqnorm_psih"] = scattered["wide_sqnorm_psih"] = half_norms
        scattered["psi_ones"] = scattered["psi_counts"] = scattered["wide_ones"]
    return ({k: v for k, v in exact.items() if k in wanted},
            {k: v for k, v in scattered.items() if k in wanted})


# --------------------------------------------------------------------------- row sets

class RowSet:
    """The set of non-negative global row indices a representation holds.

    Kept as sorted, disjoint, non-adjacent ``[start, stop)`` intervals in two
    int64 arrays, so memory is proportional to the number of runs of
    consecutive rows (at most the rows seen), whatever the largest index is,
    and checking or adding a batch costs a few vectorised passes.
    """

    __slots__ = ("starts", "stops")

    def __init__(self, intervals: Optional[Sequence[Sequence[int]]] = None) -> None:
        pairs = np.asarray(intervals if intervals else np.zeros((0, 2)), dtype=np.int64)
        self.starts, self.stops = _merge(pairs[:, 0].copy(), pairs[:, 1].copy())

    @classmethod
    def _of(cls, starts: np.ndarray, stops: np.ndarray) -> "RowSet":
        out = cls.__new__(cls)
        out.starts, out.stops = starts, stops
        return out

    @property
    def intervals(self) -> List[List[int]]:
        return [[int(a), int(b)] for a, b in zip(self.starts, self.stops)]

    def count(self) -> int:
        return int((self.stops - self.starts).sum())

    def copy(self) -> "RowSet":
        return RowSet._of(self.starts.copy(), self.stops.copy())

    def add_range(self, start: int, stop: int) -> None:
        if stop <= start:
            return
        if len(self.stops) and self.stops[-1] == start:   # the common streaming case
            self.stops[-1] = stop
            return
        self.starts, self.stops = _merge(np.append(self.starts, start), np.append(self.stops, stop))

    def check_new(self, rows: torch.Tensor) -> None:
        """Raise if ``rows`` repeats an index, within itself or with the set."""
        r = np.sort(rows.detach().to("cpu", torch.int64).numpy())
        if r.size == 0:
            return
        if bool((r[1:] == r[:-1]).any()):
            raise ValueError("rows contains duplicate indices within one batch")
        if self._contains_any(r):
            raise ValueError("rows repeats dataset indices already sketched in this "
                             "representation; each sample may be added once")

    def _contains_any(self, sorted_rows: np.ndarray) -> bool:
        if not len(self.starts):
            return False
        where = np.searchsorted(self.starts, sorted_rows, side="right") - 1
        hit = where >= 0
        return bool((sorted_rows[hit] < self.stops[where[hit]]).any())

    def add_rows(self, rows: torch.Tensor) -> None:
        r = np.unique(rows.detach().to("cpu", torch.int64).numpy())
        if r.size == 0:
            return
        breaks = np.flatnonzero(r[1:] != r[:-1] + 1) + 1
        starts = r[np.concatenate(([0], breaks))]
        stops = r[np.concatenate((breaks - 1, [r.size - 1]))] + 1
        self.starts, self.stops = _merge(np.concatenate((self.starts, starts)),
                                         np.concatenate((self.stops, stops)))

    def overlaps(self, other: "RowSet") -> bool:
        both = self.union(other)
        return both.count() < self.count() + other.count()

    def union(self, other: "RowSet") -> "RowSet":
        return RowSet._of(*_merge(np.concatenate((self.starts, other.starts)),
                                  np.concatenate((self.stops, other.stops))))

    def max_row(self) -> int:
        return int(self.stops[-1]) - 1 if len(self.stops) else -1

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        return ((int(a), int(b)) for a, b in zip(self.starts, self.stops))


def _merge(starts: np.ndarray, stops: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Sorted, merged (touching or overlapping intervals joined) copies of the intervals."""
    keep = stops > starts
    starts, stops = starts[keep].astype(np.int64), stops[keep].astype(np.int64)
    if starts.size <= 1:
        return starts, stops
    order = np.argsort(starts, kind="stable")
    starts, stops = starts[order], stops[order]
    reach = np.maximum.accumulate(stops)
    new = np.concatenate(([True], starts[1:] > reach[:-1]))
    group_starts = starts[new]
    group_ends = np.maximum.reduceat(stops, np.flatnonzero(new))
    return group_starts, group_ends
