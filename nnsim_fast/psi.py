"""Per-sample features ``psi(x) = g f^T`` of the paper's kernel, exact or TensorSketched.

The paper's kernel is ``K = K_f o K_g``, the linear kernel of ``psi(x) = g f^T``
(``d_g x d_f``).  Sketching the sample axis of ``Psi`` itself gives
``K~ = S K S^T``, the estimator the paper's bounds (eqs. 15, 16) are about --
unlike Algorithm 1, which multiplies two separately sketched Grams.

When ``m * d_f * d_g`` fits the budget, ``psi`` is used exactly
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

#: Default largest ``m * d_f * d_g`` accumulated exactly (float32: 1 GiB).
DEFAULT_PSI_BUDGET = 1 << 28
#: Default TensorSketch width when psi is too large to keep exactly.
DEFAULT_PSI_DIM = 4096
_ROW_BUDGET = 1 << 24   # psi elements materialised per slice of a batch


def axis_seeds(seed: int) -> Tuple[int, int]:
    """Seeds of the feature-axis CountSketches (features, gradients) for a sketch seed."""
    keys = ops.block_keys(seed, 3)
    return keys[1] >> 1, keys[2] >> 1


def psi_width(df: int, dg: int, m: int, budget: int = DEFAULT_PSI_BUDGET,
              dim: int = DEFAULT_PSI_DIM) -> int:
    """Width of the per-sample psi vector: ``df * dg`` (exact) when it fits the budget or
    is no wider than ``dim``, else the TensorSketch width ``dim``."""
    return df * dg if (m * df * dg <= budget or df * dg <= dim) else dim


def psi_features(f: torch.Tensor, g: torch.Tensor, width: int, seed: int) -> torch.Tensor:
    """``[B, width]`` rows ``psi_i``: ``vec(g_i f_i^T)`` when ``width == df * dg``, else its
    TensorSketch to ``width`` coordinates.  Computed in float64."""
    B, df = f.shape
    dg = g.shape[1]
    f64, g64 = f.to(torch.float64), g.to(torch.float64)
    if width == df * dg:
        return (g64.unsqueeze(2) * f64.unsqueeze(1)).reshape(B, df * dg)
    seed_f, seed_g = axis_seeds(seed)
    # CountSketch of the feature axis: sketch the columns, i.e. the rows of f^T.
    cf = ops.countsketch(f64.T, width, seed_f).T        # [B, width]
    cg = ops.countsketch(g64.T, width, seed_g).T
    return torch.fft.irfft(torch.fft.rfft(cf, dim=1) * torch.fft.rfft(cg, dim=1), n=width, dim=1)


def row_slices(batch: int, width: int):
    """Row ranges of a batch small enough to materialise ``psi`` for at once."""
    step = max(1, _ROW_BUDGET // max(width, 1))
    for start in range(0, batch, step):
        yield start, min(batch, start + step)
