"""Tests of :mod:`nnsim_fast.estimators` against exact dense references.

References, all computed here in float64: the dense sketch matrix ``S`` of
``ops.sketch_matrix``, the data-centring matrix ``H``, the exact ``N x N`` kernels
and the library's exact indices (``nnsim_fast.indices``).  Statistical checks use
fixed seeds; each tolerance is derived in a comment: for a mean over R independent
draws, ``|mean - target| <= z * sd / sqrt(R)`` with ``sd`` the sample sd and ``z``
the two-sided Gaussian quantile at the false-alarm rate ALPHA split over the checks
of the test (union bound).  R is a few hundred, where the CLT holds well for these
bounded-moment statistics.
"""
from __future__ import annotations

import functools
import math
from statistics import NormalDist
from typing import Tuple

import pytest
import torch

from nnsim_fast import estimators as est
from nnsim_fast import indices, ops, psi

F64 = torch.float64
ALPHA = 1e-4


def z_two_sided(alpha: float, checks: int = 1) -> float:
    return NormalDist().inv_cdf(1.0 - alpha / (2.0 * checks))


@pytest.fixture(autouse=True)
def one_thread(restore_num_threads):
    # many small problems: thread hand-offs would cost more than the work
    torch.set_num_threads(1)


# --------------------------------------------------------------------------- data

def relu_rows(n: int, d: int, rank: int, mean: float, seed: int, noise: float = 0.0) -> torch.Tensor:
    """Post-ReLU-like rows: a rank-``rank`` signal plus isotropic noise, shifted by ``mean``
    before the ReLU, so the rows have a large common mean (as real activations do)."""
    gen = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, rank, generator=gen, dtype=F64)
    mix = torch.randn(rank, d, generator=gen, dtype=F64) / math.sqrt(rank)
    return torch.relu(latent @ mix + noise * torch.randn(n, d, generator=gen, dtype=F64) + mean)


@functools.lru_cache(maxsize=None)
def pair(kind: str, n: int = 240) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two related layers: low rank (effective rank ~2-5), or high rank (effective rank
    above the m = 16 used below, from isotropic noise in 96 dimensions)."""
    if kind == "low":
        x = relu_rows(n, 12, 3, 1.0, seed=1)
        return x, torch.relu(x[:, :8] @ torch.randn(8, 10, generator=torch.Generator().manual_seed(2),
                                                        dtype=F64) + 0.5)
    x = relu_rows(n, 96, 8, 0.5, seed=3, noise=1.0)
    y = relu_rows(n, 64, 8, 0.5, seed=4, noise=1.0) + 0.5 * x[:, :64]
    return x, y


def centring(n: int) -> torch.Tensor:
    return torch.eye(n, dtype=F64) - torch.full((n, n), 1.0 / n, dtype=F64)


def centred_kernel(x: torch.Tensor) -> torch.Tensor:
    h = centring(x.shape[0])
    return h @ x @ x.T @ h


def effective_rank_exact(a: torch.Tensor) -> float:
    return float(a.trace() ** 2 / a.square().sum())


def gram(x: torch.Tensor, m: int, seed: int, sparsity: int = 1) -> est.SketchedGram:
    return est.gram_from_rows(x, m, seed, sparsity)


def without_control(g: est.SketchedGram) -> est.SketchedGram:
    """The same gram without the diagonal's control variate."""
    return est.SketchedGram(g.kernels, g.deviation, g.trace, g.ones, g.n, g.sparsity, g.counts)


def one_half(g: est.SketchedGram, half: int) -> est.SketchedGram:
    return g.map_layers(lambda x: x[:, half:half + 1])


# --------------------------------------------------------------------------- exact identities

@pytest.mark.parametrize("sparsity", [1, 2])
def test_centred_gram_is_the_sketch_of_the_data_centred_kernel(sparsity):
    """kernels = S H X X^T H S^T, diag = S diag(H X X^T H), trace = Tr(H X X^T H), exactly
    (up to float64 rounding), from statistics streamed in batches with offsets."""
    x = relu_rows(50, 7, 3, 2.0, seed=5)
    m, seed = 8, 11
    S = ops.sketch_matrix(50, m, seed, sparsity=sparsity)
    a = centred_kernel(x)
    parts = [est.row_statistics(x[lo:lo + 20], m, seed, lo, sparsity) for lo in range(0, 50, 20)]
    stats = [sum(p[i] for p in parts) for i in range(5)]
    key_parts = [est.key_statistics(min(20, 50 - lo), m, seed, lo, sparsity) for lo in range(0, 50, 20)]
    keys = [sum(k[i] for k in key_parts) for i in range(3)]
    ones = S.sum(1)
    torch.testing.assert_close(keys[0], ones, rtol=0, atol=1e-12)
    g = est.centred_gram(stats[0], stats[1], ones.unsqueeze(1), 50, stats[2], stats[3], sparsity,
                         counts=keys[1], wide_sqnorm=stats[4], wide_ones=keys[2])
    scale = float(a.abs().max())
    torch.testing.assert_close(g.kernels[0, 0], S @ a @ S.T, rtol=0, atol=1e-11 * scale)
    deviation = torch.diagonal(a) - a.trace() / 50
    torch.testing.assert_close(g.deviation[0, 0], S @ deviation, rtol=0, atol=1e-11 * scale)
    assert float(g.trace[0, 0]) == pytest.approx(float(a.trace()), rel=1e-12)
    torch.testing.assert_close(g.ones, ones, rtol=0, atol=1e-12)
    assert (g.layers, g.halves, g.m, g.n, g.sparsity) == (1, 1, m, 50, sparsity)
    # the control variate's sketches: S e and S' e, e the deviations of the raw row norms
    norms = x.square().sum(1)
    wide = ops.sketch_matrix(50, est.DIAGONAL_WIDTH, est.diagonal_seed(seed))
    torch.testing.assert_close(g.norm_deviation[0, 0], S @ (norms - norms.mean()), rtol=0,
                               atol=1e-11 * scale)
    torch.testing.assert_close(g.wide_deviation[0, 0], wide @ (norms - norms.mean()), rtol=0,
                               atol=1e-11 * scale)


def test_row_statistics_take_rows_by_key():
    """Rows keyed by dataset index give the same statistics in any order."""
    x = relu_rows(30, 5, 2, 1.0, seed=6)
    order = torch.randperm(30, generator=torch.Generator().manual_seed(0))
    whole = est.row_statistics(x, 8, 3)
    shuffled = est.row_statistics(x[order], 8, 3, rows=order)
    for mine, theirs in zip(whole, shuffled):
        torch.testing.assert_close(theirs, mine, rtol=1e-12, atol=1e-12)


def test_sum_of_grams_is_the_gram_of_concatenated_rows():
    """K_f + K_g is the linear kernel of [f, g]: adding grams equals the gram of the
    concatenation, and an exact half (h = 1) adds to each of two halves."""
    x, y = pair("low")
    m, seed = 16, 2
    torch.testing.assert_close(
        (gram(x, m, seed) + gram(y, m, seed)).kernels,
        gram(torch.cat([x, y], dim=1), m, seed).kernels, rtol=1e-10, atol=1e-9)
    two = gram(torch.stack([y, 2 * y]), m, seed)
    mixed = gram(x, m, seed) + two
    assert mixed.halves == 2
    torch.testing.assert_close(mixed.trace[0], gram(x, m, seed).trace[0, 0] + two.trace[0],
                               rtol=1e-12, atol=0)


def test_stack_and_select_layers():
    x, y = pair("low")
    g = est.stack_grams([gram(x, 16, 0), gram(y, 16, 0), gram(x, 16, 0)])
    assert g.layers == 3
    torch.testing.assert_close(g[1].kernels, gram(y, 16, 0).kernels, rtol=0, atol=0)
    torch.testing.assert_close(g[[2, 0]].trace, g[[0, 2]].trace, rtol=0, atol=0)
    matrix = est.hsic_matrix(g)
    assert matrix.shape == (3, 3) and matrix.dtype == F64
    torch.testing.assert_close(matrix, matrix.T, rtol=1e-12, atol=0)
    torch.testing.assert_close(matrix[0], matrix[2], rtol=1e-12, atol=0)


# --------------------------------------------------------------------------- the expectation

@functools.lru_cache(maxsize=None)
def dense_sketches(n: int, m: int, sparsity: int, draws: int) -> torch.Tensor:
    return torch.stack([ops.sketch_matrix(n, m, seed, sparsity=sparsity) for seed in range(draws)])


@pytest.mark.parametrize("sparsity", [1, 2, 4])
def test_off_diagonal_buckets_hold_no_trace_term(sparsity):
    """E sum_{b != c} A~_bc B~_bc = (1 - 1/m) O + (1 - 1/s) D, and the full inner product
    E <A~, B~> = (1 + 1/m) <A, B> + Tr A Tr B / m - 2 D / m, for any s (docs/estimators.md).

    Over R dense sketches each mean is within z sd / sqrt(R) of its formula (2 checks).
    The data are chosen so that the trace term is 3x <A, B>: a missed trace term fails."""
    x, y = pair("high", 40)
    a, b = centred_kernel(x), centred_kernel(y)
    m, draws = 8, 3000
    S = dense_sketches(40, m, sparsity, draws)
    sa, sb = S @ a @ S.transpose(1, 2), S @ b @ S.transpose(1, 2)
    full = (sa * sb).sum((1, 2))
    off = full - (torch.diagonal(sa, dim1=1, dim2=2) * torch.diagonal(sb, dim1=1, dim2=2)).sum(1)
    diag = float((torch.diagonal(a) * torch.diagonal(b)).sum())
    inner = float((a * b).sum())
    traces = float(a.trace() * b.trace())
    assert traces / m > 3 * inner
    expected_off = (1 - 1 / m) * (inner - diag) + (1 - 1 / sparsity) * diag
    expected_full = (1 + 1 / m) * inner + traces / m - 2 * diag / m
    z = z_two_sided(ALPHA, 2)
    for values, expected in ((off, expected_off), (full, expected_full)):
        se = float(values.std()) / math.sqrt(draws)
        assert abs(float(values.mean()) - expected) <= z * se, (float(values.mean()), expected, se)


def seed_means(x: torch.Tensor, y: torch.Tensor, m: int, sparsity: int, draws: int):
    """Per draw: biased and debiased HSIC estimates and the CKA estimate with its stderr."""
    out = {"hsic": [], "hsic_u": [], "cka": [], "stderr": []}
    for seed in range(draws):
        ga, gb = gram(x, m, seed, sparsity), gram(y, m, seed, sparsity)
        out["hsic"].append(float(est.hsic_matrix(ga, gb)[0, 0]))
        out["hsic_u"].append(float(est.hsic_matrix(ga, gb, debiased=True)[0, 0]))
        value, stderr = est.cka_matrix(ga, gb, clip=False)
        out["cka"].append(float(value[0, 0]))
        out["stderr"].append(float(stderr[0, 0]))
    return {k: torch.tensor(v, dtype=F64) for k, v in out.items()}


@pytest.mark.parametrize("kind,sparsity", [("low", 1), ("high", 1), ("high", 2)])
def test_hsic_estimates_are_unbiased_at_the_clt_rate(kind, sparsity):
    """Mean over R seeds of hsic_matrix (biased and debiased targets) lies within
    z sd / sqrt(R) of indices.hsic of the exact N x N kernels (2 checks).  The plug-in
    data-centred inner product misses by far more than that (it carries Tr A Tr B / m)."""
    x, y = pair(kind)
    m, draws = 16, 300
    runs = seed_means(x, y, m, sparsity, draws)
    kx, ky = x @ x.T, y @ y.T
    z = z_two_sided(ALPHA, 2)
    for key, debiased in (("hsic", False), ("hsic_u", True)):
        exact = indices.hsic(kx, ky, debiased=debiased)
        values = runs[key]
        se = float(values.std()) / math.sqrt(draws)
        assert abs(float(values.mean()) - exact) <= z * se, (key, float(values.mean()), exact, se)
    if kind == "high":
        a, b = centred_kernel(x), centred_kernel(y)
        assert effective_rank_exact(a) > m
        collision = float(a.trace() * b.trace()) / m / (x.shape[0] - 1) ** 2
        assert collision > 10 * z * float(runs["hsic"].std()) / math.sqrt(draws)


@pytest.mark.parametrize("kind", ["low", "high"])
def test_cka_estimate_and_jackknife_stderr(kind):
    """CKA from the unbiased HSICs, against the exact centred CKA over R seeds.

    * bias: a ratio of unbiased estimates has bias O(var); allow z sd / sqrt(R) plus
      sd^2 (the second-order term of the ratio's expansion, bounded by the variance
      of the ratio times a constant of order 1 for CKA-like ratios).
    * coverage: |estimate - exact| <= 1.96 stderr in at least 95% - 3 binomial sd of the
      draws.  The jackknife of a U-statistic is conservative (Efron & Stein, 1981): about
      right when the first-order term dominates (low rank), up to sqrt(2) too large when
      the degenerate second-order term does (effective rank >> m).  m = 32: at m = 16 the
      rank-3 pair's CKA is visibly skewed and a Gaussian interval covers 91%.
    * the stderr is informative: its mean is within a factor 2 of the seed-to-seed sd.
    """
    x, y = pair(kind)
    m, draws = 32, 300
    runs = seed_means(x, y, m, 1, draws)
    exact = indices.cka(x @ x.T, y @ y.T)
    values, stderr = runs["cka"], runs["stderr"]
    sd = float(values.std())
    assert abs(float(values.mean()) - exact) <= z_two_sided(ALPHA) * sd / math.sqrt(draws) + sd ** 2
    covered = float(((values - exact).abs() <= 1.96 * stderr).to(F64).mean())
    assert covered >= 0.95 - 3 * math.sqrt(0.95 * 0.05 / draws), covered
    assert 0.5 * sd <= float(stderr.mean()) <= 2.0 * sd, (float(stderr.mean()), sd)


def test_bucket_counts_and_the_load_regressed_jackknife():
    """The bucket counts are the bincount of the hash (s per row), additive over batches.

    With the loads regressed out of the pseudo-values the error bar of a high-rank pair
    shrinks (the loads sum to N exactly, so their share of the first-order term has no
    variance), stays conservative enough for coverage (checked above with counts), and
    without counts the plain jackknife is returned."""
    buckets, _ = ops.sketch_hash(50, 16, 3, sparsity=2)
    counts = est.key_statistics(20, 16, 3, sparsity=2).counts + \
        est.key_statistics(30, 16, 3, 20, sparsity=2).counts
    torch.testing.assert_close(counts, torch.bincount(buckets.reshape(-1), minlength=16).to(F64))
    assert float(counts.sum()) == 100.0
    x, y = pair("high")
    with_counts = [gram(x, 32, 1), gram(y, 32, 1)]
    assert with_counts[0].counts is not None
    plain = [est.SketchedGram(g.kernels, g.deviation, g.trace, g.ones, g.n, 1, None,
                              g.norm_deviation, g.wide_deviation) for g in with_counts]
    value, stderr = est.cka_matrix(*with_counts)
    value_plain, stderr_plain = est.cka_matrix(*plain)
    assert float(value) == float(value_plain)
    assert float(stderr) < float(stderr_plain)


def test_diagonal_control_variate_with_heavy_tailed_row_norms():
    """Rows scaled by log-normal factors (as expected gradients are: confident samples
    have tiny ones): the diagonal term D dominates and its m-bucket sketch is noisy.

    Over R seeds, with and without the control variate (wide sketch of the raw row
    norms): both means are within z sd / sqrt(R) of the exact HSIC (2 checks), and the
    control variate has the smaller variance: paired draws, so the Pitman-Morgan test,
    Var(p) > Var(c) iff corr(p + c, p - c) > 0, with t = r sqrt((R-2)/(1-r^2)) against
    the one-sided t quantile at ALPHA (for R - 2 = 198 degrees of freedom within 2% of
    the Gaussian one, which is allowed for)."""
    x, y = pair("high")
    gen = torch.Generator().manual_seed(5)
    scale = torch.exp(1.5 * torch.randn(x.shape[0], 1, generator=gen, dtype=F64))
    x, y = x * scale, y * scale
    exact = indices.hsic(x @ x.T, y @ y.T)
    draws = 200
    runs = {"control": [], "plain": []}
    for seed in range(draws):
        a, b = gram(x, 16, seed), gram(y, 16, seed)
        runs["control"].append(float(est.hsic_matrix(a, b)[0, 0]))
        runs["plain"].append(float(est.hsic_matrix(without_control(a), without_control(b))[0, 0]))
    z = z_two_sided(ALPHA, 2)
    for values in runs.values():
        values = torch.tensor(values, dtype=F64)
        assert abs(float(values.mean()) - exact) <= z * float(values.std()) / math.sqrt(draws)
    control, plain = (torch.tensor(runs[k], dtype=F64) for k in ("control", "plain"))
    r = float(torch.corrcoef(torch.stack([plain + control, plain - control]))[0, 1])
    t = r * math.sqrt((draws - 2) / (1 - r * r))
    assert t > 1.02 * NormalDist().inv_cdf(1 - ALPHA), (r, float(control.std() / plain.std()))


def test_control_coefficient_follows_where_the_norms_vary(monkeypatch):
    """Rows with a large common mean whose raw norms vary only through ``2 x_i . mean``
    (as the logits of an untrained head do): the raw-norm deviations ``e`` are large
    but the centred diagonal ``d`` does not contain them, so the control variate with a
    fixed coefficient 1 adds noise instead of removing it (measured on a ResNet-18: CKA
    sd 0.045 instead of 0.016).  Over R seeds the estimated coefficient's HSIC is within
    z sd / sqrt(R) of exact (unbiased), and its variance is below the fixed-coefficient
    one by the Pitman-Morgan test (as in the test above); on the heavy-tailed norms of
    that test the coefficient is near 1 (checked there by the control beating the plain
    estimate)."""
    n, m, draws = 240, 16, 200
    gen = torch.Generator().manual_seed(11)
    mean = 10.0 * torch.randn(1, 12, generator=gen, dtype=F64)
    x = mean + relu_rows(n, 12, 3, 0.0, seed=12)
    y = mean[:, :10] + 0.5 * x[:, :10] + relu_rows(n, 10, 2, 0.0, seed=13)
    exact = indices.hsic(x @ x.T, y @ y.T)
    estimated, fixed = [], []
    for seed in range(draws):
        a, b = gram(x, m, seed), gram(y, m, seed)
        estimated.append(float(est.hsic_matrix(a, b)[0, 0]))
        with monkeypatch.context() as patch:
            patch.setattr(est, "_control_coefficient", lambda **k: torch.ones_like(k["uv"]))
            fixed.append(float(est.hsic_matrix(a, b)[0, 0]))
    estimated, fixed = torch.tensor(estimated, dtype=F64), torch.tensor(fixed, dtype=F64)
    z = z_two_sided(ALPHA, 2)
    for values in (estimated, fixed):
        assert abs(float(values.mean()) - exact) <= z * float(values.std()) / math.sqrt(draws)
    r = float(torch.corrcoef(torch.stack([fixed + estimated, fixed - estimated]))[0, 1])
    t = r * math.sqrt((draws - 2) / (1 - r * r))
    assert t > 1.02 * NormalDist().inv_cdf(1 - ALPHA), (r, float(estimated.std() / fixed.std()))


def test_control_coefficient_values():
    """The coefficient against its formula: 1 for identical ``d`` and ``e`` (the variance of
    ``<Su, Sv>`` equals the covariance), 0 for an absent control (zero norms), clipped to
    [0, 1] otherwise."""
    g = torch.Generator().manual_seed(3)
    u, v = torch.randn(2, 5, generator=g, dtype=F64)
    one = est._control_coefficient(xu=u @ u, yv=v @ v, xv=u @ v, yu=v @ u, uu=u @ u, vv=v @ v,
                                   uv=u @ v)
    assert float(one) == pytest.approx(1.0)
    half = est._control_coefficient(xu=0.5 * (u @ u), yv=v @ v, xv=0.5 * (u @ v), yu=v @ u,
                                    uu=u @ u, vv=v @ v, uv=u @ v)
    assert float(half) == pytest.approx(0.5)
    zero = torch.zeros(())
    assert float(est._control_coefficient(xu=zero, yv=zero, xv=zero, yu=zero, uu=zero, vv=zero,
                                          uv=zero)) == 0.0
    assert float(est._control_coefficient(xu=-(u @ u), yv=v @ v, xv=-(u @ v), yu=v @ u, uu=u @ u,
                                          vv=v @ v, uv=u @ v)) == 0.0


# --------------------------------------------------------------------------- two halves

def test_tensor_sketch_halves_give_unbiased_hsic_of_the_paper_kernel():
    """K = K_f o K_g through two TensorSketch halves (width 16 < df * dg = 48): the mean of
    hsic_matrix over R seeds (each seed draws S and both halves) is within z sd / sqrt(R)
    of the exact HSIC, for a pair of "checkpoints" whose feature coordinates are aligned
    (model 2 = model 1 + a small perturbation), where a TensorSketch paired with itself
    would add Tr(Psi_1^T Psi_2)^2 / W.  The self-HSIC (halves 0 and 1) is unbiased too."""
    n, m, width, draws = 120, 16, 16, 300
    f1 = relu_rows(n, 8, 3, 1.0, seed=7)
    g1 = relu_rows(n, 6, 3, 0.0, seed=8) - 0.3
    gen = torch.Generator().manual_seed(9)
    f2 = f1 + 0.2 * torch.randn(n, 8, generator=gen, dtype=F64)
    g2 = g1 + 0.2 * torch.randn(n, 6, generator=gen, dtype=F64)
    k1, k2 = (f1 @ f1.T) * (g1 @ g1.T), (f2 @ f2.T) * (g2 @ g2.T)
    cross, self_1, shared = [], [], []
    for seed in range(draws):
        h1 = psi.tensor_sketch_halves(f1, g1, width, seed)
        h2 = psi.tensor_sketch_halves(f2, g2, width, seed)
        a, b = gram(h1, m, seed), gram(h2, m, seed)
        cross.append(float(est.hsic_matrix(a, b)[0, 0]))
        self_1.append(float(est.hsic_matrix(a)[0, 0]))
        # the same half on both sides: the bias the pairing rule avoids
        shared.append(float(est.hsic_matrix(one_half(a, 0), one_half(b, 0))[0, 0]))
    z = z_two_sided(ALPHA, 3)
    for values, exact in ((cross, indices.hsic(k1, k2)), (self_1, indices.hsic(k1, k1))):
        values = torch.tensor(values, dtype=F64)
        se = float(values.std()) / math.sqrt(draws)
        assert abs(float(values.mean()) - exact) <= z * se, (float(values.mean()), exact, se)
    shared = torch.tensor(shared, dtype=F64)
    exact = indices.hsic(k1, k2)
    assert float(shared.mean()) - exact > z * float(shared.std()) / math.sqrt(draws)


def test_exact_psi_halves_equal_the_single_exact_kernel():
    """When df * dg fits the width both halves are psi itself: the estimates equal those
    of one exact half."""
    f, g = relu_rows(60, 4, 2, 1.0, seed=10), relu_rows(60, 3, 2, 0.0, seed=11)
    halves = psi.tensor_sketch_halves(f, g, 12, 5)
    exact = (g.unsqueeze(2) * f.unsqueeze(1)).reshape(60, 12)
    two, one = gram(halves, 16, 5), gram(exact, 16, 5)
    other = gram(relu_rows(60, 5, 2, 1.0, seed=12), 16, 5)
    torch.testing.assert_close(est.hsic_matrix(two, other), est.hsic_matrix(one, other),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(est.cka_matrix(two, other)[0], est.cka_matrix(one, other)[0],
                               rtol=1e-12, atol=0)


# --------------------------------------------------------------------------- invariances

def test_invariances():
    """Scale: rows times c leave CKA unchanged and scale HSIC by c^2.  Translation of all
    rows: the gram is unchanged (centring is exact).  Rotation of the feature axis: unchanged.  A layer
    with itself: CKA exactly 1 (one half or two)."""
    x, y = pair("high")
    m, seed = 16, 4
    base, other = gram(x, m, seed), gram(y, m, seed)
    value, _ = est.cka_matrix(base, other)
    scaled = gram(3.0 * x, m, seed)
    torch.testing.assert_close(est.cka_matrix(scaled, other)[0], value, rtol=1e-10, atol=0)
    torch.testing.assert_close(est.hsic_matrix(scaled, other), 9.0 * est.hsic_matrix(base, other),
                               rtol=1e-10, atol=0)
    shifted = gram(x + torch.linspace(-5, 5, x.shape[1], dtype=F64), m, seed)
    scale = float(base.kernels.abs().max())
    torch.testing.assert_close(shifted.kernels, base.kernels, rtol=0, atol=1e-9 * scale)
    torch.testing.assert_close(shifted.deviation, base.deviation, rtol=0, atol=1e-9 * scale)
    # (the control variate uses raw row norms, which a translation changes: it moves the
    # estimate by noise, not in expectation; without it the estimate is invariant)
    torch.testing.assert_close(est.cka_matrix(without_control(shifted), without_control(other))[0],
                               est.cka_matrix(without_control(base), without_control(other))[0],
                               rtol=1e-9, atol=0)
    q, _ = torch.linalg.qr(torch.randn(x.shape[1], x.shape[1], generator=torch.Generator().manual_seed(1),
                                       dtype=F64))
    torch.testing.assert_close(gram(x @ q, m, seed).kernels, base.kernels, rtol=0, atol=1e-9 * scale)
    for g in (base, gram(torch.stack([x, x + 1e-3 * y[:, :1]]), m, seed)):
        assert float(est.cka_matrix(g)[0][0, 0]) == pytest.approx(1.0, abs=1e-12)


def test_degenerate_layer_gives_zero_with_zero_stderr():
    constant = torch.ones(40, 5, dtype=F64) * 3.0
    x = relu_rows(40, 5, 2, 1.0, seed=13)
    value, stderr = est.cka_matrix(gram(constant, 8, 0), gram(x, 8, 0))
    assert float(value[0, 0]) == 0.0 and float(stderr[0, 0]) == 0.0
    assert float(est.effective_rank(gram(constant, 8, 0))[0]) == 0.0


def test_effective_rank_estimates_the_exact_one():
    """The numerator ||A||_F^2 is unbiased; averaged over R seeds the inverse of the
    estimated rank, Tr(A)^2 / rank = ||A||_F^2^, is within z sd / sqrt(R) of exact."""
    x, _ = pair("high")
    a = centred_kernel(x)
    draws = 200
    norms = torch.tensor([float(a.trace() ** 2 / est.effective_rank(gram(x, 16, s))[0])
                          for s in range(draws)], dtype=F64)
    se = float(norms.std()) / math.sqrt(draws)
    assert abs(float(norms.mean()) - float(a.square().sum())) <= z_two_sided(ALPHA) * se


def test_resolution_warnings():
    stderr = torch.tensor([[0.001, 0.02], [math.inf, 0.0]], dtype=F64)
    assert est.resolution_warnings(stderr).tolist() == [[False, True], [True, False]]
    assert est.resolution_warnings(stderr, 0.05).tolist() == [[False, False], [True, False]]
    with pytest.raises(ValueError, match="tolerance"):
        est.resolution_warnings(stderr, 0.0)


# --------------------------------------------------------------------------- bad input

def test_suggested_m_values():
    assert est.suggested_m(0.02, 512) == 2048            # (0.02 / 0.01)^2 = 4 exactly
    assert est.suggested_m(0.0234, 512) == 4096          # 512 * 5.48 = 2804, next power of two
    assert est.suggested_m(0.005, 512) == 512            # already within the tolerance
    assert est.suggested_m(0.03, 512, tolerance=0.01) == 8192
    assert est.suggested_m(math.inf, 512) is None
    assert est.suggested_m(1e6, 512) is None             # beyond the largest bucket count
    with pytest.raises(TypeError, match="stderr"):
        est.suggested_m(torch.tensor(0.1), 512)
    with pytest.raises(ValueError, match="tolerance"):
        est.suggested_m(0.1, 512, tolerance=0.0)


def test_suggested_m_brings_the_standard_error_to_the_tolerance():
    """A low-rank pair (rank 2 and 3, the slowest case: error ~ 1/sqrt(m)) whose mean
    jackknife stderr over seeds exceeds a tolerance at m = 32: at the suggested m the mean
    stderr is within the tolerance up to 25% (the law is leading order in 1/m; the mean
    over 20 seeds has a relative sd of a few percent), and the seed-to-seed sd too."""
    gen = torch.Generator().manual_seed(21)
    n = 4000
    x = torch.randn(n, 2, generator=gen, dtype=F64) @ torch.randn(2, 6, generator=gen, dtype=F64)
    y = torch.cat([x[:, :1], torch.randn(n, 2, generator=gen, dtype=F64)], 1) @ \
        torch.randn(3, 5, generator=gen, dtype=F64)

    def run(m):
        values, errors = [], []
        for seed in range(20):
            value, error = est.cka_matrix(gram(x, m, seed), gram(y, m, seed))
            values.append(float(value[0, 0]))
            errors.append(float(error[0, 0]))
        return torch.tensor(values), torch.tensor(errors)

    _, small = run(32)
    tolerance = float(small.mean()) / 3.0
    m = est.suggested_m(float(small.mean()), 32, tolerance)
    assert m == 512
    values, errors = run(m)
    assert float(errors.mean()) <= 1.25 * tolerance, (float(errors.mean()), tolerance)
    assert float(values.std()) <= 1.25 * tolerance, (float(values.std()), tolerance)


def test_bad_inputs_raise_naming_the_argument():
    x, y = pair("low")
    stats = est.row_statistics(x, 8, 0)
    ones = torch.ones(8, dtype=F64)
    with pytest.raises(ValueError, match="column_sum"):
        est.centred_gram(stats[0], stats[1][:, :3], ones, 240, stats[2], stats[3])
    with pytest.raises(ValueError, match="sketch_ones"):
        est.centred_gram(stats[0], stats[1], torch.ones(7, dtype=F64), 240, stats[2], stats[3])
    with pytest.raises(TypeError, match="sketch"):
        est.centred_gram(stats[0].to(torch.int64), stats[1], ones, 240, stats[2], stats[3])
    with pytest.raises(ValueError, match="n must be"):
        est.centred_gram(stats[0], stats[1], ones, 1, stats[2], stats[3])
    with pytest.raises(ValueError, match="sparsity"):
        est.centred_gram(stats[0], stats[1], ones, 240, stats[2], stats[3], sparsity=3)
    with pytest.raises(ValueError, match="NaN"):
        est.centred_gram(stats[0] * math.nan, stats[1], ones, 240, stats[2], stats[3])
    with pytest.raises(ValueError, match="halves"):
        est.row_statistics(torch.zeros(3, 4, 5, dtype=F64), 8, 0)
    with pytest.raises(TypeError, match="grams_a"):
        est.cka_matrix(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="share m"):
        est.hsic_matrix(gram(x, 8, 0), gram(y, 16, 0))
    with pytest.raises(ValueError, match="different rows"):
        est.hsic_matrix(gram(x, 8, 0), gram(y, 8, 1))
    with pytest.raises(ValueError, match="counts"):
        est.centred_gram(stats[0], stats[1], ones, 240, stats[2], stats[3], counts=torch.ones(5))
    with pytest.raises(ValueError, match="n > 3"):
        est.hsic_matrix(gram(x[:3], 8, 0), debiased=True)
    with pytest.raises(TypeError, match="debiased"):
        est.cka_matrix(gram(x, 8, 0), debiased=1)
    with pytest.raises(ValueError, match=r"\[L, h, m\]"):
        est.SketchedGram(torch.zeros(1, 1, 8, 8), torch.zeros(1, 8), torch.zeros(1, 1),
                         torch.zeros(8), 10)
    with pytest.raises(ValueError, match="together"):
        est.centred_gram(stats[0], stats[1], ones, 240, stats[2], stats[3], wide_sqnorm=stats[4])
    with pytest.raises(ValueError, match="m >= 3"):
        est.SketchedGram(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2), torch.zeros(1, 1),
                         torch.zeros(2), 10)


def test_a_gram_with_itself_has_unit_self_similarity_with_two_different_halves():
    """Two distinct halves (as a TensorSketch of psi gives): passing the same gram twice
    must still give exactly 1 for each layer against itself, for CKA and NBS alike,
    while a copy of the gram (other object, same values) pairs different halves."""
    gen = torch.Generator().manual_seed(31)

    def halves(base: torch.Tensor) -> torch.Tensor:     # two noisy views of one kernel
        return base + 0.2 * torch.randn(2, *base.shape, generator=gen, dtype=torch.float64)

    base = torch.randn(120, 9, generator=gen, dtype=torch.float64)
    grams = est.stack_grams([gram(halves(base), 16, 2), gram(halves(base.relu()), 16, 2)])
    for same in (est.cka_matrix(grams, grams)[0], est.cka_matrix(grams)[0],
                 est.nbs_matrix(grams, grams), est.nbs_matrix(grams)):
        torch.testing.assert_close(same.diagonal(), torch.ones(2, dtype=torch.float64),
                                   rtol=0, atol=1e-12)
    copy = est.SketchedGram(grams.kernels.clone(), grams.deviation, grams.trace, grams.ones, grams.n)
    assert float((est.nbs_matrix(copy, grams).diagonal() - 1).abs().max()) > 1e-6
    # Off the diagonal the same-gram shortcut (one pairing and its transpose) is the
    # general two-pairing average.
    same, general = est.nbs_matrix(grams), est.nbs_matrix(grams, copy)
    torch.testing.assert_close(same[0, 1], general[0, 1], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(same[1, 0], general[1, 0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind, sparsity", [("feature", 1), ("gradient", 2), ("hadamard", 1),
                                            ("hadamard", 2)])
def test_a_streamed_representation_gives_the_all_rows_gram(kind, sparsity):
    """Representation.grams (batches streamed, rows keyed by dataset index in shuffled
    order) equals gram_from_rows on all rows at once, every statistic included: the bucket
    loads and the wide sketch of the row norms (the diagonal's control variate) reach the
    estimators from a sketched model, not only from the function-level API."""
    from nnsim_fast import Representation
    gen = torch.Generator().manual_seed(41)
    n, m = 150, 16
    f = torch.randn(n, 7, generator=gen, dtype=torch.float64) * torch.rand(n, 1, generator=gen) * 4
    g = torch.randn(n, 5, generator=gen, dtype=torch.float64).pow(3)      # heavy-tailed norms
    # psi_dim 16 < df * dg = 35: the halves are TensorSketches, each centred with its own norms.
    rep = Representation(m, 3, sparsity, dtype=torch.float64, psi=kind == "hadamard", psi_dim=16)
    order = torch.randperm(n, generator=gen)
    for batch in order.split(40):
        rep.update({"l": f[batch]}, {"l": g[batch]}, rows=batch)
    got = rep.grams(["l"], kind)
    rows = {"feature": f, "gradient": g}.get(kind)
    if rows is None:
        rows = psi.tensor_sketch_halves(f, g, 16, 3)
        assert got.halves == 2
    # The psi halves have their own bucket count (psi_buckets, 4 m by default).
    buckets = rep.options["psi_buckets"] if kind == "hadamard" else m
    assert buckets == (4 * m if kind == "hadamard" else m)
    want = est.gram_from_rows(rows, buckets, 3, sparsity)
    assert got.counts is not None and got.wide_deviation is not None
    for name in ("kernels", "deviation", "trace", "ones", "counts", "norm_deviation",
                 "wide_deviation"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-10, atol=1e-9,
                                   msg=name)
