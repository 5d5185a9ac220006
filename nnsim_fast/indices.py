"""Similarity indices between kernels (Gram matrices) and between feature matrices.

Small pure functions on tensors.  Whatever the floating dtype of the input, the
index math runs in float64 on the input's device; scalar results are Python
floats and matrix results are float64 tensors.

Every index here is a **similarity**, not a distance: 1 means identical up to the
index's invariances, 0 means nothing in common.  For positive semidefinite (PSD)
kernels, CKA and NBS lie in [0, 1]; debiased CKA lies in [-1, 1], where values
near 0 (or slightly below) mean "no similarity".

Conventions
-----------
* A kernel is a square matrix ``[n, n]`` (one row/column per sample); stacks of
  kernels are ``[L, n, n]``.  Feature matrices are ``[n, d]`` (one row per sample).
* Centring is ``H K H`` with ``H = I - 11^T / n``, applied through row and column
  means (``H`` is never formed).
* Degenerate input (a kernel that is zero after centring, features without any
  variance) has no defined similarity; the indices return 0.0 for it instead of
  NaN.  "Zero" means below float64 rounding of the input: a norm at most
  ``n * eps64`` times the norm of the (peak-scaled) input.
* Kernels are scaled by their largest absolute entry before any squared
  quantity is formed; all indices are scale invariant, and this keeps float64
  free of overflow and underflow for kernels of any magnitude.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "PSD_RTOL",
    "validate_kernel",
    "center_kernel",
    "cka",
    "cka_matrix",
    "nbs",
    "nbs_matrix",
    "hsic",
    "linear_cka",
    "mean_embedding_norm_from_kernel",
    "mean_embedding_ratios",
    "mean_embedding_scores",
]

#: Tolerance, relative to the Frobenius norm of a kernel, beyond which an NBS input
#: counts as not symmetric or not positive semidefinite.  It is far above the
#: rounding error of float32 Gram matrices (so sketched kernels always pass) and
#: far below what an indefinite matrix (a distance matrix, a difference of two
#: kernels) shows, so such input raises instead of being silently clamped.
PSD_RTOL = 1e-3

_EPS64 = torch.finfo(torch.float64).eps

KernelStack = Union[Tensor, Sequence[Tensor]]


# --------------------------------------------------------------------------- checks

def _shape(tensor: Tensor) -> Tuple[int, ...]:
    return tuple(tensor.shape)


def _check_floating(tensor: object, name: str) -> None:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(
            f"{name} must have a floating dtype, got {tensor.dtype} with shape {_shape(tensor)}")


def validate_kernel(K: Tensor, name: str, *, ndim: Optional[int] = None) -> None:
    """Check that ``K`` is a floating, non-empty square matrix or stack of them.

    Args:
        K: kernel ``[n, n]`` or batch of kernels ``[..., n, n]``.
        name: the argument's name, used in error messages.
        ndim: if given, the exact number of dimensions required (2 for one kernel,
            3 for a stack ``[L, n, n]``); otherwise any ``ndim >= 2`` is accepted.

    Raises:
        TypeError: ``K`` is not a tensor or its dtype is not floating.
        ValueError: wrong number of dimensions, non-square trailing dimensions,
            or ``n == 0``; the message names ``name`` and the shape.
    """
    _check_floating(K, name)
    if ndim is not None and K.dim() != ndim:
        expected = "[n, n]" if ndim == 2 else "[" + ", ".join(["L"] * (ndim - 2) + ["n", "n"]) + "]"
        raise ValueError(f"{name} must be a {ndim}-D kernel {expected}, got shape {_shape(K)}")
    if K.dim() < 2:
        raise ValueError(f"{name} must be a square kernel [n, n] or [..., n, n], got shape {_shape(K)}")
    if K.shape[-1] != K.shape[-2]:
        raise ValueError(f"{name} must be square in its last two dimensions, got shape {_shape(K)}")
    if K.shape[-1] == 0:
        raise ValueError(f"{name} must have at least one sample (n >= 1), got shape {_shape(K)}")


def _validate_features(X: Tensor, name: str) -> None:
    _check_floating(X, name)
    if X.dim() != 2:
        raise ValueError(
            f"{name} must be a 2-D feature matrix [n, d] (flatten the per-sample dimensions "
            f"first), got shape {_shape(X)}")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"{name} must have at least one sample and one feature, got shape {_shape(X)}")


def _check_same_n(A: Tensor, B: Tensor, name_a: str, name_b: str) -> None:
    n_a = A.shape[-1]
    n_b = B.shape[-1]
    if n_a != n_b:
        raise ValueError(
            f"{name_a} and {name_b} must be kernels on the same samples (same n), got "
            f"{name_a} with shape {_shape(A)} and {name_b} with shape {_shape(B)}")


def _check_finite(tensor: Tensor, name: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contains NaN or infinite values (shape {_shape(tensor)})")


def _check_debiased_n(n: int, tensor: Tensor, name: str) -> None:
    if n <= 3:
        raise ValueError(
            f"the debiased (unbiased HSIC) estimator needs n > 3 samples, got {name} with "
            f"shape {_shape(tensor)}")


def _to_float64(tensor: Tensor, name: str) -> Tensor:
    tensor = tensor.detach().to(dtype=torch.float64)
    _check_finite(tensor, name)
    return tensor


def _peak_scaled(K: Tensor) -> Tensor:
    """Divide each kernel of a stack [..., n, n] by its largest |entry| (zero kernels stay zero)."""
    peak = K.abs().amax(dim=(-2, -1), keepdim=True)
    return K / torch.where(peak > 0, peak, torch.ones_like(peak))


def _stack(Ks: KernelStack, name: str) -> Tensor:
    if isinstance(Ks, Tensor):
        validate_kernel(Ks, name, ndim=3)
        return _to_float64(Ks, name)
    if not isinstance(Ks, (list, tuple)) or len(Ks) == 0:
        raise TypeError(
            f"{name} must be a tensor [L, n, n] or a non-empty list of [n, n] tensors, "
            f"got {type(Ks).__name__}")
    kernels = []
    for index, K in enumerate(Ks):
        item = f"{name}[{index}]"
        validate_kernel(K, item, ndim=2)
        if K.shape != Ks[0].shape:
            raise ValueError(
                f"all kernels in {name} must have the same shape, got {name}[0] with shape "
                f"{_shape(Ks[0])} and {item} with shape {_shape(K)}")
        if K.device != Ks[0].device:
            raise ValueError(
                f"all kernels in {name} must be on one device, got {Ks[0].device} and {K.device}")
        kernels.append(_to_float64(K, item))
    return torch.stack(kernels)


# --------------------------------------------------------------------------- centring

def center_kernel(K: Tensor) -> Tensor:
    """Double-centred kernel ``H K H`` with ``H = I - 11^T / n``.

    Computed as ``K - row means - column means + grand mean`` (O(n^2), ``H`` is
    never formed).  Centring a Gram matrix ``X X^T`` equals taking the Gram
    matrix of the mean-centred features.

    Args:
        K: kernel ``[n, n]`` or batch ``[..., n, n]`` of any floating dtype.

    Returns:
        float64 tensor of the same shape, on ``K``'s device; its rows and columns
        sum to zero.
    """
    validate_kernel(K, "K")
    K = K.to(dtype=torch.float64)
    return _center(K)


def _center(K: Tensor) -> Tensor:
    row_mean = K.mean(dim=-1, keepdim=True)
    col_mean = K.mean(dim=-2, keepdim=True)
    grand_mean = row_mean.mean(dim=-2, keepdim=True)
    return K - row_mean - col_mean + grand_mean


def _u_center(K: Tensor) -> Tensor:
    """U-centring (Szekely & Rizzo, 2014) of a stack [..., n, n], n > 3.

    The Frobenius inner product of two U-centred kernels divided by n(n - 3) is
    the unbiased HSIC estimator of Song et al. (2012), so debiased CKA is a cosine
    between U-centred kernels, just as biased CKA is one between centred kernels.
    """
    n = K.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=K.device)
    off_diagonal = K.masked_fill(eye, 0.0)
    row_sum = off_diagonal.sum(dim=-1, keepdim=True)
    col_sum = off_diagonal.sum(dim=-2, keepdim=True)
    total = row_sum.sum(dim=-2, keepdim=True)
    centred = off_diagonal - row_sum / (n - 2) - col_sum / (n - 2) + total / ((n - 1) * (n - 2))
    return centred.masked_fill(eye, 0.0)


# --------------------------------------------------------------------------- CKA

def _unit_kernels(K: Tensor, centering: str) -> Tensor:
    """Flattened, centred, unit-Frobenius-norm kernels [..., n*n]; degenerate ones are zero rows.

    ``centering`` is "none", "center" or "u_center".
    """
    n = K.shape[-1]
    K = _peak_scaled(K)
    reference = torch.linalg.vector_norm(K, dim=(-2, -1))
    if centering == "center":
        K = _center(K)
    elif centering == "u_center":
        K = _u_center(K)
    flat = K.flatten(start_dim=-2)
    norm = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    degenerate = norm.squeeze(-1) <= n * _EPS64 * reference
    flat = flat / torch.where(norm > 0, norm, torch.ones_like(norm))
    return flat.masked_fill(degenerate.unsqueeze(-1), 0.0)


def _cka_centering(centered: bool, debiased: bool) -> str:
    if debiased:
        if not centered:
            raise ValueError(
                "debiased=True always centres the kernels; it cannot be combined with centered=False")
        return "u_center"
    return "center" if centered else "none"


def cka(K1: Tensor, K2: Tensor, centered: bool = True, debiased: bool = False) -> float:
    """Centred kernel alignment, a similarity (not a distance) between two kernels.

    ``CKA(K1, K2) = <K1c, K2c>_F / (||K1c||_F ||K2c||_F)`` with ``Kc = H K H``
    (Cortes et al., 2012; Kornblith et al., 2019).  With ``centered=False`` this is
    eq. 10 of Tang et al. literally, ``<K1, K2>_F / (||K1||_F ||K2||_F)`` on the
    kernels as given.  With ``debiased=True`` the centred kernels are replaced by
    U-centred ones, which turns the HSIC estimates into the unbiased estimator of
    Song et al. (2012) (needs n > 3).

    Range: for PSD kernels the (biased) similarity is in [0, 1], 1 for kernels
    equal up to a positive scale.  Debiased CKA is in [-1, 1]; values near 0 mean
    no similarity.  Kernels that are not PSD can give negative values; they are
    returned as computed (clipped to [-1, 1] only to absorb rounding), never
    clamped at 0.

    Degenerate input: if either kernel is zero after centring (e.g. a constant
    kernel, or features without variance), the index is undefined and 0.0 is
    returned instead of NaN.

    Args:
        K1, K2: kernels ``[n, n]`` on the same n samples in the same order; any
            floating dtype (computed in float64).
        centered: centre both kernels first (default); False gives eq. 10 as written.
        debiased: use the unbiased HSIC estimator (implies centring).

    Returns:
        The similarity as a Python float.
    """
    validate_kernel(K1, "K1", ndim=2)
    validate_kernel(K2, "K2", ndim=2)
    _check_same_n(K1, K2, "K1", "K2")
    centering = _cka_centering(centered, debiased)
    if debiased:
        _check_debiased_n(K1.shape[0], K1, "K1")
    unit1 = _unit_kernels(_to_float64(K1, "K1"), centering)
    unit2 = _unit_kernels(_to_float64(K2, "K2"), centering)
    return float(torch.dot(unit1, unit2.to(unit1.device)).clamp(-1.0, 1.0))


def cka_matrix(Ks_a: KernelStack, Ks_b: KernelStack, centered: bool = True,
               debiased: bool = False) -> Tensor:
    """CKA similarity between every kernel of ``Ks_a`` and every kernel of ``Ks_b``.

    Each kernel is centred (see :func:`cka`), flattened and scaled to unit
    Frobenius norm once; the whole ``[La, Lb]`` table is then one matrix product.
    Entry ``[i, j]`` equals ``cka(Ks_a[i], Ks_b[j], centered, debiased)``.

    Range: like :func:`cka` -- similarities in [0, 1] for PSD kernels (debiased in
    [-1, 1]); degenerate kernels give rows/columns of 0.0, not NaN.

    Args:
        Ks_a: ``[La, n, n]`` tensor, or a list of ``[n, n]`` tensors.
        Ks_b: ``[Lb, n, n]`` tensor, or a list of ``[n, n]`` tensors, same n.
        centered, debiased: as in :func:`cka`.

    Returns:
        float64 tensor ``[La, Lb]`` on the device of ``Ks_a``.
    """
    stack_a = _stack(Ks_a, "Ks_a")
    stack_b = _stack(Ks_b, "Ks_b")
    _check_same_n(stack_a, stack_b, "Ks_a", "Ks_b")
    centering = _cka_centering(centered, debiased)
    if debiased:
        _check_debiased_n(stack_a.shape[-1], stack_a, "Ks_a")
    units_a = _unit_kernels(stack_a, centering)
    units_b = _unit_kernels(stack_b.to(stack_a.device), centering)
    return (units_a @ units_b.T).clamp_(-1.0, 1.0)


# --------------------------------------------------------------------------- NBS

def _bures_factors(K: Tensor, name: str, centered: bool) -> Tensor:
    """Square-root factors F [..., n, r] of a stack of PSD kernels, scaled so Tr(F F^T) = 1.

    ``F = V diag(sqrt(lambda / sum(lambda)))`` from ``eigh``, so ``F F^T = K / Tr K``;
    ``r`` is the largest numerical rank in the stack.
    Any factor of ``K1 = F1 F1^T`` and ``K2 = F2 F2^T`` gives
    ``Tr((K1^1/2 K2 K1^1/2)^1/2) = ||F2^T F1||_*`` (nuclear norm).  Eigenvalues
    below float64 rounding (``n * eps * lambda_max``, including tiny negative ones)
    are set to 0; otherwise each would add a spurious ``sqrt(eps)``-sized term.
    """
    n = K.shape[-1]
    K = _peak_scaled(K)
    reference = torch.linalg.vector_norm(K, dim=(-2, -1))
    asymmetry = torch.linalg.vector_norm(K - K.transpose(-2, -1), dim=(-2, -1))
    if bool((asymmetry > PSD_RTOL * reference).any()):
        worst = float((asymmetry / reference.clamp_min(1e-300)).max())
        raise ValueError(
            f"{name} must be symmetric: ||K - K^T||_F / ||K||_F = {worst:.3g} exceeds {PSD_RTOL:g} "
            f"(shape {_shape(K)})")
    K = 0.5 * (K + K.transpose(-2, -1))
    if centered:
        K = _center(K)
    # Rows that are zero in every kernel of the stack (a sketch's empty buckets) add only
    # zero eigenvalues; they are left out of the eigendecomposition and put back as zero
    # rows of the factors.
    support = (K != 0).reshape(-1, n, n).any(dim=0).any(dim=0).nonzero().squeeze(1)
    if support.numel() == 0:
        support = support.new_zeros(1)
    reduced = K if support.numel() == n else K[..., support[:, None], support]
    eigenvalues, eigenvectors = symmetric_eigh(reduced)
    smallest = eigenvalues[..., 0]
    if bool((smallest < -PSD_RTOL * reference).any()):
        worst = float((smallest / reference.clamp_min(1e-300)).min())
        raise ValueError(
            f"{name} must be positive semidefinite: its smallest eigenvalue is {worst:.3g} "
            f"times ||K||_F, beyond the rounding tolerance {PSD_RTOL:g} (shape {_shape(K)})")
    largest = eigenvalues[..., -1:].clamp_min(0.0)
    eigenvalues = torch.where(eigenvalues > n * _EPS64 * largest, eigenvalues, torch.zeros_like(eigenvalues))
    trace = eigenvalues.sum(dim=-1, keepdim=True)
    degenerate = trace.squeeze(-1) <= n * _EPS64 * reference
    scale = torch.sqrt(eigenvalues / torch.where(trace > 0, trace, torch.ones_like(trace)))
    factors = eigenvectors * scale.unsqueeze(-2)
    factors = factors.masked_fill(degenerate[..., None, None], 0.0)
    # eigh sorts eigenvalues in ascending order, so the zeroed ones lead; dropping the
    # columns that are zero in every kernel of the stack shrinks the later products
    # and SVDs to the (largest) rank instead of n.
    rank = max(int((eigenvalues > 0).sum(dim=-1).max()), 1)
    factors = factors[..., factors.shape[-1] - rank:]
    if support.numel() == n:
        return factors
    full = factors.new_zeros(factors.shape[:-2] + (n, rank))
    full[..., support, :] = factors
    return full


def symmetric_eigh(K: Tensor) -> Tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` of a stack of symmetric float64 matrices; where LAPACK's
    divide-and-conquer driver reports no convergence (it can on matrices with many equal
    eigenvalues, depending on the CPU's LAPACK), SciPy's relatively robust representations
    driver (``evr``) on the CPU instead."""
    try:
        return torch.linalg.eigh(K)
    except torch.linalg.LinAlgError:
        import numpy as np
        import scipy.linalg

        flat = K.detach().reshape(-1, K.shape[-1], K.shape[-1]).cpu().numpy()
        pairs = [scipy.linalg.eigh(matrix, driver="evr") for matrix in flat]
        values = torch.from_numpy(np.stack([w for w, _ in pairs])).reshape(K.shape[:-1])
        vectors = torch.from_numpy(np.stack([v for _, v in pairs])).reshape(K.shape)
        return values.to(K.device), vectors.to(K.device)


def _nuclear_norm_of_products(factors_b: Tensor, factor_a: Tensor) -> Tensor:
    # Singular values of F_b^T F_a rather than sqrt(eigenvalues of K_a^1/2 K_b K_a^1/2):
    # both give Tr((K_a^1/2 K_b K_a^1/2)^1/2), but square roots of eigenvalues that
    # are zero in exact arithmetic turn eps-sized rounding into sqrt(eps) errors.
    return torch.linalg.svdvals(factors_b.transpose(-2, -1) @ factor_a).sum(dim=-1)


def nbs(K1: Tensor, K2: Tensor, centered: bool = True) -> float:
    """Normalised Bures similarity, a similarity (not a distance) between two PSD kernels.

    ``NBS(K1, K2) = Tr((K1^1/2 K2 K1^1/2)^1/2) / sqrt(Tr K1 Tr K2)`` (eq. 11 of
    Tang et al.; Muzellec & Cuturi, 2018).  For linear kernels ``K = X X^T`` it is
    the nuclear norm of ``X1^T X2`` over ``||X1||_F ||X2||_F`` (eq. 13), invariant to
    orthogonal transforms and isotropic scaling of either feature space.

    By default both kernels are centred first (``H K H``), as for CKA: NBS then
    compares the feature covariances rather than uncentred second moments and is
    invariant to translating the features.  ``centered=False`` applies eq. 11 to
    the kernels as given.

    Numerics: float64; square roots from symmetric eigendecompositions
    (``torch.linalg.eigh``); tiny negative eigenvalues, and positive ones below
    float64 resolution (``n * eps * lambda_max``), are set to 0; the trace of the
    matrix square root is taken as a sum of singular values.  Never NaN for valid
    input.

    Range: similarity in [0, 1]; 1 iff the (centred) kernels are equal up to a
    positive scale.  A kernel that is zero after centring gives 0.0 (undefined
    index, not NaN).

    Args:
        K1, K2: symmetric PSD kernels ``[n, n]`` on the same samples, any floating dtype.
        centered: centre both kernels first (default True).

    Returns:
        The similarity as a Python float.

    Raises:
        ValueError: bad shapes, NaN/inf entries, or a kernel that is not symmetric or
            not PSD beyond rounding (relative tolerance :data:`PSD_RTOL` of its
            Frobenius norm).
    """
    validate_kernel(K1, "K1", ndim=2)
    validate_kernel(K2, "K2", ndim=2)
    _check_same_n(K1, K2, "K1", "K2")
    factor1 = _bures_factors(_to_float64(K1, "K1"), "K1", centered)
    factor2 = _bures_factors(_to_float64(K2, "K2"), "K2", centered)
    value = _nuclear_norm_of_products(factor2.to(factor1.device), factor1)
    return float(value.clamp(0.0, 1.0))


def nbs_matrix(Ks_a: KernelStack, Ks_b: Optional[KernelStack] = None,
               centered: bool = True) -> Tensor:
    """NBS similarity between every kernel of ``Ks_a`` and every kernel of ``Ks_b``.

    Each kernel is eigendecomposed once (square-root factor ``K^1/2``); entry
    ``[i, j]`` equals ``nbs(Ks_a[i], Ks_b[j], centered)``.  Cost: ``La + Lb``
    eigendecompositions and ``La * Lb`` singular-value computations of ``r x r``
    matrices, ``r <= n`` the largest numerical rank of the kernels.  With
    ``Ks_b`` omitted (or the same object as ``Ks_a``) the ``[L, L]`` matrix of
    the stack with itself uses its symmetry: ``L`` eigendecompositions and one
    singular-value computation per unordered pair.

    Range: similarities in [0, 1]; degenerate kernels give 0.0, not NaN.

    Args:
        Ks_a: ``[La, n, n]`` tensor or list of ``[n, n]`` symmetric PSD tensors.
        Ks_b: ``[Lb, n, n]`` tensor or list of ``[n, n]`` tensors, same n.
        centered: as in :func:`nbs`.

    Returns:
        float64 tensor ``[La, Lb]`` on the device of ``Ks_a``.
    """
    stack_a = _stack(Ks_a, "Ks_a")
    if Ks_b is None or Ks_b is Ks_a:
        factors = _bures_factors(stack_a, "Ks_a", centered)
        count = factors.shape[0]
        out = torch.zeros(count, count, dtype=torch.float64, device=factors.device)
        for i in range(count):
            out[i, i] = factors[i].square().sum()      # Tr K / Tr K: 1, or 0 if degenerate
            if i + 1 < count:
                values = _nuclear_norm_of_products(factors[i + 1:], factors[i])
                out[i, i + 1:] = values
                out[i + 1:, i] = values
        return out.clamp_(0.0, 1.0)
    stack_b = _stack(Ks_b, "Ks_b")
    _check_same_n(stack_a, stack_b, "Ks_a", "Ks_b")
    factors_a = _bures_factors(stack_a, "Ks_a", centered)
    factors_b = _bures_factors(stack_b, "Ks_b", centered).to(factors_a.device)
    rows = [_nuclear_norm_of_products(factors_b, factor_a) for factor_a in factors_a]
    return torch.stack(rows).clamp_(0.0, 1.0)


# --------------------------------------------------------------------------- HSIC

def hsic(K: Tensor, L: Tensor, debiased: bool = False) -> float:
    """Hilbert-Schmidt independence criterion between two kernels on the same samples.

    * biased (Gretton et al., 2005): ``Tr(K H L H) / (n - 1)^2``, n >= 2.
    * debiased (Song et al., 2012), with ``K~``, ``L~`` the kernels with zeroed
      diagonals::

          [Tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n(n-3))

      n > 3; computed as the inner product of U-centred kernels over n(n - 3).

    HSIC is a dependence statistic, not a normalised similarity: it scales with
    both kernels.  The biased value is >= 0 for PSD kernels; the debiased value
    is unbiased for the population HSIC and can be negative.

    Args:
        K, L: kernels ``[n, n]``, any floating dtype (computed in float64).
        debiased: use the unbiased estimator.

    Returns:
        The statistic as a Python float.
    """
    validate_kernel(K, "K", ndim=2)
    validate_kernel(L, "L", ndim=2)
    _check_same_n(K, L, "K", "L")
    n = K.shape[0]
    K = _to_float64(K, "K")
    L = _to_float64(L, "L").to(K.device)
    if debiased:
        _check_debiased_n(n, K, "K")
        return float((_u_center(K) * _u_center(L)).sum() / (n * (n - 3)))
    if n < 2:
        raise ValueError(f"biased HSIC needs n >= 2 samples, got K with shape {_shape(K)}")
    return float((_center(K) * _center(L)).sum() / (n - 1) ** 2)


# --------------------------------------------------------------------------- linear CKA

def _centred_unit_features(X: Tensor, name: str) -> Optional[Tensor]:
    """Mean-centred X scaled to unit Frobenius norm, or None if X has no variance."""
    X = _to_float64(X, name)
    peak = X.abs().amax()
    if peak == 0:
        return None
    X = X / peak
    reference = torch.linalg.vector_norm(X)
    X = X - X.mean(dim=0, keepdim=True)
    norm = torch.linalg.vector_norm(X)
    if norm <= X.shape[0] * _EPS64 * reference:
        return None
    return X / norm


def _debiased_hsic_of_features(X: Tensor, Y: Tensor) -> Tensor:
    """n(n-3) times the unbiased HSIC of K = X X^T and L = Y Y^T, in O(n dx dy).

    Each term of Song et al.'s estimator is rewritten with feature-space
    quantities, so no n x n matrix is formed:
    Tr(K~ L~) = ||Y^T X||_F^2 - sum_i |x_i|^2 |y_i|^2,
    1^T K~ 1 = ||X^T 1||^2 - ||X||_F^2, and K~ 1 = X (X^T 1) - (|x_i|^2)_i.
    """
    n = X.shape[0]
    row_sq_x = X.square().sum(dim=1)
    row_sq_y = Y.square().sum(dim=1)
    col_sum_x = X.sum(dim=0)
    col_sum_y = Y.sum(dim=0)
    trace_term = (Y.T @ X).square().sum() - torch.dot(row_sq_x, row_sq_y)
    total_x = col_sum_x.square().sum() - row_sq_x.sum()
    total_y = col_sum_y.square().sum() - row_sq_y.sum()
    row_total_x = X @ col_sum_x - row_sq_x
    row_total_y = Y @ col_sum_y - row_sq_y
    return (trace_term + total_x * total_y / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * torch.dot(row_total_x, row_total_y))


def linear_cka(X: Tensor, Y: Tensor, debiased: bool = False) -> float:
    """Exact linear CKA between two feature matrices, computed in feature space.

    Equals ``cka(X X^T, Y Y^T, debiased=debiased)`` but costs O(n (dx + dy)^2) time
    and O((dx + dy)^2) extra memory: no ``n x n`` matrix is formed, so n can be
    large (when d is much larger than n, the kernel form is the cheaper one).

    * biased (Kornblith et al., 2019), with column-centred ``Xc``, ``Yc``:
      ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)``.
    * debiased: ``HSIC_1(K, L) / sqrt(HSIC_1(K, K) HSIC_1(L, L))`` with the unbiased
      HSIC of Song et al. (2012) written through column sums and row norms of the
      features (needs n > 3).

    Range: similarity (not a distance) in [0, 1] for the biased index, invariant
    to orthogonal transforms, isotropic scaling and translation of either feature
    space; the debiased index is in [-1, 1], near 0 for unrelated features.

    Degenerate input: if X or Y has no variance across samples (a zero or constant
    matrix, n == 1), or -- debiased only -- its U-centred kernel vanishes (e.g. one
    orthonormal feature vector per sample), the index is undefined and 0.0 is
    returned instead of NaN.

    Args:
        X: features ``[n, dx]``, one row per sample, any floating dtype.
        Y: features ``[n, dy]`` of the same samples in the same order.
        debiased: use the unbiased HSIC estimator.

    Returns:
        The similarity as a Python float.
    """
    _validate_features(X, "X")
    _validate_features(Y, "Y")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(
            f"X and Y must have the same number of samples (rows), got X with shape "
            f"{_shape(X)} and Y with shape {_shape(Y)}")
    n = X.shape[0]
    if debiased:
        _check_debiased_n(n, X, "X")
    unit_x = _centred_unit_features(X, "X")
    unit_y = _centred_unit_features(Y, "Y")
    if unit_x is None or unit_y is None:
        return 0.0
    unit_y = unit_y.to(unit_x.device)
    if not debiased:
        cross = (unit_y.T @ unit_x).square().sum()
        self_x = torch.linalg.matrix_norm(unit_x.T @ unit_x)
        self_y = torch.linalg.matrix_norm(unit_y.T @ unit_y)
        return float((cross / (self_x * self_y)).clamp(0.0, 1.0))
    hsic_xy = _debiased_hsic_of_features(unit_x, unit_y)
    hsic_xx = _debiased_hsic_of_features(unit_x, unit_x)
    hsic_yy = _debiased_hsic_of_features(unit_y, unit_y)
    # With unit-norm features every term above is O(1), so rounding leaves about
    # n * eps of absolute noise in these (squared) norms.
    floor = n * _EPS64
    if hsic_xx <= floor or hsic_yy <= floor:
        return 0.0
    return float((hsic_xy / torch.sqrt(hsic_xx * hsic_yy)).clamp(-1.0, 1.0))


# --------------------------------------------------------------------------- mean embedding

def _mean_embedding_parts(K: Tensor) -> Tuple[float, float, float, int]:
    validate_kernel(K, "K", ndim=2)
    K = _to_float64(K, "K")
    n = K.shape[0]
    frobenius = float(torch.linalg.matrix_norm(K))
    mean = float(K.mean())
    if mean < -PSD_RTOL * frobenius / n:
        raise ValueError(
            f"K must be a PSD kernel, whose mean is >= 0; got mean {mean:.3g} with "
            f"||K||_F = {frobenius:.3g} (shape {_shape(K)})")
    trace = float(torch.diagonal(K).sum())
    return math.sqrt(max(mean, 0.0)), frobenius, max(trace, 0.0), n


def mean_embedding_norm_from_kernel(K: Tensor) -> float:
    """Norm of the empirical kernel mean embedding, ``||mu_p|| = sqrt(mean of K)``.

    For features ``psi(x_i)`` with ``K[i, j] = <psi(x_i), psi(x_j)>``,
    ``mu_p = (1/N) sum_i psi(x_i)`` and ``||mu_p||^2 = (1/N^2) sum_ij K[i, j]``
    (Tang et al., eq. 17-18).  With the paper's kernel ``K = K_f o K_g`` this is
    the Frobenius norm of the mean of ``psi(x) = g f^T``.

    ``K`` must be the unsketched ``N x N`` kernel: for a CountSketch summary
    ``S^T K S`` the sum of entries is ``||sum_i s_i psi(x_i)||^2`` with random signs
    ``s_i``, whose expectation is ``Tr K``, not ``sum_ij K[i, j]``.

    This is a norm (>= 0, scales with the kernel), not a similarity.  A mean below
    zero by more than rounding means ``K`` is not PSD and raises ``ValueError``.

    Args:
        K: kernel ``[N, N]`` of the psi features, any floating dtype.

    Returns:
        ``||mu_p||`` as a Python float.
    """
    norm, _, _, _ = _mean_embedding_parts(K)
    return norm


def mean_embedding_ratios(K: Tensor) -> Dict[str, float]:
    """Kernel mean embedding norm and its ratios to the CKA and NBS normalisers.

    With ``N = K.shape[0]`` and ``||mu_p|| = sqrt(mean of K)`` (see
    :func:`mean_embedding_norm_from_kernel`), Tang et al. rescale ``Psi`` to
    ``Psi / N`` in the normalisers of CKA and NBS (Fig. 4) and compare (eq. 19)::

        ratio_frobenius     = ||mu_p|| / (||K||_F / N^2)        # CKA normaliser
        ratio_trace         = ||mu_p|| / (sqrt(Tr K) / N)       # NBS normaliser
        log_ratio_frobenius = log(||mu_p|| / (||K||_F / N^2))   # eq. 48

    These are scores, not similarities.  ``ratio_trace`` equals
    ``sqrt(sum K / Tr K)``, lies in [0, sqrt(N)] for PSD ``K`` and is scale
    invariant.  ``ratio_frobenius`` equals ``N sqrt(sum K) / ||K||_F`` (>= 0) and,
    as the paper defines it, is not scale invariant: scaling ``K`` by ``c``
    divides it by ``sqrt(c)``.  For a zero kernel the ratios are 0.0 and the log
    is ``-inf``.

    Args:
        K: unsketched kernel ``[N, N]`` of the psi features, any floating dtype.

    Returns:
        dict with float values: ``norm`` (``||mu_p||``), ``frobenius_factor``
        (``||K||_F / N^2``), ``trace_factor`` (``sqrt(Tr K) / N``),
        ``ratio_frobenius``, ``ratio_trace`` and ``log_ratio_frobenius``.
    """
    norm, frobenius, trace, n = _mean_embedding_parts(K)
    return mean_embedding_scores(norm, frobenius / n ** 2, math.sqrt(trace) / n)


def mean_embedding_scores(norm: float, frobenius_factor: float, trace_factor: float
                          ) -> Dict[str, float]:
    """The dict of :func:`mean_embedding_ratios` from its three parts (computed however:
    from a dense kernel, streamed exactly, or estimated from sketches)."""
    ratio_frobenius = norm / frobenius_factor if frobenius_factor > 0 else 0.0
    ratio_trace = norm / trace_factor if trace_factor > 0 else 0.0
    return {
        "norm": norm,
        "frobenius_factor": frobenius_factor,
        "trace_factor": trace_factor,
        "ratio_frobenius": ratio_frobenius,
        "ratio_trace": ratio_trace,
        "log_ratio_frobenius": math.log(ratio_frobenius) if ratio_frobenius > 0 else -math.inf,
    }
