"""Tests of the similarity indices against independent float64 references.

References are written here with numpy/scipy straight from the published
formulas (explicit centring matrix H, scipy.linalg.sqrtm, singular values of
X1^T X2, Song et al.'s unbiased HSIC with zero-diagonal kernels), on fresh
random inputs with fixed seeds.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from nnsim_fast.indices import (
    PSD_RTOL,
    center_kernel,
    cka,
    cka_matrix,
    hsic,
    linear_cka,
    mean_embedding_norm_from_kernel,
    mean_embedding_ratios,
    nbs,
    nbs_matrix,
    validate_kernel,
)


# --------------------------------------------------------------------------- references

def centring_matrix(n: int) -> np.ndarray:
    return np.eye(n) - np.ones((n, n)) / n


def ref_cka(K1: np.ndarray, K2: np.ndarray, centered: bool = True) -> float:
    if centered:
        H = centring_matrix(K1.shape[0])
        K1, K2 = H @ K1 @ H, H @ K2 @ H
    return float(np.sum(K1 * K2) / (np.linalg.norm(K1) * np.linalg.norm(K2)))


def ref_hsic_biased(K: np.ndarray, L: np.ndarray) -> float:
    n = K.shape[0]
    H = centring_matrix(n)
    return float(np.trace(K @ H @ L @ H) / (n - 1) ** 2)


def ref_hsic_unbiased(K: np.ndarray, L: np.ndarray) -> float:
    """Song et al. (2012), eq. 5, with the diagonals of both kernels set to zero."""
    n = K.shape[0]
    K_t, L_t = K.copy(), L.copy()
    np.fill_diagonal(K_t, 0.0)
    np.fill_diagonal(L_t, 0.0)
    ones = np.ones(n)
    value = (np.trace(K_t @ L_t)
             + (ones @ K_t @ ones) * (ones @ L_t @ ones) / ((n - 1) * (n - 2))
             - 2.0 / (n - 2) * (ones @ K_t @ L_t @ ones))
    return float(value / (n * (n - 3)))


def ref_linear_cka_kornblith(X: np.ndarray, Y: np.ndarray) -> float:
    """Kornblith et al. (2019): HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), K = X X^T."""
    K, L = X @ X.T, Y @ Y.T
    return ref_hsic_biased(K, L) / math.sqrt(ref_hsic_biased(K, K) * ref_hsic_biased(L, L))


def ref_debiased_cka(X: np.ndarray, Y: np.ndarray) -> float:
    K, L = X @ X.T, Y @ Y.T
    return ref_hsic_unbiased(K, L) / math.sqrt(ref_hsic_unbiased(K, K) * ref_hsic_unbiased(L, L))


def ref_nbs_sqrtm(K1: np.ndarray, K2: np.ndarray) -> float:
    root = scipy.linalg.sqrtm(K1)
    inner = scipy.linalg.sqrtm(root @ K2 @ root)
    return float(np.trace(inner).real / math.sqrt(np.trace(K1) * np.trace(K2)))


def ref_nbs_features(X1: np.ndarray, X2: np.ndarray) -> float:
    """Eq. 13: nuclear norm of Psi1 Psi2^T over ||Psi1||_F ||Psi2||_F, Psi = X^T."""
    singular = np.linalg.svd(X1.T @ X2, compute_uv=False)
    return float(singular.sum() / (np.linalg.norm(X1) * np.linalg.norm(X2)))


def random_orthogonal(rng: np.random.Generator, d: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


def random_psd(rng: np.random.Generator, n: int, rank: int | None = None) -> np.ndarray:
    factor = rng.normal(size=(n, rank or n))
    return factor @ factor.T


def related_features(rng: np.random.Generator, n: int, dx: int, dy: int, noise: float = 1.0):
    X = rng.normal(size=(n, dx)) + rng.normal(size=dx)
    Y = np.tanh(X @ rng.normal(size=(dx, dy))) + noise * rng.normal(size=(n, dy)) + 2.0
    return X, Y


def t(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))


# --------------------------------------------------------------------------- centring

def test_center_kernel_matches_explicit_h_k_h_and_batches():
    rng = np.random.default_rng(0)
    K = rng.normal(size=(9, 9))
    H = centring_matrix(9)
    centred = center_kernel(t(K))
    assert centred.dtype == torch.float64
    np.testing.assert_allclose(centred.numpy(), H @ K @ H, rtol=0, atol=1e-12)

    stack = rng.normal(size=(2, 3, 7, 7))
    centred_stack = center_kernel(t(stack).float())
    assert centred_stack.dtype == torch.float64 and centred_stack.shape == (2, 3, 7, 7)
    H7 = centring_matrix(7)
    for i in range(2):
        for j in range(3):
            expected = H7 @ stack[i, j].astype(np.float32).astype(np.float64) @ H7
            np.testing.assert_allclose(centred_stack[i, j].numpy(), expected, rtol=0, atol=1e-12)


def test_centred_gram_equals_gram_of_centred_features():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(20, 4)) + 5.0
    Xc = X - X.mean(axis=0)
    np.testing.assert_allclose(center_kernel(t(X @ X.T)).numpy(), Xc @ Xc.T, atol=1e-10)


# --------------------------------------------------------------------------- CKA

def test_cka_matches_reference_identity_and_symmetry():
    rng = np.random.default_rng(2)
    X, Y = related_features(rng, 50, 6, 4)
    K1, K2 = X @ X.T, Y @ Y.T
    for centered in (True, False):
        value = cka(t(K1), t(K2), centered=centered)
        assert isinstance(value, float)
        assert value == pytest.approx(ref_cka(K1, K2, centered), abs=1e-12)
        assert cka(t(K2), t(K1), centered=centered) == pytest.approx(value, abs=1e-14)
        assert cka(t(K1), t(K1), centered=centered) == pytest.approx(1.0, abs=1e-14)
        assert 0.0 <= value <= 1.0


def test_cka_of_linear_kernels_invariances():
    rng = np.random.default_rng(3)
    X, Y = related_features(rng, 60, 8, 5)
    base = cka(t(X @ X.T), t(Y @ Y.T))
    assert 0.05 < base < 0.99  # a non-trivial value, so the invariances mean something

    Q = random_orthogonal(rng, 8)
    Xq = X @ Q
    assert cka(t(Xq @ Xq.T), t(Y @ Y.T)) == pytest.approx(base, abs=1e-12)
    Xs = 7.3 * X
    assert cka(t(Xs @ Xs.T), t(Y @ Y.T)) == pytest.approx(base, abs=1e-12)
    Xp = X[:, rng.permutation(8)]
    assert cka(t(Xp @ Xp.T), t(Y @ Y.T)) == pytest.approx(base, abs=1e-12)
    # Centred CKA ignores a translation of the features; the uncentred index does not.
    Xt = X + rng.normal(size=8) * 3
    assert cka(t(Xt @ Xt.T), t(Y @ Y.T)) == pytest.approx(base, abs=1e-12)
    assert cka(t(Xt @ Xt.T), t(Y @ Y.T), centered=False) != pytest.approx(
        cka(t(X @ X.T), t(Y @ Y.T), centered=False), abs=1e-6)
    # Reordering the samples consistently in both kernels changes nothing.
    order = rng.permutation(60)
    K1, K2 = X @ X.T, Y @ Y.T
    assert cka(t(K1[np.ix_(order, order)]), t(K2[np.ix_(order, order)])) == pytest.approx(base, abs=1e-12)


def test_cka_of_independent_kernels_is_small_for_large_n():
    rng = np.random.default_rng(4)
    n = 1500
    X = rng.normal(size=(n, 4))
    Y = rng.normal(size=(n, 4))
    assert cka(t(X @ X.T), t(Y @ Y.T)) < 0.02
    assert linear_cka(t(X), t(Y)) < 0.02
    assert abs(linear_cka(t(X), t(Y), debiased=True)) < 0.01
    # A dependent pair with the same dimensions scores far higher.
    assert linear_cka(t(X), t(X[:, :2] + 0.1 * Y[:, :2])) > 0.4


def test_cka_degenerate_kernels_give_zero_not_nan():
    rng = np.random.default_rng(5)
    K = random_psd(rng, 12)
    zero = np.zeros((12, 12))
    constant = np.full((12, 12), 0.1)  # centres to zero
    shift = rng.normal(size=12)
    additive = np.add.outer(shift, shift)  # centres to zero in exact arithmetic, to rounding noise here
    assert np.linalg.norm(center_kernel(t(additive)).numpy()) > 0
    for degenerate in (zero, constant, additive):
        assert cka(t(degenerate), t(K)) == 0.0
        assert cka(t(K), t(degenerate)) == 0.0
        assert cka(t(degenerate), t(degenerate)) == 0.0
    assert cka(t(zero), t(K), centered=False) == 0.0
    # A constant kernel plus a perturbation below float64 resolution: still degenerate.
    nearly_constant = np.ones((12, 12)) + 3e-16 * K / np.abs(K).max()
    assert np.unique(nearly_constant).size > 1
    assert cka(t(nearly_constant), t(K)) == 0.0
    assert nbs(t(nearly_constant), t(K)) == 0.0
    # A constant kernel is not degenerate without centring.
    assert cka(t(constant), t(constant), centered=False) == pytest.approx(1.0)


def test_cka_is_scale_free_for_extreme_magnitudes():
    rng = np.random.default_rng(6)
    X, Y = related_features(rng, 30, 5, 5)
    K1, K2 = X @ X.T, Y @ Y.T
    base = cka(t(K1), t(K2))
    assert cka(t(K1 * 1e200), t(K2 * 1e-200)) == pytest.approx(base, abs=1e-12)
    assert nbs(t(K1 * 1e200), t(K2 * 1e-200)) == pytest.approx(nbs(t(K1), t(K2)), abs=1e-12)


# --------------------------------------------------------------------------- eq. 14 and NBS

@pytest.mark.parametrize("seed", [7, 8, 9])
def test_eq14_cka_bounded_by_nbs_of_squared_kernels(seed):
    """Eq. 14 (proof in appendix D.1): rho_CKA(K1, K2) <= rho_NBS(K1^2, K2^2) for PSD K1, K2."""
    rng = np.random.default_rng(seed)
    n = 25
    K1 = random_psd(rng, n, rank=6)
    K2 = random_psd(rng, n, rank=4) + 0.5 * K1
    # The statement as written: eq. 10 and eq. 11 on the kernels as given.
    lhs = cka(t(K1), t(K2), centered=False)
    rhs = nbs(t(K1 @ K1), t(K2 @ K2), centered=False)
    assert lhs <= rhs + 1e-12
    assert lhs < 1.0 and rhs < 1.0
    # The same with centred kernels (Kc is PSD, and centring Kc^2 leaves it unchanged).
    K1c, K2c = center_kernel(t(K1)), center_kernel(t(K2))
    assert cka(t(K1), t(K2)) <= nbs(K1c @ K1c, K2c @ K2c) + 1e-12
    assert nbs(K1c @ K1c, K2c @ K2c) == pytest.approx(nbs(K1c @ K1c, K2c @ K2c, centered=False), abs=1e-12)


def test_nbs_matches_scipy_sqrtm_on_random_psd():
    rng = np.random.default_rng(10)
    for n in (5, 17, 40):
        K1 = random_psd(rng, n)
        K2 = random_psd(rng, n) + 0.3 * K1
        value = nbs(t(K1), t(K2), centered=False)
        assert isinstance(value, float)
        assert value == pytest.approx(ref_nbs_sqrtm(K1, K2), abs=1e-10)
        H = centring_matrix(n)
        # Centring makes the kernels singular, which sqrtm handles poorly; eq. 13 does not.
        factor1 = np.linalg.cholesky(K1)
        factor2 = np.linalg.cholesky(K2)
        assert nbs(t(K1), t(K2)) == pytest.approx(ref_nbs_features(H @ factor1, H @ factor2), abs=1e-10)


def test_nbs_identity_symmetry_range_and_invariances():
    rng = np.random.default_rng(11)
    X, Y = related_features(rng, 40, 6, 3)
    K1, K2 = X @ X.T, Y @ Y.T
    base = nbs(t(K1), t(K2))
    assert 0.05 < base < 0.99
    assert nbs(t(K2), t(K1)) == pytest.approx(base, abs=1e-12)
    assert nbs(t(K1), t(K1)) == pytest.approx(1.0, abs=1e-12)
    assert nbs(t(K1), t(3.0 * K1)) == pytest.approx(1.0, abs=1e-12)
    Xq = 0.01 * (X @ random_orthogonal(rng, 6))
    assert nbs(t(Xq @ Xq.T), t(K2)) == pytest.approx(base, abs=1e-12)
    Xp = X[:, rng.permutation(6)] + 4.0
    assert nbs(t(Xp @ Xp.T), t(K2)) == pytest.approx(base, abs=1e-12)
    for seed in range(5):
        local = np.random.default_rng(100 + seed)
        A = random_psd(local, 15, rank=local.integers(1, 15))
        B = random_psd(local, 15, rank=local.integers(1, 15))
        for centered in (True, False):
            value = nbs(t(A), t(B), centered=centered)
            assert 0.0 <= value <= 1.0


def test_nbs_on_rank_deficient_kernels_is_finite_and_exact():
    rng = np.random.default_rng(12)
    for n, rank in ((60, 1), (60, 3), (120, 10), (30, 29)):
        X1 = rng.normal(size=(n, rank))
        X2 = X1 @ rng.normal(size=(rank, rank)) + 0.2 * rng.normal(size=(n, rank))
        value = nbs(t(X1 @ X1.T), t(X2 @ X2.T), centered=False)
        assert math.isfinite(value)
        assert value == pytest.approx(ref_nbs_features(X1, X2), abs=1e-10)
        X1c, X2c = X1 - X1.mean(axis=0), X2 - X2.mean(axis=0)
        assert nbs(t(X1 @ X1.T), t(X2 @ X2.T)) == pytest.approx(ref_nbs_features(X1c, X2c), abs=1e-10)
    K = random_psd(rng, 20, rank=2)
    assert nbs(t(K), t(K)) == pytest.approx(1.0, abs=1e-10)


def test_nbs_degenerate_gives_zero_and_invalid_kernels_raise():
    rng = np.random.default_rng(13)
    K = random_psd(rng, 10)
    assert nbs(t(np.zeros((10, 10))), t(K)) == 0.0
    assert nbs(t(np.ones((10, 10))), t(K)) == 0.0  # zero after centring
    indefinite = rng.normal(size=(10, 10))
    indefinite = indefinite + indefinite.T
    with pytest.raises(ValueError, match="K2 must be positive semidefinite"):
        nbs(t(K), t(indefinite))
    asymmetric = K + np.triu(np.full((10, 10), 5.0), 1)
    with pytest.raises(ValueError, match="K1 must be symmetric"):
        nbs(t(asymmetric), t(K))
    # Rounding-level asymmetry and negative eigenvalues (a float32 Gram) are accepted.
    X = rng.normal(size=(10, 3)).astype(np.float32)
    gram32 = torch.from_numpy(X) @ torch.from_numpy(X).T
    assert nbs(gram32, gram32) == pytest.approx(1.0, abs=1e-9)
    assert 0 < PSD_RTOL < 1e-1


# --------------------------------------------------------------------------- HSIC and linear CKA

def test_hsic_matches_published_estimators():
    rng = np.random.default_rng(14)
    X, Y = related_features(rng, 35, 5, 4)
    K, L = X @ X.T, Y @ Y.T
    assert hsic(t(K), t(L)) == pytest.approx(ref_hsic_biased(K, L), rel=1e-12)
    assert hsic(t(K), t(L), debiased=True) == pytest.approx(ref_hsic_unbiased(K, L), rel=1e-10)
    # Non-linear kernels too: the estimators are defined for any kernel.
    sq = np.sum((X[:, None] - X[None]) ** 2, axis=-1)
    rbf = np.exp(-sq / 10.0)
    assert hsic(t(rbf), t(L), debiased=True) == pytest.approx(ref_hsic_unbiased(rbf, L), rel=1e-10)
    assert hsic(t(rbf), t(L)) == pytest.approx(ref_hsic_biased(rbf, L), rel=1e-12)


def test_linear_cka_matches_kernel_form_and_references():
    rng = np.random.default_rng(15)
    for n, dx, dy in ((30, 4, 9), (80, 12, 3), (6, 2, 2)):
        X, Y = related_features(rng, n, dx, dy)
        value = linear_cka(t(X), t(Y))
        assert isinstance(value, float)
        assert value == pytest.approx(cka(t(X @ X.T), t(Y @ Y.T)), abs=1e-12)
        assert value == pytest.approx(ref_linear_cka_kornblith(X, Y), abs=1e-12)
        debiased = linear_cka(t(X), t(Y), debiased=True)
        assert debiased == pytest.approx(ref_debiased_cka(X, Y), abs=1e-10)
        assert debiased == pytest.approx(cka(t(X @ X.T), t(Y @ Y.T), debiased=True), abs=1e-10)
        assert -1.0 <= debiased <= 1.0


def test_linear_cka_invariances_and_identity():
    rng = np.random.default_rng(16)
    X, Y = related_features(rng, 70, 6, 6)
    base = linear_cka(t(X), t(Y))
    base_debiased = linear_cka(t(X), t(Y), debiased=True)
    Xq = 1e-3 * (X @ random_orthogonal(rng, 6)) + 10.0
    assert linear_cka(t(Xq), t(Y)) == pytest.approx(base, abs=1e-10)
    assert linear_cka(t(Xq), t(Y), debiased=True) == pytest.approx(base_debiased, abs=1e-10)
    assert linear_cka(t(X), t(X)) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(t(X), t(X), debiased=True) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(t(Y), t(X)) == pytest.approx(base, abs=1e-14)


def test_linear_cka_degenerate_features_give_zero_not_nan():
    rng = np.random.default_rng(17)
    # Identical rows: the centred features are rounding noise (not exactly zero for n = 7).
    identical_rows = np.tile(rng.normal(size=4), (7, 1))
    Y = rng.normal(size=(7, 3))
    for X in (np.zeros((7, 4)), np.full((7, 4), 0.1), identical_rows):
        assert linear_cka(t(X), t(Y)) == 0.0
        assert linear_cka(t(X), t(Y), debiased=True) == 0.0
        assert linear_cka(t(Y), t(X)) == 0.0
    # One orthonormal feature vector per sample: the U-centred kernel (identity) vanishes,
    # up to rounding noise that must not be read as a similarity.
    assert linear_cka(t(np.eye(7)), t(Y), debiased=True) == 0.0
    assert linear_cka(t(np.eye(16)), t(rng.normal(size=(16, 3))), debiased=True) == 0.0
    assert cka(t(np.eye(16)), t(random_psd(rng, 16)), debiased=True) == 0.0
    assert linear_cka(t(np.ones((1, 3))), t(np.ones((1, 2)))) == 0.0


# --------------------------------------------------------------------------- matrices

def test_cka_matrix_equals_loop_of_cka():
    rng = np.random.default_rng(18)
    n = 16
    stack_a = np.stack([random_psd(rng, n, rank=r) for r in (2, 5, 16)] + [np.zeros((n, n))])
    stack_b = np.stack([random_psd(rng, n, rank=r) for r in (1, 8)] + [stack_a[1] * 2.0])
    for centered, debiased in ((True, False), (False, False), (True, True)):
        table = cka_matrix(t(stack_a), t(stack_b), centered=centered, debiased=debiased)
        assert table.dtype == torch.float64 and table.shape == (4, 3)
        for i in range(4):
            for j in range(3):
                expected = cka(t(stack_a[i]), t(stack_b[j]), centered=centered, debiased=debiased)
                assert float(table[i, j]) == pytest.approx(expected, abs=1e-12)
    assert float(cka_matrix(t(stack_a), t(stack_b))[1, 2]) == pytest.approx(1.0, abs=1e-12)
    from_lists = cka_matrix([t(K).float() for K in stack_a], list(t(stack_b)))
    np.testing.assert_allclose(
        from_lists.numpy(), cka_matrix(t(stack_a).float(), t(stack_b)).numpy(), atol=1e-14)


def test_nbs_matrix_equals_loop_of_nbs():
    rng = np.random.default_rng(19)
    n = 14
    stack_a = np.stack([random_psd(rng, n, rank=r) for r in (3, 14)] + [np.zeros((n, n))])
    stack_b = np.stack([random_psd(rng, n, rank=r) for r in (1, 6)] + [5.0 * stack_a[0]])
    for centered in (True, False):
        table = nbs_matrix(t(stack_a), t(stack_b), centered=centered)
        assert table.dtype == torch.float64 and table.shape == (3, 3)
        for i in range(3):
            for j in range(3):
                expected = nbs(t(stack_a[i]), t(stack_b[j]), centered=centered)
                assert float(table[i, j]) == pytest.approx(expected, abs=1e-12)
        assert float(table[0, 2]) == pytest.approx(1.0, abs=1e-10)
        assert torch.all(table[2] == 0.0)


def test_nbs_matrix_of_a_stack_with_itself_equals_loop_of_nbs():
    # The symmetric path (Ks_b omitted) computes each unordered pair once.
    rng = np.random.default_rng(23)
    n = 12
    stack = np.stack([random_psd(rng, n, rank=r) for r in (2, 5, 12)] + [np.zeros((n, n))])
    for centered in (True, False):
        table = nbs_matrix(t(stack), centered=centered)
        assert table.shape == (4, 4) and torch.equal(table, table.T)
        for i in range(4):
            for j in range(4):
                expected = nbs(t(stack[i]), t(stack[j]), centered=centered)
                assert float(table[i, j]) == pytest.approx(expected, abs=1e-12)


# --------------------------------------------------------------------------- bad input

SQUARE = torch.eye(5, dtype=torch.float64)


@pytest.mark.parametrize("call, error, pattern", [
    (lambda: cka(torch.zeros(5, 4, dtype=torch.float64), SQUARE), ValueError, r"K1 .*\(5, 4\)"),
    (lambda: cka(SQUARE, torch.eye(6, dtype=torch.float64)), ValueError, r"K1 and K2 .*\(5, 5\).*\(6, 6\)"),
    (lambda: cka(torch.zeros(5, dtype=torch.float64), SQUARE), ValueError, r"K1 .*\(5,\)"),
    (lambda: cka(SQUARE, torch.eye(5, dtype=torch.int64)), TypeError, r"K2 .*int64"),
    (lambda: cka(SQUARE, torch.zeros(2, 5, 5, dtype=torch.float64)), ValueError, r"K2 .*\(2, 5, 5\)"),
    (lambda: cka(SQUARE, SQUARE, centered=False, debiased=True), ValueError, r"centered=False"),
    (lambda: cka(torch.eye(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64), debiased=True),
     ValueError, r"n > 3.*K1 .*\(3, 3\)"),
    (lambda: cka([[1.0]], SQUARE), TypeError, r"K1 must be a torch.Tensor"),
    (lambda: nbs(torch.zeros(4, 5, dtype=torch.float64), SQUARE), ValueError, r"K1 .*\(4, 5\)"),
    (lambda: nbs(SQUARE, torch.eye(4, dtype=torch.float64)), ValueError, r"K1 and K2 .*\(5, 5\).*\(4, 4\)"),
    (lambda: nbs(SQUARE, torch.eye(5, dtype=torch.int32)), TypeError, r"K2 .*int32"),
    (lambda: nbs(SQUARE, torch.full((5, 5), float("nan"), dtype=torch.float64)), ValueError, r"K2 .*NaN"),
    (lambda: hsic(SQUARE, torch.zeros(5, 3, dtype=torch.float64)), ValueError, r"L .*\(5, 3\)"),
    (lambda: hsic(torch.eye(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64), debiased=True),
     ValueError, r"n > 3.*K .*\(3, 3\)"),
    (lambda: hsic(torch.eye(1, dtype=torch.float64), torch.eye(1, dtype=torch.float64)),
     ValueError, r"n >= 2.*K "),
    (lambda: hsic(torch.eye(5, dtype=torch.bool), SQUARE), TypeError, r"K .*bool"),
    (lambda: linear_cka(torch.zeros(5, 3, dtype=torch.float64), torch.zeros(6, 3, dtype=torch.float64)),
     ValueError, r"X .*\(5, 3\).*Y .*\(6, 3\)"),
    (lambda: linear_cka(torch.zeros(5, dtype=torch.float64), torch.zeros(5, 3, dtype=torch.float64)),
     ValueError, r"X .*\(5,\)"),
    (lambda: linear_cka(torch.zeros(5, 3), torch.zeros(5, 2, 2)), ValueError, r"Y .*\(5, 2, 2\)"),
    (lambda: linear_cka(torch.zeros(5, 3), torch.zeros(5, 3, dtype=torch.int64)), TypeError, r"Y .*int64"),
    (lambda: linear_cka(torch.randn(3, 2), torch.randn(3, 2), debiased=True),
     ValueError, r"n > 3.*X .*\(3, 2\)"),
    (lambda: cka_matrix(torch.zeros(2, 5, 5), torch.zeros(3, 6, 6)),
     ValueError, r"Ks_a and Ks_b .*\(2, 5, 5\).*\(3, 6, 6\)"),
    (lambda: cka_matrix(torch.zeros(5, 5), torch.zeros(3, 5, 5)), ValueError, r"Ks_a .*3-D.*\(5, 5\)"),
    (lambda: cka_matrix([torch.zeros(5, 5), torch.zeros(4, 4)], torch.zeros(1, 5, 5)),
     ValueError, r"Ks_a\[1\] .*\(4, 4\)"),
    (lambda: cka_matrix([], torch.zeros(1, 5, 5)), TypeError, r"Ks_a"),
    (lambda: nbs_matrix(torch.zeros(2, 5, 4), torch.zeros(3, 5, 5)), ValueError, r"Ks_a .*\(2, 5, 4\)"),
    (lambda: nbs_matrix(torch.zeros(2, 5, 5), torch.zeros(3, 5, 5, dtype=torch.int64)),
     TypeError, r"Ks_b .*int64"),
    (lambda: mean_embedding_norm_from_kernel(torch.zeros(3, 4)), ValueError, r"K .*\(3, 4\)"),
    (lambda: mean_embedding_ratios(torch.ones(3, 3, dtype=torch.int64)), TypeError, r"K .*int64"),
    (lambda: mean_embedding_norm_from_kernel(-torch.ones(4, 4)), ValueError, r"K must be a PSD"),
    (lambda: center_kernel(torch.zeros(4)), ValueError, r"K .*\(4,\)"),
    (lambda: validate_kernel(torch.zeros(0, 0), "Kx"), ValueError, r"Kx .*\(0, 0\)"),
])
def test_bad_input_raises_and_names_the_argument(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_validate_kernel_accepts_single_and_batched():
    validate_kernel(torch.zeros(4, 4), "K")
    validate_kernel(torch.zeros(2, 3, 4, 4, dtype=torch.float16), "K")
    validate_kernel(torch.zeros(3, 4, 4), "Ks", ndim=3)
    with pytest.raises(ValueError, match=r"Ks must be a 3-D"):
        validate_kernel(torch.zeros(4, 4), "Ks", ndim=3)


# --------------------------------------------------------------------------- precision

def test_float32_and_half_inputs_give_float64_accurate_results():
    rng = np.random.default_rng(20)
    X, Y = related_features(rng, 64, 8, 5)
    X32 = torch.from_numpy(X.astype(np.float32))
    Y32 = torch.from_numpy(Y.astype(np.float32))
    X64, Y64 = X32.double(), Y32.double()
    K32, L32 = X32 @ X32.T, Y32 @ Y32.T  # a float32 Gram, as a sketch would produce
    K64, L64 = K32.double(), L32.double()

    def close(value32, value64):
        assert value32 == pytest.approx(value64, rel=1e-6, abs=1e-12)

    close(linear_cka(X32, Y32), ref_linear_cka_kornblith(X64.numpy(), Y64.numpy()))
    close(linear_cka(X32, Y32, debiased=True), ref_debiased_cka(X64.numpy(), Y64.numpy()))
    close(cka(K32, L32), ref_cka(K64.numpy(), L64.numpy()))
    close(cka(K32, L32, debiased=True), cka(K64, L64, debiased=True))
    close(nbs(K32, L32), nbs(K64, L64))
    close(hsic(K32, L32, debiased=True), ref_hsic_unbiased(K64.numpy(), L64.numpy()))
    close(mean_embedding_norm_from_kernel(K32), mean_embedding_norm_from_kernel(K64))
    table = cka_matrix(torch.stack([K32, L32]), torch.stack([L32]))
    assert table.dtype == torch.float64
    close(float(table[0, 0]), ref_cka(K64.numpy(), L64.numpy()))
    # Half precision goes through the same float64 path.
    K16 = K32.half()
    close(cka(K16, L32), ref_cka(K16.double().numpy(), L64.numpy()))


# --------------------------------------------------------------------------- mean embedding

def test_mean_embedding_norm_equals_norm_of_mean_psi():
    """Eq. 17-18: with psi(x) = g f^T, the Hadamard kernel's mean is ||E psi||_F^2."""
    rng = np.random.default_rng(21)
    N, df, dg = 40, 5, 3
    F = rng.normal(size=(N, df)) + 0.5
    G = rng.normal(size=(N, dg)) * 0.1 + 0.2
    kernel = (F @ F.T) * (G @ G.T)
    psi = np.einsum("ng,nf->ngf", G, F)
    expected = np.linalg.norm(psi.mean(axis=0))
    assert mean_embedding_norm_from_kernel(t(kernel)) == pytest.approx(expected, rel=1e-12)

    ratios = mean_embedding_ratios(t(kernel))
    psi_flat = psi.reshape(N, -1)
    gram = psi_flat @ psi_flat.T
    assert ratios["norm"] == pytest.approx(expected, rel=1e-12)
    assert ratios["frobenius_factor"] == pytest.approx(np.linalg.norm(gram) / N ** 2, rel=1e-12)
    assert ratios["trace_factor"] == pytest.approx(np.linalg.norm(psi_flat) / N, rel=1e-12)
    assert ratios["ratio_frobenius"] == pytest.approx(expected / (np.linalg.norm(gram) / N ** 2), rel=1e-12)
    assert ratios["ratio_trace"] == pytest.approx(expected / (np.linalg.norm(psi_flat) / N), rel=1e-12)
    assert ratios["log_ratio_frobenius"] == pytest.approx(math.log(ratios["ratio_frobenius"]), rel=1e-12)
    assert 0.0 <= ratios["ratio_trace"] <= math.sqrt(N)


def test_mean_embedding_ratio_scaling_and_zero_kernel():
    rng = np.random.default_rng(22)
    K = random_psd(rng, 30, rank=4) + 1.0
    base = mean_embedding_ratios(t(K))
    scaled = mean_embedding_ratios(t(9.0 * K))
    assert scaled["ratio_trace"] == pytest.approx(base["ratio_trace"], rel=1e-12)
    assert scaled["ratio_frobenius"] == pytest.approx(base["ratio_frobenius"] / 3.0, rel=1e-12)
    assert scaled["norm"] == pytest.approx(3.0 * base["norm"], rel=1e-12)
    zero = mean_embedding_ratios(torch.zeros(6, 6))
    assert zero["norm"] == 0.0 and zero["ratio_frobenius"] == 0.0 and zero["ratio_trace"] == 0.0
    assert zero["log_ratio_frobenius"] == -math.inf
    # Centred features have a zero mean embedding even though the kernel is not zero.
    X = rng.normal(size=(10, 3))
    Xc = X - X.mean(axis=0)
    assert mean_embedding_norm_from_kernel(t(Xc @ Xc.T)) == pytest.approx(0.0, abs=1e-7)


# --------------------------------------------------------------------------- zero rows

def _padded(K: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros((n, n))
    out[np.ix_(rows, rows)] = K
    return out


def test_nbs_of_kernels_with_many_zero_rows():
    """A sketched kernel with far more buckets than rows is mostly zero rows (empty buckets):
    NBS on the padded kernels equals the reference on the occupied block, and does not depend
    on LAPACK converging on thousands of equal eigenvalues."""
    rng = np.random.default_rng()
    occupied = np.sort(rng.choice(2048, size=37, replace=False))
    features = [rng.standard_normal((37, 6)) * rng.uniform(0.5, 2.0, 6) * 1e-2 for _ in range(3)]
    reference = ref_nbs_features(features[0], features[1])
    padded = [torch.from_numpy(_padded(X @ X.T, occupied, 2048)) for X in features]
    assert nbs(padded[0], padded[1], centered=False) == pytest.approx(reference, abs=1e-9)
    matrix = nbs_matrix(torch.stack(padded[:2]), torch.stack(padded[1:]), centered=False)
    assert float(matrix[0, 0]) == pytest.approx(reference, abs=1e-9)
    assert float(matrix[1, 0]) == pytest.approx(1.0, abs=1e-9)
    assert float(matrix[0, 1]) == pytest.approx(ref_nbs_features(features[0], features[2]),
                                                abs=1e-9)


def test_symmetric_eigh_falls_back_when_lapack_does_not_converge(monkeypatch):
    """Where torch's eigh reports no convergence, SciPy's evr driver gives the
    decomposition: eigenvalues as numpy's, and vectors that rebuild the matrices."""
    from nnsim_fast import indices

    def refuse(_):
        raise torch.linalg.LinAlgError("linalg.eigh: the algorithm failed to converge")

    X = torch.randn(2, 3, 9, 4, dtype=torch.float64)
    K = X @ X.transpose(-1, -2)
    monkeypatch.setattr(torch.linalg, "eigh", refuse)
    values, vectors = indices.symmetric_eigh(K)
    assert values.shape == K.shape[:-1] and vectors.shape == K.shape
    np.testing.assert_allclose(values.numpy(), np.linalg.eigvalsh(K.numpy()), atol=1e-10)
    rebuilt = (vectors * values.unsqueeze(-2)) @ vectors.transpose(-1, -2)
    torch.testing.assert_close(rebuilt, K, atol=1e-10, rtol=1e-10)


def test_plugin_nbs_of_a_sketch_with_mostly_empty_buckets():
    """40 rows in 2048 psi buckets (a small data set at the default m): the plug-in NBS is the
    reference NBS of the occupied buckets' block (this sketch once made LAPACK's eigh fail)."""
    import warnings

    import nnsim_fast

    torch.manual_seed(0)
    x = torch.randn(40, 5)
    models = [torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 6),
                                  torch.nn.Linear(6, 3)) for _ in range(2)]
    reps = [nnsim_fast.sketch_model(model, [x], layers=["0", "2"], m=512, seed=0, progress=False)
            for model in models]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = nnsim_fast.similarity(reps[0], reps[1], index="nbs").matrix
        grams = [rep.grams(["0", "2"], "hadamard") for rep in reps]
    for i in range(2):
        for j in range(2):
            pairs = []
            for x_half, y_half in ((0, 1), (1, 0)):
                a, b = grams[0].kernels[i, x_half].numpy(), grams[1].kernels[j, y_half].numpy()
                rows = np.flatnonzero(np.abs(a).sum(0) + np.abs(b).sum(0))
                pairs.append(ref_nbs_sqrtm(a[np.ix_(rows, rows)], b[np.ix_(rows, rows)]))
            assert float(value[i, j]) == pytest.approx(sum(pairs) / 2, abs=1e-6)
