"""Exact kernels and similarity indices over all N x N sample pairs, in float64.

This is the reference every sketched estimator is judged against, and a tool to
choose the sketch size ``m`` on a subset of the data.  An
:class:`ExactRepresentation` is fed exactly like a sketched
:class:`~nnsim_fast.sketch.Representation` -- per batch, the features ``f`` and
expected gradients ``g`` of each probed layer -- but keeps every row.  The
functions below then compute, with no sketch and no estimator:

* :func:`exact_similarity`: CKA (centred, uncentred, or debiased with the
  unbiased HSIC of Song et al.) and NBS between every layer of two
  representations, for every kernel kind of :mod:`nnsim_fast.kernels`;
* :func:`exact_kernel`: the ``N x N`` kernel itself (small N);
* :func:`exact_mean_embedding`: the kernel mean embedding norm and the ratios of
  eq. 19 and eq. 48 of Tang et al.

Kernels, with ``F`` and ``G`` the ``N x d`` feature and gradient matrices of a
layer: ``feature`` ``F F^T``; ``gradient`` ``G G^T``; ``hadamard`` (and ``psi``,
the same kernel reached through ``psi(x) = g f^T``) ``(F F^T) o (G G^T)``; ``sum``
``F F^T + G G^T``; ``khatri_rao`` ``(F o G)(F o G)^T``; ``transport``
``(I/2 + T/2) F F^T (I/2 + T/2)`` with ``T`` the optimal-transport map from
``F F^T`` to ``G G^T`` (:func:`nnsim_fast.kernels.transport_kernel`).
"Centred" always means ``H K H`` with ``H = I - 11^T / N`` over the data.

What is held where
------------------
* Rows are kept in arrival order, one ``[N, df]`` matrix of features and one
  ``[N, dg]`` matrix of gradients per layer, in float32 (float64 when
  ``dtype=torch.float64`` or when a layer's data arrives in float64).
* The first ``R`` rows of every matrix are in RAM, with
  ``R = min(max_rows, ram_bytes // (bytes of one row over all layers))`` fixed by
  the first batch; RAM is reserved for ``R`` rows but only touched as rows arrive.
* Rows past ``R`` go to one file per matrix (columns in panels of
  :data:`PANEL`, so a block of rows of a panel is one contiguous read), in a
  temporary directory that is removed by :meth:`ExactRepresentation.close`, at the
  end of a ``with`` block, or when the object is garbage collected (a directory
  left by a killed process is removed by the next representation that makes
  one) -- or, with ``storage=dir``, in a new subdirectory of ``dir`` that is kept.  Files are read
  with plain reads (no memory map), so cached pages belong to the OS page cache,
  not to the process.
* Also in RAM: the row ids (int64) and, once a centred index of a linear kind asks
  for them, float64 column sums of ``f``, ``g`` (or ``f o g``) and kernel traces,
  from one pass over the stored rows, cached until the next batch.

How the math runs
-----------------
Kernels are never held whole, except where matrix functions need them (up to
``N = max_dense``, default :data:`MAX_DENSE_N`).  The upper triangle of each ``N x N`` kernel is computed in
square tiles of ``block`` rows, each tile a float64 GEMM over the stored rows
(converted panel by panel), and reduced at once into row sums, diagonals and the
Frobenius inner products of every pair of kernels; the tile of each layer is
computed once and used for every layer it is compared with.  Then, with
``r`` the row sums, ``s`` the total and ``D`` the diagonal of each kernel:

* uncentred ``<K1, K2> = sum K1 o K2`` (eq. 10 as printed);
* centred ``<H K1 H, H K2 H> = sum K1 o K2 - (2/N) r1.r2 + s1 s2 / N^2``;
* debiased: the inner product of U-centred kernels (``n(n-3)`` times Song et al.'s
  unbiased HSIC, as :func:`nnsim_fast.indices.cka` with ``debiased=True``):
  ``sum K1 o K2 - D1.D2 + (s1 - Tr K1)(s2 - Tr K2)/((N-1)(N-2))
  - 2/(N-2) (r1 - D1).(r2 - D2)``.

For the kinds linear in the data (``feature``, ``gradient``, ``sum``,
``khatri_rao``) the centred and debiased indices are computed from mean-centred
data (the same ``H K H`` and the same U-centred kernel, without the cancellation
of a large mean).  NBS needs matrix square roots: for linear kinds with widths
``d <= N`` (or any width once N is past ``max_dense``, while the cross-covariances
fit :data:`FEATURE_NBS_BYTES`) it is the nuclear norm of the ``d_b x d_a``
cross-covariance, with no ``N x N`` matrix at all; otherwise the dense kernels go
to :func:`nnsim_fast.indices.nbs_matrix`, up to ``N = max_dense``.

Cost: ``N^2 * (sum of the widths of all GEMM factors)`` multiply-adds for the
tiles (``hadamard``: ``df + dg`` per layer), independent of the number of layer
pairs.  Memory beyond the stored rows: about ``(kernels + 3) * block^2 * 8``
bytes plus ``4 * block * PANEL * 8`` for the converted panels.
"""
from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import weakref
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from torch import Tensor

from . import indices
from ._checks import check_bool, check_choice, check_int
from .kernels import transport_kernel
from .options import FEATURE_KINDS, INDICES, KINDS

try:
    import fcntl
except ImportError:         # not POSIX: abandoned directories are not detected
    fcntl = None

__all__ = ["ExactRepresentation", "exact_similarity", "exact_similarity_matrix", "exact_kernel",
           "exact_mean_embedding",
           "MAX_DENSE_N", "DEFAULT_RAM_BYTES", "DEFAULT_BLOCK", "PANEL"]

#: Default largest N for which N x N matrices are formed and factorised (``transport``,
#: NBS of non-linear kinds, :func:`exact_kernel`).  Each dense kernel takes
#: ``N^2 * 8`` bytes and each eigendecomposition O(N^3) time (about a minute at
#: N = 4096 on two CPU cores); pass ``max_dense=`` to go further knowingly.
MAX_DENSE_N = 4096
#: Default RAM for stored rows, per representation (the rest goes to disk).
DEFAULT_RAM_BYTES = 4 << 30
#: Default tile size (rows); large tiles make each stored row be read fewer times.
DEFAULT_BLOCK = 2048
#: Columns per panel: the unit of disk reads and of the float64 copies fed to GEMMs.
PANEL = 4096
#: Largest total size of the cross-covariances of the feature-space NBS route.
FEATURE_NBS_BYTES = 2 << 30
#: Work (multiply-adds) above which a progress bar is shown on a terminal.
_PROGRESS_WORK = 1e11
_LINEAR_KINDS = ("feature", "gradient", "sum", "khatri_rao")
_EPS64 = torch.finfo(torch.float64).eps
Rows = Union[slice, Tensor]


# --------------------------------------------------------------------------- row storage

def _panel_count(width: int, panel: int) -> int:
    return max(1, -(-width // panel))


def _panel_columns(index: int, width: int, panel: int) -> Tuple[int, int]:
    return index * panel, min((index + 1) * panel, width)


def _write_all(handle, array: np.ndarray, offset: int) -> None:
    handle.seek(offset)
    view = memoryview(array).cast("B")
    while view.nbytes:
        view = view[handle.write(view):]


def _read_all(handle, array: np.ndarray, offset: int) -> None:
    handle.seek(offset)
    view = memoryview(array).cast("B")
    while view.nbytes:
        count = handle.readinto(view)
        if not count:
            raise OSError(f"unexpected end of an exact-representation file at byte {offset}")
        view = view[count:]


def _runs(positions: np.ndarray) -> List[Tuple[int, int, int]]:
    """``(first row, row count, output offset)`` of each run of consecutive sorted positions."""
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [positions.size]])
    return [(int(positions[a]), int(b - a), int(a)) for a, b in zip(starts, stops)]


class _DiskMatrix:
    """Rows ``[0, capacity)`` of a ``[capacity, width]`` matrix in one file, panel-major.

    Panel ``p`` (columns ``[p * panel, (p + 1) * panel)``) of every row is one
    contiguous stretch, so a block of rows of one panel is one read.  The file is
    sparse: space is used only by the rows written.
    """

    def __init__(self, path: str, capacity: int, width: int, dtype: torch.dtype, panel: int,
                 handles: List) -> None:
        self.handle = open(path, "w+b", buffering=0)
        handles.append(self.handle)
        self.capacity, self.width, self.panel = capacity, width, panel
        self.np_dtype = np.dtype(np.float64 if dtype == torch.float64 else np.float32)

    def _offset(self, panel: int, row: int) -> int:
        first, last = _panel_columns(panel, self.width, self.panel)
        return (self.capacity * first + row * (last - first)) * self.np_dtype.itemsize

    def write(self, row: int, data: np.ndarray) -> None:
        for panel in range(_panel_count(self.width, self.panel)):
            first, last = _panel_columns(panel, self.width, self.panel)
            _write_all(self.handle, np.ascontiguousarray(data[:, first:last]), self._offset(panel, row))

    def read(self, runs: List[Tuple[int, int, int]], count: int, panel: int) -> np.ndarray:
        first, last = _panel_columns(panel, self.width, self.panel)
        out = np.empty((count, last - first), dtype=self.np_dtype)
        for row, length, at in runs:
            _read_all(self.handle, out[at:at + length], self._offset(panel, row))
        return out


class _RowStore:
    """One ``[n, width]`` matrix (a layer's f or g) in arrival order: RAM rows, then a file."""

    def __init__(self, width: int, dtype: torch.dtype, ram_rows: int, capacity: int,
                 open_disk) -> None:
        self.width, self.dtype, self.ram_rows = width, dtype, ram_rows
        self.panel = PANEL
        # torch.empty leaves the pages untouched: RAM is used as rows arrive.
        self.ram = torch.empty(ram_rows, width, dtype=dtype)
        self.disk_capacity = capacity - ram_rows
        self._open_disk = open_disk
        self.disk: Optional[_DiskMatrix] = None

    @property
    def panels(self) -> int:
        return _panel_count(self.width, self.panel)

    def write(self, start: int, data: Tensor) -> None:
        """Rows ``[start, start + B)`` from a ``[B, width]`` tensor of any float dtype and device."""
        split = min(data.shape[0], max(self.ram_rows - start, 0))
        if split:
            self.ram[start:start + split] = data[:split]
        if split < data.shape[0]:
            if self.disk is None:
                self.disk = self._open_disk(self.disk_capacity, self.width, self.dtype, self.panel)
            rest = data[split:].to("cpu", self.dtype).contiguous()
            self.disk.write(start + split - self.ram_rows, rest.numpy())

    def read(self, rows: Rows, panel: int) -> Tensor:
        """Rows (a slice or positions) of one panel, on the CPU, in the storage dtype."""
        first, last = _panel_columns(panel, self.width, self.panel)
        if isinstance(rows, slice):
            low, high, split = rows.start, rows.stop, self.ram_rows
            parts = []
            if low < split:
                parts.append(self.ram[low:min(high, split), first:last])
            if high > split:
                start = max(low, split) - split
                block = self.disk.read([(start, high - split - start, 0)], high - split - start, panel)
                parts.append(torch.from_numpy(block))
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        out = torch.empty(rows.numel(), last - first, dtype=self.dtype)
        in_ram = rows < self.ram_rows
        out[in_ram] = self.ram[rows[in_ram], first:last]
        if not bool(in_ram.all()):
            on_disk = rows[~in_ram] - self.ram_rows
            ordered, permutation = on_disk.sort()
            block = torch.from_numpy(self.disk.read(_runs(ordered.numpy()), ordered.numel(), panel))
            out[~in_ram] = block[torch.argsort(permutation)]
        return out


_DIRECTORY_PREFIX = "nnsim-exact-"
_OWNER = "owner.lock"


def _claim(directory: str) -> Optional[object]:
    """Lock a new temporary directory for this process; the lock ends with the process,
    however it ends, which is how a later representation knows the directory is abandoned."""
    if fcntl is None:
        return None
    staging = os.path.join(directory, ".owner.staging")
    handle = open(staging, "wb")
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    # The lock file appears under its final name only once locked: no one can take it first.
    os.rename(staging, os.path.join(directory, _OWNER))
    return handle


def _remove_abandoned(parent: str) -> None:
    """Remove temporary directories left by processes killed before their clean-up ran."""
    if fcntl is None:
        return
    for name in os.listdir(parent):
        path = os.path.join(parent, name)
        if not name.startswith(_DIRECTORY_PREFIX):
            continue
        try:
            with open(os.path.join(path, _OWNER), "rb") as probe:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:      # no lock file (being created), or its owner is alive
            continue
        shutil.rmtree(path, ignore_errors=True)


def _release(resources: Dict) -> None:
    for handle in resources["handles"]:
        handle.close()
    resources["handles"].clear()
    directory = resources.get("directory")
    if directory is not None and resources["remove"]:
        shutil.rmtree(directory, ignore_errors=True)
    resources["directory"] = None


class _ExactLayer:
    """The stored rows of one layer, and statistics of them computed on demand."""

    def __init__(self, f: _RowStore, g: Optional[_RowStore], shape: Tuple[int, ...]) -> None:
        self.f, self.g, self.feature_shape = f, g, shape
        self._statistics: Tuple[int, Dict[str, Tensor]] = (-1, {})

    def statistics(self, n: int, product: bool = False) -> Dict[str, Tensor]:
        """Float64 column sums and ``Tr K`` of f, g (and, if asked, f o g) over the first n rows."""
        if self._statistics[0] != n:
            self._statistics = (n, _layer_statistics(self, n))
        stats = self._statistics[1]
        if product and "sum_fg" not in stats:
            stats["sum_fg"] = torch.zeros(self.f.width, dtype=torch.float64)
            stats["trace_fg"] = sum(_column_pass(self.f, slice(low, min(n, low + _STATISTICS_ROWS)),
                                                 stats["sum_fg"], self.g).sum()
                                    for low in range(0, n, _STATISTICS_ROWS))
        return stats

    def trace(self, kind: str, n: int) -> float:
        """``Tr K`` of the uncentred kernel of ``kind`` (the scale that rounding is judged by)."""
        stats = self.statistics(n, product=kind == "khatri_rao")
        if kind == "sum":
            return float(stats["trace_f"] + stats["trace_g"])
        key = {"feature": "trace_f", "gradient": "trace_g", "khatri_rao": "trace_fg"}.get(kind)
        return float(stats[key or "trace_fog"])


#: Rows per step of the statistics pass (memory: this many rows of one panel, in float64).
_STATISTICS_ROWS = 1024


def _column_pass(store: _RowStore, rows: slice, column_sum: Tensor,
                 partner: Optional[_RowStore] = None) -> Tensor:
    """Add the rows' column sums (of ``x``, or of ``x o partner``) and return their squared norms."""
    squares = torch.zeros(rows.stop - rows.start, dtype=torch.float64)
    for panel in range(store.panels):
        x = store.read(rows, panel).to(torch.float64)
        if partner is not None:
            x = x * partner.read(rows, panel).to(torch.float64)
        first, last = _panel_columns(panel, store.width, store.panel)
        column_sum[first:last] += x.sum(0)
        squares += x.square().sum(1)
    return squares


def _layer_statistics(entry: _ExactLayer, n: int) -> Dict[str, Tensor]:
    # One pass over the stored rows (N * d work, against N^2 * d for the kernels); it
    # reads the stored values, so the sums are exact for exactly what the kernels use.
    zero = torch.zeros((), dtype=torch.float64)
    out = {"sum_f": torch.zeros(entry.f.width, dtype=torch.float64), "trace_f": zero}
    if entry.g is not None:
        out.update(sum_g=torch.zeros(entry.g.width, dtype=torch.float64), trace_g=zero, trace_fog=zero)
    for low in range(0, n, _STATISTICS_ROWS):
        rows = slice(low, min(n, low + _STATISTICS_ROWS))
        square_f = _column_pass(entry.f, rows, out["sum_f"])
        out["trace_f"] = out["trace_f"] + square_f.sum()
        if entry.g is not None:
            square_g = _column_pass(entry.g, rows, out["sum_g"])
            out["trace_g"] = out["trace_g"] + square_g.sum()
            out["trace_fog"] = out["trace_fog"] + (square_f * square_g).sum()
    return out


def _all_finite(x: Tensor) -> bool:
    # A finite sum rules out NaN and inf in one cheap pass; only a non-finite sum
    # (which large finite values can also give) needs the element-wise check.
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def _check_matrix(x: object, what: str, batch: Optional[int]) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{what} must have a floating dtype, got {x.dtype}")
    if x.dim() != 2 or (batch is not None and x.shape[0] != batch):
        rows = "B" if batch is None else str(batch)
        raise ValueError(f"{what} must be a [B, d] matrix with B = {rows} rows (flatten the "
                         f"per-sample dimensions first), got shape {tuple(x.shape)}")
    return x


def _stored_rows(entry: _ExactLayer, ids: Tensor, n: int, batch: int
                 ) -> Iterator[Tuple[Tensor, Tensor, Optional[Tensor]]]:
    def read(store: _RowStore, rows: slice) -> Tensor:
        return torch.cat([store.read(rows, panel) for panel in range(store.panels)], dim=1)

    for low in range(0, n, batch):
        rows = slice(low, min(n, low + batch))
        yield ids[rows].clone(), read(entry.f, rows), None if entry.g is None else read(entry.g, rows)


class ExactRepresentation:
    """Every row of each layer's features (and gradients), for exact indices.

    Fed like :class:`~nnsim_fast.sketch.Representation` (see :meth:`update`); read
    by :func:`exact_similarity`, :func:`exact_kernel` and
    :func:`exact_mean_embedding`.  See the module docstring for what is held in
    RAM and what on disk.  Use it as a context manager, or call :meth:`close`,
    to remove its temporary files at a known time.

    Args:
        dtype: storage dtype, ``torch.float32`` (default; float64 data is still
            kept in float64) or ``torch.float64``.
        device: where the float64 tile GEMMs run (default CPU); the rows stay in
            host RAM or on disk.
        max_rows: the most rows this representation accepts (sizes its files).
        storage: directory for the rows beyond the RAM budget; a new subdirectory
            is created there and kept.  Default: a temporary directory, removed on
            close or garbage collection.
        meta: free-form settings kept in ``self.meta`` (e.g. how f and g were made).
        ram_bytes: RAM for stored rows (default :data:`DEFAULT_RAM_BYTES`); 0 keeps
            every row on disk.
    """

    def __init__(self, *, dtype: torch.dtype = torch.float32, device=None, max_rows: int = 20000,
                 storage: Optional[Union[str, os.PathLike]] = None, meta: Optional[Dict] = None,
                 ram_bytes: int = DEFAULT_RAM_BYTES) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.max_rows = check_int(max_rows, "max_rows", 1, 1 << 40)
        self.ram_bytes = check_int(ram_bytes, "ram_bytes", 0)
        self.meta: Dict = dict(meta or {})
        self.n = 0
        self.row_keys: Optional[str] = None      # "stream" or "index", fixed by the first batch
        self._layers: Dict[str, _ExactLayer] = {}
        self._gradients: Optional[bool] = None
        self._id_chunks: List[Tensor] = []
        self._resources: Dict = {"handles": [], "directory": None, "remove": storage is None,
                                 "parent": None if storage is None else os.fspath(storage)}
        self._finalizer = weakref.finalize(self, _release, self._resources)

    # ------------------------------------------------------------------ views
    @property
    def layer_names(self) -> List[str]:
        return list(self._layers)

    @property
    def has_gradients(self) -> bool:
        """False for a features-only representation (fed ``gradients=None``)."""
        return bool(self._gradients)

    @property
    def row_ids(self) -> Tensor:
        """The global row ids held, sorted (the row order of :func:`exact_kernel`)."""
        return self._arrival_ids().sort().values

    @property
    def storage_path(self) -> Optional[str]:
        """The directory holding the rows beyond the RAM budget (None while all fit in RAM)."""
        return self._resources["directory"]

    @property
    def ram_rows(self) -> int:
        """Rows per layer kept in RAM (fixed by the first batch; 0 before it)."""
        return next(iter(self._layers.values())).f.ram_rows if self._layers else 0

    def widths(self, layer: str) -> Tuple[int, Optional[int]]:
        """``(df, dg)`` of a layer (``dg`` is None for a features-only representation)."""
        entry = self._layer(layer)
        return entry.f.width, None if entry.g is None else entry.g.width

    def feature_shape(self, layer: str) -> Tuple[int, ...]:
        return self._layer(layer).feature_shape

    def iter_rows(self, layer: str, batch: int = 1024
                  ) -> Iterator[Tuple[Tensor, Tensor, Optional[Tensor]]]:
        """The stored rows of ``layer`` in arrival order, ``batch`` rows at a time.

        Yields ``(ids, f, g)``: the rows' global ids (int64 ``[B]``: stream positions,
        or the dataset indices they were fed with), their features ``[B, df]`` and
        gradients ``[B, dg]`` (None for a features-only representation) -- on the CPU,
        in the storage dtype, exactly as stored, in new tensors (not views of the
        storage).  Rows that were fed in batches of ``batch`` come back in those same
        batches, so feeding them in order to a sketched
        :class:`~nnsim_fast.sketch.Representation` (``rows=None`` for stream-numbered
        rows, ``rows=ids`` otherwise) repeats what sketching the model would have done.
        Rows on disk are read panel by panel; memory is one batch of the layer.  The
        iterator covers the rows held when it starts.
        """
        self._check_open()
        entry = self._layer(layer)
        batch = check_int(batch, "batch", 1)
        # Checked now, read lazily: a bad argument raises at the call, not at the first next().
        return _stored_rows(entry, self._arrival_ids(), self.n, batch)

    def __repr__(self) -> str:
        return (f"ExactRepresentation(n={self.n}, layers={self.layer_names}, "
                f"gradients={self.has_gradients}, ram_rows={self.ram_rows}, "
                f"storage={self.storage_path!r})")

    def _layer(self, name: str) -> _ExactLayer:
        if name not in self._layers:
            raise ValueError(f"layer {name!r} is not in this representation; it has "
                             f"{self.layer_names}")
        return self._layers[name]

    def _arrival_ids(self) -> Tensor:
        if len(self._id_chunks) != 1:
            ids = torch.cat(self._id_chunks) if self._id_chunks else torch.zeros(0, dtype=torch.int64)
            self._id_chunks = [ids]
        return self._id_chunks[0]

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Close and (unless ``storage=`` was given) delete the files; the rows are gone."""
        self._finalizer()
        self._layers.clear()
        self.n = 0
        self._id_chunks = []
        self._closed = True

    def __enter__(self) -> "ExactRepresentation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if getattr(self, "_closed", False):
            raise ValueError("this ExactRepresentation is closed")

    def _open_disk(self, capacity: int, width: int, dtype: torch.dtype, panel: int) -> _DiskMatrix:
        resources = self._resources
        if resources["directory"] is None:
            parent = resources["parent"]
            if parent is not None:
                os.makedirs(parent, exist_ok=True)
            else:
                _remove_abandoned(tempfile.gettempdir())
            directory = tempfile.mkdtemp(prefix=_DIRECTORY_PREFIX, dir=parent)
            resources["directory"] = directory
            if parent is None:
                lock = _claim(directory)
                if lock is not None:
                    resources["handles"].append(lock)
        path = os.path.join(resources["directory"], f"matrix{len(resources['handles'])}.bin")
        return _DiskMatrix(path, capacity, width, dtype, panel, resources["handles"])

    # ------------------------------------------------------------------ feeding
    def update(self, features: Mapping[str, Tensor], gradients: Optional[Mapping[str, Tensor]] = None,
               *, rows: Optional[Tensor] = None,
               feature_shapes: Optional[Mapping[str, Tuple[int, ...]]] = None,
               label: str = "") -> None:
        """Add one batch: ``features[name]`` ``[B, df]`` and ``gradients[name]`` ``[B, dg]``.

        ``gradients=None`` makes (and must keep) a features-only representation.
        Rows are numbered in stream order (``rows=None``: this batch follows the
        rows already held) or by dataset index (``rows``: integer ``[B]``); one
        representation uses one numbering, and two representations are compared
        row by row through these ids.  ``feature_shapes`` (per layer, from the
        first batch) is kept for reference.

        A bad batch -- wrong types or shapes, a width that changed, layers that
        differ from the first batch's, a repeated row id, more than ``max_rows``
        rows in all -- raises ``TypeError``/``ValueError``, and non-finite values
        raise ``FloatingPointError``; each names the layer (and ``label``, e.g. the
        batch) and leaves the representation unchanged.
        """
        self._check_open()
        where = f" in {label}" if label else ""
        names, batch = self._check_layers(features, gradients, where)
        ids = self._new_ids(rows, batch, where)
        if self.n + batch > self.max_rows:
            raise ValueError(f"this batch{where} of {batch} rows would bring the representation to "
                             f"{self.n + batch} rows, past max_rows={self.max_rows}; create it with a "
                             "larger max_rows (exact indices cost O(N^2)) or feed a subset")
        prepared = {name: self._prepare(name, features[name],
                                        None if gradients is None else gradients[name], batch, where)
                    for name in names}
        if batch:
            self._commit(prepared, ids, "stream" if rows is None else "index", gradients is not None,
                         feature_shapes)

    def _check_layers(self, features, gradients, where: str) -> Tuple[List[str], int]:
        if not isinstance(features, Mapping) or not features:
            raise TypeError(f"features{where} must be a non-empty mapping layer -> [B, d] tensor")
        if gradients is not None and (not isinstance(gradients, Mapping) or
                                      set(gradients) != set(features)):
            got = sorted(gradients) if isinstance(gradients, Mapping) else type(gradients).__name__
            raise ValueError(f"gradients{where} must be None or name the same layers as features: "
                             f"{sorted(features)} vs {got}")
        if self._gradients is not None and self._gradients != (gradients is not None):
            raise ValueError(f"this representation was built {'with' if self._gradients else 'without'}"
                             f" gradients; a batch{where} "
                             f"{'without' if gradients is None else 'with'} them cannot be mixed in")
        if self._layers and set(features) != set(self._layers):
            raise ValueError(f"batch{where} layers {sorted(features)} differ from the "
                             f"representation's {sorted(self._layers)}")
        names = list(self._layers) or list(features)
        first = _check_matrix(features[names[0]], f"features[{names[0]!r}]{where}", None)
        return names, first.shape[0]

    def _new_ids(self, rows: Optional[Tensor], batch: int, where: str) -> Tensor:
        keys = "stream" if rows is None else "index"
        if self.row_keys is not None and keys != self.row_keys:
            raise ValueError(f"this representation numbers rows by {self.row_keys}; a batch{where} "
                             f"{'without' if rows is None else 'with'} dataset indices cannot be mixed in")
        if rows is None:
            return torch.arange(self.n, self.n + batch, dtype=torch.int64)
        if not isinstance(rows, Tensor) or rows.is_floating_point() or rows.is_complex() or \
                rows.dtype == torch.bool:
            raise TypeError(f"rows{where} must be an integer tensor of dataset indices, got "
                            f"{getattr(rows, 'dtype', type(rows).__name__)}")
        if rows.dim() != 1 or rows.shape[0] != batch:
            raise ValueError(f"rows{where} must be a 1-D tensor of length {batch}, got shape "
                             f"{tuple(rows.shape)}")
        rows = rows.detach().to("cpu", torch.int64)
        if batch and bool((rows < 0).any()):
            raise ValueError(f"rows{where} must be non-negative dataset indices")
        if torch.unique(rows).numel() != batch:
            raise ValueError(f"rows{where} contains duplicate indices within the batch")
        if self.n and bool(torch.isin(rows, self._arrival_ids()).any()):
            repeated = rows[torch.isin(rows, self._arrival_ids())][:5].tolist()
            raise ValueError(f"rows{where} repeats dataset indices already held (e.g. {repeated}); "
                             "each sample may be added once")
        return rows

    def _storage_dtype(self, name: str, f: Tensor, g: Optional[Tensor]) -> torch.dtype:
        if name in self._layers:
            return self._layers[name].f.dtype
        wide = self.dtype == torch.float64 or f.dtype == torch.float64 or \
            (g is not None and g.dtype == torch.float64)
        return torch.float64 if wide else torch.float32

    def _prepare(self, name: str, f, g, batch: int, where: str) -> Tuple[Tensor, Optional[Tensor]]:
        f = _check_matrix(f, f"features[{name!r}]{where}", batch)
        if g is not None:
            g = _check_matrix(g, f"gradients[{name!r}]{where}", batch)
        if name in self._layers:
            before = self.widths(name)
            now = (f.shape[1], None if g is None else g.shape[1])
            if before != now:
                raise ValueError(f"layer {name!r}{where}: (feature, gradient) widths changed from "
                                 f"{before} to {now}")
        for what, x in (("features", f), ("gradients", g)):
            if x is not None and not _all_finite(x):
                raise FloatingPointError(f"non-finite {what} at layer {name!r}{where}")
        return f.detach(), None if g is None else g.detach()

    def _create_layers(self, prepared: Dict, gradients: bool, feature_shapes) -> None:
        dtypes = {name: self._storage_dtype(name, f, g) for name, (f, g) in prepared.items()}
        row_bytes = sum((f.shape[1] + (0 if g is None else g.shape[1])) * dtypes[name].itemsize
                        for name, (f, g) in prepared.items())
        ram_rows = min(self.max_rows, self.ram_bytes // max(row_bytes, 1))
        for name, (f, g) in prepared.items():
            shape = tuple(feature_shapes[name]) if feature_shapes and name in feature_shapes \
                else (f.shape[1],)
            stores = [None if x is None else
                      _RowStore(x.shape[1], dtypes[name], ram_rows, self.max_rows, self._open_disk)
                      for x in (f, g)]
            self._layers[name] = _ExactLayer(stores[0], stores[1], shape)
        self._gradients = gradients

    def _commit(self, prepared: Dict, ids: Tensor, keys: str, gradients: bool, feature_shapes) -> None:
        first = not self._layers
        if first:
            self._create_layers(prepared, gradients, feature_shapes)
        try:
            # Rows past self.n are not part of the state until n moves, so a failed
            # write (a full disk) leaves the representation as it was.
            for name, (f, g) in prepared.items():
                self._layers[name].f.write(self.n, f)
                if g is not None:
                    self._layers[name].g.write(self.n, g)
        except BaseException:
            if first:
                self._layers.clear()
                self._gradients = None
            raise
        self._id_chunks.append(ids)
        self.row_keys = keys
        self.n += ids.numel()

# --------------------------------------------------------------------------- kernel tiles

#: Below this many rows a diagonal tile's Gram is one GEMM rather than two halves.
_SYMMETRIC_LEAF = 512


def _add_upper_gram(out: Tensor, x: Tensor) -> None:
    """Add ``x x^T`` to ``out`` on and above the diagonal (by blocks): about half a GEMM's work."""
    size = x.shape[0]
    if size <= _SYMMETRIC_LEAF:
        out.addmm_(x, x.T)
        return
    half = size // 2
    _add_upper_gram(out[:half, :half], x[:half])
    _add_upper_gram(out[half:, half:], x[half:])
    out[:half, half:].addmm_(x[:half], x[half:].T)


class _Factor:
    """A data matrix ``X`` (F, G or F o G; rows in a given order; optionally mean-centred)
    whose Gram ``X X^T`` is a kernel or a factor of one."""

    def __init__(self, stores: Sequence[_RowStore], mean: Optional[Tensor], order: Optional[Tensor],
                 device: torch.device) -> None:
        self.stores, self.order, self.device = list(stores), order, device
        self.mean = None if mean is None else mean.to(device)
        self.width = stores[0].width

    def rows(self, low: int, high: int) -> Rows:
        return slice(low, high) if self.order is None else self.order[low:high]

    def panel(self, rows: Rows, panel: int) -> Tensor:
        x = self.stores[0].read(rows, panel).to(self.device, torch.float64, copy=True)
        for store in self.stores[1:]:
            x.mul_(store.read(rows, panel).to(self.device, torch.float64))
        if self.mean is not None:
            first, last = _panel_columns(panel, self.width, self.stores[0].panel)
            x.sub_(self.mean[first:last])
        return x

    def gram_into(self, out: Tensor, tile: Tuple[int, int, int, int]) -> Tensor:
        low_i, high_i, low_j, high_j = tile
        rows_i = self.rows(low_i, high_i)
        rows_j = None if low_i == low_j else self.rows(low_j, high_j)
        out.zero_()
        for panel in range(self.stores[0].panels):
            x_i = self.panel(rows_i, panel)
            if rows_j is None:
                _add_upper_gram(out, x_i)
            else:
                out.addmm_(x_i, self.panel(rows_j, panel).T)
        if rows_j is None:
            # Mirror the upper triangle (torch.triu is avoided: it starts threads even
            # for tiny tiles, which is slow on a busy machine).
            index = torch.arange(out.shape[0], device=out.device)
            out.copy_(torch.where(index[:, None] > index[None, :], out.T, out))
        return out

    def matrix(self, low: int, high: int) -> Tensor:
        rows = self.rows(low, high)
        return torch.cat([self.panel(rows, panel) for panel in range(self.stores[0].panels)], dim=1)


def _check_kind_for(rep: ExactRepresentation, layer: str, kind: str) -> _ExactLayer:
    entry = rep._layer(layer)
    if kind not in FEATURE_KINDS and entry.g is None:
        raise ValueError(f"kind={kind!r} needs gradients, but this representation holds features "
                         f"only (it was fed gradients=None); use kind in {FEATURE_KINDS} or feed "
                         "gradients")
    if kind == "khatri_rao" and entry.f.width != entry.g.width:
        raise ValueError(f"kind='khatri_rao' needs features and gradients of one width; layer "
                         f"{layer!r} has {entry.f.width} and {entry.g.width}")
    return entry


class _LayerKernel:
    """Tiles of one layer's kernel of one kind (see the module docstring)."""

    def __init__(self, rep: ExactRepresentation, layer: str, kind: str, order: Optional[Tensor],
                 center: bool, device: torch.device) -> None:
        entry = _check_kind_for(rep, layer, kind)
        # Only the linear kinds' H K H (and U-centred K) equal those of centred data.
        center = center and kind in _LINEAR_KINDS

        def factor(stores: List[_RowStore], key: str) -> _Factor:
            mean = entry.statistics(rep.n, key == "sum_fg")[key] / rep.n if center else None
            return _Factor(stores, mean, order, device)

        if kind == "feature":
            self.factors = [factor([entry.f], "sum_f")]
        elif kind == "gradient":
            self.factors = [factor([entry.g], "sum_g")]
        elif kind == "khatri_rao":
            self.factors = [factor([entry.f, entry.g], "sum_fg")]
        else:   # hadamard, psi, sum
            self.factors = [factor([entry.f], "sum_f"), factor([entry.g], "sum_g")]
        self.multiply = kind in ("hadamard", "psi")
        self.centred = center
        self._trace = (entry, kind, rep.n)
        self.work = sum(item.width for item in self.factors)
        self.device = device

    def reference(self, observed: float) -> float:
        """``Tr K`` of the uncentred kernel, the scale rounding is judged by: ``observed``
        (the trace of the tiles) unless the tiles come from centred data."""
        if not self.centred:
            return observed
        entry, kind, n = self._trace
        return entry.trace(kind, n)

    def tile_into(self, out: Tensor, tile: Tuple[int, int, int, int]) -> Tensor:
        self.factors[0].gram_into(out, tile)
        if len(self.factors) > 1:
            other = self.factors[1].gram_into(torch.empty_like(out), tile)
            out.mul_(other) if self.multiply else out.add_(other)
        return out

    def matrix(self, low: int, high: int) -> Tensor:
        """Rows ``[low, high)`` of the data matrix whose Gram is the kernel (linear kinds)."""
        return torch.cat([item.matrix(low, high) for item in self.factors], dim=1)


class _DenseKernel:
    """A kernel formed whole (transport), served in tiles like :class:`_LayerKernel`."""

    def __init__(self, K: Tensor) -> None:
        self.K = (K + K.T) / 2
        self.work = 0
        self.device = K.device

    def reference(self, observed: float) -> float:
        return observed

    def tile_into(self, out: Tensor, tile: Tuple[int, int, int, int]) -> Tensor:
        low_i, high_i, low_j, high_j = tile
        return out.copy_(self.K[low_i:high_i, low_j:high_j])


Source = Union[_LayerKernel, _DenseKernel]


def _check_dense(n: int, max_dense: int, what: str) -> None:
    if n > max_dense:
        raise ValueError(f"{what} needs N x N matrices: N = {n} exceeds max_dense = {max_dense} "
                         f"({n * n * 8 / 2**30:.2f} GiB per kernel, O(N^3) time); pass a larger "
                         "max_dense to allow it, or use a subset of the rows")


def _progress(items: Sequence, progress: Optional[bool], work: float, what: str) -> Iterator:
    show = sys.stderr.isatty() and work > _PROGRESS_WORK if progress is None else progress
    if not show:
        yield from items
        return
    from tqdm.auto import tqdm
    with tqdm(items, desc=what, leave=False) as bar:
        yield from bar


def _tiles(n: int, block: int, work: float, progress: Optional[bool], what: str) -> Iterator:
    """The tiles ``(low_i, high_i, low_j, high_j)`` of the upper triangle, by row blocks."""
    edges = list(range(0, n, block)) + [n]
    grid = [(edges[i], edges[i + 1], edges[j], edges[j + 1])
            for i in range(len(edges) - 1) for j in range(i, len(edges) - 1)]
    return _progress(grid, progress, work * n * n / 2, what)


def _source(rep: ExactRepresentation, layer: str, kind: str, order: Optional[Tensor], center: bool,
            settings: Dict) -> Source:
    if kind != "transport":
        return _LayerKernel(rep, layer, kind, order, center, settings["device"])
    _check_kind_for(rep, layer, kind)
    _check_dense(rep.n, settings["max_dense"], "kind='transport'")
    factors = [_assemble(_LayerKernel(rep, layer, part, order, False, settings["device"]), rep.n,
                         settings) for part in ("feature", "gradient")]
    return _DenseKernel(transport_kernel(*factors))


def _assemble(source: Source, n: int, settings: Dict) -> Tensor:
    """The whole ``[n, n]`` float64 kernel of a source."""
    if isinstance(source, _DenseKernel):
        return source.K
    K = torch.empty(n, n, dtype=torch.float64, device=source.device)
    for tile in _tiles(n, settings["block"], source.work, settings["progress"], "exact kernel"):
        low_i, high_i, low_j, high_j = tile
        part = source.tile_into(torch.empty(high_i - low_i, high_j - low_j, dtype=torch.float64,
                                            device=source.device), tile)
        if low_i == low_j:   # GEMM rounding need not be symmetric
            part = (part + part.T) / 2
        K[low_i:high_i, low_j:high_j] = part
        K[low_j:high_j, low_i:high_i] = part.T
    return K


def _sources(groups: Sequence[Tuple[ExactRepresentation, List[str], Optional[Tensor]]], kind: str,
             center: bool, settings: Dict) -> Tuple[List[Source], List[List[int]]]:
    """One source per distinct (representation, layer), and each group's indices into them."""
    sources: List[Source] = []
    seen: Dict[Tuple[int, str], int] = {}
    picked: List[List[int]] = []
    for rep, names, order in groups:
        picked.append([])
        for name in names:
            key = (id(rep), name)
            if key not in seen:
                seen[key] = len(sources)
                sources.append(_source(rep, name, kind, order, center, settings))
            picked[-1].append(seen[key])
    return sources, picked


def _stream(sources: Sequence[Source], n: int, settings: Dict) -> Tuple[Tensor, Tensor, Tensor]:
    """``<K_u, K_v>_F`` for every pair of sources, and each one's row sums and diagonal."""
    count, device = len(sources), settings["device"]
    inner = torch.zeros(count, count, dtype=torch.float64, device=device)
    row_sums = torch.zeros(count, n, dtype=torch.float64, device=device)
    diagonal = torch.zeros(count, n, dtype=torch.float64, device=device)
    work = sum(source.work for source in sources)
    for tile in _tiles(n, settings["block"], work, settings["progress"], "exact indices"):
        low_i, high_i, low_j, high_j = tile
        stack = torch.empty(count, high_i - low_i, high_j - low_j, dtype=torch.float64, device=device)
        for k, source in enumerate(sources):
            source.tile_into(stack[k], tile)
        flat = stack.view(count, -1)
        # An off-diagonal tile stands for itself and its transpose.
        inner.add_(flat @ flat.T, alpha=1.0 if low_i == low_j else 2.0)
        row_sums[:, low_i:high_i] += stack.sum(2)
        if low_i == low_j:
            diagonal[:, low_i:high_i] = stack.diagonal(dim1=1, dim2=2)
        else:
            row_sums[:, low_j:high_j] += stack.sum(1)
    return inner, row_sums, diagonal


def _centred_products(inner: Tensor, row_sums: Tensor, diagonal: Tensor, n: int,
                      centering: str) -> Tensor:
    """Frobenius inner products of the centred kernels (module docstring) from streamed sums."""
    if centering == "none":
        return inner
    totals = row_sums.sum(1)
    if centering == "center":
        return inner - (2.0 / n) * (row_sums @ row_sums.T) + torch.outer(totals, totals) / n ** 2
    off_rows = row_sums - diagonal
    off_totals = off_rows.sum(1)
    return (inner - diagonal @ diagonal.T
            + torch.outer(off_totals, off_totals) / ((n - 1) * (n - 2))
            - (2.0 / (n - 2)) * (off_rows @ off_rows.T))


def _cosines(products: Tensor, references: Tensor, picked_a: List[int], picked_b: List[int],
             n: int) -> Tensor:
    # A kernel whose centred norm is below float64 rounding of its size (n * eps * Tr K)
    # has no defined index: 0.0, the rule of nnsim_fast.indices.
    selfs = products.diagonal().clamp_min(0.0)
    norms = torch.where(selfs > (n * _EPS64 * references) ** 2, selfs.sqrt(), torch.zeros_like(selfs))
    rows, cols = torch.tensor(picked_a), torch.tensor(picked_b)
    scale = torch.outer(norms[rows], norms[cols])
    table = products[rows][:, cols]
    return torch.where(scale > 0, table / torch.where(scale > 0, scale, 1.0), 0.0).clamp_(-1.0, 1.0)


def _cka(sources: Sequence[Source], picked: List[List[int]], centering: str, n: int,
         settings: Dict) -> Tensor:
    picked_a, picked_b = picked
    inner, row_sums, diagonal = _stream(sources, n, settings)
    products = _centred_products(inner, row_sums, diagonal, n, centering)
    references = torch.tensor([source.reference(float(trace))
                               for source, trace in zip(sources, diagonal.sum(1))],
                              dtype=torch.float64, device=products.device)
    return _cosines(products, references, picked_a, picked_b, n)


# --------------------------------------------------------------------------- NBS

def _feature_route(sources: Sequence[Source], picked: List[List[int]], n: int, max_dense: int) -> bool:
    """Whether NBS through the d_b x d_a cross-covariances is both affordable and cheaper."""
    if not all(isinstance(source, _LayerKernel) for source in sources):
        return False
    widths = [source.work for source in sources]
    pairs = {tuple(sorted((a, b))) for a in picked[0] for b in picked[1]}
    fits = sum(widths[a] * widths[b] for a, b in pairs) * 8 <= FEATURE_NBS_BYTES
    return fits and (max(widths) <= n or n > max_dense)


def _nbs_features(sources: Sequence[_LayerKernel], picked: List[List[int]], n: int,
                  settings: Dict) -> Tensor:
    """``||X_b^T X_a||_* / (||X_a||_F ||X_b||_F)``: NBS of ``K = X X^T`` without N x N matrices."""
    device = settings["device"]
    widths = [source.work for source in sources]
    pairs = sorted({tuple(sorted((a, b))) for a in picked[0] for b in picked[1] if a != b})
    cross = {pair: torch.zeros(widths[pair[1]], widths[pair[0]], dtype=torch.float64, device=device)
             for pair in pairs}
    squares = torch.zeros(len(sources), dtype=torch.float64, device=device)
    step = max(1, min(settings["block"], (256 << 20) // (8 * sum(widths))))
    starts = range(0, n, step)
    for low in _progress(starts, settings["progress"], n * sum(widths) ** 2, "exact NBS"):
        blocks = [source.matrix(low, min(low + step, n)) for source in sources]
        squares += torch.stack([block.square().sum() for block in blocks])
        for (a, b), total in cross.items():
            total.addmm_(blocks[b].T, blocks[a])
    references = torch.tensor([source.reference(float(trace)) for source, trace in zip(sources, squares)],
                              dtype=torch.float64, device=device)
    alive = squares > n * _EPS64 * references
    out = torch.zeros(len(picked[0]), len(picked[1]), dtype=torch.float64, device=device)
    for i, a in enumerate(picked[0]):
        for j, b in enumerate(picked[1]):
            if not (alive[a] and alive[b]):
                continue
            nuclear = squares[a] if a == b else torch.linalg.svdvals(cross[tuple(sorted((a, b)))]).sum()
            out[i, j] = nuclear / torch.sqrt(squares[a] * squares[b])
    return out.clamp_(0.0, 1.0)


def _nbs(sources: Sequence[Source], picked: List[List[int]], kind: str, centered: bool, n: int,
         settings: Dict) -> Tensor:
    if kind in _LINEAR_KINDS and _feature_route(sources, picked, n, settings["max_dense"]):
        return _nbs_features(sources, picked, n, settings)
    _check_dense(n, settings["max_dense"], f"exact NBS of kind={kind!r}" +
                 (" (with feature widths above N)" if kind in _LINEAR_KINDS else ""))
    dense = [_assemble(source, n, settings) for source in sources]
    kernels_a = [dense[k] for k in picked[0]]
    if picked[0] == picked[1]:
        return indices.nbs_matrix(kernels_a, centered=centered)
    return indices.nbs_matrix(kernels_a, [dense[k] for k in picked[1]], centered=centered)


# --------------------------------------------------------------------------- public functions

def _check_rep(rep: object, name: str) -> ExactRepresentation:
    if not isinstance(rep, ExactRepresentation):
        raise TypeError(f"{name} must be an ExactRepresentation, got {type(rep).__name__}")
    rep._check_open()
    if rep.n == 0:
        raise ValueError(f"{name} is empty (no rows fed yet)")
    return rep


def _settings(rep: ExactRepresentation, block, max_dense, progress) -> Dict:
    n = rep.n
    return {"block": min(n, DEFAULT_BLOCK) if block is None else check_int(block, "block", 1),
            "max_dense": check_int(max_dense, "max_dense", 1),
            "progress": None if progress is None else check_bool(progress, "progress"),
            "device": rep.device}


def _layer_list(rep: ExactRepresentation, spec, name: str) -> List[str]:
    names = rep.layer_names if spec is None else [spec] if isinstance(spec, str) else list(spec)
    if not names:
        raise ValueError(f"no layers of {name} to compare")
    for layer in names:
        if not isinstance(layer, str):
            raise TypeError(f"layer names must be strings, got {type(layer).__name__} for {name}")
        rep._layer(layer)
    return names


def _pairing(rep_a: ExactRepresentation, rep_b: ExactRepresentation
             ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Row orders that put rep_b's rows beside rep_a's rows of the same global id."""
    if rep_a is rep_b:
        return None, None
    if rep_a.row_keys != rep_b.row_keys:
        raise ValueError(f"rep_a numbers its rows by {rep_a.row_keys} and rep_b by {rep_b.row_keys}; "
                         "rows are paired by their global id, so feed both the same way (dataset "
                         "indices, or the same stream)")
    ids_a, ids_b = rep_a._arrival_ids(), rep_b._arrival_ids()
    sorted_a = ids_a.sort().values
    sorted_b, by_id = ids_b.sort()
    if not torch.equal(sorted_a, sorted_b):
        only_a = sorted_a[~torch.isin(sorted_a, sorted_b)]
        only_b = sorted_b[~torch.isin(sorted_b, sorted_a)]
        raise ValueError(f"rep_a and rep_b hold different rows (N = {rep_a.n} and {rep_b.n}; "
                         f"{only_a.numel()} ids only in rep_a, e.g. {only_a[:5].tolist()}; "
                         f"{only_b.numel()} only in rep_b, e.g. {only_b[:5].tolist()}): exact "
                         "indices compare the same samples row by row")
    order_b = by_id[torch.searchsorted(sorted_b, ids_a)]
    identity = torch.equal(order_b, torch.arange(order_b.numel()))
    return None, None if identity else order_b


def _centering(index: str, centered: bool, debiased: bool, n: int) -> str:
    if debiased and not centered:
        raise ValueError("debiased=True always centres the kernels; it cannot be combined with "
                         "centered=False")
    if debiased and index == "nbs":
        raise ValueError("debiased=True is an option of CKA (the unbiased HSIC); NBS has no "
                         "debiased form")
    if debiased and n <= 3:
        raise ValueError(f"the debiased (unbiased HSIC) index needs N > 3 rows, got N = {n}")
    return "u_center" if debiased else "center" if centered else "none"


def exact_similarity(rep_a: ExactRepresentation, rep_b: ExactRepresentation, index: str = "cka",
                     kind: str = "hadamard", layers=None, *, debiased: bool = False,
                     centered: bool = True, block: Optional[int] = None,
                     max_dense: int = MAX_DENSE_N, progress: Optional[bool] = None
                     ) -> Tuple[Tensor, List[str], List[str]]:
    """Exact similarity of every layer of ``rep_a`` with every layer of ``rep_b``.

    The index of the ``N x N`` kernels of ``kind`` over the rows both hold, paired
    by global row id, in float64 with no sketch (see the module docstring):

    * ``index="cka"``: centred kernel alignment of ``H K H`` (default); with
      ``centered=False`` the uncentred alignment, eq. 10 of Tang et al. as printed;
      with ``debiased=True`` the cosine of U-centred kernels, i.e. the unbiased
      HSIC of Song et al. -- the values :func:`nnsim_fast.indices.cka` gives on
      the same kernels.
    * ``index="nbs"``: normalised Bures similarity of the centred (or, with
      ``centered=False``, uncentred) kernels, as :func:`nnsim_fast.indices.nbs`.

    Range: similarities in [0, 1] (debiased CKA in [-1, 1]); a kernel that
    vanishes after centring gives 0.0, not NaN.

    Args:
        rep_a, rep_b: exact representations holding the same rows (ids); ``rep_b``
            may be ``rep_a``.  Stream-numbered rows pair by position in the stream,
            so both passes must see the samples in one order; dataset indices pair
            them whatever the order.  Computations run on ``rep_a.device``.
        index: ``"cka"`` or ``"nbs"``.
        kind: kernel kind (:data:`nnsim_fast.options.KINDS`); kinds other than
            ``"feature"`` need gradients.
        layers: None (all layers of each), a name or list used for both, or a
            2-tuple ``(layers_a, layers_b)``.
        debiased, centered: see above (CKA only for ``debiased``).
        block: tile size in rows (default ``min(N, DEFAULT_BLOCK)``); memory beyond
            the stored rows is about ``(layers + 3) * block^2 * 8`` bytes.
        max_dense: largest N for which N x N matrix functions are formed
            (``transport``; NBS of ``hadamard``/``psi`` or of wide linear kinds).
        progress: show a progress bar; default: on a terminal, for long runs.

    Returns:
        ``(matrix [La, Lb] float64 on the CPU, layers_a, layers_b)``.

    Raises:
        ValueError: the row sets differ, a kind needs gradients the
            representation lacks, or N is past a limit (the message says which).
    """
    _check_rep(rep_a, "rep_a")
    _check_rep(rep_b, "rep_b")
    check_choice(index, "index", INDICES)
    check_choice(kind, "kind", KINDS)
    centering = _centering(index, check_bool(centered, "centered"), check_bool(debiased, "debiased"),
                           rep_a.n)
    if isinstance(layers, tuple) and len(layers) == 2:
        names_a, names_b = _layer_list(rep_a, layers[0], "rep_a"), _layer_list(rep_b, layers[1], "rep_b")
    else:
        names_a, names_b = _layer_list(rep_a, layers, "rep_a"), _layer_list(rep_b, layers, "rep_b")
    order_a, order_b = _pairing(rep_a, rep_b)
    settings = _settings(rep_a, block, max_dense, progress)
    groups = ((rep_a, names_a, order_a), (rep_b, names_b, order_b))
    sources, picked = _sources(groups, kind, centering != "none", settings)
    return _index_table(sources, picked, index, kind, centering, rep_a.n, settings), names_a, names_b


def _index_table(sources: Sequence[Source], picked: List[List[int]], index: str, kind: str,
                 centering: str, n: int, settings: Dict) -> Tensor:
    if index == "nbs":
        return _nbs(sources, picked, kind, centering == "center", n, settings).cpu()
    return _cka(sources, picked, centering, n, settings).cpu()


def exact_similarity_matrix(reps: Sequence[ExactRepresentation], layer: Union[str, Sequence[str]],
                            index: str = "cka", kind: str = "hadamard", *, debiased: bool = False,
                            centered: bool = True, block: Optional[int] = None,
                            max_dense: int = MAX_DENSE_N, progress: Optional[bool] = None) -> Tensor:
    """Model x model exact similarity ``[R, R]`` at one layer (one name, or one name per model).

    The same numbers as :func:`exact_similarity` for each pair, in one pass over
    the tiles: each model's kernel tile is computed once and compared with all
    the others.  All representations must hold the same rows.
    """
    reps = list(reps)
    if not reps:
        raise ValueError("reps is empty")
    for position, rep in enumerate(reps):
        _check_rep(rep, f"reps[{position}]")
    check_choice(index, "index", INDICES)
    check_choice(kind, "kind", KINDS)
    centering = _centering(index, check_bool(centered, "centered"), check_bool(debiased, "debiased"),
                           reps[0].n)
    names = [layer] * len(reps) if isinstance(layer, str) else list(layer)
    if len(names) != len(reps):
        raise ValueError(f"layer names one layer per representation: got {len(names)} names for "
                         f"{len(reps)} representations")
    groups = [(rep, _layer_list(rep, name, f"reps[{position}]"), _pairing(reps[0], rep)[1])
              for position, (rep, name) in enumerate(zip(reps, names))]
    settings = _settings(reps[0], block, max_dense, progress)
    sources, picked = _sources(groups, kind, centering != "none", settings)
    every = [chosen[0] for chosen in picked]
    return _index_table(sources, [every, every], index, kind, centering, reps[0].n, settings)


def exact_kernel(rep: ExactRepresentation, layer: str, kind: str = "hadamard", centered: bool = True,
                 *, block: Optional[int] = None, max_dense: int = MAX_DENSE_N,
                 progress: Optional[bool] = None) -> Tensor:
    """The whole ``[N, N]`` float64 kernel of ``kind`` at ``layer``, rows ordered by ``rep.row_ids``.

    ``centered=True`` returns ``H K H`` (:func:`nnsim_fast.indices.center_kernel`).
    For small N only: N above ``max_dense`` raises ``ValueError``.  The tensor is
    on ``rep.device``.
    """
    _check_rep(rep, "rep")
    check_choice(kind, "kind", KINDS)
    centered = check_bool(centered, "centered")
    settings = _settings(rep, block, max_dense, progress)
    _check_dense(rep.n, settings["max_dense"], "exact_kernel")
    order = torch.argsort(rep._arrival_ids())
    order = None if torch.equal(order, torch.arange(rep.n)) else order
    K = _assemble(_source(rep, layer, kind, order, centered, settings), rep.n, settings)
    return indices.center_kernel(K) if centered else K


def exact_mean_embedding(rep: ExactRepresentation, layer: str, kind: str = "hadamard", *,
                         block: Optional[int] = None, max_dense: int = MAX_DENSE_N,
                         progress: Optional[bool] = None) -> Dict[str, float]:
    """Kernel mean embedding norm and its ratios (eq. 19, eq. 48), exactly, from the N x N kernel.

    With ``K`` the uncentred kernel of ``kind`` (default the paper's ``K_f o K_g``,
    the linear kernel of ``psi(x) = g f^T``), streamed in tiles:

    * ``norm`` ``||mu_p|| = ||sum_i psi_i|| / N = sqrt(sum K) / N``;
    * ``trace_factor`` ``sqrt(Tr K) / N`` and ``frobenius_factor`` ``||K||_F / N^2``;
    * ``ratio_frobenius`` ``= norm / frobenius_factor`` and ``ratio_trace`` ``= norm /
      trace_factor`` (eq. 19), ``log_ratio_frobenius`` (eq. 48).

    The same keys and conventions as :func:`nnsim_fast.indices.mean_embedding_ratios`
    (a zero kernel gives ratios 0.0 and a log of ``-inf``).  These are scores, not
    similarities.
    """
    _check_rep(rep, "rep")
    check_choice(kind, "kind", KINDS)
    settings = _settings(rep, block, max_dense, progress)
    inner, row_sums, diagonal = _stream([_source(rep, layer, kind, None, False, settings)], rep.n,
                                        settings)
    n = rep.n
    norm = math.sqrt(max(float(row_sums.sum()), 0.0)) / n
    frobenius_factor = math.sqrt(max(float(inner[0, 0]), 0.0)) / n ** 2
    trace_factor = math.sqrt(max(float(diagonal.sum()), 0.0)) / n
    return indices.mean_embedding_scores(norm, frobenius_factor, trace_factor)
