"""Sketched ``m x m`` kernels of a :class:`~nnsim_fast.sketch.Representation`.

With ``F~ = S F`` and ``G~ = S G`` the sketched feature and gradient matrices of
a layer (``m x d``), the kinds are:

``"feature"``     ``K~_f = F~ F~^T``
``"gradient"``    ``K~_g = G~ G~^T``
``"hadamard"``    ``K~_f o K~_g``, Algorithm 1 of the paper (the default).  Note it
                  is not ``S K S^T``: the sketch of each factor adds cross terms.
``"sum"``         ``K~_f + K~_g``
``"khatri_rao"``  ``P~ P~^T`` with ``P~ = S (F o G)``, the elementwise product of
                  features and gradients (needs ``sketch_model(..., product=True)``)
``"psi"``         ``(Psi~_0 Psi~_0^T + Psi~_1 Psi~_1^T) / 2`` with ``Psi~_h = S T_h(Psi)``,
                  two independent TensorSketches ``T_h`` of ``psi(x) = g (x) f`` (exact
                  ``psi`` when ``df * dg`` fits the width): each term is unbiased for
                  ``S K S^T`` with ``K = K_f o K_g`` -- the estimator the paper's
                  bounds cover (kept unless ``psi=False``).  The halves have their
                  own buckets (``psi_buckets``, 4 m up to 2048 by default), so this
                  kernel is ``psi_buckets x psi_buckets``
``"transport"``   ``(I/2 + T/2) K~_f (I/2 + T/2)`` with
                  ``T = K~_f^{-1/2} (K~_f^{1/2} K~_g K~_f^{1/2})^{1/2} K~_f^{-1/2}``
                  (pseudo-inverse square roots on the numerical range of ``K~_f``)

Centering (``centering=``):

``"none"``     the kernel as defined above.
``"buckets"``  ``H K~ H`` on the ``m x m`` matrix, ``H = I - 11^T/m`` -- what the
               paper's code does; cheap and always available.
``"data"``     remove the data means before the Grams: ``F~ - (S 1) mean_f^T`` and
               likewise for ``G~``, ``F o G`` and ``Psi`` (subtracting the mean
               embedding), using the exact column sums kept
               in the representation.  For ``feature``, ``gradient``, ``sum`` and
               ``khatri_rao`` this is exactly the sketch of the centred data
               (``S H F``), and for ``psi`` it is the sketch of ``H K H``; for
               ``hadamard`` and ``transport`` it centres each factor, which is not
               the same as centring their product.
Kernels are returned in float64 (the index math's precision).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Mapping, Sequence, Tuple

import torch

from . import ops
from .estimators import centred_gram, stack_grams
from .indices import symmetric_eigh
from ._checks import check_choice
from .options import CENTERINGS, KINDS


def check_kind(kind: str) -> str:
    return check_choice(kind, "kind", KINDS)


def check_centering(centering: str) -> str:
    return check_choice(centering, "centering", CENTERINGS)


def center_buckets(K: torch.Tensor) -> torch.Tensor:
    """``H K H`` over the last two dimensions (through row and column means)."""
    K = K - K.mean(dim=-1, keepdim=True)
    return K - K.mean(dim=-2, keepdim=True)


def _psd_power(K: torch.Tensor, power: float) -> torch.Tensor:
    """``K^power`` of symmetric PSD matrices on their numerical range (pseudo-inverse for < 0)."""
    values, vectors = symmetric_eigh((K + K.transpose(-1, -2)) / 2)
    limit = values.amax(dim=-1, keepdim=True).clamp_min(0) * K.shape[-1] * torch.finfo(K.dtype).eps
    keep = values > limit
    scaled = torch.where(keep, values.clamp_min(0) if power > 0 else values, torch.ones_like(values))
    scaled = torch.where(keep, scaled.pow(power), torch.zeros_like(values))
    return (vectors * scaled.unsqueeze(-2)) @ vectors.transpose(-1, -2)


def transport_kernel(K_f: torch.Tensor, K_g: torch.Tensor) -> torch.Tensor:
    """``(I/2 + T/2) K_f (I/2 + T/2)``, T the optimal-transport map from K_f to K_g (batched)."""
    root = _psd_power(K_f, 0.5)
    inv_root = _psd_power(K_f, -0.5)
    middle = _psd_power(root @ K_g @ root, 0.5)
    T = inv_root @ middle @ inv_root
    eye = torch.eye(K_f.shape[-1], dtype=K_f.dtype, device=K_f.device)
    A = (eye + T) / 2
    return A @ K_f @ A


def _grams(mats: List[torch.Tensor]) -> torch.Tensor:
    """``X X^T`` for a list of ``[m, d_i]`` matrices, batched over equal widths."""
    out = [None] * len(mats)
    groups: Dict[int, List[int]] = defaultdict(list)
    for i, x in enumerate(mats):
        groups[x.shape[1]].append(i)
    for idx in groups.values():
        stack = torch.stack([mats[i] for i in idx])
        grams = torch.bmm(stack, stack.transpose(1, 2))
        for k, i in enumerate(idx):
            out[i] = grams[k]
    return torch.stack(out)


def _hadamard(fs: List[torch.Tensor], gs: List[torch.Tensor]) -> torch.Tensor:
    """``(F F^T) o (G G^T)`` for many layers through the batched native op."""
    out = [None] * len(fs)
    groups: Dict[Tuple[int, int], List[int]] = defaultdict(list)
    for i, (f, g) in enumerate(zip(fs, gs)):
        groups[(f.shape[1], g.shape[1])].append(i)
    for idx in groups.values():
        grams = ops.hadamard_gram(torch.stack([fs[i] for i in idx]), torch.stack([gs[i] for i in idx]))
        for k, i in enumerate(idx):
            out[i] = grams[k]
    return torch.stack(out)


def _centred_sketch(sketch: torch.Tensor, column_sum: torch.Tensor, ones: torch.Tensor, n: int
                    ) -> torch.Tensor:
    # S (X - 1 mean^T) = S X - (S 1) mean^T, for a [.., m, d] sketch and [.., d] sums.
    return sketch - ones * (column_sum / max(n, 1)).unsqueeze(-2)


def sketched_kernels(layers: Sequence[Mapping[str, torch.Tensor]], sketch_ones: torch.Tensor,
                     n: int, kind: str = "hadamard", centering: str = "none") -> torch.Tensor:
    """``[L, m, m]`` float64 kernels of the given layers (see the module docstring).

    ``layers`` holds each layer's statistics by name (:mod:`nnsim_fast.state`),
    ``sketch_ones`` is ``S 1`` and ``n`` the number of rows sketched.
    """
    check_choice(kind, "kind", KINDS)
    check_choice(centering, "centering", CENTERINGS)
    ones = sketch_ones.to(torch.float64)

    def factor(stats, which: str) -> torch.Tensor:
        sketch = stats.get(f"sketch_{which}")
        if sketch is None:
            raise ValueError(f"kind={kind!r} needs a statistic this representation lacks; "
                             f"{_OPTION_FOR[which]}")
        sketch = sketch.to(torch.float64)
        if centering != "data":
            return sketch
        # The psi halves have their own buckets (and so their own S 1).
        column_ones = stats["psi_ones"].to(torch.float64).unsqueeze(-1) if which == "psi" else ones
        return _centred_sketch(sketch, stats[f"sum_{which}"].to(torch.float64), column_ones, n)

    if kind == "psi":
        # Mean of the Grams of the two independent TensorSketch halves: PSD, and
        # each half is unbiased for S K S^T (K the paper's kernel).
        K = sum(_grams([factor(stats, "psi")[h] for stats in layers]) for h in (0, 1)) / 2
    elif kind in ("hadamard", "transport"):
        fs = [factor(stats, "f") for stats in layers]
        gs = [factor(stats, "g") for stats in layers]
        K = _hadamard(fs, gs) if kind == "hadamard" else transport_kernel(_grams(fs), _grams(gs))
    else:
        which = {"feature": ("f",), "gradient": ("g",), "sum": ("f", "g"), "khatri_rao": ("fg",)}
        K = sum(_grams([factor(stats, w) for stats in layers]) for w in which[kind])
    if centering == "buckets":
        K = center_buckets(K)
    return K


_OPTION_FOR = {
    "g": "sketch with gradients (sketch_model(..., gradients=True))",
    "psi": "sketch with psi=True (the default when gradients are kept)",
    "fg": "sketch with sketch_model(..., product=True)",
    "f": "features are always kept; the representation is damaged",
}


# --------------------------------------------------------------------------- estimator input

#: The factor(s) whose data-centred Grams make each kind's kernel (summed).
_GRAM_FACTORS = {"feature": ("f",), "gradient": ("g",), "sum": ("f", "g"),
                 "khatri_rao": ("fg",), "hadamard": ("psi",), "psi": ("psi",)}


def _factor_gram(stats: Mapping[str, torch.Tensor], which: str, ones: torch.Tensor, n: int,
                 sparsity: int, kind: str):
    sketch = stats.get(f"sketch_{which}")
    if sketch is None:
        raise ValueError(f"kind={kind!r} needs a statistic this representation lacks; "
                         f"{_OPTION_FOR[which]}")
    if which == "psi":
        # Two independent TensorSketch halves of psi, each centred with its own rows' norms
        # |T_h psi_i|^2 (exact for the half: the common mean's energy cancels within it).
        extras = _control_statistics(stats, "psih")
        extras["counts"] = stats["psi_counts"]
        return centred_gram(sketch.to(torch.float64), stats["sum_psi"], stats["psi_ones"], n,
                            stats["sketch_sqnorm_psih"], stats["sqnorm_psih"], sparsity, **extras)
    extras = _control_statistics(stats, which)
    return centred_gram(sketch.to(torch.float64).unsqueeze(0), stats[f"sum_{which}"].unsqueeze(0),
                        ones, n, stats[f"sketch_sqnorm_{which}"].unsqueeze(0),
                        stats[f"sqnorm_{which}"].reshape(1), sparsity, **extras)


def _control_statistics(stats: Mapping[str, torch.Tensor], which: str) -> Dict[str, torch.Tensor]:
    """The bucket loads and the wide sketch of the row norms, when the layer keeps them:
    tighter error bars and the diagonal's control variate (docs/estimators.md)."""
    extras = {}
    if stats.get("counts") is not None:
        extras["counts"] = stats["counts"]
    wide = stats.get(f"wide_sqnorm_{which}")
    if wide is not None and stats.get("wide_ones") is not None:
        extras["wide_sqnorm"] = wide if wide.dim() == 2 else wide.unsqueeze(0)
        extras["wide_ones"] = stats["wide_ones"]
    return extras


def sketched_grams(layers: Sequence[Mapping[str, torch.Tensor]], sketch_ones: torch.Tensor,
                   n: int, kind: str, sparsity: int = 1):
    """The :class:`~nnsim_fast.estimators.SketchedGram` of the given layers' data-centred
    kernels of ``kind`` (what the collision-corrected estimators take)."""
    check_choice(kind, "kind", KINDS)
    if kind not in _GRAM_FACTORS:
        raise ValueError(f"kind={kind!r} is not a linear function of the data's Gram matrices, "
                         "so it has no collision-corrected estimator; use estimator='plugin' "
                         "(or 'paper', or 'exact' on a subset)")
    ones = sketch_ones.to(torch.float64).reshape(-1)
    grams = []
    for stats in layers:
        parts = [_factor_gram(stats, which, ones, n, sparsity, kind)
                 for which in _GRAM_FACTORS[kind]]
        grams.append(parts[0] if len(parts) == 1 else parts[0] + parts[1])
    return stack_grams(grams)
