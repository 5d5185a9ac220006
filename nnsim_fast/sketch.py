"""Streaming, mergeable sketch state: the ``Representation`` of a model on a dataset.

A ``Representation`` holds, for each probed layer, the CountSketch of its
feature matrix ``F~ = S F`` and of its expected-gradient matrix ``G~ = S G``
(S is the ``m x N`` sketch of the sample axis, see :mod:`nnsim_fast.ops`),
plus exact streaming statistics that do not need the sketch: the row count,
the column sums of f and g (for data-space centering), ``Tr K`` of the
paper's kernel, and optionally the sketch of ``f o g`` and the exact mean
embedding ``sum_i g_i f_i^T``.  Memory is ``O(layers * m * d)`` whatever N is.

It follows the update / compute / merge shape of a streaming metric:
``update`` adds a batch, ``merge`` sums two states over disjoint rows,
``kernel`` computes an ``m x m`` kernel, ``save``/``load`` persist it safely.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from . import ops

FORMAT_VERSION = 1
_META_KEY = "nnsim_fast"
#: Settings that must agree for two representations' rows to be summed.
COMPARED_META = ("beta", "target", "spatial")


def _library_version() -> str:
    from . import __version__
    return __version__


@dataclass
class LayerSketch:
    """Sketched and exact statistics of one layer (see module docstring)."""

    sketch_f: torch.Tensor                 # [m, df]  S F
    sketch_g: torch.Tensor                 # [m, dg]  S G
    sum_f: torch.Tensor                    # [df] float64, sum_i f_i
    sum_g: torch.Tensor                    # [dg] float64, sum_i g_i
    trace: torch.Tensor                    # [] float64, sum_i |f_i|^2 |g_i|^2 = Tr K
    sketch_fg: Optional[torch.Tensor] = None    # [m, d] S (F o G), for kind="khatri_rao"
    sum_fg: Optional[torch.Tensor] = None       # [d] float64, sum_i f_i o g_i
    mean_psi: Optional[torch.Tensor] = None     # [dg, df] float64, sum_i g_i f_i^T
    sketch_psi: Optional[torch.Tensor] = None   # [m, P] S Psi (P = dg*df exact, or TensorSketch)
    sum_psi: Optional[torch.Tensor] = None      # [P] float64, sum_i psi_i
    feature_shape: Tuple[int, ...] = ()

    def tensors(self) -> Dict[str, torch.Tensor]:
        out = {"sketch_f": self.sketch_f, "sketch_g": self.sketch_g, "sum_f": self.sum_f,
               "sum_g": self.sum_g, "trace": self.trace}
        if self.sketch_fg is not None:
            out["sketch_fg"] = self.sketch_fg
            out["sum_fg"] = self.sum_fg
        if self.mean_psi is not None:
            out["mean_psi"] = self.mean_psi
        if self.sketch_psi is not None:
            out["sketch_psi"] = self.sketch_psi
            out["sum_psi"] = self.sum_psi
        return out


def rows_to_intervals(rows: torch.Tensor) -> List[List[int]]:
    """Sorted, merged ``[start, stop)`` intervals covering the given row indices."""
    if rows.numel() == 0:
        return []
    r = torch.unique(rows.detach().to("cpu", torch.int64))
    breaks = torch.nonzero(r[1:] != r[:-1] + 1).flatten() + 1
    starts = torch.cat([r[:1], r[breaks]]).tolist()
    stops = torch.cat([r[breaks - 1], r[-1:]]).add(1).tolist()
    return [[int(s), int(e)] for s, e in zip(starts, stops)]


class RowSet:
    """The set of (non-negative) global rows a representation holds.

    Stream-numbered rows form one interval and are kept as intervals;
    dataset-index rows are kept as a bitmap (one byte per index up to the
    largest), so adding a batch and checking it for repeats costs O(batch)
    whatever the order or interleaving of the indices.
    """

    def __init__(self, intervals: Optional[List[List[int]]] = None) -> None:
        self._intervals: List[List[int]] = [list(iv) for iv in intervals or []]
        self._bits: Optional[torch.Tensor] = None

    # -- views
    @property
    def intervals(self) -> List[List[int]]:
        if self._bits is not None:
            return rows_to_intervals(torch.nonzero(self._bits).flatten())
        return [list(iv) for iv in self._intervals]

    def bits(self, length: int = 0) -> torch.Tensor:
        """The membership bitmap, at least ``length`` long."""
        if self._bits is None:
            top = max([stop for _, stop in self._intervals] + [0])
            bits = torch.zeros(top, dtype=torch.bool)
            for start, stop in self._intervals:
                bits[start:stop] = True
            self._bits, self._intervals = bits, []
        if self._bits.numel() < length:
            grown = torch.zeros(max(length, 2 * self._bits.numel()), dtype=torch.bool)
            grown[: self._bits.numel()] = self._bits
            self._bits = grown
        return self._bits

    def copy(self) -> "RowSet":
        out = RowSet(self._intervals)
        out._bits = None if self._bits is None else self._bits.clone()
        return out

    # -- updates
    def add_range(self, start: int, stop: int) -> None:
        if stop <= start:
            return
        if self._bits is not None:
            self.bits(stop)[start:stop] = True
        elif self._intervals and self._intervals[-1][1] == start:
            self._intervals[-1][1] = stop
        else:
            self._intervals = _merge_intervals(self._intervals + [[start, stop]])

    def check_new(self, rows: torch.Tensor) -> None:
        """Raise if ``rows`` repeats an index, within itself or with the set."""
        rows = rows.to("cpu", torch.int64)
        if rows.numel() == 0:
            return
        if torch.unique(rows).numel() != rows.numel():
            raise ValueError("rows contains duplicate indices within one batch")
        bits = self.bits(int(rows.max()) + 1)
        if bool(bits[rows].any()):
            raise ValueError("rows repeats dataset indices already sketched in this "
                             "representation; each sample may be added once")

    def add_rows(self, rows: torch.Tensor) -> None:
        rows = rows.to("cpu", torch.int64)
        if rows.numel():
            self.bits(int(rows.max()) + 1)[rows] = True

    # -- set algebra
    def overlaps(self, other: "RowSet") -> bool:
        if self._bits is None and other._bits is None:
            return any(s1 < e2 and s2 < e1 for s1, e1 in self._intervals
                       for s2, e2 in other._intervals)
        mine, theirs = self.copy().bits(), other.copy().bits()
        n = min(mine.numel(), theirs.numel())
        return bool((mine[:n] & theirs[:n]).any())

    def union(self, other: "RowSet") -> "RowSet":
        if self._bits is None and other._bits is None:
            return RowSet(_merge_intervals(self._intervals + other._intervals))
        out = self.copy()
        theirs = other.copy().bits()
        out.bits(theirs.numel())[: theirs.numel()] |= theirs
        return out


def _merge_intervals(intervals: List[List[int]]) -> List[List[int]]:
    merged: List[List[int]] = []
    for start, stop in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    return merged


class Representation:
    """Sketched per-layer representation of one model on one dataset.

    Build it with :func:`nnsim_fast.sketch_model` (or ``Representation.empty``
    followed by ``update``).  Two representations are comparable when they
    share ``m``, ``seed`` and ``sparsity``; the datasets may differ in size.
    """

    def __init__(self, m: int, seed: int, sparsity: int = 1, *, beta: Optional[float] = None,
                 dtype: torch.dtype = torch.float32, device=None,
                 meta: Optional[Dict] = None) -> None:
        m, seed, _, sparsity = ops._check_sketch_args(m, seed, 0, sparsity)
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.m, self.seed, self.sparsity = m, seed, sparsity
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.layers: Dict[str, LayerSketch] = {}
        self.n = 0
        self.rows = RowSet()
        self.row_keys: Optional[str] = None      # "stream" or "index", fixed by the first update
        self.sketch_ones = torch.zeros(m, 1, dtype=torch.float64, device=self.device)
        self.meta: Dict = {"beta": beta}
        if meta:
            self.meta.update(meta)

    # ------------------------------------------------------------------ building
    @property
    def row_intervals(self) -> List[List[int]]:
        """The rows held, as sorted ``[start, stop)`` intervals of global row indices."""
        return self.rows.intervals

    @property
    def layer_names(self) -> List[str]:
        return list(self.layers)

    def _new_layer(self, name: str, f: torch.Tensor, g: torch.Tensor, product: bool,
                   mean_embedding: bool, feature_shape: Tuple[int, ...],
                   psi_width: int = 0) -> LayerSketch:
        df, dg = f.shape[1], g.shape[1]
        zeros = lambda *shape, dtype=self.dtype: torch.zeros(*shape, dtype=dtype,  # noqa: E731
                                                              device=self.device)
        layer = LayerSketch(
            sketch_f=zeros(self.m, df), sketch_g=zeros(self.m, dg),
            sum_f=zeros(df, dtype=torch.float64), sum_g=zeros(dg, dtype=torch.float64),
            trace=zeros((), dtype=torch.float64), feature_shape=tuple(feature_shape))
        if product:
            if df != dg:
                raise ValueError(f"layer {name!r}: the product sketch needs features and "
                                 f"gradients of one width, got {df} and {dg}")
            layer.sketch_fg = zeros(self.m, df)
            layer.sum_fg = zeros(df, dtype=torch.float64)
        if mean_embedding:
            layer.mean_psi = zeros(dg, df, dtype=torch.float64)
        if psi_width:
            layer.sketch_psi = zeros(self.m, psi_width)
            layer.sum_psi = zeros(psi_width, dtype=torch.float64)
        return layer

    def update(self, features: Mapping[str, torch.Tensor], gradients: Mapping[str, torch.Tensor],
               *, rows: Optional[torch.Tensor] = None, product: bool = False,
               mean_embedding: bool = False, psi: bool = False,
               psi_budget: Optional[int] = None, psi_dim: Optional[int] = None,
               feature_shapes: Optional[Mapping[str, Tuple[int, ...]]] = None,
               label: str = "") -> None:
        """Add one batch: ``features[name]`` and ``gradients[name]`` are ``[B, d]`` matrices.

        ``product``, ``mean_embedding`` and ``psi`` add the optional statistics
        of :class:`LayerSketch` (decided by the first batch of each layer); ``psi``
        keeps ``S Psi`` exactly while ``m * df * dg <= psi_budget`` and a
        TensorSketch of width ``psi_dim`` otherwise (see :mod:`nnsim_fast.psi`).

        Non-finite values raise ``FloatingPointError`` naming the layer (and
        ``label``, e.g. the batch) and leave the representation unchanged.

        Rows are numbered in stream order (``rows=None``: this batch follows the
        rows already seen) or by dataset index (``rows``: int64 ``[B]``).  One
        representation uses one numbering throughout.
        """
        if psi_budget is not None:
            ops._check_int(psi_budget, "psi_budget", 0, 1 << 62)
        if psi_dim is not None:
            ops._check_int(psi_dim, "psi_dim", 1, 1 << 30)
        if set(features) != set(gradients):
            raise ValueError(f"features and gradients must name the same layers, got "
                             f"{sorted(features)} and {sorted(gradients)}")
        if not features:
            raise ValueError("update needs at least one layer")
        batch = next(iter(features.values())).shape[0]
        keys = "stream" if rows is None else "index"
        if self.row_keys is not None and keys != self.row_keys:
            raise ValueError(f"this representation numbers rows by {self.row_keys}; a batch "
                             f"{'without' if rows is None else 'with'} dataset indices cannot "
                             "be mixed in")
        if rows is not None:
            if rows.dim() != 1 or rows.shape[0] != batch:
                raise ValueError(f"rows must be a 1-D tensor of length {batch}, got shape "
                                 f"{tuple(rows.shape)}")
            if rows.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
                raise TypeError(f"rows must be an integer tensor of dataset indices, got {rows.dtype}")
            rows = rows.to(self.device, torch.int64)
            if rows.numel() and bool((rows < 0).any()):
                raise ValueError("rows must be non-negative dataset indices")
            self.rows.check_new(rows)
            offset = 0
        else:
            offset = self.n
        if self.layers and set(features) != set(self.layers):
            raise ValueError(f"batch layers {sorted(features)} differ from the representation's "
                             f"{sorted(self.layers)}")
        # Pass 1: check every layer and reduce the batch before anything is added,
        # so a bad batch leaves the representation unchanged.
        prepared = {}
        for name in features:
            f, g = features[name], gradients[name]
            if f.dim() != 2 or g.dim() != 2 or f.shape[0] != batch or g.shape[0] != batch:
                raise ValueError(f"layer {name!r}: features and gradients must be [B, d] with "
                                 f"B={batch}, got {tuple(f.shape)} and {tuple(g.shape)}")
            if name in self.layers:
                layer = self.layers[name]
                if layer.sketch_f.shape[1] != f.shape[1] or layer.sketch_g.shape[1] != g.shape[1]:
                    raise ValueError(f"layer {name!r}: width changed from "
                                     f"({layer.sketch_f.shape[1]}, {layer.sketch_g.shape[1]}) to "
                                     f"({f.shape[1]}, {g.shape[1]})")
            f = f.to(self.device)
            g = g.to(self.device)
            # Batch reductions in the data's precision (float32 for 16-bit data),
            # accumulated across batches in float64.  A non-finite value anywhere
            # makes its column sum non-finite, so the sums double as the check.
            work = torch.float64 if f.dtype == torch.float64 else torch.float32
            fw, gw = f.to(work), g.to(work)
            sum_f, sum_g = fw.sum(0), gw.sum(0)
            for what, total in (("features", sum_f), ("gradients", sum_g)):
                if not bool(torch.isfinite(total).all()):
                    where = f" in {label}" if label else ""
                    raise FloatingPointError(f"non-finite {what} at layer {name!r}{where}")
            trace = (fw.square().sum(1) * gw.square().sum(1)).sum(dtype=torch.float64)
            prepared[name] = (f, g, sum_f.to(torch.float64), sum_g.to(torch.float64), trace)
        # Pass 2: accumulate.
        for name, (f, g, sum_f, sum_g, trace) in prepared.items():
            if name not in self.layers:
                shape = tuple(feature_shapes[name]) if feature_shapes and name in feature_shapes \
                    else (f.shape[1],)
                width = 0
                if psi:
                    from .psi import DEFAULT_PSI_BUDGET, DEFAULT_PSI_DIM, psi_width
                    width = psi_width(f.shape[1], g.shape[1], self.m,
                                      DEFAULT_PSI_BUDGET if psi_budget is None else psi_budget,
                                      DEFAULT_PSI_DIM if psi_dim is None else psi_dim)
                self.layers[name] = self._new_layer(name, f, g, product, mean_embedding, shape,
                                                    width)
            layer = self.layers[name]
            ops.countsketch_pair_(layer.sketch_f, layer.sketch_g, f, g, self.seed, offset,
                                  self.sparsity, rows=rows)
            layer.sum_f += sum_f
            layer.sum_g += sum_g
            layer.trace += trace
            if layer.sketch_fg is None and layer.mean_psi is None and layer.sketch_psi is None:
                continue
            f64, g64 = f.to(torch.float64), g.to(torch.float64)
            if layer.sketch_fg is not None:
                fg64 = f64 * g64
                layer.sum_fg += fg64.sum(0)
                ops.countsketch_(layer.sketch_fg, fg64.to(self.dtype), self.seed, offset,
                                 self.sparsity, rows=rows)
            if layer.mean_psi is not None:
                layer.mean_psi += g64.T @ f64
            if layer.sketch_psi is not None:
                from .psi import psi_features, row_slices
                width = layer.sketch_psi.shape[1]
                for lo, hi in row_slices(batch, width):
                    psi_rows = psi_features(f64[lo:hi], g64[lo:hi], width, self.seed)
                    layer.sum_psi += psi_rows.sum(0)
                    ops.countsketch_(layer.sketch_psi, psi_rows.to(self.dtype), self.seed,
                                     offset + (lo if rows is None else 0), self.sparsity,
                                     rows=None if rows is None else rows[lo:hi])
        ones = torch.ones(batch, 1, dtype=torch.float64, device=self.device)
        ops.countsketch_(self.sketch_ones, ones, self.seed, offset, self.sparsity, rows=rows)
        self.row_keys = keys
        if rows is None:
            self.rows.add_range(self.n, self.n + batch)
        else:
            self.rows.add_rows(rows)
        self.n += batch

    # ------------------------------------------------------------------ combining
    def _check_compatible(self, other: "Representation", what: str) -> None:
        if not isinstance(other, Representation):
            raise TypeError(f"{what} needs a Representation, got {type(other).__name__}")
        for key in ("m", "seed", "sparsity"):
            if getattr(self, key) != getattr(other, key):
                raise ValueError(f"cannot {what} representations with different {key}: "
                                 f"{getattr(self, key)} vs {getattr(other, key)}")

    def merge(self, other: "Representation") -> "Representation":
        """A new representation holding the rows of both (their row sets must be disjoint)."""
        self._check_compatible(other, "merge")
        if self.layers and other.layers and list(self.layers) != list(other.layers):
            raise ValueError(f"cannot merge representations of different layers: "
                             f"{list(self.layers)} vs {list(other.layers)}")
        if self.row_keys and other.row_keys and self.row_keys != other.row_keys:
            raise ValueError("cannot merge a stream-numbered with an index-numbered representation")
        if self.rows.overlaps(other.rows):
            raise ValueError("cannot merge representations whose rows overlap: each sample must "
                             "be counted once (for stream-numbered batches, give the second "
                             "run a distinct row offset or use dataset indices)")
        for key in COMPARED_META:
            if self.meta.get(key) != other.meta.get(key):
                raise ValueError(f"cannot merge representations with different {key}: "
                                 f"{self.meta.get(key)!r} vs {other.meta.get(key)!r}")
        for name in set(self.layers) & set(other.layers):
            mine, theirs = self.layers[name].tensors(), other.layers[name].tensors()
            if set(mine) != set(theirs):
                raise ValueError(f"cannot merge: layer {name!r} has statistics "
                                 f"{sorted(mine)} here and {sorted(theirs)} there (sketch both "
                                 "with the same product/mean_embedding/psi options)")
        out = self.copy()
        other = other.to(out.device)
        for name, theirs in other.layers.items():
            if name not in out.layers:
                out.layers[name] = LayerSketch(**{**theirs.__dict__, **{
                    k: v.clone() for k, v in theirs.tensors().items()}})
                continue
            mine = out.layers[name]
            for key, value in theirs.tensors().items():
                current = getattr(mine, key)
                if current is None or current.shape != value.shape:
                    raise ValueError(f"layer {name!r}: {key} differs between the representations "
                                     f"({None if current is None else tuple(current.shape)} vs "
                                     f"{tuple(value.shape)})")
                current += value.to(current.dtype)
        out.sketch_ones += other.sketch_ones
        out.n += other.n
        out.row_keys = out.row_keys or other.row_keys
        out.rows = out.rows.union(other.rows)
        return out

    def copy(self) -> "Representation":
        out = Representation(self.m, self.seed, self.sparsity, dtype=self.dtype,
                             device=self.device, meta=dict(self.meta))
        out.layers = {name: LayerSketch(**{**layer.__dict__, **{
            k: v.clone() for k, v in layer.tensors().items()}}) for name, layer in self.layers.items()}
        out.n, out.row_keys = self.n, self.row_keys
        out.rows = self.rows.copy()
        out.sketch_ones = self.sketch_ones.clone()
        return out

    def to(self, device) -> "Representation":
        """A copy on ``device`` (self when it is already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        out = self.copy()
        out.device = device
        for layer in out.layers.values():
            for key, value in layer.tensors().items():
                setattr(layer, key, value.to(device))
        out.sketch_ones = out.sketch_ones.to(device)
        return out

    def all_reduce(self, group=None) -> "Representation":
        """Sum this representation over the ranks of a torch.distributed process group.

        Every rank must have sketched the same layers with the same settings and
        disjoint rows (for example shards of a ``DistributedSampler``); a rank
        that saw no rows takes part with zeros.  After the call every rank holds
        the same representation.  Returns ``self``.
        """
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("all_reduce needs an initialised torch.distributed process group")
        world = dist.get_world_size(group)
        # Agree on the structure first, so a mismatch is an error rather than a hang.
        rows_length = self.rows.bits().numel() if self.row_keys == "index" else 0
        mine = {"m": self.m, "seed": self.seed, "sparsity": self.sparsity,
                "layers": {k: {key: list(t.shape) for key, t in v.tensors().items()}
                           for k, v in self.layers.items()},
                "shapes": {k: list(v.feature_shape) for k, v in self.layers.items()},
                "dtype": str(self.dtype), "beta": self.meta.get("beta"),
                "row_keys": self.row_keys, "n": self.n, "rows_length": rows_length,
                "intervals": self.rows.intervals if self.row_keys == "stream" else None}
        gathered: List[Optional[Dict]] = [None] * world
        dist.all_gather_object(gathered, mine, group=group)
        active = [g for g in gathered if g["n"] > 0] or gathered
        for key in ("m", "seed", "sparsity", "dtype", "beta", "layers"):
            pool = gathered if key != "layers" else active
            values = [g[key] for g in pool]
            if any(v != values[0] for v in values):
                raise ValueError(f"ranks disagree on {key}: {values}")
        keys = {g["row_keys"] for g in active if g["row_keys"]}
        if len(keys) > 1:
            raise ValueError("ranks mix stream-numbered and index-numbered rows")
        row_keys = keys.pop() if keys else None
        if not self.layers and active[0]["layers"]:
            self._adopt_layers(active[0]["layers"], active[0]["shapes"])
        # Rows: stream intervals are small; index bitmaps are summed, so an index
        # held by two ranks shows up as a count above one.
        if row_keys == "index":
            length = max(g["rows_length"] for g in gathered)
            counts = torch.zeros(length, dtype=torch.int32)
            if self.row_keys == "index":
                bits = self.rows.bits(length)[:length]
                counts += bits.to(torch.int32)
            dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
            overlap = bool((counts > 1).any())
            merged = RowSet()
            merged.add_rows(torch.nonzero(counts).flatten())
        else:
            merged, overlap = RowSet(), False
            for g in gathered:
                theirs = RowSet(g["intervals"] or [])
                overlap = overlap or merged.overlaps(theirs)
                merged = merged.union(theirs)
        if overlap:
            raise ValueError("ranks sketched overlapping rows; each sample must be counted "
                             "once (key rows by dataset index, e.g. with a DistributedSampler "
                             "or IndexedDataset, so repeats can be dropped)")
        tensors = [self.sketch_ones]
        for layer in self.layers.values():
            tensors.extend(layer.tensors().values())
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        self.n = sum(g["n"] for g in gathered)
        self.rows = merged
        self.row_keys = row_keys
        return self

    def _adopt_layers(self, layers: Dict[str, Dict[str, List[int]]],
                      shapes: Dict[str, List[int]]) -> None:
        """Zero statistics with the given structure (a rank that saw no rows)."""
        for name, tensors in layers.items():
            fields = {}
            for key, shape in tensors.items():
                exact = key.startswith("sum_") or key in ("trace", "mean_psi")
                fields[key] = torch.zeros(shape, device=self.device,
                                          dtype=torch.float64 if exact else self.dtype)
            self.layers[name] = LayerSketch(feature_shape=tuple(shapes.get(name, ())), **fields)

    # ------------------------------------------------------------------ kernels
    def kernel(self, layer: str, kind: str = "hadamard", centering: str = "none") -> torch.Tensor:
        """The ``m x m`` sketched kernel of one layer, float64 (see :mod:`nnsim_fast.kernels`)."""
        from .kernels import representation_kernels
        return representation_kernels(self, [layer], kind=kind, centering=centering)[0]

    def kernels(self, layers: Optional[Sequence[str]] = None, kind: str = "hadamard",
                centering: str = "none") -> torch.Tensor:
        """Kernels of many layers at once, ``[L, m, m]`` float64."""
        from .kernels import representation_kernels
        return representation_kernels(self, self._resolve(layers), kind=kind, centering=centering)

    def _resolve(self, layers: Optional[Union[str, Sequence[str]]]) -> List[str]:
        if layers is None:
            return self.layer_names
        if isinstance(layers, str):
            layers = [layers]
        missing = [name for name in layers if name not in self.layers]
        if missing:
            raise KeyError(f"layers {missing} are not in this representation; it has "
                           f"{self.layer_names}")
        return list(layers)

    def layer(self, name: str) -> LayerSketch:
        return self.layers[self._resolve([name])[0]]

    # ------------------------------------------------------------------ persistence
    def state(self) -> Tuple[Dict[str, torch.Tensor], Dict]:
        tensors = {"sketch_ones": self.sketch_ones.contiguous()}
        layer_meta = {}
        for i, (name, layer) in enumerate(self.layers.items()):
            for key, value in layer.tensors().items():
                tensors[f"layer{i}.{key}"] = value.contiguous()
            layer_meta[name] = {"index": i, "feature_shape": list(layer.feature_shape)}
        meta = {"format": FORMAT_VERSION, "library_version": _library_version(),
                "m": self.m, "seed": self.seed, "sparsity": self.sparsity, "n": self.n,
                "dtype": str(self.dtype).replace("torch.", ""), "row_keys": self.row_keys,
                "row_intervals": self.rows.intervals, "layers": layer_meta, "meta": self.meta}
        return tensors, meta

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write to ``path`` (safetensors; atomic: written beside it, then renamed)."""
        from safetensors.torch import save_file
        tensors, meta = self.state()
        tensors = {k: v.detach().to("cpu") for k, v in tensors.items()}
        path = os.fspath(path)
        # A fixed temporary name: a save interrupted by a crash leaves at most this
        # one file behind, and the next save replaces it.
        tmp = path + ".partial"
        try:
            save_file(tensors, tmp, metadata={_META_KEY: json.dumps(meta)})
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)   # as a plain open() would have created it
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    @classmethod
    def load(cls, path: Union[str, os.PathLike], device=None) -> "Representation":
        """Read a file written by :meth:`save` (no pickle is ever executed)."""
        from safetensors import SafetensorError, safe_open
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no representation file at {path!r}")
        try:
            with safe_open(path, framework="pt", device="cpu") as handle:
                header = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except (SafetensorError, OSError, ValueError) as error:
            raise ValueError(f"{path!r} is not a nnsim_fast representation file: {error}") from None
        if _META_KEY not in header:
            raise ValueError(f"{path!r} is a safetensors file but not a nnsim_fast representation")
        try:
            meta = json.loads(header[_META_KEY])
        except json.JSONDecodeError as error:
            raise ValueError(f"{path!r}: corrupt representation metadata ({error})") from None
        if not isinstance(meta, dict):
            raise ValueError(f"{path!r}: corrupt representation metadata (not a mapping)")
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path!r} has representation format {meta.get('format')}, this "
                             f"nnsim_fast (version {_library_version()}) reads format "
                             f"{FORMAT_VERSION}; re-sketch with this version")
        try:
            return cls.from_state(tensors, meta, device=device)
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{path!r}: corrupt representation ({error!r})") from None

    @classmethod
    def from_state(cls, tensors: Dict[str, torch.Tensor], meta: Dict, device=None
                   ) -> "Representation":
        """Rebuild from :meth:`state`'s output, checking structure and shapes."""
        def bad(why: str) -> ValueError:
            return ValueError(f"corrupt representation: {why}")

        if not isinstance(meta, dict):
            raise bad(f"metadata is a {type(meta).__name__}, not a mapping")
        required = ("m", "seed", "sparsity", "n", "dtype", "row_keys", "row_intervals", "layers")
        missing = [key for key in required if key not in meta]
        if missing:
            raise bad(f"metadata lacks {missing}")
        if meta["dtype"] not in ("float32", "float64"):
            raise bad(f"accumulator dtype {meta['dtype']!r}")
        if not isinstance(meta["layers"], dict):
            raise bad("the layer table is not a mapping")
        try:
            rep = cls(meta["m"], meta["seed"], meta["sparsity"],
                      dtype=getattr(torch, meta["dtype"]), device=device, meta=meta.get("meta"))
        except (TypeError, ValueError) as error:
            raise bad(str(error)) from None
        m, dev = rep.m, rep.device
        rep.n, rep.row_keys = int(meta["n"]), meta["row_keys"]
        rep.rows = RowSet(meta["row_intervals"])
        if "sketch_ones" not in tensors or tuple(tensors["sketch_ones"].shape) != (m, 1):
            raise bad(f"sketch_ones missing or not of shape ({m}, 1)")
        rep.sketch_ones = tensors["sketch_ones"].to(dev)
        for name, info in sorted(meta["layers"].items(), key=lambda kv: kv[1]["index"]):
            prefix = f"layer{info['index']}."
            get = lambda key: tensors[prefix + key].to(dev) if prefix + key in tensors else None  # noqa: E731
            layer = LayerSketch(
                sketch_f=get("sketch_f"), sketch_g=get("sketch_g"), sum_f=get("sum_f"),
                sum_g=get("sum_g"), trace=get("trace"), sketch_fg=get("sketch_fg"),
                sum_fg=get("sum_fg"), sketch_psi=get("sketch_psi"), sum_psi=get("sum_psi"),
                mean_psi=get("mean_psi"), feature_shape=tuple(info["feature_shape"]))
            for key in ("sketch_f", "sketch_g", "sum_f", "sum_g", "trace"):
                if getattr(layer, key) is None:
                    raise bad(f"layer {name!r} lacks {key}")
            df, dg = layer.sketch_f.shape[-1], layer.sketch_g.shape[-1]
            expected = {"sketch_f": (m, df), "sketch_g": (m, dg), "sum_f": (df,), "sum_g": (dg,),
                        "trace": (), "sketch_fg": (m, df), "sum_fg": (df,), "mean_psi": (dg, df)}
            if layer.sketch_psi is not None:
                expected["sketch_psi"] = (m, layer.sketch_psi.shape[-1])
                expected["sum_psi"] = (layer.sketch_psi.shape[-1],)
            for key, shape in expected.items():
                value = getattr(layer, key)
                if value is not None and tuple(value.shape) != shape:
                    raise bad(f"layer {name!r}: {key} has shape {tuple(value.shape)}, "
                              f"expected {shape}")
            if (layer.sketch_fg is None) != (layer.sum_fg is None):
                raise bad(f"layer {name!r}: sketch_fg and sum_fg must come together")
            rep.layers[name] = layer
        return rep

    def __repr__(self) -> str:
        dims = ", ".join(f"{k}: {v.sketch_f.shape[1]}" for k, v in self.layers.items())
        return (f"Representation(n={self.n}, m={self.m}, seed={self.seed}, "
                f"sparsity={self.sparsity}, layers={{{dims}}})")
