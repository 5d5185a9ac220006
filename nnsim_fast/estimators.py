"""Unbiased estimates of data-centred HSIC, CKA and NBS from sample-axis sketches.

Pure functions on tensors; the derivation and its tests are in ``docs/estimators.md``.

Notation.  ``S`` is the ``m x N`` sketch of :mod:`nnsim_fast.ops` (CountSketch for
``sparsity = s = 1``, ``s`` blocks of ``m/s`` buckets with values ``+-1/sqrt(s)``
otherwise), ``H = I - 11^T/N`` centres over the data, and ``A = H X X^T H`` is the
data-centred kernel of the rows ``x_i`` of a layer (features, gradients, or the
paper's ``psi_i = g_i (x) f_i``, possibly through a TensorSketch ``T``).  With
``A~ = S A S^T``, ``O(A, B) = sum_{i != j} A_ij B_ij`` and
``D(A, B) = sum_i A_ii B_ii``::

    E sum_{b != c} A~_bc B~_bc = (1 - 1/m) O + (1 - 1/s) D           (exact, any s)

so the collision term ``Tr A Tr B / m`` of the plain inner product lives entirely
on the diagonal buckets ``b = c``, which the estimators drop.  ``D`` is estimated
unbiasedly from sketches of the centred diagonal ``d_A = diag(A) - (Tr A / N) 1``::

    D^ = Tr A Tr B / N + <S d_A, S d_B> - beta (<S e_A, S e_B> - <S' e_A, S' e_B>)

with ``e_A`` the deviations of the raw row norms ``|x_i|^2`` and ``S'`` a wide
independent CountSketch (``diagonal_width`` buckets): the bracket is a control
variate (mean 0) that removes most of the noise when row norms vary a lot, with
the variance-minimising coefficient ``beta`` in [0, 1] estimated per pair
(:func:`_control_coefficient`); it is dropped when the statistics are absent.  Then::

    <A, B>^   = [sum_{b != c} A~_bc B~_bc + (1/s - 1/m) D^] / (1 - 1/m)
    O^        = [sum_{b != c} A~_bc B~_bc - (1 - 1/s) D^] / (1 - 1/m)

are unbiased for ``<A, B>`` (the biased HSIC's numerator) and ``O``; the
U-statistic HSIC of Song et al. (2012) is a linear function of ``O``, ``D`` and the
traces, so it is estimated unbiasedly too.

Two TensorSketch halves.  A kernel may come as ``h = 2`` independent estimates
``A_0, A_1`` (``A_h = H Psi T_h^T T_h Psi^T H``, ``E_T A_h = A``).  A product of two
kernels always pairs different halves -- ``(A_0, B_1)`` and ``(A_1, B_0)`` across
kernels, ``(A_0, A_1)`` for a kernel with itself -- so that, given ``T``, the
estimate is unbiased for ``<A_x, B_y>`` and, the halves being independent, for
``<A, B>``.

Everything is float64 and batched over layers: a :class:`SketchedGram` holds
``L`` layers, and the matrix functions return ``[La, Lb]`` tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import indices, ops
from ._checks import check_bool, check_float, check_int

__all__ = [
    "SketchedGram", "RowStatistics", "KeyStatistics", "row_statistics", "key_statistics",
    "diagonal_seed", "centred_gram", "gram_from_rows", "stack_grams", "hsic_matrix",
    "cka_matrix", "nbs_matrix", "effective_rank", "resolution_warnings", "suggested_m",
    "RESOLUTION_TOLERANCE", "DIAGONAL_WIDTH",
]

F64 = torch.float64
_EPS64 = torch.finfo(F64).eps

#: Standard error of a CKA estimate above which :func:`resolution_warnings` reports
#: that ``m`` is too small for the layer pair: three such errors make 0.03, the
#: accuracy the default aims for (benchmarks/ACCURACY.md says where it gets there).
RESOLUTION_TOLERANCE = 0.01

#: Buckets of the wide sketch ``S'`` of the row norms (the diagonal's control
#: variate): 512 KiB per layer and half in float64; with N rows its noise is about
#: ``sqrt(m / DIAGONAL_WIDTH)`` times that of the m-bucket diagonal sketch.
DIAGONAL_WIDTH = 1 << 16


# --------------------------------------------------------------------------- checks

def _shape(x: Tensor) -> Tuple[int, ...]:
    return tuple(x.shape)


def _tensor(x, name: str, allow_inf: bool = False) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype} with shape {_shape(x)}")
    bad = torch.isnan(x) if allow_inf else ~torch.isfinite(x)
    if bool(bad.any()):
        raise ValueError(f"{name} contains NaN or infinite values (shape {_shape(x)})")
    return x.detach().to(F64)


def _expect(x: Tensor, name: str, shape: Tuple[int, ...], spelled: str) -> None:
    if _shape(x) != shape:
        raise ValueError(f"{name} must have shape {spelled} = {shape}, got {_shape(x)}")


def _halves_first(x: Tensor, name: str, ndim: int) -> Tensor:
    """Accept ``[...]`` for one half and ``[h, ...]`` for ``h`` halves (h = 1 or 2)."""
    if x.dim() == ndim - 1:
        x = x.unsqueeze(0)
    if x.dim() != ndim or x.shape[0] not in (1, 2):
        raise ValueError(f"{name} must have {ndim - 1} dimensions, or {ndim} with a leading "
                         f"halves dimension of 1 or 2, got shape {_shape(x)}")
    return x


def _check_sparsity(sparsity, m: int) -> int:
    sparsity = check_int(sparsity, "sparsity", 1, ops.MAX_SPARSITY)
    if m % sparsity:
        raise ValueError(f"sparsity ({sparsity}) must divide m ({m})")
    return sparsity


# --------------------------------------------------------------------------- statistics

class RowStatistics(NamedTuple):
    """Streamed statistics of one layer's rows (per half ``h``), float64 sums over rows."""

    sketch: Tensor          #: ``[h, m, w]``  ``S X``
    column_sum: Tensor      #: ``[h, w]``     ``sum_i x_i``
    sketch_sqnorm: Tensor   #: ``[h, m]``     ``S (|x_i|^2)_i``
    sum_sqnorm: Tensor      #: ``[h]``        ``sum_i |x_i|^2``
    wide_sqnorm: Tensor     #: ``[h, m']``    ``S' (|x_i|^2)_i``


class KeyStatistics(NamedTuple):
    """Statistics of the row keys alone (one set per representation), float64 sums."""

    ones: Tensor            #: ``[m]``   ``S 1``
    counts: Tensor          #: ``[m]``   rows per bucket (``s`` per row)
    wide_ones: Tensor       #: ``[m']``  ``S' 1``


def diagonal_seed(seed: int) -> int:
    """Seed of the wide row-norm sketch ``S'``, derived from the sketch seed and
    distinct from the sample-axis and TensorSketch keys."""
    seed = check_int(seed, "seed", 0, ops.MAX_SEED)
    return ops.block_keys(seed, 8)[7] >> 1


def row_statistics(x: Tensor, m: int, seed: int, offset: int = 0, sparsity: int = 1, *,
                   rows: Optional[Tensor] = None, diagonal_width: int = DIAGONAL_WIDTH
                   ) -> RowStatistics:
    """One batch's :class:`RowStatistics` of rows ``x`` (``[B, w]``, or ``[h, B, w]`` halves).

    Each is a sum over rows, so batches (and disjoint representations) add.
    ``offset`` and ``rows`` key the rows as in :func:`nnsim_fast.ops.countsketch`.
    """
    x = _halves_first(_tensor(x, "x"), "x", 3)
    width = check_int(diagonal_width, "diagonal_width", 1, ops.MAX_BUCKETS)
    halves, batch, dim = x.shape
    sqnorm = x.square().sum(-1)                                   # [h, B]
    # One pass: the squared norms ride along as extra columns of the same sketch.
    columns = torch.cat([x.permute(1, 0, 2).reshape(batch, halves * dim), sqnorm.T], dim=1)
    sketched = ops.countsketch(columns, m, seed, offset, sparsity, rows=rows)
    sketch = sketched[:, :halves * dim].reshape(m, halves, dim).permute(1, 0, 2).contiguous()
    wide = ops.countsketch(sqnorm.T.contiguous(), width, diagonal_seed(seed), offset, rows=rows)
    return RowStatistics(sketch, x.sum(1), sketched[:, halves * dim:].T.contiguous(),
                         sqnorm.sum(1), wide.T.contiguous())


def key_statistics(n: int, m: int, seed: int, offset: int = 0, sparsity: int = 1, *,
                   rows: Optional[Tensor] = None, diagonal_width: int = DIAGONAL_WIDTH,
                   device=None) -> KeyStatistics:
    """One batch's :class:`KeyStatistics` for ``n`` rows keyed like :func:`row_statistics`."""
    width = check_int(diagonal_width, "diagonal_width", 1, ops.MAX_BUCKETS)
    buckets, _ = ops.sketch_hash(n, m, seed, offset, sparsity, rows=rows, device=device)
    ones = torch.ones(n, 1, dtype=F64, device=buckets.device)
    return KeyStatistics(
        ops.countsketch(ones, m, seed, offset, sparsity, rows=rows)[:, 0],
        torch.bincount(buckets.reshape(-1), minlength=m).to(F64),
        ops.countsketch(ones, width, diagonal_seed(seed), offset, rows=rows)[:, 0])


# --------------------------------------------------------------------------- the summary

_LAYER_FIELDS = ("kernels", "deviation", "trace", "norm_deviation", "wide_deviation")


@dataclass(frozen=True)
class SketchedGram:
    """Sketched data-centred kernels of ``L`` layers, with what the estimators need.

    Attributes:
        kernels: ``[L, h, m, m]``, ``S A_{l,h} S^T`` (``h = 1``: exact feature axis;
            ``h = 2``: two independent feature-axis sketches).
        deviation: ``[L, h, m]``, ``S d_A`` with ``d_A = diag(A) - (Tr A / N) 1``.
        trace: ``[L, h]``, ``Tr A``.
        ones: ``[m]``, ``S 1``.
        n: number of rows N sketched.
        sparsity: blocks ``s`` of the sketch.
        counts: ``[m]`` bucket loads (rows per bucket), or None; the error bars use them.
        norm_deviation: ``[L, h, m]``, ``S e_A`` with ``e_A`` the deviations of the raw
            row norms ``|x_i|^2`` from their mean, or None.
        wide_deviation: ``[L, h, m']``, ``S' e_A``, or None.  With ``norm_deviation``
            it forms the diagonal's control variate (module docstring).
    All tensors are float64 on one device.
    """

    kernels: Tensor
    deviation: Tensor
    trace: Tensor
    ones: Tensor
    n: int
    sparsity: int = 1
    counts: Optional[Tensor] = None
    norm_deviation: Optional[Tensor] = None
    wide_deviation: Optional[Tensor] = None

    def __post_init__(self) -> None:
        kernels = _tensor(self.kernels, "kernels")
        if kernels.dim() != 4 or kernels.shape[1] not in (1, 2) or kernels.shape[2] != kernels.shape[3]:
            raise ValueError(f"kernels must have shape [L, h, m, m] with h in (1, 2), got "
                             f"{_shape(kernels)}")
        layers, halves, m, _ = kernels.shape
        if layers < 1 or m < 3:
            raise ValueError(f"kernels needs L >= 1 layers and m >= 3 buckets, got {_shape(kernels)}")
        expected = {"deviation": ((layers, halves, m), "[L, h, m]"), "trace": ((layers, halves), "[L, h]"),
                    "ones": ((m,), "[m]"), "counts": ((m,), "[m]"),
                    "norm_deviation": ((layers, halves, m), "[L, h, m]")}
        for name, (shape, spelled) in expected.items():
            value = getattr(self, name)
            if value is not None:
                value = _tensor(value, name)
                _expect(value, name, shape, spelled)
                object.__setattr__(self, name, value.to(kernels.device))
        object.__setattr__(self, "kernels", kernels)
        self._check_wide(layers, halves)
        object.__setattr__(self, "n", check_int(self.n, "n", 2))
        object.__setattr__(self, "sparsity", _check_sparsity(self.sparsity, m))

    def _check_wide(self, layers: int, halves: int) -> None:
        if (self.wide_deviation is None) != (self.norm_deviation is None):
            raise ValueError("norm_deviation and wide_deviation come together (both or neither)")
        if self.wide_deviation is not None:
            wide = _tensor(self.wide_deviation, "wide_deviation")
            if wide.dim() != 3 or wide.shape[:2] != (layers, halves):
                raise ValueError(f"wide_deviation must have shape [L, h, m'] = [{layers}, {halves}, "
                                 f"m'], got {_shape(wide)}")
            object.__setattr__(self, "wide_deviation", wide.to(self.kernels.device))

    @property
    def m(self) -> int:
        return self.kernels.shape[-1]

    @property
    def layers(self) -> int:
        return self.kernels.shape[0]

    @property
    def halves(self) -> int:
        return self.kernels.shape[1]

    def map_layers(self, fn) -> "SketchedGram":
        """A gram with ``fn`` applied to every per-layer tensor (the rest shared)."""
        changed = {name: fn(getattr(self, name)) for name in _LAYER_FIELDS
                   if getattr(self, name) is not None}
        return SketchedGram(**{f.name: getattr(self, f.name) for f in fields(self)}
                            | changed)

    def to(self, device) -> "SketchedGram":
        """The same gram with every tensor on ``device``."""
        moved = self.map_layers(lambda x: x.to(device))
        counts = None if self.counts is None else self.counts.to(device)
        return replace(moved, ones=self.ones.to(device), counts=counts)

    def __getitem__(self, index: Union[int, slice, Sequence[int]]) -> "SketchedGram":
        """The layers ``index`` (an int keeps the layer dimension)."""
        if isinstance(index, int):
            index = [index]
        if isinstance(index, slice):
            return self.map_layers(lambda x: x[index])
        return self.map_layers(lambda x: x[torch.as_tensor(index, dtype=torch.long, device=x.device)])

    def __add__(self, other: "SketchedGram") -> "SketchedGram":
        """The kernels ``A + B`` (e.g. ``K_f + K_g``), layer by layer; one exact half
        (``h = 1``) is added to each of two halves.  Every statistic is linear in the
        kernel, so the sum's statistics are the sums."""
        _check_same_rows(self, other, "self", "other")
        if self.layers != other.layers:
            raise ValueError(f"cannot add grams of {self.layers} and {other.layers} layers")
        halves = max(self.halves, other.halves)

        def widen(x: Tensor) -> Tensor:
            return x.expand(x.shape[0], halves, *x.shape[2:])

        summed = {}
        for name in _LAYER_FIELDS:
            mine, theirs = getattr(self, name), getattr(other, name)
            summed[name] = None if mine is None or theirs is None else widen(mine) + widen(theirs)
        return SketchedGram(ones=self.ones, n=self.n, sparsity=self.sparsity,
                            counts=_counts(self, other), **summed)


def _counts(a: SketchedGram, b: SketchedGram) -> Optional[Tensor]:
    return a.counts if a.counts is not None else b.counts


def _check_gram(gram, name: str) -> SketchedGram:
    if not isinstance(gram, SketchedGram):
        raise TypeError(f"{name} must be a SketchedGram, got {type(gram).__name__}")
    return gram


def _check_same_rows(a: SketchedGram, b: SketchedGram, name_a: str, name_b: str) -> None:
    """The estimators target kernels on the same N rows, sketched by the same S."""
    _check_gram(a, name_a)
    _check_gram(b, name_b)
    if (a.m, a.n, a.sparsity) != (b.m, b.n, b.sparsity):
        raise ValueError(f"{name_a} and {name_b} must share m, n and sparsity, got "
                         f"(m, n, s) = {(a.m, a.n, a.sparsity)} and {(b.m, b.n, b.sparsity)}")
    ones_b = b.ones.to(a.ones.device)
    if not torch.allclose(a.ones, ones_b, rtol=0, atol=1e-6 * max(1.0, float(a.ones.abs().max()))):
        raise ValueError(f"{name_a} and {name_b} hold different rows (their sketches of the ones "
                         "vector differ): the exact index they estimate needs the same samples")
    if a.counts is not None and b.counts is not None and \
            not torch.equal(a.counts, b.counts.to(a.counts.device)):
        raise ValueError(f"{name_a} and {name_b} have different bucket counts: they hold different rows")
    if a.wide_deviation is not None and b.wide_deviation is not None and \
            a.wide_deviation.shape[-1] != b.wide_deviation.shape[-1]:
        raise ValueError(f"{name_a} and {name_b} have wide diagonal sketches of different widths "
                         f"({a.wide_deviation.shape[-1]} and {b.wide_deviation.shape[-1]})")


# --------------------------------------------------------------------------- building

def centred_gram(sketch: Tensor, column_sum: Tensor, sketch_ones: Tensor, n: int,
                 sketch_sqnorm: Tensor, sum_sqnorm: Tensor, sparsity: int = 1, *,
                 counts: Optional[Tensor] = None, wide_sqnorm: Optional[Tensor] = None,
                 wide_ones: Optional[Tensor] = None) -> SketchedGram:
    """The :class:`SketchedGram` (one layer) of the data-centred kernel ``A = H X X^T H``.

    From streamed statistics of the rows ``x_i`` (per half ``h`` when given with a
    leading halves dimension; :class:`RowStatistics`, :class:`KeyStatistics`):
    ``sketch`` ``[h, m, w]``, ``column_sum`` ``[h, w]``, ``sketch_ones`` ``[m]`` (or
    ``[m, 1]``), ``n`` rows, ``sketch_sqnorm`` ``[h, m]``, ``sum_sqnorm`` ``[h]``, and
    optionally the bucket loads ``counts`` ``[m]`` (tighter error bars) and
    ``wide_sqnorm`` ``[h, m']`` with ``wide_ones`` ``[m']`` (the diagonal's control
    variate, which removes the noise of varying row norms).

    Exact identities (no estimation here): with ``mean = column_sum / n``,
    ``S H X = S X - (S 1) mean^T``, ``S diag(A) = S(|x_i|^2) - 2 S X mean + |mean|^2 S 1``
    and ``Tr A = sum |x_i|^2 - n |mean|^2``.
    """
    sketch = _halves_first(_tensor(sketch, "sketch"), "sketch", 3)
    halves, m, width = sketch.shape
    n = check_int(n, "n", 2)
    device = sketch.device
    ones = _tensor(sketch_ones, "sketch_ones").to(device)
    ones = ones.reshape(-1) if ones.dim() == 2 and ones.shape[1] == 1 else ones
    _expect(ones, "sketch_ones", (m,), "[m]")
    column_sum = _halves_first(_tensor(column_sum, "column_sum"), "column_sum", 2).to(device)
    sqnorms = _halves_first(_tensor(sketch_sqnorm, "sketch_sqnorm"), "sketch_sqnorm", 2).to(device)
    totals = _tensor(sum_sqnorm, "sum_sqnorm").reshape(-1).to(device)
    _expect(column_sum, "column_sum", (halves, width), "[h, w]")
    _expect(sqnorms, "sketch_sqnorm", (halves, m), "[h, m]")
    _expect(totals, "sum_sqnorm", (halves,), "[h]")
    mean = column_sum / n                                             # [h, w]
    centred = sketch - ones[None, :, None] * mean[:, None, :]         # [h, m, w]
    mean_sq = mean.square().sum(-1)                                   # [h]
    trace = totals - n * mean_sq
    diag = sqnorms - 2.0 * (sketch @ mean.unsqueeze(-1)).squeeze(-1) + mean_sq[:, None] * ones
    norm_deviation = wide_deviation = None
    if wide_sqnorm is not None or wide_ones is not None:
        wide_deviation = _wide_deviation(wide_sqnorm, wide_ones, totals / n, halves).to(device)
        norm_deviation = (sqnorms - (totals / n)[:, None] * ones).unsqueeze(0)
        wide_deviation = wide_deviation.unsqueeze(0)
    return SketchedGram((centred @ centred.transpose(1, 2)).unsqueeze(0),
                        (diag - (trace / n)[:, None] * ones).unsqueeze(0), trace.unsqueeze(0),
                        ones, n, _check_sparsity(sparsity, m), counts, norm_deviation, wide_deviation)


def _wide_deviation(wide_sqnorm, wide_ones, mean_sqnorm: Tensor, halves: int) -> Tensor:
    """``S' e = S'(|x_i|^2) - mean |x|^2 S' 1``, ``[h, m']``."""
    if wide_sqnorm is None or wide_ones is None:
        raise ValueError("wide_sqnorm and wide_ones come together (both or neither)")
    wide = _halves_first(_tensor(wide_sqnorm, "wide_sqnorm"), "wide_sqnorm", 2)
    ones = _tensor(wide_ones, "wide_ones").reshape(-1).to(wide.device)
    if wide.shape != (halves, ones.shape[0]):
        raise ValueError(f"wide_sqnorm must have shape [h, m'] = [{halves}, {ones.shape[0]}] "
                         f"(m' from wide_ones), got {_shape(wide)}")
    return wide - mean_sqnorm.to(wide.device)[:, None] * ones


def gram_from_rows(x: Tensor, m: int, seed: int, sparsity: int = 1, *,
                   diagonal_width: int = DIAGONAL_WIDTH) -> SketchedGram:
    """:func:`centred_gram` of all rows ``x`` (``[N, w]`` or ``[h, N, w]``) at once, with
    every optional statistic."""
    x = _halves_first(_tensor(x, "x"), "x", 3)
    stats = row_statistics(x, m, seed, sparsity=sparsity, diagonal_width=diagonal_width)
    keys = key_statistics(x.shape[1], m, seed, sparsity=sparsity, diagonal_width=diagonal_width,
                          device=x.device)
    return centred_gram(stats.sketch, stats.column_sum, keys.ones, x.shape[1], stats.sketch_sqnorm,
                        stats.sum_sqnorm, sparsity, counts=keys.counts,
                        wide_sqnorm=stats.wide_sqnorm, wide_ones=keys.wide_ones)


def stack_grams(grams: Sequence[SketchedGram]) -> SketchedGram:
    """One :class:`SketchedGram` of all layers of ``grams`` (same rows, m, s and h)."""
    if not isinstance(grams, (list, tuple)) or not grams:
        raise TypeError(f"grams must be a non-empty list of SketchedGram, got {type(grams).__name__}")
    first = _check_gram(grams[0], "grams[0]")
    for i, gram in enumerate(grams[1:], start=1):
        _check_same_rows(first, gram, "grams[0]", f"grams[{i}]")
        if gram.halves != first.halves:
            raise ValueError(f"grams[0] has {first.halves} halves but grams[{i}] has {gram.halves}")
    stacked = {}
    for name in _LAYER_FIELDS:
        parts = [getattr(g, name) for g in grams]
        stacked[name] = None if any(p is None for p in parts) else torch.cat(parts)
    return SketchedGram(ones=first.ones, n=first.n, sparsity=first.sparsity, counts=first.counts,
                        **stacked)


# --------------------------------------------------------------------------- HSIC terms

@dataclass(frozen=True)
class _Terms:
    """Pieces of the estimators for a batch of kernel pairs: per bucket ``[..., m]``,
    ``off[b] = sum_{c != b} A~_bc B~_bc`` and ``dev[b]`` (the m-bucket part of
    ``<d_A, d_B>``^); per pair ``[...]``, ``traces = Tr A Tr B`` and ``extra`` (the wide
    part of the control variate, ``<S' e_A, S' e_B>``, or 0)."""

    off: Tensor
    dev: Tensor
    traces: Tensor
    extra: Tensor


def _controlled(a: SketchedGram, b: SketchedGram) -> bool:
    return a.wide_deviation is not None and b.wide_deviation is not None


def _control_coefficient(*, xu: Tensor, yv: Tensor, xv: Tensor, yu: Tensor, uu: Tensor,
                         vv: Tensor, uv: Tensor) -> Tensor:
    """Coefficient ``beta`` of the diagonal's control variate (module docstring), per pair.

    With ``x = d_A``, ``y = d_B`` (centred diagonals) and ``u = e_A``, ``v = e_B`` (raw norm
    deviations), to leading order in ``1/m``
    ``Cov(<Sx, Sy>, <Su, Sv>) = (<x,u><y,v> + <x,v><y,u>) / m`` and
    ``Var <Su, Sv> = (|u|^2 |v|^2 + <u,v>^2) / m``, so ``<Sx, Sy> - beta (<Su, Sv> - <S'u, S'v>)``
    has the least variance at ``beta = Cov / Var``: 1 when the norms vary row by row
    (``d ~ e``), near 0 when a large common mean makes ``e`` mostly ``2 x_i . mean``,
    which ``d`` does not contain (there the fixed ``beta = 1`` adds the noise it should
    remove).  The inner products come from the sketches themselves: ``<x,u>`` etc. from
    the m buckets (unbiased), ``|u|^2``, ``|v|^2``, ``<u,v>`` from the wide sketch.  Clipped
    to [0, 1]; the term it multiplies has mean 0, so the estimate stays unbiased up to
    the covariance of ``beta``'s own noise with that term (second order, measured in
    docs/estimators.md §4).
    """
    denominator = uu * vv + uv.square()
    ratio = (xu * yv + xv * yu) / torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return torch.where(denominator > 0, ratio, torch.zeros_like(ratio)).clamp(0.0, 1.0)


def _cross_terms(a: SketchedGram, x: int, b: SketchedGram, y: int) -> _Terms:
    """Terms of every layer of ``a`` (half x) against every layer of ``b`` (half y): [La, Lb, m]."""
    ka, kb = a.kernels[:, x], b.kernels[:, y]
    da, db = torch.diagonal(ka, dim1=1, dim2=2), torch.diagonal(kb, dim1=1, dim2=2)
    off = torch.einsum("ibc,jbc->ijb", ka, kb) - da[:, None, :] * db[None, :, :]
    sa, sb = a.deviation[:, x], b.deviation[:, y]
    dev = sa[:, None, :] * sb[None, :, :]
    extra = torch.zeros(off.shape[:2], dtype=F64, device=off.device)
    if _controlled(a, b):
        ua, ub = a.norm_deviation[:, x], b.norm_deviation[:, y]
        wa, wb = a.wide_deviation[:, x], b.wide_deviation[:, y]
        uv = wa @ wb.T
        beta = _control_coefficient(
            xu=(sa * ua).sum(-1)[:, None], yv=(sb * ub).sum(-1)[None, :], xv=sa @ ub.T,
            yu=(ua @ sb.T), uu=wa.square().sum(-1)[:, None], vv=wb.square().sum(-1)[None, :], uv=uv)
        dev = dev - beta[..., None] * (ua[:, None, :] * ub[None, :, :])
        extra = beta * uv
    return _Terms(off, dev, a.trace[:, x][:, None] * b.trace[:, y][None, :], extra)


def _self_terms(a: SketchedGram) -> _Terms:
    """Terms of each layer with itself, halves (0, 1) when there are two: [L, m]."""
    y = a.halves - 1
    ka, kb = a.kernels[:, 0], a.kernels[:, y]
    off = (ka * kb).sum(-1) - torch.diagonal(ka, dim1=1, dim2=2) * torch.diagonal(kb, dim1=1, dim2=2)
    sa, sb = a.deviation[:, 0], a.deviation[:, y]
    dev = sa * sb
    extra = torch.zeros(off.shape[:1], dtype=F64, device=off.device)
    if _controlled(a, a):
        ua, ub = a.norm_deviation[:, 0], a.norm_deviation[:, y]
        wa, wb = a.wide_deviation[:, 0], a.wide_deviation[:, y]
        uv = (wa * wb).sum(-1)
        beta = _control_coefficient(xu=(sa * ua).sum(-1), yv=(sb * ub).sum(-1), xv=(sa * ub).sum(-1),
                                    yu=(ua * sb).sum(-1), uu=wa.square().sum(-1),
                                    vv=wb.square().sum(-1), uv=uv)
        dev = dev - beta[..., None] * (ua * ub)
        extra = beta * uv
    return _Terms(off, dev, a.trace[:, 0] * a.trace[:, y], extra)


def _half_pairs(a: SketchedGram, b: SketchedGram):
    if a.halves == 2 and b.halves == 2:
        return ((0, 1), (1, 0))       # never a feature-axis sketch with itself
    return tuple((x, y) for x in range(a.halves) for y in range(b.halves))


def _hsic_from_sums(off: Tensor, diagonal: Tensor, traces: Tensor, n: int, m: int, s: int,
                    debiased: bool) -> Tensor:
    """HSIC (as :func:`nnsim_fast.indices.hsic` of the exact kernels) from ``sum_{b != c}``
    and ``D^``."""
    if not debiased:
        inner = (off + (1.0 / s - 1.0 / m) * diagonal) / (1.0 - 1.0 / m)
        return inner / (n - 1) ** 2
    off_diagonal = (off - (1.0 - 1.0 / s) * diagonal) / (1.0 - 1.0 / m)
    return (off_diagonal + traces / ((n - 1) * (n - 2)) - 2.0 * diagonal / (n - 2)) / (n * (n - 3))


def _hsic_and_leave_one_out(terms: _Terms, n: int, m: int, s: int, debiased: bool
                            ) -> Tuple[Tensor, Tensor]:
    """The estimate ``[...]`` and its leave-one-bucket-out values ``[..., m]``.

    Buckets are exchangeable units: the off-diagonal sum is m(m-1) times a mean over
    ordered bucket pairs and the m-bucket diagonal term m times a mean over buckets.
    Leaving bucket b out recomputes both means over the other buckets (the delete-one
    jackknife of a U-statistic) and plugs them into the same formula; the exact traces
    and the wide sketch's term are not bucket quantities and stay.
    """
    off, dev = terms.off.sum(-1), terms.dev.sum(-1)
    fixed = terms.traces / n + terms.extra
    estimate = _hsic_from_sums(off, fixed + dev, terms.traces, n, m, s, debiased)
    off_out = (off[..., None] - 2.0 * terms.off) * (m / (m - 2.0))
    dev_out = (dev[..., None] - terms.dev) * (m / (m - 1.0))
    leave_one = _hsic_from_sums(off_out, fixed[..., None] + dev_out, terms.traces[..., None], n, m,
                                s, debiased)
    return estimate, leave_one


def _cross_hsic(a: SketchedGram, b: SketchedGram, debiased: bool) -> Tuple[Tensor, Tensor]:
    pairs = _half_pairs(a, b)
    estimate = leave_one = 0.0
    for x, y in pairs:
        value, out = _hsic_and_leave_one_out(_cross_terms(a, x, b, y), a.n, a.m, a.sparsity, debiased)
        estimate, leave_one = estimate + value / len(pairs), leave_one + out / len(pairs)
    return estimate, leave_one


def _grams_pair(grams_a, grams_b) -> Tuple[SketchedGram, SketchedGram]:
    a = _check_gram(grams_a, "grams_a")
    if grams_b is None or grams_b is a:       # one gram: its layers' self-pairs are exact
        return a, a
    _check_same_rows(a, grams_b, "grams_a", "grams_b")
    return a, grams_b.to(a.kernels.device)


def _check_debiased(debiased, n: int) -> bool:
    debiased = check_bool(debiased, "debiased")
    if debiased and n <= 3:
        raise ValueError(f"the debiased (U-statistic) HSIC needs n > 3 rows, got n = {n}")
    return debiased


def hsic_matrix(grams_a: SketchedGram, grams_b: Optional[SketchedGram] = None,
                debiased: bool = False) -> Tensor:
    """Unbiased estimates of the HSIC of every layer pair, ``[La, Lb]`` float64.

    Entry ``[i, j]`` estimates ``nnsim_fast.indices.hsic(K_i, L_j, debiased)`` of the
    exact ``N x N`` kernels (``Tr(K H L H) / (N-1)^2``, or Song et al.'s U-statistic),
    with no collision bias for any ``m`` and ``s``.  ``grams_b`` defaults to
    ``grams_a``.  A dependence statistic, not a similarity: it may be negative.
    """
    a, b = _grams_pair(grams_a, grams_b)
    return _cross_hsic(a, b, _check_debiased(debiased, a.n))[0]


# --------------------------------------------------------------------------- CKA

def _ratio(cross: Tensor, self_a: Tensor, self_b: Tensor) -> Tuple[Tensor, Tensor]:
    """``cross / sqrt(self_a self_b)`` and a mask of where it is defined."""
    product = self_a[..., :, None] * self_b[..., None, :]
    defined = (self_a[..., :, None] > 0) & (self_b[..., None, :] > 0)
    safe = torch.where(defined, product, torch.ones_like(product))
    return torch.where(defined, cross / safe.sqrt(), torch.zeros_like(cross)), defined


def _degenerate(gram: SketchedGram) -> Tensor:
    """Layers whose centred kernel is zero (no variance across rows): ``[L]`` bool."""
    scale = gram.kernels.abs().amax(dim=(1, 2, 3))
    return (gram.trace.amin(dim=1) <= gram.n * _EPS64 * gram.trace.abs().amax(dim=1)) | (scale == 0)


def _jackknife_stderr(estimate: Tensor, leave_one: Tensor, counts: Optional[Tensor]) -> Tensor:
    """Standard error from leave-one-bucket values ``[m, ...]``.

    Pseudo-values ``p_b = m theta - (m-1) theta_-b`` have mean ``theta_jack`` and, for
    independent units, variance ``m Var(theta)``.  Buckets are not independent in one
    known way: their loads sum to ``s N`` exactly (multinomial), while the first-order
    term of a high-rank kernel pair is nearly proportional to the load.  The part of
    the pseudo-values explained by the centred loads therefore sums to zero and is
    regressed out (one degree of freedom) before taking the variance.
    """
    m = leave_one.shape[0]
    pseudo = m * estimate.unsqueeze(0) - (m - 1) * leave_one
    resid = pseudo - pseudo.mean(0)
    dof = m - 1
    if counts is not None:
        load = (counts - counts.mean()).reshape(-1, *([1] * estimate.dim()))
        spread = load.square().sum()
        if float(spread) > 0:
            resid = resid - load * (resid * load).sum(0) / spread
            dof = m - 2
    return (resid.square().sum(0) / (dof * m)).sqrt()


def cka_matrix(grams_a: SketchedGram, grams_b: Optional[SketchedGram] = None,
               debiased: bool = False, clip: bool = True) -> Tuple[Tensor, Tensor]:
    """Data-centred CKA of every layer pair with a standard error: ``(estimate, stderr)``.

    ``estimate[i, j]`` estimates ``nnsim_fast.cka(K_i, L_j, debiased=debiased)`` of the
    exact ``N x N`` kernels (centred over the data): the ratio
    ``HSIC_ij / sqrt(HSIC_ii HSIC_jj)`` of the unbiased HSIC estimates of
    :func:`hsic_matrix`.  A ratio of unbiased estimates, its bias is of the order of
    their relative variance (``stderr^2``), far below ``stderr``.

    ``stderr`` is the delete-one-bucket jackknife of the whole ratio (buckets as
    exchangeable units), with the bucket loads regressed out of the pseudo-values when
    the grams carry ``counts`` (without them it is still conservative, but measured up
    to 5x too large for high-rank layers); validated for coverage against the exact value in
    ``tests/test_estimators.py``.  It measures the sample-axis sketch's error; the
    feature-axis TensorSketch halves add a smaller part (see ``docs/estimators.md``).

    Range: with ``clip=True`` the biased index is clipped to [0, 1] and the debiased
    one to [-1, 1] (similarities, 1 = identical up to scale); ``clip=False`` returns
    the raw ratio (for averaging over seeds).  A layer whose centred kernel is zero
    gives 0.0 with stderr 0; an estimated self-HSIC <= 0 (``m`` far too small) gives
    0.0 with stderr ``inf``.
    """
    a, b = _grams_pair(grams_a, grams_b)
    debiased = _check_debiased(debiased, a.n)
    clip = check_bool(clip, "clip")
    cross, cross_out = _cross_hsic(a, b, debiased)
    self_a, self_a_out = _hsic_and_leave_one_out(_self_terms(a), a.n, a.m, a.sparsity, debiased)
    self_b, self_b_out = (self_a, self_a_out) if b is a else _hsic_and_leave_one_out(
        _self_terms(b), b.n, b.m, b.sparsity, debiased)
    estimate, defined = _ratio(cross, self_a, self_b)
    out, defined_out = _ratio(cross_out.permute(2, 0, 1), self_a_out.T, self_b_out.T)   # [m, La, Lb]
    stderr = _jackknife_stderr(estimate, out, _counts(a, b))
    stderr = torch.where(defined & defined_out.all(0), stderr, torch.full_like(stderr, math.inf))
    degenerate = _degenerate(a).unsqueeze(1) | _degenerate(b).unsqueeze(0)
    estimate = torch.where(degenerate, torch.zeros_like(estimate), estimate)
    stderr = torch.where(degenerate, torch.zeros_like(stderr), stderr)
    if clip:
        estimate = estimate.clamp(-1.0 if debiased else 0.0, 1.0)
    return estimate, stderr


def effective_rank(grams: SketchedGram) -> Tensor:
    """``(Tr A)^2 / ||A||_F^2`` per layer, ``[L]`` float64, with the unbiased ``||A||_F^2``.

    The number of directions the layer's centred kernel spreads its energy over:
    above ``m`` the plain sketched kernel's collision term ``(Tr A)^2 / m`` exceeds
    ``||A||_F^2`` itself.  Degenerate layers give 0.
    """
    a = _check_gram(grams, "grams")
    terms = _self_terms(a)
    norm_sq = _hsic_and_leave_one_out(terms, a.n, a.m, a.sparsity, False)[0] * (a.n - 1) ** 2
    positive = norm_sq > 0
    rank = terms.traces / torch.where(positive, norm_sq, torch.ones_like(norm_sq))
    return torch.where(positive & ~_degenerate(a), rank, torch.zeros_like(rank))


def resolution_warnings(stderr: Tensor, tolerance: float = RESOLUTION_TOLERANCE) -> Tensor:
    """Where a similarity's standard error exceeds ``tolerance``: ``m`` is too small
    for that layer pair (``bool`` tensor of ``stderr``'s shape)."""
    stderr = _tensor(stderr, "stderr", allow_inf=True)     # inf: no usable estimate
    tolerance = check_float(tolerance, "tolerance", 0.0, low_open=True)
    return ~(stderr <= tolerance)


def suggested_m(stderr: float, m: int, tolerance: float = RESOLUTION_TOLERANCE) -> Optional[int]:
    """A sketch size whose standard error should fall to ``tolerance``: the standard error
    of the corrected CKA falls like ``1/sqrt(m)`` at worst (low-rank layers, the floor of
    docs/estimators.md section 6; high-rank pairs fall faster, like ``1/m``), so
    ``m (stderr / tolerance)^2``, rounded up to a power of two.  None when ``stderr`` is
    not finite (no usable estimate to extrapolate from) or the size would exceed the
    sketch's largest bucket count; ``m`` itself when ``stderr <= tolerance``."""
    m = check_int(m, "m", 3)
    tolerance = check_float(tolerance, "tolerance", 0.0, low_open=True)
    if not isinstance(stderr, (int, float)) or isinstance(stderr, bool):
        raise TypeError(f"stderr must be a number, got {type(stderr).__name__}")
    if not math.isfinite(stderr):
        return None
    if stderr <= tolerance:
        return m
    wanted = m * (stderr / tolerance) ** 2
    size = 1 << max(0, math.ceil(math.log2(wanted)))
    return size if size <= ops.MAX_BUCKETS else None


# --------------------------------------------------------------------------- NBS

def nbs_matrix(grams_a: SketchedGram, grams_b: Optional[SketchedGram] = None) -> Tensor:
    """Plug-in NBS of the data-centred sketched kernels, ``[La, Lb]`` float64 in [0, 1].

    ``NBS(A~, B~) = Tr((A~^1/2 B~ A~^1/2)^1/2) / sqrt(Tr A~ Tr B~)`` on the ``m x m``
    kernels (different TensorSketch halves on the two sides, averaged over the two
    pairings; a layer with itself is 1).  Not unbiased: the nuclear norm depends on
    the whole spectrum of ``A^1/2 B A^1/2``, including directions beyond the ``m`` a
    sketch can resolve, so no correction of the collision terms (which HSIC allows)
    applies; removing the collision floor makes it far worse.  The plug-in's measured
    error is in ``docs/estimators.md``: small for low effective rank, an upward bias
    that grows with effective rank / m otherwise.  Prefer CKA, or check NBS against
    the exact path on a subset.
    """
    a, b = _grams_pair(grams_a, grams_b)
    if b is a and a.halves == 2:
        # NBS is symmetric in its arguments, so pairing (1, 0) is the transpose of (0, 1).
        once = indices.nbs_matrix(a.kernels[:, 0], a.kernels[:, 1], centered=False)
        out = (once + once.T) / 2
    else:
        pairs = _half_pairs(a, b)
        out = sum(indices.nbs_matrix(a.kernels[:, x], b.kernels[:, y], centered=False)
                  for x, y in pairs) / len(pairs)
    if b is a:
        # A layer with itself: its one kernel (the same half on both sides) is identical.
        out.diagonal().copy_(torch.ones(a.layers, dtype=F64) * (~_degenerate(a)).to(F64))
    return out
