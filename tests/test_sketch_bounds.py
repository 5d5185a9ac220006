"""Statistical properties of the sample-axis sketch S, and the paper's bounds (eqs. 15, 16).

S is the m x N CountSketch (sparsity s = 1) or OSNAP-style sparse embedding (s > 1)
of :mod:`nnsim_fast.ops`: every column holds s entries +-1/sqrt(s), one in each of s
blocks of m/s buckets.  Facts used below, for a hash that behaves as fully random
(they follow by expanding the products; independence of blocks gives the s > 1 case):

* ``(S^T S)_ii = 1`` exactly, and for i != j ``(S^T S)_ij`` has mean 0 and variance 1/m;
  it is bounded, ``|(S^T S)_ij| <= 1``, and ``E (S^T S)_ij^4 = 1/(s^2 m) + 3(s-1)/(s m^2)``.
* For columns a, b: ``E <Sa, Sb> = <a, b>`` and, for every s,
  ``Var <Sa, Sb> = (1/m) sum_{r != r'} (a_r^2 b_r'^2 + a_r b_r a_r' b_r')``.  Summed over
  the columns of Psi1 (N x d1) and Psi2 (N x d2) this gives the exact mean-square error
  of the sketched cross-Gram::

      E ||Psi1^T S^T S Psi2 - Psi1^T Psi2||_F^2 = V / m,
      V = ||Psi1||_F^2 ||Psi2||_F^2 + ||Psi1^T Psi2||_F^2 - 2 sum_r |psi1_r|^2 |psi2_r|^2

  (psi_r the r-th rows).  So the relative error of eq. 15 is O(sqrt(V / m) / ||Psi1^T Psi2||_F).

Every tolerance is a z-score at a stated false-alarm rate (Bonferroni over the checks of
one test), a concentration bound, or a rounding bound; seeds are fixed, so the tests are
deterministic.  The sketches here are applied to Psi (the N x d matrix of per-sample
vectors psi(x)), which is what the bounds are about; Algorithm 1's product of two
separately sketched Grams is a different estimator (see tests/test_psi.py).
"""
from __future__ import annotations

import functools
import math
from statistics import NormalDist
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch

import nnsim_fast
from nnsim_fast import ops

#: False-alarm rate of each test (split over its checks by a union bound).
ALPHA = 1e-4
F64 = torch.float64


def z_two_sided(alpha: float, checks: int = 1) -> float:
    """Gaussian z with P(|Z| > z) = alpha / checks."""
    return NormalDist().inv_cdf(1.0 - alpha / (2.0 * checks))


def z_one_sided(alpha: float, checks: int = 1) -> float:
    return NormalDist().inv_cdf(1.0 - alpha / checks)


@pytest.fixture(autouse=True)
def one_thread(restore_num_threads):
    # Hundreds of tiny sketches: on a shared 2-core machine, thread hand-offs would cost
    # more than the work.  The numbers do not depend on the thread count.
    torch.set_num_threads(1)


def exact_gram_mse_numerator(A: torch.Tensor, B: torch.Tensor) -> float:
    """V of the module docstring: m * E ||A^T S^T S B - A^T B||_F^2."""
    row_products = (A.square().sum(1) * B.square().sum(1)).sum()
    return float(A.square().sum() * B.square().sum() + (A.T @ B).square().sum()
                 - 2.0 * row_products)


@functools.lru_cache(maxsize=None)
def correlated_pair(n: int = 2000, d: int = 8, rank: int = 3, noise: float = 0.3,
                    seed: int = 11) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two data-centred N x d matrices sharing a rank-3 signal (like two layers' Psi)."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, rank, generator=g, dtype=F64)
    psi1 = Z @ torch.randn(rank, d, generator=g, dtype=F64)
    psi1 = psi1 + noise * torch.randn(n, d, generator=g, dtype=F64)
    psi2 = Z @ torch.randn(rank, d, generator=g, dtype=F64)
    psi2 = psi2 + noise * torch.randn(n, d, generator=g, dtype=F64)
    return psi1 - psi1.mean(0), psi2 - psi2.mean(0)


def sketch_both(psi1: torch.Tensor, psi2: torch.Tensor, m: int, seed: int, sparsity: int = 1
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(S Psi1, S Psi2) with one S, through the native CountSketch."""
    sketched = ops.countsketch(torch.cat([psi1, psi2], dim=1), m, seed, sparsity=sparsity)
    return sketched[:, :psi1.shape[1]], sketched[:, psi1.shape[1]:]


# --------------------------------------------------------------------------- the sketch itself

@pytest.mark.parametrize("sparsity", [1, 2, 8])
def test_dense_sketch_matrix_matches_hash_and_native_countsketch(sparsity):
    n, m, seed = 300, 32, 7
    S = ops.sketch_matrix(n, m, seed, sparsity=sparsity)
    buckets, signs = ops.sketch_hash(n, m, seed, sparsity=sparsity)
    by_hand = torch.zeros(m, n, dtype=F64)
    columns = torch.arange(n)
    width = m // sparsity
    for j in range(sparsity):
        # one bucket per block: block j covers [j*m/s, (j+1)*m/s)
        assert bool(((buckets[:, j] >= j * width) & (buckets[:, j] < (j + 1) * width)).all())
        by_hand[buckets[:, j], columns] = signs[:, j].to(F64) / math.sqrt(sparsity)
    assert torch.equal(S, by_hand)
    assert torch.equal(signs.abs(), torch.ones_like(signs))
    # unit columns: the diagonal of S^T S is exactly 1, the premise of unbiasedness
    torch.testing.assert_close(S.square().sum(0), torch.ones(n, dtype=F64), rtol=0, atol=1e-15)
    X = torch.randn(n, 5, generator=torch.Generator().manual_seed(1), dtype=F64)
    torch.testing.assert_close(ops.countsketch(X, m, seed, sparsity=sparsity), S @ X,
                               rtol=1e-13, atol=1e-13)
    # rows keyed by offset: a later chunk of the stream is the matching columns of S
    torch.testing.assert_close(ops.countsketch(X[100:], m, seed, 100, sparsity),
                               S[:, 100:] @ X[100:], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("sparsity", [1, 4])
def test_mean_of_StS_approaches_identity_at_clt_rate(sparsity):
    n, m, trials = 96, 16, 600
    sketches = torch.stack([ops.sketch_matrix(n, m, seed, sparsity=sparsity)
                            for seed in range(trials)])
    products = sketches.transpose(1, 2) @ sketches
    # the diagonal is exactly 1 in every draw (unit columns), not just on average
    torch.testing.assert_close(torch.diagonal(products, dim1=1, dim2=2),
                               torch.ones(trials, n, dtype=F64), rtol=0, atol=1e-14)
    mean = products.mean(0)
    pairs = n * (n - 1) // 2
    upper = mean[torch.triu_indices(n, n, 1).unbind()]

    # (1) max |mean_ij| over all pairs, against Bernstein's inequality for a mean of T
    # independent terms in [-1, 1] with variance 1/m, union bound over the pairs:
    # P(|mean| >= u) <= 2 exp(-T u^2 / (2 (1/m + u/3))).  Solve for u at ALPHA / 2.
    log_term = math.log(2 * pairs / (ALPHA / 2))
    a, b, c = trials, -2 * log_term / 3, -2 * log_term / m
    bernstein = (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)
    assert float(upper.abs().max()) <= bernstein

    # (2) the CLT rate: E mean_ij^2 = 1/(m T) exactly, and the squares of different pairs
    # are uncorrelated, so r = m T * average(mean_ij^2) has mean 1 and
    # sd = m T sqrt(Var(mean_ij^2) / pairs), with
    # E mean^4 = (T mu4 + 3 T (T-1) mu2^2) / T^4, mu2 = 1/m, mu4 from the module docstring.
    mu2 = 1.0 / m
    mu4 = 1.0 / (sparsity ** 2 * m) + 3.0 * (sparsity - 1) / (sparsity * m * m)
    fourth = (trials * mu4 + 3 * trials * (trials - 1) * mu2 ** 2) / trials ** 4
    variance_of_square = fourth - (mu2 / trials) ** 2
    ratio = float(upper.square().mean()) * m * trials
    sd = m * trials * math.sqrt(variance_of_square / pairs)
    assert abs(ratio - 1.0) <= z_two_sided(ALPHA / 2) * sd, (ratio, sd)


# --------------------------------------------------------------------------- eq. 15

M_GRID = (64, 128, 256, 512, 1024, 2048, 4096)
TRIALS_EQ15 = 120


@functools.lru_cache(maxsize=None)
def eq15_runs() -> Dict[str, np.ndarray]:
    """Per (m, seed): the squared Frobenius error of the sketched cross-Gram and the
    relative error of its norm, ||Psi1^T S^T S Psi2||_F / ||Psi1^T Psi2||_F - 1."""
    psi1, psi2 = correlated_pair()
    cross = psi1.T @ psi2
    norm = float(torch.linalg.matrix_norm(cross))
    sq_error = np.zeros((len(M_GRID), TRIALS_EQ15))
    relative = np.zeros_like(sq_error)
    for i, m in enumerate(M_GRID):
        for seed in range(TRIALS_EQ15):
            s1, s2 = sketch_both(psi1, psi2, m, seed)
            sketched = s1.T @ s2
            sq_error[i, seed] = float((sketched - cross).square().sum())
            relative[i, seed] = float(torch.linalg.matrix_norm(sketched)) / norm - 1.0
    return {"sq_error": sq_error, "relative": relative}


def test_sketched_cross_gram_error_has_the_exact_variance_v_over_m():
    psi1, psi2 = correlated_pair()
    V = exact_gram_mse_numerator(psi1, psi2)
    sq_error = eq15_runs()["sq_error"]
    z = z_two_sided(ALPHA, len(M_GRID))
    for i, m in enumerate(M_GRID):
        samples = sq_error[i]
        # CLT for the mean of T squared errors; se from the sample sd
        se = samples.std(ddof=1) / math.sqrt(samples.size)
        assert abs(samples.mean() - V / m) <= z * se, (m, samples.mean() * m / V, se * m / V)


def test_eq15_relative_error_shrinks_like_inverse_sqrt_m():
    """Fit log RMS(relative error) against log m over m = 64..4096: the slope is -1/2.

    Tolerance = z * se(slope) + a systematic allowance, both derived:
    * se: each point is y_i = log RMS_i; by the delta method Var(y_i) =
      Var(e^2) / (4 T (mean e^2)^2), estimated from the T samples; the least-squares
      slope is sum w_i y_i with w_i = (x_i - mean x) / S_xx, so se^2 = sum w_i^2 Var(y_i).
    * systematic: the leading term of the error is <Psi1^T Psi2, E> / ||Psi1^T Psi2||_F,
      whose sd is exactly sqrt(v / m).  The next term of the expansion of the norm is
      (||E||_F^2 - ...) / (2 ||Psi1^T Psi2||_F), of size c / (2m) with
      c = V / ||Psi1^T Psi2||_F^2 (exact, from the docstring formula); it can add at most
      twice its square to RMS^2, i.e. lift y_i by at most
      beta_i = 1/2 log(1 + c^2 / (2 m_i v)).  A lift of beta_i at point i moves the slope
      by at most |w_i| beta_i.
    """
    psi1, psi2 = correlated_pair()
    cross_norm_sq = float((psi1.T @ psi2).square().sum())
    c = exact_gram_mse_numerator(psi1, psi2) / cross_norm_sq
    relative = eq15_runs()["relative"]
    m = np.array(M_GRID, dtype=np.float64)
    x = np.log(m)
    mean_sq = (relative ** 2).mean(axis=1)
    y = 0.5 * np.log(mean_sq)
    var_y = (relative ** 2).var(axis=1, ddof=1) / (4 * relative.shape[1] * mean_sq ** 2)
    w = (x - x.mean()) / ((x - x.mean()) ** 2).sum()
    slope = float((w * y).sum())
    se = float(math.sqrt((w ** 2 * var_y).sum()))
    v = m[-1] * mean_sq[-1]          # the 1/m coefficient, where the next term is smallest
    beta = 0.5 * np.log1p(c ** 2 / (2 * m * v))
    allowance = float((np.abs(w) * beta).sum())
    tolerance = z_two_sided(ALPHA) * se + allowance
    assert abs(slope + 0.5) <= tolerance, (slope, se, allowance)
    # the relative error itself: its RMS at every m sits within the same band around
    # sqrt(v / m), and it is well below 1 from m = 64 on for these inputs
    assert float(np.sqrt(mean_sq[0])) < 0.5


def test_eq15_needs_the_frobenius_scale_when_the_premise_is_columnwise():
    """With the JL premise of the paper's proof (eq. 27: each column pair's inner product
    distorted by at most eps |a_i| |b_j|) the triangle inequality gives
    | ||Psi1^T S^T S Psi2||_F - ||Psi1^T Psi2||_F | <= eps ||Psi1||_F ||Psi2||_F,
    which holds in every draw.  The relative form eps ||Psi1^T Psi2||_F (eq. 40) does not
    follow from it: for Psi1^T Psi2 = 0 it would force the sketched product to vanish."""
    psi1, psi2 = correlated_pair()
    # Psi3: columns orthogonal to every column of Psi1
    q, _ = torch.linalg.qr(psi1)
    psi3 = psi2 - q @ (q.T @ psi2)
    assert float(torch.linalg.matrix_norm(psi1.T @ psi3)) < 1e-9 * float(
        torch.linalg.matrix_norm(psi1) * torch.linalg.matrix_norm(psi3))
    columns1 = psi1.norm(dim=0)
    for other in (psi2, psi3):
        exact = psi1.T @ other
        scale = torch.outer(columns1, other.norm(dim=0))
        for seed in range(20):
            s1, s2 = sketch_both(psi1, other, 256, seed)
            sketched = s1.T @ s2
            eps = float(((sketched - exact).abs() / scale).max())
            gap = abs(float(torch.linalg.matrix_norm(sketched)) - float(torch.linalg.matrix_norm(exact)))
            bound = eps * float(torch.linalg.matrix_norm(psi1) * torch.linalg.matrix_norm(other))
            assert gap <= bound * (1 + 1e-12)
            if other is psi3:
                assert gap > eps * float(torch.linalg.matrix_norm(exact))


# --------------------------------------------------------------------------- eq. 16

def cka_of_factors(psi1: torch.Tensor, psi2: torch.Tensor) -> float:
    """Eq. 45: ||Psi1^T Psi2||_F^2 / (||Psi1^T Psi1||_F ||Psi2^T Psi2||_F), the uncentred CKA
    of Psi1 Psi1^T and Psi2 Psi2^T computed through d x d products."""
    norm = torch.linalg.matrix_norm
    return float(norm(psi1.T @ psi2) ** 2 / (norm(psi1.T @ psi1) * norm(psi2.T @ psi2)))


def distortion(sketched: List[torch.Tensor], exact: List[torch.Tensor]) -> Tuple[float, float]:
    """(eps, rho_scka) of one draw: eps = max over the pairs (1,1), (2,2), (1,2) of
    | ||Psi_a^T S^T S Psi_b||_F / ||Psi_a^T Psi_b||_F - 1 | -- exactly the three
    instances of eq. 15 that the proof of eq. 16 (D.5, eqs. 42-43) combines."""
    s1, s2 = sketched
    e1, e2 = exact
    eps = max(abs(float(torch.linalg.matrix_norm(a.T @ b)) / float(torch.linalg.matrix_norm(c.T @ d)) - 1)
              for a, b, c, d in ((s1, s1, e1, e1), (s2, s2, e2, e2), (s1, s2, e1, e2)))
    return eps, cka_of_factors(s1, s2)


@pytest.mark.parametrize("sparsity", [1, 4])
def test_eq16_bound_holds_with_the_measured_distortion(sparsity):
    """|rho_SCKA - rho_CKA| <= 4 eps / (1 - eps)^2 rho_CKA.

    rho_SCKA is the CKA of S K1 S^T and S K2 S^T (K = Psi Psi^T, Psi data-centred, so the
    sketched kernels need no further centring: eq. 45 as written), checked against the
    library's ``cka``; rho_CKA is the library's centred CKA of the N x N kernels.

    (a) With eps measured per draw (see :func:`distortion`) the premise of the proof holds
        by construction, so the bound must hold in every draw with eps < 1.
    (b) The probabilistic form: eps_delta is the (1 - delta) quantile of the distortion over
        T calibration seeds; on T fresh seeds the bound with eps_delta must hold in at least
        a 1 - delta fraction.  Since the bound holds whenever the distortion is <= eps_delta,
        the fraction is at least Binomial(T, F(eps_delta)) / T with F(eps_delta) ~
        Beta(k, T + 1 - k); together sd ~ sqrt(delta (1 - delta) (2 / T)), and we allow
        z (one-sided, ALPHA) of them.
    """
    psi1, psi2 = correlated_pair()
    rho = nnsim_fast.cka(psi1 @ psi1.T, psi2 @ psi2.T)
    assert rho == pytest.approx(cka_of_factors(psi1, psi2), rel=1e-12)
    m, delta, trials = 256, 0.1, 150
    draws = []
    for seed in range(2 * trials):
        sketched = list(sketch_both(psi1, psi2, m, seed, sparsity))
        eps, rho_s = distortion(sketched, [psi1, psi2])
        if seed < 5:   # the library's index on the m x m sketched kernels agrees
            s1, s2 = sketched
            assert nnsim_fast.cka(s1 @ s1.T, s2 @ s2.T, centered=False) == pytest.approx(
                rho_s, rel=1e-12)
        draws.append((eps, rho_s))
    for eps, rho_s in draws:                                          # (a)
        assert eps < 1
        assert abs(rho_s - rho) <= 4 * eps / (1 - eps) ** 2 * rho * (1 + 1e-12) + 1e-15
    calibration = np.array([eps for eps, _ in draws[:trials]])        # (b)
    eps_delta = float(np.quantile(calibration, 1 - delta, method="higher"))
    fresh = draws[trials:]
    bound = 4 * eps_delta / (1 - eps_delta) ** 2 * rho
    fraction = np.mean([abs(rho_s - rho) <= bound for _, rho_s in fresh])
    slack = z_one_sided(ALPHA) * math.sqrt(delta * (1 - delta) * 2 / trials)
    assert fraction >= 1 - delta - slack, (fraction, eps_delta)
    # the bound is informative here (a relative error below 1)
    assert 4 * eps_delta / (1 - eps_delta) ** 2 < 1


# --------------------------------------------------------------------------- subspace embedding

@pytest.mark.parametrize("rank,m", [(4, 1024), (8, 4096)])
def test_subspace_embedding_singular_values(rank, m):
    """S is a (1 +- eps) subspace embedding of range(A) iff all eigenvalues of
    U^T S^T S U lie in [1 - eps, 1 + eps] (U an orthonormal basis of range(A)); then by
    Courant-Fischer sigma_i(SA)^2 / sigma_i(A)^2 is in the same interval.

    (a) With eps_t = ||U^T S^T S U - I||_2 measured in draw t, the singular values of SA
        obey the interval in every draw (to rounding).
    (b) When is m large enough?  E ||U^T S^T S U - I||_F^2 = V_U / m <= (r^2 + r) / m
        (docstring formula with Psi1 = Psi2 = U), and ||.||_2 <= ||.||_F, so by Markov
        P(eps_t > eps) <= V_U / (m eps^2).  At eps = sqrt(V_U / (m delta)) at least a
        1 - delta fraction of draws must embed within eps (binomial slack, z one-sided).
    """
    n, trials, delta = 1500, 100, 0.1
    g = torch.Generator().manual_seed(rank)
    U, _ = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=F64))
    W, _ = torch.linalg.qr(torch.randn(rank, rank, generator=g, dtype=F64))
    sigma = torch.logspace(2, -1, rank, dtype=F64)       # condition number 1000
    A = U @ torch.diag(sigma) @ W.T
    V_U = exact_gram_mse_numerator(U, U)
    assert V_U <= rank * rank + rank
    eps_delta = math.sqrt(V_U / (m * delta))
    assert eps_delta < 0.5
    eye = torch.eye(rank, dtype=F64)
    within = 0
    for seed in range(trials):
        SU = ops.countsketch(U, m, seed)
        eps_t = float(torch.linalg.matrix_norm(SU.T @ SU - eye, ord=2))
        ratio = torch.linalg.svdvals(ops.countsketch(A, m, seed)) / sigma
        rounding = 1e-10
        assert eps_t < 1
        assert bool((ratio >= math.sqrt(1 - eps_t) - rounding).all()), (ratio, eps_t)
        assert bool((ratio <= math.sqrt(1 + eps_t) + rounding).all()), (ratio, eps_t)
        within += eps_t <= eps_delta
    slack = z_one_sided(ALPHA) * math.sqrt(delta * (1 - delta) / trials)
    assert within / trials >= 1 - delta - slack


# --------------------------------------------------------------------------- sparsity

def test_sparsity_does_not_increase_the_error_at_equal_m():
    """OSNAP blocks (s > 1) versus CountSketch (s = 1) at m = 256.

    Theory: the mean-square error of every sketched inner product is the same V/m for all
    s, so neither the cross-Gram error nor (to first order) the CKA error may grow with s.
    Checks, each at ALPHA split over all of them (se from the seed-to-seed sd; a draw of
    one s and of s = 1 share a seed, so their errors are positively correlated and the
    independent-samples se of a difference is conservative):
    * m E||Psi1^T S^T S Psi2 - Psi1^T Psi2||_F^2 / V = 1 for each s (CLT);
    * RMS CKA error of s <= that of s = 1 + z se (delta method on the mean square);
    * median subspace distortion ||U^T S^T S U - I||_2 of s <= that of s = 1 + z se, with
      se(median) = sqrt(pi/2) sd / sqrt(T) (normal approximation).
    """
    m, trials, sparsities = 256, 150, (1, 2, 4, 8)
    checks = 3 * len(sparsities)
    z_two, z_one = z_two_sided(ALPHA, checks), z_one_sided(ALPHA, checks)
    psi1, psi2 = correlated_pair()
    cross = psi1.T @ psi2
    V = exact_gram_mse_numerator(psi1, psi2)
    rho = cka_of_factors(psi1, psi2)
    U, _ = torch.linalg.qr(torch.randn(1500, 4, generator=torch.Generator().manual_seed(5),
                                       dtype=F64))
    eye = torch.eye(4, dtype=F64)
    stats = {}
    for s in sparsities:
        gram, cka_error, embed = [], [], []
        for seed in range(trials):
            s1, s2 = sketch_both(psi1, psi2, m, seed, s)
            gram.append(float((s1.T @ s2 - cross).square().sum()))
            _, rho_s = distortion([s1, s2], [psi1, psi2])
            cka_error.append(rho_s - rho)
            SU = ops.countsketch(U, m, seed, sparsity=s)
            embed.append(float(torch.linalg.matrix_norm(SU.T @ SU - eye, ord=2)))
        stats[s] = tuple(np.array(v) for v in (gram, cka_error, embed))
    base_gram, base_cka, base_embed = stats[1]

    def rms_and_se(errors):
        sq = errors ** 2
        rms = math.sqrt(sq.mean())
        return rms, rms * sq.std(ddof=1) / (2 * sq.mean() * math.sqrt(errors.size))

    base_rms, base_rms_se = rms_and_se(base_cka)
    base_median_se = math.sqrt(math.pi / 2) * base_embed.std(ddof=1) / math.sqrt(trials)
    for s, (gram, cka_error, embed) in stats.items():
        se = gram.std(ddof=1) / math.sqrt(trials)
        assert abs(gram.mean() - V / m) <= z_two * se, (s, gram.mean() * m / V)
        if s == 1:
            continue
        rms, rms_se = rms_and_se(cka_error)
        assert rms <= base_rms + z_one * math.hypot(rms_se, base_rms_se), (s, rms, base_rms)
        median_se = math.sqrt(math.pi / 2) * embed.std(ddof=1) / math.sqrt(trials)
        assert np.median(embed) <= np.median(base_embed) + z_one * math.hypot(median_se, base_median_se)
