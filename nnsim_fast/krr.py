"""Kernel ridge regression on sketched kernels (seed paper, appendix G).

A classifier is read off a sketched training set without fine-tuning: with K~ [m, m] the sketched
kernel over buckets, T~ [m, c] the sketched one-hot targets and k(x*) [m] the kernel between a
test point and every bucket,

    t* = T~^T (K~ + alpha I)^{-1} k(x*),        y* = argmax_c t*_c.

This module only solves that system: the caller builds K~, T~ and k(x*). Which target sketch and
which test kernel belong to which train kernel matters, because the bucket "feature" implied by
K~ fixes how each sample's sign enters it:

* **Sketch of psi** (the estimator the paper's bound covers): bucket b has feature
  psi~_b = sum_{j in b} s_j psi(x_j), so K~ = S K S^T and the matching quantities are
  ``k_star[i, b] = sum_{j in b} s_j k(x_j, x_i*)`` and the *signed* target sketch
  ``T~ = S Y`` (same buckets, same signs).
* **Hadamard of separately sketched Grams** (Algorithm 1): K~ = (F~^T F~) o (G~^T G~) is the
  Gram of the bucket features G~_b F~_b^T (the outer product of the sketched gradient and
  feature), so ``k_star[i, b] = (F~_b . f_i) (G~_b . g_i)`` — the product of the sketched feature
  and gradient inner products. In G~_b F~_b^T each sample appears as s_j^2 g_j f_j^T = g_j f_j^T:
  its sign cancels (the cross terms between samples of a bucket carry random signs and act as
  noise). The matching target sketch is therefore the *unsigned* bucket sum
  ``T~ = |S| Y``; with signed targets the regression sees targets uncorrelated with its features
  and predicts at chance level or worse.

:func:`sketch_targets` builds either target sketch from the buckets and signs of the sketch.

The solve is in float64 through one symmetric eigendecomposition K~ = U diag(lambda) U^T, which
serves every alpha: (K~ + alpha I)^{-1} = U diag(1 / (lambda + alpha)) U^T. Eigenvalues are
clamped at 0 (K~ is positive semi-definite; tiny negative values are round-off).

Choosing alpha (``alpha=None``): candidates are ``alpha = r * trace(K~) / m`` for r in
``relative_alphas`` (default 10^k, k = -6, -5.75, ..., 2: 33 values, so alpha ranges from a
millionth to a hundred times the mean eigenvalue). The one with the smallest criterion wins (the
smallest alpha on ties):

* ``criterion="loo"`` (default): the exact leave-one-out squared error over buckets,
  (1/m) sum_b || r_b / [(K~ + alpha I)^{-1}]_bb ||^2 with r = (K~ + alpha I)^{-1} T~ — identical
  to refitting m times with bucket b held out and predicting it;
* ``criterion="gcv"``: generalised cross-validation,
  (1/m) ||alpha (K~ + alpha I)^{-1} T~||_F^2 / ((1/m) alpha trace((K~ + alpha I)^{-1}))^2.

Buckets are sums of (signed) samples, so these are bucket-level estimates of generalisation: a
heuristic for the sample-level error, exact for the identity sketch.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch

from ._checks import check_choice, check_float, check_int
from .indices import symmetric_eigh

__all__ = ["SketchedKRR", "onehot", "sketch_targets", "DEFAULT_RELATIVE_ALPHAS"]

#: Default grid of alpha / (trace(K) / m): 10^k for k = -6, -5.75, ..., 2.
DEFAULT_RELATIVE_ALPHAS: tuple = tuple(10.0 ** (-6 + 0.25 * step) for step in range(33))

_CRITERIA = ("loo", "gcv")

_INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _check_integer_dtype(indices: torch.Tensor, name: str) -> None:
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {indices.dtype}")


def _check_indices_below(indices: torch.Tensor, upper: int, name: str) -> None:
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= upper):
        raise ValueError(
            f"{name} must lie in [0, {upper}), got values in [{int(indices.min())}, {int(indices.max())}]"
        )


def onehot(labels: torch.Tensor, num_classes: int, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """One-hot matrix [n, num_classes] of integer class indices ``labels`` [n] in [0, num_classes)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 1:
        raise ValueError(f"labels must be a vector [n], got shape {tuple(labels.shape)}")
    _check_integer_dtype(labels, "labels")
    num_classes = check_int(num_classes, "num_classes", low=1)
    _check_indices_below(labels, num_classes, "labels")
    result = torch.zeros(labels.shape[0], num_classes, dtype=dtype, device=labels.device)
    result[torch.arange(labels.shape[0], device=labels.device), labels.long()] = 1
    return result


def sketch_targets(
    targets: torch.Tensor,
    buckets: torch.Tensor,
    m: int,
    signs: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Sketch a target matrix over the samples: ``out[b] += w_j * targets[j]`` for bucket b of j.

    Args:
        targets: [n, c] (e.g. :func:`onehot` labels).
        buckets: int64 [n] or [n, s], the bucket(s) of each sample, in [0, m).
        m: number of buckets.
        signs: the sample weights, same shape as ``buckets`` (the sketch's signs, including any
            sparsity scaling). None means weight 1: the unsigned bucket sums that match the
            Hadamard of separately sketched Grams (see the module docstring); pass the signs for
            a sketch of psi.
        out: optional float64 accumulator [m, c] to add into (streaming); a new one otherwise.

    Returns:
        float64 [m, c].
    """
    buckets, signs = _bucket_columns(targets, buckets, signs)
    m = check_int(m, "m", low=1)
    _check_indices_below(buckets, m, "buckets")
    _check_signs(signs, buckets)
    out = _target_accumulator(out, m, targets)
    values = targets.to(device=out.device, dtype=torch.float64)
    for block in range(buckets.shape[1]):
        weighted = values
        if signs is not None:
            weighted = values * signs[:, block].to(device=out.device, dtype=torch.float64)[:, None]
        out.index_add_(0, buckets[:, block].to(device=out.device, dtype=torch.long), weighted)
    return out


def _bucket_columns(
    targets: Any, buckets: Any, signs: Any
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``buckets`` as [n, s] (one column per block) and ``signs`` reshaped to match when given as [n]."""
    if not isinstance(targets, torch.Tensor) or not isinstance(buckets, torch.Tensor):
        raise TypeError("targets and buckets must be torch.Tensors")
    if targets.dim() != 2:
        raise ValueError(f"targets must be a matrix [n, c], got shape {tuple(targets.shape)}")
    _check_integer_dtype(buckets, "buckets")
    if buckets.dim() == 1:
        buckets = buckets[:, None]
        if signs is not None and isinstance(signs, torch.Tensor) and signs.dim() == 1:
            signs = signs[:, None]
    if buckets.dim() != 2 or buckets.shape[0] != targets.shape[0]:
        raise ValueError(
            f"buckets must have shape [n] or [n, s] with n = {targets.shape[0]} "
            f"(targets {tuple(targets.shape)}), got {tuple(buckets.shape)}"
        )
    return buckets, signs


def _check_signs(signs: Any, buckets: torch.Tensor) -> None:
    if signs is None:
        return
    if not isinstance(signs, torch.Tensor):
        raise TypeError(f"signs must be a torch.Tensor or None, got {type(signs).__name__}")
    if signs.shape != buckets.shape:
        raise ValueError(
            f"signs must have the shape of buckets {tuple(buckets.shape)}, got {tuple(signs.shape)}"
        )


def _target_accumulator(out: Any, m: int, targets: torch.Tensor) -> torch.Tensor:
    """The caller's float64 [m, c] ``out`` (streaming), or a new zero one on the targets' device."""
    shape = (m, targets.shape[1])
    if out is None:
        return torch.zeros(shape, dtype=torch.float64, device=targets.device)
    if not isinstance(out, torch.Tensor) or out.shape != shape or out.dtype != torch.float64:
        raise ValueError(
            f"out must be a float64 tensor of shape {shape}, got "
            f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}"
        )
    return out


def _as_float64_matrix(value: Any, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != 2:
        raise ValueError(f"{name} must be a matrix, got shape {tuple(value.shape)}")
    if not (value.dtype.is_floating_point or value.dtype in _INTEGER_DTYPES):
        raise TypeError(f"{name} must hold real numbers, got dtype {value.dtype}")
    result = value.detach().to(torch.float64)
    if not bool(torch.isfinite(result).all()):
        raise ValueError(f"{name} must be finite (no NaN or inf)")
    return result


class SketchedKRR:
    """Kernel ridge regression classifier on a (sketched) kernel over m buckets.

    ``fit(K, T, alpha=None)`` then ``predict(k_star)`` (scores [n*, c]) or
    ``predict_labels(k_star)`` (argmax). After ``fit``: ``alpha_`` (the alpha used),
    ``relative_alphas_``/``alphas_``/``scores_`` (the grid searched and its criterion values,
    empty when alpha was given), ``eigenvalues_`` and ``eigenvectors_`` of K,
    ``dual_coef_`` = (K + alpha I)^{-1} T [m, c].

    Args:
        criterion: ``"loo"`` (exact leave-one-bucket-out error) or ``"gcv"``; see the module
            docstring.
        relative_alphas: candidate alphas in units of trace(K) / m (all > 0); default
            :data:`DEFAULT_RELATIVE_ALPHAS`.
    """

    def __init__(self, criterion: str = "loo", relative_alphas: Optional[Sequence[float]] = None) -> None:
        check_choice(criterion, "criterion", _CRITERIA)
        if relative_alphas is None:
            relative_alphas = DEFAULT_RELATIVE_ALPHAS
        grid = [self._check_alpha(value, "relative_alphas") for value in relative_alphas]
        if not grid:
            raise ValueError("relative_alphas must not be empty")
        self.criterion = criterion
        self.relative_alphas: List[float] = grid
        self.alpha_: Optional[float] = None
        self.alphas_: List[float] = []
        self.relative_alphas_: List[float] = []
        self.scores_: List[float] = []
        self.eigenvalues_: Optional[torch.Tensor] = None
        self.eigenvectors_: Optional[torch.Tensor] = None
        self.dual_coef_: Optional[torch.Tensor] = None

    @staticmethod
    def _check_alpha(value: Any, name: str) -> float:
        # check_float takes 0-d tensors only; an alpha may also come as a one-element tensor such as [1].
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        return check_float(value, name, low=0.0, low_open=True)

    def _coefficients(self, alpha: float) -> torch.Tensor:
        # Rotated targets U^T T are computed once in fit; here only the diagonal scaling changes.
        assert self.eigenvalues_ is not None and self.eigenvectors_ is not None
        return self.eigenvectors_ @ (self._rotated_targets / (self.eigenvalues_ + alpha)[:, None])

    def _criterion(self, alpha: float) -> float:
        assert self.eigenvalues_ is not None and self.eigenvectors_ is not None
        m = self.eigenvalues_.shape[0]
        inverse_eigenvalues = 1.0 / (self.eigenvalues_ + alpha)
        residual_scaled = self._coefficients(alpha)  # (K + aI)^{-1} T = (T - H T) / alpha
        if self.criterion == "loo":
            # The LOO residual of bucket b is r_b / [(K + aI)^{-1}]_bb: alpha cancels, no 1 - H_bb
            # that loses its digits when alpha is small.
            inverse_diagonal = (self.eigenvectors_.square() * inverse_eigenvalues[None, :]).sum(dim=1)
            residuals = residual_scaled / inverse_diagonal[:, None]
            return float(residuals.square().sum() / m)
        # GCV: ||(I - H) T||^2 / m over (trace(I - H) / m)^2, with I - H = alpha (K + aI)^{-1}.
        residual = alpha * residual_scaled
        trace_ratio = alpha * float(inverse_eigenvalues.sum()) / m
        return float(residual.square().sum() / m) / trace_ratio**2

    def fit(self, K: torch.Tensor, T: torch.Tensor, alpha: Optional[float] = None) -> "SketchedKRR":
        """Fit on a kernel K [m, m] (symmetric PSD) and targets T [m, c]; alpha > 0 or None (search).

        K is symmetrised as (K + K^T) / 2 before the eigendecomposition. Returns ``self``.
        """
        kernel = _as_float64_matrix(K, "K")
        targets = _as_float64_matrix(T, "T")
        if kernel.shape[0] != kernel.shape[1]:
            raise ValueError(f"K must be square [m, m], got shape {tuple(kernel.shape)}")
        if kernel.shape[0] == 0:
            raise ValueError("K must not be empty")
        if targets.shape[0] != kernel.shape[0] or targets.shape[1] < 1:
            raise ValueError(
                f"T must have shape [m, c] with m = {kernel.shape[0]} (K {tuple(kernel.shape)}), "
                f"got {tuple(targets.shape)}"
            )
        targets = targets.to(kernel.device)
        if alpha is not None:
            alpha = self._check_alpha(alpha, "alpha")
        eigenvalues, eigenvectors = symmetric_eigh((kernel + kernel.T) / 2)
        self.eigenvalues_ = eigenvalues.clamp_min(0.0)
        self.eigenvectors_ = eigenvectors
        self._rotated_targets = eigenvectors.T @ targets
        m = kernel.shape[0]
        if alpha is None:
            scale = float(self.eigenvalues_.sum()) / m
            if scale <= 0.0:
                raise ValueError("K has zero trace: alpha cannot be scaled to it; pass alpha explicitly")
            self.relative_alphas_ = list(self.relative_alphas)
            self.alphas_ = [relative * scale for relative in self.relative_alphas_]
            self.scores_ = [self._criterion(candidate) for candidate in self.alphas_]
            best = min(range(len(self.scores_)), key=lambda index: (self.scores_[index], index))
            alpha = self.alphas_[best]
        else:
            self.relative_alphas_, self.alphas_, self.scores_ = [], [], []
        self.alpha_ = alpha
        self.dual_coef_ = self._coefficients(alpha)
        return self

    def predict(self, k_star: torch.Tensor) -> torch.Tensor:
        """Scores [n*, c] = k_star (K + alpha I)^{-1} T for k_star [n*, m] (float64)."""
        if self.dual_coef_ is None:
            raise RuntimeError("SketchedKRR.predict called before fit")
        cross = _as_float64_matrix(k_star, "k_star")
        m = self.dual_coef_.shape[0]
        if cross.shape[1] != m:
            raise ValueError(
                f"k_star must have shape [n*, {m}] to match K [{m}, {m}], got {tuple(cross.shape)}"
            )
        return cross.to(self.dual_coef_.device) @ self.dual_coef_

    def predict_labels(self, k_star: torch.Tensor) -> torch.Tensor:
        """Predicted classes (int64 [n*]): the argmax of :meth:`predict`."""
        return self.predict(k_star).argmax(dim=1)
