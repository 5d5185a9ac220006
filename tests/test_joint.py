"""The joint path: CKA from exact within-block kernel entries of two models on the same batches.

References are independent of the code under test: centred CKA from dense ``H K H`` in
float64, Song et al.'s unbiased HSIC written out from its formula, and the exact path
(``exact_model`` + ``similarity``) on the same models.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import nnsim_fast as nf
from nnsim_fast.datasets import render_shapes
from nnsim_fast.pairs import BatchPairs


def centred_cka(K: torch.Tensor, L: torch.Tensor) -> float:
    n = K.shape[0]
    H = torch.eye(n, dtype=torch.float64) - 1.0 / n
    A, B = H @ K @ H, H @ L @ H
    return float((A * B).sum() / (A.norm() * B.norm()))


def song_hsic(K: torch.Tensor, L: torch.Tensor) -> float:
    """Song et al. (2012), eq. 5: the unbiased HSIC, straight from the formula."""
    n = K.shape[0]
    K, L = K.clone(), L.clone()
    K.fill_diagonal_(0)
    L.fill_diagonal_(0)
    one = torch.ones(n, dtype=torch.float64)
    value = torch.trace(K @ L) + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2)) \
        - 2.0 / (n - 2) * (one @ K @ L @ one)
    return float(value / (n * (n - 3)))


def random_kernels(n: int, generator: torch.Generator) -> torch.Tensor:
    """Three related kernels: post-ReLU-like features with a large mean (the hard case for
    centring), correlated gradients, and their Hadamard product."""
    f = torch.randn(n, 24, generator=generator, dtype=torch.float64).relu() + 0.7
    g = torch.randn(n, 12, generator=generator, dtype=torch.float64) \
        + f[:, :4] @ torch.randn(4, 12, generator=generator, dtype=torch.float64)
    Kf, Kg = f @ f.T, g @ g.T
    return torch.stack([Kf, Kg, Kf * Kg])


def feed(kernels: torch.Tensor, order: torch.Tensor, sizes) -> BatchPairs:
    pairs = BatchPairs(kernels.shape[0])
    start = 0
    for size in sizes:
        rows = order[start:start + size]
        pairs.add(kernels[:, rows][:, :, rows])
        start += size
    assert start == kernels.shape[1]
    return pairs


def test_one_block_is_exact(torch_generator):
    K = random_kernels(90, torch_generator)
    plain, error = feed(K, torch.arange(90), [90]).cka()
    debiased, _ = feed(K, torch.arange(90), [90]).cka(debiased=True)
    assert torch.equal(error, torch.zeros_like(error))
    for p in range(3):
        for q in range(3):
            assert plain[p, q].item() == pytest.approx(centred_cka(K[p], K[q]), rel=1e-10)
            expected = song_hsic(K[p], K[q]) / math.sqrt(song_hsic(K[p], K[p]) * song_hsic(K[q], K[q]))
            assert debiased[p, q].item() == pytest.approx(expected, rel=1e-9)


def test_debiased_equal_blocks_is_the_minibatch_estimator(torch_generator):
    """With equal blocks the debiased estimate is the ratio of summed per-block unbiased HSICs
    (Nguyen et al.'s minibatch CKA), computed here from Song's formula block by block."""
    K = random_kernels(120, torch_generator)
    order = torch.randperm(120, generator=torch_generator)
    got, _ = feed(K, order, [30] * 4).cka(debiased=True)
    blocks = [order[i:i + 30] for i in range(0, 120, 30)]

    def summed(p, q):
        return sum(song_hsic(K[p][b][:, b], K[q][b][:, b]) for b in blocks)

    for p, q in ((0, 1), (0, 2), (1, 2)):
        assert got[p, q].item() == pytest.approx(summed(p, q) / math.sqrt(summed(p, p) * summed(q, q)),
                                                 rel=1e-9)


@pytest.mark.parametrize("sizes", [[64] * 6 + [16], [150, 150, 100]])
def test_unbiased_with_calibrated_error_bars(torch_generator, sizes):
    """Random partitions (blocks of unequal sizes included) of one fixed dataset: the mean
    error over R partitions is within 4 standard deviations / sqrt(R) of zero (a chance
    failure below 1e-4 per entry), and the reported standard error matches the spread.

    The error-bar check is loose on purpose: with 3 to 7 groups the standard error is itself
    noisy, and for triples and quadruples the swap overstates the variance (pairs.py), so
    the rms standard error may exceed the rms error; measured ratios 0.9-1.6 on these data,
    so [0.6, 2.5] fails only for a wrong error bar, as does fewer than 80% within 2 SE."""
    n, R = sum(sizes), 40
    K = random_kernels(n, torch_generator)
    exact = torch.tensor([[centred_cka(K[p], K[q]) for q in range(3)] for p in range(3)])
    errors, bars = [], []
    for _ in range(R):
        estimate, error = feed(K, torch.randperm(n, generator=torch_generator), sizes).cka()
        errors.append(estimate - exact)
        bars.append(error)
    errors, bars = torch.stack(errors), torch.stack(bars)
    upper = torch.triu_indices(3, 3, 1)
    e, s = errors[:, upper[0], upper[1]], bars[:, upper[0], upper[1]]
    assert (e.mean(0).abs() <= 4 * e.std(0) / math.sqrt(R)).all(), (e.mean(0), e.std(0))
    ratio = s.pow(2).mean(0).sqrt() / e.pow(2).mean(0).sqrt()
    assert ((ratio > 0.6) & (ratio < 2.5)).all(), ratio
    assert float((e.abs() <= 2 * s).float().mean()) >= 0.8


def test_unequal_blocks_weighted_alike(torch_generator):
    """Per-term tuple counts as weights (the natural ratio of sums) break HSIC's cancellation
    when blocks differ in size; with one weight per block the two layouts agree closely."""
    K = random_kernels(300, torch_generator)
    order = torch.randperm(300, generator=torch_generator)
    exact = centred_cka(K[0], K[1])
    equal, _ = feed(K, order, [150, 150]).cka()
    unequal, error = feed(K, order, [160, 140]).cka()
    assert abs(unequal[0, 1].item() - exact) <= 4 * error[0, 1].item() + 1e-3
    assert abs(unequal[0, 1].item() - equal[0, 1].item()) <= 0.02


def test_bad_blocks_refused():
    pairs = BatchPairs(2)
    with pytest.raises(ValueError, match="blocks must be"):
        pairs.add(torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="no batches"):
        pairs.cka()
    pairs.add(torch.eye(3).expand(2, 3, 3))
    with pytest.raises(ValueError, match="at least 4 samples"):
        pairs.cka()
    with pytest.raises(ValueError, match="groups"):
        BatchPairs(2, groups=1)


# --------------------------------------------------------------------------- compare_models

N = 240
LAYERS = ["0", "1", "2", "5"]


def small_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()


@pytest.fixture(scope="module")
def data():
    generator = torch.Generator().manual_seed(5)
    labels = torch.randperm(N, generator=generator) % 10
    images = torch.from_numpy(render_shapes(labels.tolist(), 11))[:, None].float()
    return images, labels


@pytest.fixture(scope="module")
def exact_reps(data):
    images, labels = data
    return [nf.extract.exact_model(small_cnn(seed), [(images, labels)], LAYERS, progress=False)
            for seed in (0, 1)]


@pytest.mark.parametrize("kind", ["feature", "gradient", "hadamard", "psi", "sum", "khatri_rao"])
@pytest.mark.parametrize("debiased", [False, True])
def test_one_block_matches_exact_path(data, exact_reps, kind, debiased):
    images, labels = data
    batches = list(zip(images.split(60), labels.split(60)))
    got = nf.compare_models(small_cnn(0), small_cnn(1), batches, LAYERS, LAYERS, kind=kind,
                            debiased=debiased, dtype=torch.float64, block=N, progress=False)
    want = nf.similarity(*exact_reps, kind=kind, debiased=debiased)
    assert got.estimator == "joint" and got.n == N
    assert got.layers_a == LAYERS and got.layers_b == LAYERS
    torch.testing.assert_close(got.matrix, want.matrix, rtol=1e-7, atol=1e-8)
    assert torch.equal(got.error, torch.zeros_like(got.error))


def test_many_blocks_close_to_exact(data, exact_reps):
    """Blocks of 40: the error against the exact value stays within 4 reported standard
    errors plus 0.01 (the error bars are checked for calibration on random kernels above)."""
    images, labels = data
    batches = list(zip(images.split(40), labels.split(40)))
    for kind in ("feature", "hadamard"):
        got = nf.compare_models(small_cnn(0), small_cnn(1), batches, LAYERS, LAYERS, kind=kind,
                                block=40, progress=False)
        want = nf.similarity(*exact_reps, kind=kind).matrix
        assert ((got.matrix - want).abs() <= 4 * got.error + 0.01).all(), (got.matrix - want)
        assert bool((got.error > 0).all())


def test_same_model_runs_once_and_pairs_layers(data, exact_reps):
    images, labels = data
    model = small_cnn(0)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    got = nf.compare_models(model, model, [(images, labels)], LAYERS, ["5", "0"], kind="feature",
                            dtype=torch.float64, progress=False)
    want = nf.similarity(exact_reps[0], exact_reps[0], kind="feature",
                         layers=(LAYERS, ["5", "0"])).matrix
    torch.testing.assert_close(got.matrix, want, rtol=1e-7, atol=1e-8)
    assert len(calls) == 1


def test_several_models_in_one_pass_equal_the_pairwise_results(data):
    from nnsim_fast.extract.joint import joint_similarities

    images, labels = data
    batches = list(zip(images.split(40), labels.split(40)))
    models = [small_cnn(seed) for seed in (0, 1, 2)]
    calls = [0, 0, 0]
    for k, model in enumerate(models):
        model.register_forward_hook(lambda *_, k=k: calls.__setitem__(k, calls[k] + 1))
    pairs = [(0, 1), (1, 2), (2, 0)]
    layer_lists = [LAYERS, LAYERS[:2], ["5"]]
    together = joint_similarities(models, batches, layer_lists, pairs, kind="hadamard", block=80,
                                  progress=False)
    assert calls == [len(batches)] * 3                     # each model once per batch
    for (i, j), got in zip(pairs, together):
        alone = nf.compare_models(models[i], models[j], batches, layer_lists[i], layer_lists[j],
                                  kind="hadamard", block=80, progress=False)
        assert got.layers_a == layer_lists[i] and got.layers_b == layer_lists[j]
        # Same numbers up to the summation order of differently sized products.
        torch.testing.assert_close(got.matrix, alone.matrix, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(got.error, alone.error, rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="one layer list"):
        joint_similarities(models, batches, [LAYERS], pairs)
    with pytest.raises(ValueError, match="pairs must be"):
        joint_similarities(models, batches, layer_lists, [(0, 3)])


def test_other_estimand_from_the_same_sums(data, exact_reps):
    images, labels = data
    got = nf.compare_models(small_cnn(0), small_cnn(1), [(images, labels)], LAYERS, LAYERS,
                            kind="feature", dtype=torch.float64, progress=False)
    rows, columns = got.positions
    debiased, _ = got.pairs.cka(debiased=True)
    torch.testing.assert_close(debiased[rows][:, columns],
                               nf.similarity(*exact_reps, kind="feature", debiased=True).matrix,
                               rtol=1e-7, atol=1e-8)


def test_features_only_needs_no_gradients(data):
    images, _ = data
    model = small_cnn(0)
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.inference_mode():
        got = nf.compare_models(model, small_cnn(1), [images[:100], images[100:]], LAYERS[:2],
                                LAYERS[:2], kind="feature", progress=False)
    assert got.matrix.shape == (2, 2) and torch.isfinite(got.matrix).all()


def test_data_grouped_by_class_is_warned_about(data):
    images, labels = data
    order = labels.argsort(stable=True)
    grouped = list(zip(images[order].split(24), labels[order].split(24)))
    with pytest.warns(RuntimeWarning, match="grouped by class"):
        nf.compare_models(small_cnn(0), small_cnn(1), grouped, LAYERS[:1], LAYERS[:1],
                          kind="feature", block=24, progress=False)
    shuffled = list(zip(images.split(24), labels.split(24)))
    many_classes = list(zip(images.split(8), torch.arange(N).split(8)))   # 240 labels, 8 a block
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for batches in (shuffled, many_classes):
            nf.compare_models(small_cnn(0), small_cnn(1), batches, LAYERS[:1], LAYERS[:1],
                              kind="feature", block=24, progress=False)


def test_bad_arguments(data):
    images, labels = data
    batches = [(images[:50], labels[:50])]
    a, b = small_cnn(0), small_cnn(1)
    with pytest.raises(ValueError, match="kind"):
        nf.compare_models(a, b, batches, kind="transport")
    with pytest.raises(ValueError, match="dtype"):
        nf.compare_models(a, b, batches, dtype=torch.float16)
    with pytest.raises(ValueError, match="block"):
        nf.compare_models(a, b, batches, block=0)
    with pytest.raises(ValueError, match="groups"):
        nf.compare_models(a, b, batches, groups=1)
    with pytest.raises(ValueError, match="no samples"):
        nf.compare_models(a, b, [], kind="feature")
    with pytest.raises(ValueError, match="at least 4 samples"):
        nf.compare_models(a, b, [images[:3]], LAYERS, LAYERS, kind="feature", block=1)
    with pytest.raises(TypeError, match="model"):
        nf.compare_models(a, "b", batches)
