"""Per-sample features ``psi(x) = g f^T`` of the paper's kernel, exact or TensorSketched.

Two independent halves (the estimators' path, :mod:`nnsim_fast.estimators`):
:func:`tensor_sketch_halves` maps each row to ``T_0 psi`` and ``T_1 psi``, two
TensorSketches with independent hashes derived from the sketch seed
(:func:`tensor_sketch_seeds`), or to the exact ``psi`` twice when
``df * dg <= width`` (:func:`psi_half_width`).  Products of kernels then always
pair different halves, so the feature-axis sketch adds variance but no bias.

The paper's kernel is ``K = K_f o K_g``, the linear kernel of ``psi(x) = g f^T``
(``d_g x d_f``).  Sketching the sample axis of ``Psi`` itself gives
``K~ = S K S^T``, the estimator the paper's bounds (eqs. 15, 16) are about --
unlike Algorithm 1, which multiplies two separately sketched Grams.

When ``d_f * d_g`` is at most the width ``psi_dim``, ``psi`` is used exactly
(``vec(g f^T)``, g-major).  Otherwise each ``psi`` is compressed first with a
TensorSketch (Pham & Pagh, 2013): independent CountSketches ``C_f``, ``C_g`` of
the feature axes to ``D`` coordinates and their circular convolution
``TS(g f^T) = IFFT(FFT(C_g g) * FFT(C_f f))``, an unbiased linear map with
``E <TS(a), TS(b)> = <a, b>``.  The feature-axis hashes are derived from the
sketch seed, so representations with one seed stay comparable.
"""
from __future__ import annotations

from typing import Tuple

import torch

from . import ops
from ._checks import check_int

#: Default TensorSketch width of each half when psi is too large to keep exactly.
DEFAULT_PSI_DIM = 4096
#: Upper end of the default sample-axis resolution of the halves (docs/estimators.md, §6).
DEFAULT_PSI_BUCKETS = 2048


def default_psi_buckets(m: int, sparsity: int = 1) -> int:
    """Default sample-axis buckets of the psi halves: ``4 m`` up to ``DEFAULT_PSI_BUCKETS``,
    never fewer than ``m``, a multiple of ``sparsity`` (2048 at ``m = 512``).

    The default estimator reads only the halves, and its error on low-rank layers falls
    like ``1 / sqrt(buckets)`` (the floor of any sample-axis sketch), so the halves get a
    finer resolution than the ``m x d`` sketches of the features and gradients, whose
    memory grows with the layer width; the halves' width is fixed (``psi_dim``).
    """
    m = check_int(m, "m", 1, ops.MAX_BUCKETS)
    sparsity = check_int(sparsity, "sparsity", 1, ops.MAX_SPARSITY)
    return max(m, min(4 * m, DEFAULT_PSI_BUCKETS) // sparsity * sparsity)


def check_psi_buckets(buckets, m: int, sparsity: int = 1) -> int:
    """``psi_buckets`` validated: an integer in ``[3, MAX_BUCKETS]`` divisible by ``sparsity``."""
    buckets = check_int(buckets, "psi_buckets", 3, ops.MAX_BUCKETS)
    if buckets % sparsity:
        raise ValueError(f"sparsity ({sparsity}) must divide psi_buckets ({buckets})")
    return buckets


# --------------------------------------------------------------------------- two halves

def tensor_sketch_seeds(seed: int) -> Tuple[int, int]:
    """Seeds of the feature-axis hashes (features, gradients) of both TensorSketch halves.

    Half ``h`` is block ``h`` of a two-block CountSketch of the axis (width ``2 W``,
    ``sparsity=2``), so one pass over ``f`` serves both halves and the halves' hashes
    are independent.  The keys are distinct from the sample-axis blocks of ``seed``.
    """
    seed = check_int(seed, "seed", 0, ops.MAX_SEED)
    keys = ops.block_keys(seed, 6)
    return keys[4] >> 1, keys[5] >> 1


def psi_half_width(df: int, dg: int, dim: int = DEFAULT_PSI_DIM) -> int:
    """Width of each half: ``df * dg`` (exact psi, both halves equal) when it is at most
    ``dim``, else the TensorSketch width ``dim``."""
    df, dg = check_int(df, "df", 1), check_int(dg, "dg", 1)
    dim = check_int(dim, "dim", 1, 1 << 30)
    return df * dg if df * dg <= dim else dim


def _check_rows_pair(f: torch.Tensor, g: torch.Tensor) -> None:
    for x, name in ((f, "f"), (g, "g")):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2 or not x.is_floating_point():
            raise ValueError(f"{name} must be a floating [B, d] tensor, got {x.dtype} {tuple(x.shape)}")
    if f.shape[0] != g.shape[0] or f.device != g.device:
        raise ValueError(f"f and g must have the same rows and device, got {tuple(f.shape)} on "
                         f"{f.device} and {tuple(g.shape)} on {g.device}")


def _exact_psi(f64: torch.Tensor, g64: torch.Tensor) -> torch.Tensor:
    return (g64.unsqueeze(2) * f64.unsqueeze(1)).reshape(f64.shape[0], -1)


def _convolve(cf: torch.Tensor, cg: torch.Tensor, width: int) -> torch.Tensor:
    """Circular convolution along the last axis: the TensorSketch of the outer product."""
    return torch.fft.irfft(torch.fft.rfft(cf, dim=-1) * torch.fft.rfft(cg, dim=-1), n=width, dim=-1)


def tensor_sketch_halves(f: torch.Tensor, g: torch.Tensor, width: int, seed: int) -> torch.Tensor:
    """``[2, B, width]`` float64: ``T_0 psi_i`` and ``T_1 psi_i`` for the rows of ``f``, ``g``
    (computed in the inputs' precision, at least float32).

    ``T_h (g (x) f) = IFFT(FFT(C_h g) * FFT(C_h' f))`` with ``C`` the CountSketches
    of block ``h`` (:func:`tensor_sketch_seeds`); ``E <T_h u, T_h v> = <u, v>``.
    When ``width == df * dg`` both halves are the exact ``psi = vec(g f^T)`` (g-major).
    """
    _check_rows_pair(f, g)
    width = check_int(width, "width", 1, 1 << 30)
    batch, df = f.shape
    dg = g.shape[1]
    if width == df * dg:
        return _exact_psi(f.to(torch.float64), g.to(torch.float64)).unsqueeze(0).expand(2, batch, width)
    # Sketch and convolve in the data's precision (at least float32), widen the result:
    # the rows are then read in float64 like every other statistic, while the wide inputs
    # (a layer's flattened maps) are never copied to float64 -- on a ResNet-18 stage that
    # copy and a float64 FFT cost more than the rest of the psi path.
    dtype = torch.promote_types(torch.promote_types(f.dtype, g.dtype), torch.float32)
    seed_f, seed_g = tensor_sketch_seeds(seed)
    # Columns sketched as rows of f^T: [2W, B], block h = half h scaled by 1/sqrt(2).
    # A contiguous f^T makes each scattered row one run of memory (measured 1.6x faster).
    cf = ops.countsketch(f.to(dtype).T.contiguous(), 2 * width, seed_f, sparsity=2)
    cg = ops.countsketch(g.to(dtype).T.contiguous(), 2 * width, seed_g, sparsity=2)
    halves = _convolve(cf.reshape(2, width, batch).transpose(1, 2),
                       cg.reshape(2, width, batch).transpose(1, 2), width)
    return (2.0 * halves).to(torch.float64)


def _axis_sketch(x: torch.Tensor, width: int, seed: int, half: int) -> torch.Tensor:
    """Block ``half`` of the two-block CountSketch of the columns of ``x``: ``[B, width]``."""
    buckets, signs = ops.sketch_hash(x.shape[1], 2 * width, seed, sparsity=2, device=x.device)
    out = x.new_zeros(x.shape[0], width)
    return out.index_add_(1, buckets[:, half] - half * width, x * signs[:, half].to(x.dtype))


def tensor_sketch(f: torch.Tensor, g: torch.Tensor, width: int, seed: int, half: int) -> torch.Tensor:
    """One half of :func:`tensor_sketch_halves`, ``[B, width]`` float64 (same values)."""
    _check_rows_pair(f, g)
    width = check_int(width, "width", 1, 1 << 30)
    half = check_int(half, "half", 0, 1)
    f64, g64 = f.to(torch.float64), g.to(torch.float64)
    if width == f.shape[1] * g.shape[1]:
        return _exact_psi(f64, g64)
    seed_f, seed_g = tensor_sketch_seeds(seed)
    return _convolve(_axis_sketch(f64, width, seed_f, half), _axis_sketch(g64, width, seed_g, half),
                     width)
