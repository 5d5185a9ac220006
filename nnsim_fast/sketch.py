"""Streaming, mergeable sketch state: the ``Representation`` of a model on a dataset.

For each probed layer a ``Representation`` keeps the statistics declared in
:mod:`nnsim_fast.state`: the CountSketch ``S F`` of the feature matrix and
``S G`` of the expected-gradient matrix, two independent TensorSketches of the
paper's feature map ``psi = g (x) f`` sketched the same way, and exact float64
sums (column sums, squared norms, their sketches) that the estimators need to
centre over the data and to remove the sketch's collision terms.  Memory is
``O(layers * m * d)`` whatever the number of rows N.

It follows the update / compute / merge shape of a streaming metric:
``update`` adds a batch, ``merge`` sums two states over disjoint rows,
``all_reduce`` sums them across processes, ``save``/``load`` persist them with
checksums, and the kernels and similarity estimates are computed from them.
"""
from __future__ import annotations

import json
import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from . import _distributed, _fileformat, estimators, ops, storage
from . import psi as psi_sketch
from ._checks import check_bool, check_float, check_int
from .state import COMPARED_META, STATS, WIDE, LayerStats, RowSet, Stat, batch_terms, enabled_stats

FORMAT_VERSION = 3
_META_KEY = "nnsim_fast"
_MAX_ROW = (1 << 62) - 1


def _library_version() -> str:
    from ._version import __version__
    return __version__


def _scatter_columns(values, scattered, keys: Sequence[str], buckets: int, args) -> None:
    """Sketch the per-row vector statistics ``keys`` in one call: ``[B]`` values (one
    column) or ``[h, B]`` (h columns, accumulated as ``[h, buckets]``)."""
    keys = [k for k in keys if k in scattered]
    if not keys:
        return
    parts = [scattered[k].reshape(-1, scattered[k].shape[-1]) for k in keys]      # [h, B] each
    sketched = ops.countsketch(torch.cat(parts).T, buckets, **args)               # [buckets, sum h]
    start = 0
    for key, part in zip(keys, parts):
        block = sketched[:, start:start + part.shape[0]].T                       # [h, buckets]
        values[key] += block.reshape(values[key].shape)
        start += part.shape[0]


#: The per-row vector statistics scattered at each resolution (m, psi_buckets, WIDE).
_COLUMNS_M = tuple(s.name for s in STATS if s.shape[-1:] == ("m",) and s.name != "counts")
_COLUMNS_PSI = tuple(s.name for s in STATS if s.shape[-1:] == ("mp",) and s.name != "psi_counts")
_COLUMNS_WIDE = tuple(s.name for s in STATS if s.shape[-1:] == ("M",))


class SketchSpec:
    """What must agree for two representations to be compared (same sketch ``S``)
    and, with the options and compared settings, to be merged."""

    KEYS = ("m", "seed", "sparsity")

    @staticmethod
    def comparable(a: "Representation", b: "Representation", what: str = "compare") -> None:
        for rep, name in ((a, "rep_a"), (b, "rep_b")):
            if not isinstance(rep, Representation):
                raise TypeError(f"{what} needs a Representation, got {type(rep).__name__} "
                                f"for {name}")
        for key in SketchSpec.KEYS:
            if getattr(a, key) != getattr(b, key):
                raise ValueError(f"cannot {what} representations sketched with different {key} "
                                 f"({getattr(a, key)} vs {getattr(b, key)}): their buckets do not "
                                 "correspond; sketch both with the same m, seed and sparsity")
        fine = (a.options.get("psi_buckets"), b.options.get("psi_buckets"))
        if fine[0] and fine[1] and fine[0] != fine[1]:
            raise ValueError(f"cannot {what} representations whose psi halves have different "
                             f"psi_buckets ({fine[0]} vs {fine[1]}): sketch both with the same "
                             "psi_buckets")

    @staticmethod
    def mergeable(a: "Representation", b: "Representation", what: str = "merge") -> None:
        SketchSpec.comparable(a, b, what)
        if a.options != b.options:
            differ = sorted(k for k in a.options if a.options[k] != b.options.get(k))
            raise ValueError(f"cannot {what} representations with different options {differ}: "
                             f"{a.options} vs {b.options}")
        for key in COMPARED_META:
            if a.meta.get(key) != b.meta.get(key):
                raise ValueError(f"cannot {what} representations with different {key}: "
                                 f"{a.meta.get(key)!r} vs {b.meta.get(key)!r}")
        if a.layers and b.layers and list(a.layers) != list(b.layers):
            raise ValueError(f"cannot {what} representations of different layers: "
                             f"{list(a.layers)} vs {list(b.layers)}")
        for name in set(a.layers) & set(b.layers):
            if a.layers[name].structure() != b.layers[name].structure():
                raise ValueError(f"cannot {what}: layer {name!r} has widths "
                                 f"{a.layers[name].dims} here and {b.layers[name].dims} there")
        if a.row_keys and b.row_keys and a.row_keys != b.row_keys:
            raise ValueError(f"cannot {what} a stream-numbered with an index-numbered "
                             "representation")


class Representation:
    """Sketched per-layer representation of one model on one dataset.

    Build it with :func:`nnsim_fast.sketch_model`, or with ``Representation(m,
    seed)`` (alias :meth:`empty`) followed by :meth:`update`.  Two
    representations are comparable when they share ``m``, ``seed`` and
    ``sparsity``; the datasets may differ in content and size.

    Options (fixed at construction, shared by merged representations):
      gradients: keep gradient statistics (False: features only; only
        ``kind="feature"`` is then available).
      psi: keep the two TensorSketch halves of ``psi = g (x) f`` that the
        default estimator of ``kind="hadamard"`` uses (width ``psi_dim`` each,
        or ``df * dg`` when that is smaller); needs ``gradients``.
      psi_buckets: sample-axis buckets of the psi halves (the same hash, its
        own resolution; divisible by ``sparsity``).  Default
        :func:`nnsim_fast.psi.default_psi_buckets`: ``4 m`` up to 2048, never
        below ``m`` (2048 at the default ``m = 512``), where the default
        estimator's error meets 0.03 on real networks (docs/estimators.md,
        section 6); it costs ``2 * psi_buckets * psi_dim`` floats per layer.
      product: keep the sketch of ``f o g`` (``kind="khatri_rao"``).
      mean_embedding: keep the exact ``sum_i g_i f_i^T`` (``df * dg`` floats
        per layer) for :func:`nnsim_fast.mean_embedding_norm`.
    """

    def __init__(self, m: int, seed: int, sparsity: int = 1, *, beta: Optional[float] = None,
                 dtype: torch.dtype = torch.float32, device=None, gradients: bool = True,
                 psi: bool = True, psi_dim: Optional[int] = None,
                 psi_buckets: Optional[int] = None, product: bool = False,
                 mean_embedding: bool = False, meta: Optional[Dict] = None) -> None:
        m, seed, _, sparsity = ops._check_sketch_args(m, seed, 0, sparsity)
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        gradients = check_bool(gradients, "gradients")
        psi_on = check_bool(psi, "psi") and gradients
        dim = psi_sketch.DEFAULT_PSI_DIM if psi_dim is None else check_int(psi_dim, "psi_dim", 1, 1 << 24)
        self.m, self.seed, self.sparsity = m, seed, sparsity
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        buckets = psi_sketch.default_psi_buckets(m, sparsity) if psi_buckets is None else \
            psi_sketch.check_psi_buckets(psi_buckets, m, sparsity)
        self.options = {"gradients": gradients, "psi_dim": dim if psi_on else 0,
                        "psi_buckets": buckets if psi_on else 0,
                        "product": check_bool(product, "product") and gradients,
                        "mean_embedding": check_bool(mean_embedding, "mean_embedding") and gradients}
        if (product or mean_embedding) and not gradients:
            raise ValueError("product and mean_embedding need gradients=True")
        self.layers: Dict[str, LayerStats] = {}
        self.n = 0
        self.rows = RowSet()
        self.row_keys: Optional[str] = None      # "stream" or "index", fixed by the first update
        self.sketch_ones = torch.zeros(m, 1, dtype=torch.float64, device=self.device)
        self.meta: Dict = {"beta": None if beta is None else check_float(beta, "beta")}
        if meta:
            self.meta.update(json.loads(json.dumps(meta, default=_json_scalar)))
        self._broken: Optional[str] = None

    @classmethod
    def empty(cls, m: int, seed: int, sparsity: int = 1, **options) -> "Representation":
        """An empty representation (same arguments as the constructor), to fill with :meth:`update`."""
        return cls(m, seed, sparsity, **options)

    # ------------------------------------------------------------------ views
    @property
    def row_intervals(self) -> List[List[int]]:
        """The rows held, as sorted ``[start, stop)`` intervals of global row indices."""
        return self.rows.intervals

    @property
    def layer_names(self) -> List[str]:
        return list(self.layers)

    @property
    def stats(self) -> List[Stat]:
        return enabled_stats(self.options)

    def _usable(self) -> None:
        if self._broken:
            raise RuntimeError(f"this representation is unusable: {self._broken}")

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

    def layer(self, name: str) -> LayerStats:
        return self.layers[self._resolve([name])[0]]

    # ------------------------------------------------------------------ building
    def update(self, features: Mapping[str, torch.Tensor],
               gradients: Optional[Mapping[str, torch.Tensor]] = None, *,
               rows: Optional[torch.Tensor] = None,
               feature_shapes: Optional[Mapping[str, Tuple[int, ...]]] = None,
               label: str = "") -> None:
        """Add one batch: ``features[name]`` (and ``gradients[name]``) are ``[B, d]`` matrices.

        Rows are numbered in stream order (``rows=None``: this batch follows the
        rows already seen) or by dataset index (``rows``: integer ``[B]``); one
        representation uses one numbering throughout.

        Every check runs before anything is added: a bad batch (wrong layers or
        widths, non-finite values, values too large for the accumulators,
        repeated rows) raises with the layer (and ``label``, e.g. the batch)
        named and leaves the representation unchanged.  If accumulation itself
        is interrupted (out of memory, KeyboardInterrupt), the representation
        is marked unusable and says so on its next use.
        """
        self._usable()
        batch, rows = self._check_batch(features, gradients, rows)
        if batch == 0:
            return
        offset = 0 if rows is not None else self.n
        staged = {name: self._stage_layer(name, features[name],
                                          None if gradients is None else gradients[name], label)
                  for name in features}
        new = {name: self._new_layer(name, stage, feature_shapes) for name, stage in staged.items()
               if name not in self.layers}
        try:
            self._commit(staged, new, batch, offset, rows)
        except BaseException as error:
            self._broken = (f"a batch was interrupted while it was being added ({error!r}); "
                            "rebuild it or load the last saved copy")
            raise

    def _check_batch(self, features, gradients, rows) -> Tuple[int, Optional[torch.Tensor]]:
        if not isinstance(features, Mapping) or not features:
            raise ValueError("update needs at least one layer: features must be a non-empty mapping "
                             "of layer name -> [B, d] tensor")
        if self.options["gradients"] != (gradients is not None):
            raise ValueError("this representation keeps gradients; pass gradients= as well"
                             if gradients is None else "this representation was built with "
                             "gradients=False; pass features only")
        if gradients is not None and set(features) != set(gradients):
            raise ValueError(f"features and gradients must name the same layers, got "
                             f"{sorted(features)} and {sorted(gradients)}")
        if self.layers and set(features) != set(self.layers):
            raise ValueError(f"batch layers {sorted(features)} differ from the representation's "
                             f"{sorted(self.layers)}")
        first = next(iter(features.values()))
        if not isinstance(first, torch.Tensor):
            raise TypeError(f"features must hold tensors, got {type(first).__name__}")
        batch = first.shape[0] if first.dim() else -1
        for name in features:
            self._check_layer_shapes(name, features[name],
                                     None if gradients is None else gradients[name], batch)
        keys = "stream" if rows is None else "index"
        if self.row_keys is not None and keys != self.row_keys:
            raise ValueError(f"this representation numbers rows by {self.row_keys}; a batch "
                             f"{'without' if rows is None else 'with'} dataset indices cannot "
                             "be mixed in")
        if rows is not None:
            rows = self._check_rows(rows, batch)
        elif self.n + batch > _MAX_ROW:
            raise ValueError("the stream exceeds the int64 row range")
        return batch, rows

    def _check_layer_shapes(self, name: str, f, g, batch: int) -> None:
        for what, t in (("features", f), ("gradients", g)):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise TypeError(f"layer {name!r}: {what} must be a floating tensor, got "
                                f"{getattr(t, 'dtype', type(t).__name__)}")
            if t.dim() != 2 or t.shape[0] != batch:
                raise ValueError(f"layer {name!r}: features and gradients must be [B, d] with "
                                 f"B={batch}, got {tuple(t.shape)}")
        if self.options["product"] and g is not None and f.shape[1] != g.shape[1]:
            raise ValueError(f"layer {name!r}: the product sketch needs features and gradients "
                             f"of one width, got {f.shape[1]} and {g.shape[1]}")
        if name in self.layers:
            dims = self.layers[name].dims
            have = (dims["df"], dims["dg"]) if g is not None else (dims["df"],)
            got = (f.shape[1], g.shape[1]) if g is not None else (f.shape[1],)
            if have != got:
                raise ValueError(f"layer {name!r}: width changed from {have} to {got}; every "
                                 "batch must give a layer the same width (pad or pool "
                                 "variable-length outputs to a fixed size)")

    def _check_rows(self, rows, batch: int) -> torch.Tensor:
        if not isinstance(rows, torch.Tensor):
            raise TypeError(f"rows must be a tensor of dataset indices, got {type(rows).__name__}")
        if rows.dim() != 1 or rows.shape[0] != batch:
            raise ValueError(f"rows must be a 1-D tensor of length {batch}, got shape "
                             f"{tuple(rows.shape)}")
        if rows.is_floating_point() or rows.is_complex() or rows.dtype == torch.bool:
            raise TypeError(f"rows must be an integer tensor of dataset indices, got {rows.dtype}")
        rows = rows.to(self.device, torch.int64)
        if rows.numel() and (bool((rows < 0).any()) or int(rows.max()) > _MAX_ROW):
            raise ValueError(f"rows must be non-negative dataset indices, at most {_MAX_ROW}")
        self.rows.check_new(rows)
        return rows

    def _stage_layer(self, name: str, f: torch.Tensor, g: Optional[torch.Tensor], label: str):
        """Everything one layer adds, computed (and checked) before anything is added."""
        f = f.detach().to(self.device)
        g = None if g is None else g.detach().to(self.device)
        where = f" in {label}" if label else ""
        limit = torch.finfo(self.dtype).max
        for what, t in (("features", f), ("gradients", g)):
            if t is None or t.numel() == 0:
                continue
            low, high = torch.aminmax(t)      # no |t| temporary: a batch may be large
            peak = float(torch.maximum(low.abs(), high.abs()).to(torch.float64))   # NaN stays NaN
            if not math.isfinite(peak):
                raise FloatingPointError(f"non-finite {what} at layer {name!r}{where}")
            if peak * t.shape[0] > limit / 4:
                raise FloatingPointError(
                    f"{what} at layer {name!r}{where} reach {peak:.3g}, too large for "
                    f"{str(self.dtype).replace('torch.', '')} accumulators; sketch with "
                    "dtype=torch.float64 or rescale the model's outputs")
        width = self._psi_width(name, f, g)
        psi_rows = None
        if width:
            psi_rows = tuple(psi_sketch.tensor_sketch_halves(f, g, width, self.seed).unbind(0))
        names = [s.name for s in self.stats]
        exact, scattered = batch_terms(f, g, psi_rows, names, self.dtype == torch.float64)
        for key, value in exact.items():
            if not bool(torch.isfinite(value).all()):
                raise FloatingPointError(f"layer {name!r}{where}: {key} overflows float64")
        return {"f": f, "g": g, "exact": exact, "scattered": scattered}

    def _psi_width(self, name: str, f, g) -> int:
        if not self.options["psi_dim"] or g is None:
            return 0
        if name in self.layers:
            return self.layers[name].dims["w"]
        return psi_sketch.psi_half_width(f.shape[1], g.shape[1], self.options["psi_dim"])

    def _new_layer(self, name: str, stage, feature_shapes) -> LayerStats:
        f, g = stage["f"], stage["g"]
        dims = {"m": self.m, "mp": self.options["psi_buckets"],
                "df": f.shape[1], "dg": 0 if g is None else g.shape[1],
                "w": 0 if g is None else self._psi_width(name, f, g)}
        shape = tuple(feature_shapes[name]) if feature_shapes and name in feature_shapes \
            else (f.shape[1],)
        return LayerStats.zeros(self.stats, dims, self.dtype, self.device, shape)

    def _commit(self, staged, new, batch: int, offset: int, rows) -> None:
        self.layers.update(new)
        for name, stage in staged.items():
            layer = self.layers[name]
            self._scatter(layer, stage["scattered"], offset, rows)
            for key, value in stage["exact"].items():
                layer.values[key] += value
        ones = torch.ones(batch, 1, dtype=torch.float64, device=self.device)
        ops.countsketch_(self.sketch_ones, ones, self.seed, offset, self.sparsity, rows=rows)
        self.row_keys = "stream" if rows is None else "index"
        if rows is None:
            self.rows.add_range(self.n, self.n + batch)
        else:
            self.rows.add_rows(rows)
        self.n += batch

    def _scatter(self, layer: LayerStats, scattered, offset: int, rows) -> None:
        values = layer.values
        args = dict(seed=self.seed, offset=offset, sparsity=self.sparsity, rows=rows)
        if "sketch_g" in scattered:
            ops.countsketch_pair_(values["sketch_f"], values["sketch_g"], scattered["sketch_f"],
                                  scattered["sketch_g"], **args)
        else:
            ops.countsketch_(values["sketch_f"], scattered["sketch_f"], **args)
        if "sketch_psi" in scattered:
            half_a, half_b = scattered["sketch_psi"]
            acc = values["sketch_psi"]
            ops.countsketch_pair_(acc[0], acc[1], half_a.to(self.dtype), half_b.to(self.dtype),
                                  **args)
        if "sketch_fg" in scattered:
            ops.countsketch_(values["sketch_fg"], scattered["sketch_fg"].to(self.dtype), **args)
        fine = self.options["psi_buckets"]
        for buckets, keys in ((self.m, _COLUMNS_M), (fine, _COLUMNS_PSI)):
            _scatter_columns(values, scattered, keys, buckets, args)
        # S': one bucket per row, its own seed; the control variate of the estimators.
        _scatter_columns(values, scattered, _COLUMNS_WIDE, WIDE,
                         dict(seed=estimators.diagonal_seed(self.seed), offset=offset, rows=rows))
        for key, buckets in (("counts", self.m), ("psi_counts", fine)):
            if key in scattered:
                hashed, _ = ops.sketch_hash(scattered[key].shape[0], buckets, self.seed, offset,
                                            self.sparsity, rows=rows, device=self.device)
                values[key] += torch.bincount(hashed.reshape(-1), minlength=buckets).to(torch.float64)

    # ------------------------------------------------------------------ combining
    def merge(self, other: "Representation") -> "Representation":
        """A new representation holding the rows of both (their row sets must be disjoint)."""
        SketchSpec.mergeable(self, other)
        self._usable()
        other._usable()
        if self.rows.overlaps(other.rows):
            raise ValueError("cannot merge representations whose rows overlap: each sample must "
                             "be counted once (for stream-numbered batches, give the second "
                             "run a distinct row offset or use dataset indices)")
        out = self.copy()
        other = other.to(out.device)
        for name, theirs in other.layers.items():
            if name not in out.layers:
                out.layers[name] = theirs.map(torch.clone)
                continue
            for key, value in theirs.values.items():
                out.layers[name].values[key] += value.to(out.layers[name].values[key].dtype)
        out.sketch_ones += other.sketch_ones
        out.n += other.n
        out.row_keys = out.row_keys or other.row_keys
        out.rows = out.rows.union(other.rows)
        return out

    def copy(self) -> "Representation":
        self._usable()
        out = Representation.__new__(Representation)
        out.__dict__.update(self.__dict__)
        out.options, out.meta = dict(self.options), json.loads(json.dumps(self.meta))
        out.layers = {name: layer.map(torch.clone) for name, layer in self.layers.items()}
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
        out.layers = {name: layer.map(lambda t: t.to(device)) for name, layer in out.layers.items()}
        out.sketch_ones = out.sketch_ones.to(device)
        return out

    def all_reduce(self, group=None) -> "Representation":
        """Sum this representation over the ranks of a torch.distributed process group.

        Every rank must have sketched the same layers with the same settings and
        disjoint rows (for example shards of a ``DistributedSampler``); a rank
        that saw no rows takes part with zeros.  Structures are compared first,
        on every rank, so a mismatch raises the same error everywhere instead of
        hanging or aborting.  After the call every rank holds the same
        representation.  Returns ``self``.
        """
        _distributed.all_reduce(self, group)
        return self

    # ------------------------------------------------------------------ kernels
    def kernel(self, layer: str, kind: str = "hadamard", centering: str = "none") -> torch.Tensor:
        """The ``m x m`` sketched kernel of one layer, float64 (see :mod:`nnsim_fast.kernels`)."""
        return self.kernels([layer], kind=kind, centering=centering)[0]

    def kernels(self, layers: Optional[Sequence[str]] = None, kind: str = "hadamard",
                centering: str = "none") -> torch.Tensor:
        """Kernels of many layers at once, ``[L, m, m]`` float64."""
        from . import kernels
        self._usable()
        if self.n == 0:
            raise ValueError("the representation is empty (no rows sketched yet)")
        names = self._resolve(layers)
        return kernels.sketched_kernels([self.layers[n].values for n in names],
                                        self.sketch_ones, self.n, kind=kind, centering=centering)

    def grams(self, layers: Optional[Sequence[str]] = None, kind: str = "hadamard"):
        """The sketched data-centred kernels of ``layers`` in the form the collision-corrected
        estimators take (:class:`nnsim_fast.estimators.SketchedGram`)."""
        from . import kernels
        self._usable()
        if self.n < 4:
            raise ValueError(f"the estimators need at least 4 rows, this representation has "
                             f"{self.n}")
        names = self._resolve(layers)
        return kernels.sketched_grams([self.layers[n].values for n in names], self.sketch_ones,
                                      self.n, kind, self.sparsity)

    # ------------------------------------------------------------------ persistence
    def state(self) -> Tuple[Dict[str, torch.Tensor], Dict]:
        """``(tensors, metadata)``: everything needed to rebuild this representation."""
        self._usable()
        tensors = {"sketch_ones": self.sketch_ones}
        layer_meta = {}
        for i, (name, layer) in enumerate(self.layers.items()):
            for key, value in layer.values.items():
                tensors[f"layer{i}.{key}"] = value
            layer_meta[name] = {"index": i, "feature_shape": list(layer.feature_shape),
                                "dims": dict(layer.dims)}
        meta = {"format": FORMAT_VERSION, "library_version": _library_version(),
                "m": self.m, "seed": self.seed, "sparsity": self.sparsity, "n": self.n,
                "dtype": str(self.dtype).replace("torch.", ""), "options": dict(self.options),
                "row_keys": self.row_keys, "row_intervals": self.rows.intervals,
                "layers": layer_meta, "meta": self.meta}
        return tensors, meta

    def save(self, path) -> None:
        """Write to ``path`` (safetensors with a checksum per tensor).

        Atomic: the data goes to a temporary file in the same directory, which
        is fsync'ed and renamed over ``path``.  A crash leaves ``path`` as it
        was (or absent) plus at most a hidden ``.<name>.<pid>.<random>.nnsim-partial``
        file, which the next save into that directory removes.
        """
        tensors, meta = self.state()
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        meta["checksums"] = {k: storage.digest(v) for k, v in tensors.items()}
        storage.write_tensors(path, tensors, {_META_KEY: json.dumps(meta)})

    @classmethod
    def load(cls, path, device=None) -> "Representation":
        """Read a file written by :meth:`save`; every field and checksum is validated."""
        tensors, header = storage.read_tensors(path, "nnsim_fast representation file")
        meta = _fileformat.parse_metadata(header, path, FORMAT_VERSION, _META_KEY)
        try:
            storage.verify_digests(tensors, meta.get("checksums") or {}, tensors)
            _fileformat.upgrade(tensors, meta)
            return cls.from_state(tensors, meta, device=device)
        except (KeyError, TypeError, AttributeError, ValueError) as error:
            raise ValueError(f"{str(path)!r}: corrupt representation: {error}") from None

    @classmethod
    def from_state(cls, tensors: Dict[str, torch.Tensor], meta: Dict, device=None
                   ) -> "Representation":
        """Rebuild from :meth:`state`'s output, validating every field."""
        return _fileformat.rebuild(cls, tensors, meta, device)

    def __repr__(self) -> str:
        dims = ", ".join(f"{k}: {v.dims['df']}" for k, v in self.layers.items())
        return (f"Representation(n={self.n}, m={self.m}, seed={self.seed}, "
                f"sparsity={self.sparsity}, layers={{{dims}}})")


def _json_scalar(value):
    """numpy / torch scalars in metadata become plain numbers."""
    item = getattr(value, "item", None)
    if item is not None:
        return item()
    raise TypeError(f"metadata value of type {type(value).__name__} is not JSON serialisable")


__all__ = ["Representation", "SketchSpec", "FORMAT_VERSION", "COMPARED_META", "STATS"]
