"""CKA over all N samples from the kernel entries of within-batch pairs.

When two models see the same batches, every batch gives the exact ``b x b``
blocks of both models' kernels.  This module turns those blocks into an
estimate of the *centred CKA of all N samples* (``H K H``, ``H = I - 11^T/N``,
the quantity :func:`nnsim_fast.similarity` targets) -- or, with
``debiased=True``, of the CKA of Song et al.'s unbiased HSIC over all N -- with
a standard error, in memory independent of N.

The estimator
-------------
For two kernels ``K`` and ``L`` over the N samples, write ``K^o`` for ``K``
with its diagonal set to zero, ``k_i = K_ii``, ``u = K^o 1`` and define the
sums over *distinct* indices

    P2 = sum_{i != j} K_ij L_ij,        P3 = sum_{i,j,l distinct} K_ij L_il,
    P4 = sum_{i,j,l,r distinct} K_ij L_lr,
    E_KL = sum_{i != l} K_ii L_il,      D = sum_i K_ii L_ii,   t_K = sum_i K_ii,
    Z_K = sum_{i != j} K_ij.

Splitting ``sum_ij``, ``r = K 1`` and ``1^T K 1 1^T L 1`` by which indices
coincide gives, exactly,

    N^2 HSIC = tr(K H L H) = D + P2 - (2/N) (D + E_KL + E_LK + P2 + P3)
               + (t_K t_L + t_K Z_L + t_L Z_K + P4 + 4 P3 + 2 P2) / N^2,

and the U-statistic HSIC of Song et al. is ``P2/N_2 - 2 P3/N_3 + P4/N_4`` with
``N_q = N (N-1) ... (N-q+1)``.  ``D`` and ``t`` are sums over single samples,
known exactly from the blocks.  Every other term is ``N_q`` times the mean of a
function of ``q`` distinct samples; it is estimated by the mean over the
``q``-tuples that fall inside one batch.  Within a batch of ``b`` with ``K^o``,
``L^o``, ``u``, ``v`` (``= L^o 1``) its sums are

    S2 = sum K^o o L^o,   S3 = u.v - S2,   S4 = (1^T u)(1^T v) - 4 S3 - 2 S2,
    E_KL = k.v,           Z_K = 1^T u,

(the number of ordered ``q``-tuples of a batch is ``b_q``).  Each mean over all N
is estimated by the block means ``S_q / b_q`` averaged over the blocks with
weights ``b`` -- one set of weights for every term, so that each sample counts
the same in all of them and the large, nearly equal terms of HSIC still cancel
as they do over all N (weighting each term by its own tuple count instead
leaves errors ten times larger when the blocks differ in size).  When the
blocks are random subsets of the data (a shuffled loader, or data in random
order) each mean is unbiased for its all-N counterpart; with one block holding
every sample the estimate *is* the exact value.  Blocks grouped by class see
only same-class pairs: the order of the data matters, unlike for the sketch.

Error bars: every sample enters the estimate with the same weight whatever the
partition, so its error against the all-N value comes only from which samples
share a block.  Splitting a block into two halves, the mean over the pairs
inside the halves weighs every sample as the block's mean does and differs from
it by half the difference of the within-half and the cross-half means, whose
variance is the block mean's own (for triples and quadruples, whose
within-half subsets are a quarter and an eighth, the swap overstates it).  So:
batches are dealt round-robin to ``groups`` groups; each group's means are
swapped for its halves' and the squared changes of the estimate summed over the
groups, averaged over four splits (first/second half, then alternating runs of
1, 2 and 4 positions).  Checked against exact values in the tests and in
docs/joint.md (94-100% of the errors within two standard errors).

Memory: ``groups x 5 x 6`` matrices of ``L x L`` float64 (``L`` kernels in all),
plus one block's ``L`` kernels of ``b x b`` float64.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from ._checks import check_bool, check_int

__all__ = ["BatchPairs", "DEFAULT_GROUPS"]

#: Groups for the error bars (batches are dealt to them round-robin).
DEFAULT_GROUPS = 64

_MEANS = ("S2", "S3", "S4", "E", "Z")        # tuple means of a block, weighted by its size
_SHAPES = {"S2": 2, "S3": 2, "S4": 2, "E": 2, "Z": 1, "D": 2, "t": 1}   # matrix or vector
_SMALLEST = 4                                # a block needs a quadruple to enter the means
_SPLITS = 4                                  # splits into halves averaged in the error bars


def falling(b: Tensor, q: int) -> Tensor:
    """``b (b-1) ... (b-q+1)``: the number of ordered ``q``-tuples of distinct items."""
    out = torch.ones_like(b)
    for step in range(q):
        out = out * (b - step)
    return out


class BatchPairs:
    """Tuple means of ``L`` kernels over blocks of samples, per error-bar group.

    Feed it, block after block, the ``[L, b, b]`` kernels on that block's samples
    (:meth:`add`); :meth:`cka` then gives the ``[L, L]`` matrix of estimated CKA
    between every pair of kernels, with standard errors.
    """

    def __init__(self, kernels: int, groups: int = DEFAULT_GROUPS) -> None:
        self.kernels = check_int(kernels, "kernels", 1)
        self.groups = check_int(groups, "groups", 2)
        self.batches = 0
        self.sums = {name: self._zeros(name) for name in _SHAPES}
        # Per split of the blocks into halves (_split_error): the halves' tuple means.
        self.halves = [{name: self._zeros(name) for name in _MEANS} for _ in range(_SPLITS)]
        self.size = torch.zeros(self.groups, dtype=torch.float64)      # samples
        self.weight = torch.zeros(self.groups, dtype=torch.float64)    # samples in the means
        self.half_weight = torch.zeros(self.groups, dtype=torch.float64)

    def _zeros(self, name: str) -> Tensor:
        shape = (self.groups,) + (self.kernels,) * _SHAPES[name]
        return torch.zeros(shape, dtype=torch.float64)

    @property
    def n(self) -> int:
        return int(self.size.sum())

    def add(self, blocks: Tensor) -> None:
        """Add one block of samples: ``blocks`` ``[L, b, b]``, symmetric, any float dtype."""
        if blocks.dim() != 3 or blocks.shape[0] != self.kernels or blocks.shape[1] != blocks.shape[2]:
            raise ValueError(f"blocks must be [{self.kernels}, b, b], got {tuple(blocks.shape)}")
        K = blocks.detach().to(dtype=torch.float64, copy=True)      # on its own device
        b = K.shape[1]
        diag = K.diagonal(dim1=1, dim2=2).clone()
        K.diagonal(dim1=1, dim2=2).zero_()
        group = self.batches % self.groups
        self.sums["D"][group] += (diag @ diag.T).cpu()
        self.sums["t"][group] += diag.sum(dim=1).cpu()
        self.size[group] += b
        if b >= _SMALLEST:
            self.weight[group] += b
            for name, value in _tuple_means(K, diag, weight=b).items():
                self.sums[name][group] += value.cpu()
        if b // 2 >= _SMALLEST:
            self.half_weight[group] += b
            for split, halves in enumerate(self.halves):
                for part in _halves(b, split, K.device):
                    means = _tuple_means(K[:, part][:, :, part], diag[:, part], weight=len(part))
                    for name, value in means.items():
                        halves[name][group] += value.cpu()
        self.batches += 1

    def cka(self, debiased: bool = False) -> Tuple[Tensor, Tensor]:
        """``(estimate [L, L], standard error [L, L])``, float64.

        The standard error is 0 when one block held every sample (the estimate
        is then exact).
        """
        debiased = check_bool(debiased, "debiased")
        used = self.size > 0
        if not bool(used.any()):
            raise ValueError("no batches were added")
        if float(self.weight.sum()) == 0:
            raise ValueError(f"within-batch estimates need batches of at least {_SMALLEST} "
                             f"samples; every batch had fewer ({self.n} samples in all): use a "
                             "larger batch size")
        totals = {name: value[used].sum(dim=0) for name, value in self.sums.items()}
        n, weight = self.size.sum(), self.weight.sum()
        estimate = _cka(_hsic(totals, n, weight, debiased))
        if self.batches == 1:
            return estimate, torch.zeros_like(estimate)
        return estimate, self._split_error(totals, n, weight, used, estimate, debiased)

    def _split_error(self, totals, n, weight, used, estimate, debiased) -> Tensor:
        """Each group's tuple means swapped for those inside the halves of its blocks; the
        squared changes of the estimate, summed over the groups (module docstring)."""
        ok = used & (self.half_weight > 0) & (self.half_weight == self.weight)
        if not bool(ok.any()):
            return torch.full_like(estimate, float("nan"))
        variance = torch.zeros_like(estimate)
        for halves in self.halves:
            swapped = {}
            for name, value in totals.items():
                swapped[name] = value.unsqueeze(0).expand((int(ok.sum()),) + value.shape)
                if name in _MEANS:
                    swapped[name] = swapped[name] + halves[name][ok] - self.sums[name][ok]
            replicates = _cka(_hsic(swapped, n, weight, debiased))
            variance += (replicates - estimate).pow(2).sum(dim=0) / len(self.halves)
        return variance.sqrt()


def _halves(b: int, split: int, device) -> Tuple[Tensor, Tensor]:
    """Positions of the two halves of a block of ``b`` in split number ``split``: the
    first and second half, then alternating runs of 1, 2, 4, ... positions."""
    position = torch.arange(b, device=device)
    first = position < b // 2 if split == 0 else (position // (1 << (split - 1))) % 2 == 0
    return position[first], position[~first]


def _tuple_means(K: Tensor, diag: Tensor, weight: int) -> Dict[str, Tensor]:
    """``weight`` times the means over the distinct tuples of one block (``K`` with its
    diagonal zeroed, ``diag`` its diagonal)."""
    b = torch.tensor(float(K.shape[1]), dtype=torch.float64)
    c2, c3, c4 = (float(falling(b, q)) for q in (2, 3, 4))
    u = K.sum(dim=2)
    flat = K.reshape(K.shape[0], -1)
    S2 = flat @ flat.T
    S3 = u @ u.T - S2
    Z = u.sum(dim=1)
    S4 = torch.outer(Z, Z) - 4 * S3 - 2 * S2
    return {"S2": S2 * (weight / c2), "S3": S3 * (weight / c3), "S4": S4 * (weight / c4),
            "E": (diag @ u.T) * (weight / c2), "Z": Z * (weight / c2)}


def _hsic(sums: Dict[str, Tensor], n: Tensor, weight: Tensor, debiased: bool) -> Tensor:
    """HSIC-like inner products ``[..., L, L]`` (leading dims broadcast).

    Plain: ``N^2`` times the centred HSIC of all N (module docstring); debiased:
    the U-statistic HSIC.  Only ratios of these enter CKA.
    """
    a2, a3, a4 = sums["S2"] / weight, sums["S3"] / weight, sums["S4"] / weight
    if debiased:
        return a2 - 2 * a3 + a4
    n2, n3, n4 = (float(falling(n, q)) for q in (2, 3, 4))
    n = float(n)
    P2, P3, P4 = n2 * a2, n3 * a3, n4 * a4
    E = n2 * sums["E"] / weight
    t, Z = sums["t"], n2 * sums["Z"] / weight
    outer = t.unsqueeze(-1) * t.unsqueeze(-2) + t.unsqueeze(-1) * Z.unsqueeze(-2) \
        + Z.unsqueeze(-1) * t.unsqueeze(-2)
    D = sums["D"]
    return D + P2 - 2 / n * (D + E + E.transpose(-1, -2) + P2 + P3) \
        + (outer + P4 + 4 * P3 + 2 * P2) / (n * n)


def _cka(inner: Tensor) -> Tensor:
    """``inner[p, q] / sqrt(inner[p, p] inner[q, q])``; 0 where a self term is not positive."""
    self_terms = inner.diagonal(dim1=-2, dim2=-1)
    norms = self_terms.clamp(min=0).sqrt()
    denominator = norms.unsqueeze(-1) * norms.unsqueeze(-2)
    positive = denominator > 0
    return torch.where(positive, inner / torch.where(positive, denominator, 1.0),
                       torch.zeros((), dtype=inner.dtype))


def check_groups(groups: Optional[int]) -> int:
    return DEFAULT_GROUPS if groups is None else check_int(groups, "groups", 2)
