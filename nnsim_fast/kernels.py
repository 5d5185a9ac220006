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
``"psi"``         ``Psi~ Psi~^T`` with ``Psi~ = S Psi``, the sketch of ``psi(x) = g f^T``
                  itself, so that ``K~ = S K S^T`` (exactly, or through a TensorSketch
                  of psi; needs ``sketch_model(..., psi=True)``) -- the estimator the
                  paper's bounds cover
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
               (``S H F``), and for ``psi`` it is exactly ``S H K H S^T``; for ``hadamard`` and ``transport`` it centres each
               factor, which is not the same as centring their product.
Kernels are returned in float64 (the index math's precision).
"""
from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Dict, List, Sequence, Tuple

import torch

from . import ops

if TYPE_CHECKING:  # pragma: no cover
    from .sketch import Representation

KINDS = ("feature", "gradient", "hadamard", "sum", "khatri_rao", "psi", "transport")
CENTERINGS = ("none", "buckets", "data")


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return kind


def check_centering(centering: str) -> str:
    if centering not in CENTERINGS:
        raise ValueError(f"centering must be one of {CENTERINGS}, got {centering!r}")
    return centering


def center_buckets(K: torch.Tensor) -> torch.Tensor:
    """``H K H`` over the last two dimensions (through row and column means)."""
    K = K - K.mean(dim=-1, keepdim=True)
    return K - K.mean(dim=-2, keepdim=True)


def _psd_power(K: torch.Tensor, power: float) -> torch.Tensor:
    """``K^power`` of symmetric PSD matrices on their numerical range (pseudo-inverse for < 0)."""
    values, vectors = torch.linalg.eigh((K + K.transpose(-1, -2)) / 2)
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
    # S (X - 1 mean^T) = S X - (S 1) mean^T
    return sketch - ones @ (column_sum / max(n, 1)).unsqueeze(0)


def representation_kernels(rep: "Representation", layers: Sequence[str], kind: str = "hadamard",
                           centering: str = "none") -> torch.Tensor:
    """``[L, m, m]`` float64 kernels of ``layers`` of ``rep`` (see the module docstring)."""
    check_kind(kind)
    check_centering(centering)
    if rep.n == 0:
        raise ValueError("the representation is empty (no rows sketched yet)")
    chosen = [rep.layer(name) for name in layers]
    ones = rep.sketch_ones.to(torch.float64)

    def factor(layer, which: str) -> torch.Tensor:
        sketch = getattr(layer, f"sketch_{which}")
        if sketch is None:
            option = "psi=True" if which == "psi" else "product=True"
            raise ValueError(f"kind={kind!r} needs a statistic this representation lacks; build "
                             f"it with sketch_model(..., {option})")
        sketch = sketch.to(torch.float64)
        if centering != "data":
            return sketch
        column_sum = getattr(layer, f"sum_{which}")
        return _centred_sketch(sketch, column_sum.to(torch.float64), ones, rep.n)

    if kind == "feature":
        K = _grams([factor(layer, "f") for layer in chosen])
    elif kind == "gradient":
        K = _grams([factor(layer, "g") for layer in chosen])
    elif kind == "sum":
        K = _grams([factor(layer, "f") for layer in chosen]) + \
            _grams([factor(layer, "g") for layer in chosen])
    elif kind == "khatri_rao":
        K = _grams([factor(layer, "fg") for layer in chosen])
    elif kind == "psi":
        K = _grams([factor(layer, "psi") for layer in chosen])
    elif kind == "hadamard":
        K = _hadamard([factor(layer, "f") for layer in chosen],
                      [factor(layer, "g") for layer in chosen])
    else:  # transport
        K = transport_kernel(_grams([factor(layer, "f") for layer in chosen]),
                             _grams([factor(layer, "g") for layer in chosen]))
    if centering == "buckets":
        K = center_buckets(K)
    return K
