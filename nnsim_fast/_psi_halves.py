"""Two independent TensorSketches of psi = g (x) f (interim; see nnsim_fast.psi)."""
from __future__ import annotations

import torch

from . import ops

DEFAULT_PSI_DIM = 4096


def psi_half_width(df: int, dg: int, dim: int) -> int:
    return df * dg if df * dg <= dim else dim


def _seeds(seed: int, half: int):
    keys = ops.block_keys(seed, 6)
    return keys[2 + 2 * half] >> 1, keys[3 + 2 * half] >> 1


def tensor_sketch(f: torch.Tensor, g: torch.Tensor, width: int, seed: int, half: int) -> torch.Tensor:
    B, df = f.shape
    dg = g.shape[1]
    f64, g64 = f.to(torch.float64), g.to(torch.float64)
    if width == df * dg:
        return (g64.unsqueeze(2) * f64.unsqueeze(1)).reshape(B, df * dg)
    seed_f, seed_g = _seeds(seed, half)
    cf = ops.countsketch(f64.T, width, seed_f).T
    cg = ops.countsketch(g64.T, width, seed_g).T
    return torch.fft.irfft(torch.fft.rfft(cf, dim=1) * torch.fft.rfft(cg, dim=1), n=width, dim=1)
