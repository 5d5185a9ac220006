"""Tests for kernel ridge regression on sketched kernels against dense numpy references."""

import numpy as np
import pytest
import torch

from nnsim_fast.krr import DEFAULT_RELATIVE_ALPHAS, SketchedKRR, onehot, sketch_targets


def rbf_kernel(a: np.ndarray, b: np.ndarray, width: float) -> np.ndarray:
    squared = (a**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2 * a @ b.T
    return np.exp(-np.maximum(squared, 0.0) / (2 * width**2))


def noisy_classification(seed: int, n: int, d: int = 3, classes: int = 3, flip: float = 0.2):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=1.5, size=(classes, d))
    labels = rng.integers(0, classes, n)
    points = centres[labels] + rng.normal(size=(n, d))
    flipped = rng.random(n) < flip
    labels = np.where(flipped, rng.integers(0, classes, n), labels)
    return points, labels


def test_identity_sketch_matches_closed_form_solution():
    points, labels = noisy_classification(0, 40)
    test_points, _ = noisy_classification(1, 15)
    kernel = rbf_kernel(points, points, 1.3)
    cross = rbf_kernel(test_points, points, 1.3)
    targets = np.eye(3)[labels]
    alpha = 0.37
    expected = cross @ np.linalg.solve(kernel + alpha * np.eye(40), targets)

    model = SketchedKRR().fit(torch.from_numpy(kernel), onehot(torch.from_numpy(labels), 3), alpha=alpha)
    scores = model.predict(torch.from_numpy(cross))
    assert scores.dtype == torch.float64 and scores.shape == (15, 3)
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-9, atol=1e-11)
    np.testing.assert_array_equal(model.predict_labels(torch.from_numpy(cross)).numpy(), expected.argmax(1))
    assert model.alpha_ == alpha and model.scores_ == []
    # float32 inputs are solved in float64 all the same.
    scores32 = SketchedKRR().fit(torch.from_numpy(kernel).float(), torch.from_numpy(targets), alpha=alpha)
    np.testing.assert_allclose(
        scores32.predict(torch.from_numpy(cross)).numpy(), expected, rtol=1e-5, atol=1e-6
    )


def brute_force_loo(kernel: np.ndarray, targets: np.ndarray, alpha: float) -> float:
    """Refit without each point in turn and predict it: mean squared error over points."""
    n = kernel.shape[0]
    total = 0.0
    for held_out in range(n):
        keep = np.arange(n) != held_out
        weights = np.linalg.solve(kernel[np.ix_(keep, keep)] + alpha * np.eye(n - 1), targets[keep])
        prediction = kernel[held_out, keep] @ weights
        total += ((targets[held_out] - prediction) ** 2).sum()
    return total / n


def test_loo_choice_equals_brute_force_refits():
    points, labels = noisy_classification(2, 30, flip=0.35)
    kernel = rbf_kernel(points, points, 1.0)
    targets = np.eye(3)[labels]
    grid = 10.0 ** np.arange(-6, 2.01, 0.25)
    alphas = grid * np.trace(kernel) / kernel.shape[0]
    brute = np.array([brute_force_loo(kernel, targets, alpha) for alpha in alphas])
    best = int(np.argmin(brute))
    assert 0 < best < len(grid) - 1, "the toy problem should have an interior optimum"

    model = SketchedKRR().fit(torch.from_numpy(kernel), torch.from_numpy(targets))
    np.testing.assert_allclose(model.relative_alphas_, grid, rtol=1e-12)
    np.testing.assert_allclose(model.alphas_, alphas, rtol=1e-12)
    np.testing.assert_allclose(model.scores_, brute, rtol=1e-7)
    assert model.alpha_ == pytest.approx(alphas[best], rel=1e-12)
    expected_coefficients = np.linalg.solve(kernel + alphas[best] * np.eye(30), targets)
    np.testing.assert_allclose(model.dual_coef_.numpy(), expected_coefficients, rtol=1e-8, atol=1e-10)


def test_gcv_criterion_matches_dense_formula():
    points, labels = noisy_classification(3, 35, flip=0.3)
    kernel = rbf_kernel(points, points, 0.8)
    targets = np.eye(3)[labels]
    n = kernel.shape[0]
    relative = [1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0]
    alphas = np.array(relative) * np.trace(kernel) / n
    expected = []
    for alpha in alphas:
        hat = kernel @ np.linalg.inv(kernel + alpha * np.eye(n))
        residual = targets - hat @ targets
        expected.append((residual**2).sum() / n / (np.trace(np.eye(n) - hat) / n) ** 2)
    model = SketchedKRR(criterion="gcv", relative_alphas=relative).fit(
        torch.from_numpy(kernel), torch.from_numpy(targets)
    )
    np.testing.assert_allclose(model.scores_, expected, rtol=1e-7)
    assert model.alpha_ == pytest.approx(alphas[int(np.argmin(expected))], rel=1e-12)


def test_alpha_search_is_scale_invariant():
    points, labels = noisy_classification(4, 30)
    test_points, _ = noisy_classification(5, 10)
    kernel = torch.from_numpy(rbf_kernel(points, points, 1.1))
    cross = torch.from_numpy(rbf_kernel(test_points, points, 1.1))
    targets = onehot(torch.from_numpy(labels), 3)
    base = SketchedKRR().fit(kernel, targets)
    scaled = SketchedKRR().fit(1e6 * kernel, targets)
    assert scaled.alpha_ == pytest.approx(1e6 * base.alpha_, rel=1e-9)
    torch.testing.assert_close(scaled.predict(1e6 * cross), base.predict(cross), rtol=1e-8, atol=1e-10)


def test_linearly_separable_problem_is_learnt():
    rng = np.random.default_rng(6)
    directions = rng.normal(size=(5, 4))
    train = rng.normal(size=(200, 5))
    test = rng.normal(size=(300, 5))
    train_labels = np.argmax(train @ directions, 1)
    test_labels = np.argmax(test @ directions, 1)
    model = SketchedKRR().fit(torch.from_numpy(train @ train.T), onehot(torch.from_numpy(train_labels), 4))
    predicted = model.predict_labels(torch.from_numpy(test @ train.T)).numpy()
    assert (predicted == test_labels).mean() > 0.9


def dense_countsketch(rng: np.random.Generator, m: int, n: int):
    buckets = rng.integers(0, m, n)
    signs = rng.choice([-1.0, 1.0], n)
    matrix = np.zeros((m, n))
    matrix[buckets, np.arange(n)] = signs
    return buckets, signs, matrix


def test_sketched_kernels_pair_with_the_matching_target_sketch():
    # One dense CountSketch S drives both estimators; sketch_targets must reproduce
    # the dense products S Y and |S| Y, and each kernel must be paired with its own.
    rng = np.random.default_rng(7)
    n, m, d, classes = 900, 512, 6, 3
    directions = rng.normal(size=(d, classes))
    features = rng.normal(size=(n, d))
    labels = np.argmax(features @ directions, 1)
    test_features = rng.normal(size=(400, d))
    test_labels = np.argmax(test_features @ directions, 1)
    gradients, test_gradients = np.ones((n, 1)), np.ones((400, 1))
    buckets, signs, sketch = dense_countsketch(rng, m, n)
    targets = np.eye(classes)[labels]

    signed = sketch_targets(torch.from_numpy(targets), torch.from_numpy(buckets), m, torch.from_numpy(signs))
    unsigned = sketch_targets(torch.from_numpy(targets), torch.from_numpy(buckets), m)
    np.testing.assert_allclose(signed.numpy(), sketch @ targets, rtol=0, atol=1e-12)
    np.testing.assert_allclose(unsigned.numpy(), np.abs(sketch) @ targets, rtol=0, atol=1e-12)

    def accuracy(kernel, cross, sketched_targets):
        model = SketchedKRR().fit(torch.from_numpy(kernel), sketched_targets)
        return (model.predict_labels(torch.from_numpy(cross)).numpy() == test_labels).mean()

    # Hadamard of separately sketched Grams (Algorithm 1): unsigned targets.
    sketched_f, sketched_g = sketch @ features, sketch @ gradients
    hadamard = (sketched_f @ sketched_f.T) * (sketched_g @ sketched_g.T)
    hadamard_cross = (test_features @ sketched_f.T) * (test_gradients @ sketched_g.T)
    assert accuracy(hadamard, hadamard_cross, unsigned) > 0.65
    assert accuracy(hadamard, hadamard_cross, signed) < 0.5

    # Sketch of psi: signed targets.
    psi = (gradients[:, :, None] * features[:, None, :]).reshape(n, -1)
    test_psi = (test_gradients[:, :, None] * test_features[:, None, :]).reshape(400, -1)
    sketched_psi = sketch @ psi
    assert accuracy(sketched_psi @ sketched_psi.T, test_psi @ sketched_psi.T, signed) > 0.75
    assert accuracy(sketched_psi @ sketched_psi.T, test_psi @ sketched_psi.T, unsigned) < 0.5


def test_sketch_targets_sparse_blocks_and_streaming():
    rng = np.random.default_rng(8)
    n, m, classes, blocks = 50, 12, 4, 2
    labels = rng.integers(0, classes, n)
    buckets = np.stack([rng.integers(0, m // 2, n), m // 2 + rng.integers(0, m // 2, n)], axis=1)
    weights = rng.choice([-1.0, 1.0], size=(n, blocks)) / np.sqrt(blocks)
    dense = np.zeros((m, n))
    for block in range(blocks):
        dense[buckets[:, block], np.arange(n)] += weights[:, block]
    targets = onehot(torch.from_numpy(labels), classes)
    bucket_tensor, weight_tensor = torch.from_numpy(buckets), torch.from_numpy(weights)
    accumulator = sketch_targets(targets[:20], bucket_tensor[:20], m, weight_tensor[:20])
    sketch_targets(targets[20:], bucket_tensor[20:], m, weight_tensor[20:], out=accumulator)
    np.testing.assert_allclose(accumulator.numpy(), dense @ np.eye(classes)[labels], rtol=0, atol=1e-12)


def test_onehot():
    labels = torch.tensor([2, 0, 1, 2])
    expected = np.eye(3)[labels.numpy()]
    np.testing.assert_array_equal(onehot(labels, 3).numpy(), expected)
    assert onehot(labels, 3).dtype == torch.float64
    with pytest.raises(ValueError, match="labels"):
        onehot(torch.tensor([0, 3]), 3)
    with pytest.raises(TypeError, match="labels"):
        onehot(torch.tensor([0.0, 1.0]), 3)
    with pytest.raises(ValueError, match="num_classes"):
        onehot(labels, 0)


def test_default_grid_is_documented_range():
    assert len(DEFAULT_RELATIVE_ALPHAS) == 33
    assert DEFAULT_RELATIVE_ALPHAS[0] == pytest.approx(1e-6)
    assert DEFAULT_RELATIVE_ALPHAS[-1] == pytest.approx(1e2)


def test_bad_input_raises():
    kernel = torch.eye(4, dtype=torch.float64)
    targets = torch.zeros(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="K"):
        SketchedKRR().fit(torch.ones(4, 3), targets)
    with pytest.raises(ValueError, match="T"):
        SketchedKRR().fit(kernel, torch.zeros(5, 2))
    with pytest.raises(ValueError, match="T"):
        SketchedKRR().fit(kernel, torch.zeros(4))
    with pytest.raises(ValueError, match="K"):
        SketchedKRR().fit(torch.full((4, 4), float("nan")), targets)
    with pytest.raises(ValueError, match="alpha"):
        SketchedKRR().fit(kernel, targets, alpha=0.0)
    with pytest.raises(ValueError, match="alpha"):
        SketchedKRR().fit(kernel, targets, alpha=-1.0)
    with pytest.raises(TypeError, match="K"):
        SketchedKRR().fit(np.eye(4), targets)
    with pytest.raises(ValueError, match="zero trace"):
        SketchedKRR().fit(torch.zeros(4, 4), targets)
    with pytest.raises(ValueError, match="criterion"):
        SketchedKRR(criterion="kfold")
    with pytest.raises(ValueError, match="relative_alphas"):
        SketchedKRR(relative_alphas=[1.0, -1.0])
    with pytest.raises(ValueError, match="relative_alphas"):
        SketchedKRR(relative_alphas=[])
    with pytest.raises(RuntimeError, match="fit"):
        SketchedKRR().predict(torch.zeros(2, 4))
    model = SketchedKRR().fit(kernel, targets, alpha=1.0)
    with pytest.raises(ValueError, match="k_star"):
        model.predict(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="k_star"):
        model.predict(torch.zeros(4))
    with pytest.raises(ValueError, match="buckets"):
        sketch_targets(targets, torch.tensor([0, 1, 2, 9]), 4)
    with pytest.raises(ValueError, match="signs"):
        sketch_targets(targets, torch.tensor([0, 1, 2, 3]), 4, torch.ones(3))
