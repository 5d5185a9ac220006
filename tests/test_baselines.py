"""Tests for the Task2Vec and Fisher–Rao norm baselines against per-sample autograd references."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from nnsim_fast.baselines import (
    default_depth,
    fisher_rao_distance,
    fisher_rao_norm,
    task2vec_distance,
    task2vec_embedding,
)

NUM_CLASSES = 4


def make_mlp(seed: int, bias: bool = True, dims=(5, 7, 6, NUM_CLASSES)) -> nn.Module:
    torch.manual_seed(seed)
    layers = []
    for index, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:])):
        if index:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(fan_in, fan_out, bias=bias))
    return nn.Sequential(*layers).double()


def make_convnet(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 3, kernel_size=3),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, NUM_CLASSES),
    ).double()
    # Non-trivial running statistics, so that evaluating in training mode would change the result.
    batch_norm = model[1]
    batch_norm.running_mean.copy_(torch.randn(3, dtype=torch.float64))
    batch_norm.running_var.copy_(torch.rand(3, dtype=torch.float64) + 0.5)
    return model


def make_batches(seed: int, input_shape, sizes=(5, 3, 4)):
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn((size,) + tuple(input_shape), generator=generator, dtype=torch.float64),
            torch.randint(0, NUM_CLASSES, (size,), generator=generator),
        )
        for size in sizes
    ]


def concat(batches):
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def reference_fisher(model, xs, label_of_sample):
    """Diagonal Fisher by a plain loop: one loss.backward() per (sample, label) pair.

    ``label_of_sample(i, probabilities)`` returns a list of (label, weight) pairs for sample i.
    """
    was_training = model.training
    model.eval()
    params = trainable(model)
    totals = [torch.zeros_like(p) for p in params]
    for index in range(xs.shape[0]):
        logits = model(xs[index : index + 1])
        probabilities = torch.softmax(logits, dim=-1)[0].detach()
        for label, weight in label_of_sample(index, probabilities):
            for p in params:
                p.grad = None
            loss = nn.functional.cross_entropy(model(xs[index : index + 1]), torch.tensor([label]))
            loss.backward()
            for total, p in zip(totals, params):
                total += weight * p.grad.square()
    for p in params:
        p.grad = None
    model.train(was_training)
    return torch.cat([t.reshape(-1) for t in totals]) / xs.shape[0]


def sampled_labels_like_documented(model, batches, seed):
    """Labels drawn as documented: one multinomial call per batch on softmax(logits) in float64."""
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    drawn = []
    with torch.no_grad():
        for x, _ in batches:
            probabilities = torch.softmax(model(x).to(torch.float64), dim=-1)
            drawn.append(torch.multinomial(probabilities, 1, generator=generator).squeeze(1))
    model.train(was_training)
    return torch.cat(drawn)


# ----------------------------------------------------------------------------------------------
# Task2Vec embedding
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_task2vec_true_labels_match_per_sample_backward(kind):
    model = make_mlp(0) if kind == "mlp" else make_convnet(1)
    batches = make_batches(10, (5,) if kind == "mlp" else (2, 6, 6))
    xs, ys = concat(batches)
    model.train()
    running_mean = model[1].running_mean.clone() if kind == "conv" else None

    embedding = task2vec_embedding(model, batches, labels="true")
    expected = reference_fisher(model, xs, lambda i, p: [(int(ys[i]), 1.0)])

    assert embedding.dtype == torch.float64
    assert embedding.shape == (sum(p.numel() for p in model.parameters()),)
    torch.testing.assert_close(embedding, expected, rtol=1e-10, atol=1e-14)
    assert model.training and all(module.training for module in model.modules())
    assert all(p.grad is None for p in model.parameters())
    if kind == "conv":
        torch.testing.assert_close(model[1].running_mean, running_mean, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_task2vec_expected_labels_match_weighted_backward(kind):
    model = make_mlp(2) if kind == "mlp" else make_convnet(3)
    batches = make_batches(11, (5,) if kind == "mlp" else (2, 6, 6), sizes=(4, 3))
    xs, _ = concat(batches)

    embedding = task2vec_embedding(model, batches, labels="expected")
    expected = reference_fisher(
        model, xs, lambda i, p: [(label, float(p[label])) for label in range(NUM_CLASSES)]
    )
    torch.testing.assert_close(embedding, expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_task2vec_model_labels_follow_the_generator(kind):
    model = make_mlp(4) if kind == "mlp" else make_convnet(5)
    batches = make_batches(12, (5,) if kind == "mlp" else (2, 6, 6))
    xs, _ = concat(batches)
    drawn = sampled_labels_like_documented(model, batches, seed=123)

    embedding = task2vec_embedding(
        model, batches, labels="model", generator=torch.Generator().manual_seed(123)
    )
    expected = reference_fisher(model, xs, lambda i, p: [(int(drawn[i]), 1.0)])
    torch.testing.assert_close(embedding, expected, rtol=1e-10, atol=1e-14)

    again = task2vec_embedding(model, batches, generator=torch.Generator().manual_seed(123))
    torch.testing.assert_close(again, embedding, rtol=0, atol=0)
    # The default generator is seeded, so the default is reproducible too.
    torch.testing.assert_close(
        task2vec_embedding(model, batches), task2vec_embedding(model, batches), rtol=0, atol=0
    )


def test_task2vec_model_labels_converge_to_the_exact_expectation():
    model = make_mlp(6)
    with torch.no_grad():
        model[-1].weight.mul_(0.3)  # a soft predictive, so that every class gets drawn
    x, _ = make_batches(13, (5,), sizes=(10,))[0]
    repeated = [x.repeat(100, 1)] * 3  # x-only batches are allowed when labels are drawn from the model
    sampled = task2vec_embedding(model, repeated, labels="model", generator=torch.Generator().manual_seed(7))
    exact = task2vec_embedding(model, [x], labels="expected")
    relative_error = float(torch.linalg.vector_norm(sampled - exact) / torch.linalg.vector_norm(exact))
    assert relative_error < 0.08, relative_error
    # A different draw gives a different (but equally close) estimate.
    other = task2vec_embedding(model, repeated, labels="model", generator=torch.Generator().manual_seed(8))
    assert not torch.equal(other, sampled)


def test_task2vec_max_samples_chunking_and_frozen_parameters():
    model = make_mlp(7)
    model[0].weight.requires_grad_(False)
    batches = make_batches(14, (5,))
    xs, ys = concat(batches)

    embedding = task2vec_embedding(model, batches, labels="true", max_samples=7, chunk_size=2, device="cpu")
    expected = reference_fisher(model, xs[:7], lambda i, p: [(int(ys[i]), 1.0)])
    assert embedding.shape == (sum(p.numel() for p in trainable(model)),)
    torch.testing.assert_close(embedding, expected, rtol=1e-10, atol=1e-14)
    assert model[0].weight.grad is None


def test_task2vec_float32_model_gives_float64_embedding():
    model = make_mlp(8).float()
    batches = [(x.float(), y) for x, y in make_batches(15, (5,))]
    embedding = task2vec_embedding(model, batches, labels="true")
    reference = task2vec_embedding(make_mlp(8), make_batches(15, (5,)), labels="true")
    assert embedding.dtype == torch.float64
    torch.testing.assert_close(embedding, reference, rtol=1e-4, atol=1e-7)


def test_task2vec_restores_modes_on_error_and_keeps_mixed_modes():
    model = make_convnet(9)
    model.train()
    model[1].eval()  # a frozen batch norm inside a training model must stay frozen

    def broken_data():
        yield make_batches(16, (2, 6, 6), sizes=(3,))[0]
        yield "not a batch"

    with pytest.raises(TypeError, match="data"):
        task2vec_embedding(model, broken_data(), labels="true")
    assert model.training and not model[1].training and model[0].training
    assert all(p.grad is None for p in model.parameters())


def test_task2vec_bad_input():
    model = make_mlp(10)
    batches = make_batches(17, (5,))
    with pytest.raises(ValueError, match="labels"):
        task2vec_embedding(model, batches, labels="sampled")
    with pytest.raises(ValueError, match="labels"):
        task2vec_embedding(model, [x for x, _ in batches], labels="true")
    with pytest.raises(ValueError, match="max_samples"):
        task2vec_embedding(model, batches, max_samples=0)
    with pytest.raises(TypeError, match="model"):
        task2vec_embedding("model", batches)
    with pytest.raises(TypeError, match="generator"):
        task2vec_embedding(model, batches, generator=3)
    with pytest.raises(ValueError, match="no samples"):
        task2vec_embedding(model, [])
    with pytest.raises(ValueError, match="labels"):
        task2vec_embedding(model, [(batches[0][0], batches[0][1] + NUM_CLASSES)], labels="true")
    with pytest.raises(ValueError, match=r"\[B, C\]"):
        task2vec_embedding(nn.Sequential(model, nn.Unflatten(1, (2, 2))), batches)


# ----------------------------------------------------------------------------------------------
# Task2Vec distance
# ----------------------------------------------------------------------------------------------


def test_task2vec_distance_is_cosine_distance():
    generator = torch.Generator().manual_seed(20)
    first = torch.randn(50, generator=generator, dtype=torch.float64)
    second = torch.randn(50, generator=generator, dtype=torch.float64)
    a, b = first.numpy(), second.numpy()
    expected = 1.0 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    assert task2vec_distance(first, second) == pytest.approx(expected, rel=1e-12)
    assert task2vec_distance(second, first) == pytest.approx(expected, rel=1e-12)
    assert task2vec_distance(first, first) == pytest.approx(0.0, abs=1e-12)
    assert task2vec_distance(first, -first) == pytest.approx(2.0, abs=1e-12)
    assert task2vec_distance(first, 3.5 * first) == pytest.approx(0.0, abs=1e-12)
    assert task2vec_distance(1e-3 * first, 7.0 * second) == pytest.approx(expected, rel=1e-12)
    # Huge and tiny magnitudes do not overflow or underflow.
    assert task2vec_distance(1e200 * first, 1e-200 * second) == pytest.approx(expected, rel=1e-12)


def test_task2vec_distance_of_fisher_embeddings():
    batches = make_batches(21, (5,))
    e1 = task2vec_embedding(make_mlp(11), batches)
    e2 = task2vec_embedding(make_mlp(12), batches)
    assert task2vec_distance(e1, e1) == pytest.approx(0.0, abs=1e-12)
    distance = task2vec_distance(e1, e2)
    assert 0.0 < distance <= 1.0  # non-negative vectors: cosine in [0, 1]
    orthogonal = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 3.0, 0.0])
    assert task2vec_distance(*orthogonal) == pytest.approx(1.0)


def test_task2vec_distance_symmetric_normalisation():
    generator = torch.Generator().manual_seed(22)
    first = torch.rand(30, generator=generator, dtype=torch.float64)
    second = torch.rand(30, generator=generator, dtype=torch.float64)
    first[3] = second[3] = 0.0  # both zero: left at zero, no NaN
    total = (first + second).numpy()
    safe = np.where(total > 0, total, 1.0)
    a, b = first.numpy() / safe, second.numpy() / safe
    expected = 1.0 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    assert task2vec_distance(first, second, normalize=True) == pytest.approx(expected, rel=1e-12)
    # The symmetric normalisation makes the distance invariant to a common per-entry scaling.
    scale = torch.rand(30, generator=generator, dtype=torch.float64) + 0.1
    scaled = task2vec_distance(first * scale, second * scale, normalize=True)
    assert scaled == pytest.approx(expected, rel=1e-10)
    with pytest.raises(ValueError, match="non-negative"):
        task2vec_distance(first - 1.0, second, normalize=True)


def test_task2vec_distance_bad_input():
    with pytest.raises(ValueError, match="same length"):
        task2vec_distance(torch.ones(5), torch.ones(6))
    with pytest.raises(ValueError, match="non-zero"):
        task2vec_distance(torch.zeros(5), torch.ones(5))
    with pytest.raises(ValueError, match="e1"):
        task2vec_distance(torch.ones(2, 3), torch.ones(6))
    with pytest.raises(ValueError, match="e2"):
        task2vec_distance(torch.ones(3), torch.tensor([1.0, float("nan"), 0.0]))
    with pytest.raises(TypeError, match="e1"):
        task2vec_distance([1.0, 2.0], torch.ones(2))


# ----------------------------------------------------------------------------------------------
# Fisher–Rao norm
# ----------------------------------------------------------------------------------------------


def reference_inner_products(model, xs, ys):
    """<f, d CE/d f> per sample from per-sample logits and the analytic softmax - onehot."""
    values = []
    with torch.no_grad():
        for index in range(xs.shape[0]):
            logits = model(xs[index : index + 1])[0]
            gradient = torch.softmax(logits, dim=-1) - nn.functional.one_hot(ys[index], NUM_CLASSES).double()
            values.append(float(logits @ gradient))
    return np.array(values)


def test_fisher_rao_norm_true_labels_match_definition():
    model = make_mlp(30, bias=False)
    batches = make_batches(31, (5,))
    xs, ys = concat(batches)
    depth = 2  # three weight layers
    inner = reference_inner_products(model, xs, ys)
    expected = (depth + 1) * math.sqrt(np.mean(inner**2))
    assert default_depth(model) == depth
    assert fisher_rao_norm(model, batches, labels="true") == pytest.approx(expected, rel=1e-12)
    # An explicit depth rescales by (depth + 1).
    deeper = fisher_rao_norm(model, batches, labels="true", depth=4)
    assert deeper == pytest.approx(expected * 5 / 3, rel=1e-12)


def test_fisher_rao_norm_expected_and_model_labels_match_definition():
    model = make_mlp(32, bias=False)
    batches = make_batches(33, (5,))
    xs, _ = concat(batches)
    with torch.no_grad():
        probabilities = torch.softmax(model(xs), dim=-1)
    per_class = np.stack(
        [reference_inner_products(model, xs, torch.full((xs.shape[0],), label))
         for label in range(NUM_CLASSES)],
        axis=1,
    )
    expected = 3 * math.sqrt(np.mean((probabilities.numpy() * per_class**2).sum(axis=1)))
    assert fisher_rao_norm(model, batches, labels="expected") == pytest.approx(expected, rel=1e-12)

    drawn = sampled_labels_like_documented(model, batches, seed=5)
    sampled_expected = 3 * math.sqrt(np.mean(reference_inner_products(model, xs, drawn) ** 2))
    sampled = fisher_rao_norm(model, batches, labels="model", generator=torch.Generator().manual_seed(5))
    assert sampled == pytest.approx(sampled_expected, rel=1e-12)


def test_fisher_rao_norm_equals_parameter_inner_product_for_bias_free_relu():
    # Bias-free ReLU nets are positively homogeneous of degree L + 1 in their weights, so
    # <theta, d loss/d theta> = (L + 1) <f, d loss/d f> for every sample: an independent route
    # to the norm through the parameter gradients.
    model = make_mlp(34, bias=False, dims=(5, 8, 7, 6, NUM_CLASSES))
    batches = make_batches(35, (5,))
    xs, ys = concat(batches)
    params = list(model.parameters())
    per_sample_parameter_inner = []
    for index in range(xs.shape[0]):
        loss = nn.functional.cross_entropy(model(xs[index : index + 1]), ys[index : index + 1])
        gradients = torch.autograd.grad(loss, params)
        per_sample_parameter_inner.append(
            float(sum((p.detach() * g).sum() for p, g in zip(params, gradients)))
        )
    per_sample_parameter_inner = np.array(per_sample_parameter_inner)
    depth = default_depth(model)
    assert depth == 3
    np.testing.assert_allclose(
        per_sample_parameter_inner, (depth + 1) * reference_inner_products(model, xs, ys),
        rtol=1e-10, atol=1e-12,
    )
    expected = math.sqrt(np.mean(per_sample_parameter_inner**2))
    assert fisher_rao_norm(model, batches, labels="true") == pytest.approx(expected, rel=1e-10)


def test_fisher_rao_norm_invariant_to_rescaling_between_layers():
    model = make_mlp(36, bias=False)
    batches = make_batches(37, (5,))
    before = fisher_rao_norm(model, batches, labels="expected")
    with torch.no_grad():  # the same function, other parameters
        model[0].weight.mul_(3.0)
        model[2].weight.div_(3.0)
    assert fisher_rao_norm(model, batches, labels="expected") == pytest.approx(before, rel=1e-12)


def test_fisher_rao_norm_conv_default_depth_and_modes():
    model = make_convnet(38)
    model.train()
    batches = make_batches(39, (2, 6, 6))
    xs, ys = concat(batches)
    assert default_depth(model) == 1
    model.eval()
    expected = 2 * math.sqrt(np.mean(reference_inner_products(model, xs, ys) ** 2))
    model.train()
    assert fisher_rao_norm(model, batches, labels="true") == pytest.approx(expected, rel=1e-12)
    assert model.training and all(module.training for module in model.modules())


def test_fisher_rao_norm_bad_input():
    model = make_mlp(40)
    batches = make_batches(41, (5,))
    with pytest.raises(ValueError, match="depth"):
        fisher_rao_norm(model, batches, depth=-1)
    with pytest.raises(TypeError, match="depth"):
        fisher_rao_norm(model, batches, depth=1.5)
    with pytest.raises(ValueError, match="depth"):
        fisher_rao_norm(nn.Sequential(nn.Flatten()), batches)
    with pytest.raises(ValueError, match="labels"):
        fisher_rao_norm(model, batches, labels="empirical")
    with pytest.raises(ValueError, match="no samples"):
        fisher_rao_norm(model, [])


# ----------------------------------------------------------------------------------------------
# Fisher–Rao distance
# ----------------------------------------------------------------------------------------------


def test_fisher_rao_distance_formula_and_properties():
    rng = np.random.default_rng(50)
    for first, second in rng.uniform(0.01, 100.0, size=(20, 2)):
        expected = abs(first - second) / math.sqrt(first * second)
        assert fisher_rao_distance(first, second) == pytest.approx(expected, rel=1e-12)
        assert fisher_rao_distance(second, first) == pytest.approx(expected, rel=1e-12)
        assert fisher_rao_distance(7.0 * first, 7.0 * second) == pytest.approx(expected, rel=1e-12)
        assert fisher_rao_distance(first, second) >= 0.0
    assert fisher_rao_distance(2.5, 2.5) == 0.0
    assert fisher_rao_distance(torch.tensor(4.0), 1) == pytest.approx(1.5)
    assert math.isfinite(fisher_rao_distance(1e300, 1e-300))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_fisher_rao_distance_rejects_non_positive_norms(bad):
    with pytest.raises(ValueError, match="norm1"):
        fisher_rao_distance(bad, 1.0)
    with pytest.raises(ValueError, match="norm2"):
        fisher_rao_distance(1.0, bad)


def test_fisher_rao_distance_rejects_non_numbers():
    with pytest.raises(TypeError, match="norm1"):
        fisher_rao_distance("1.0", 1.0)
    with pytest.raises(TypeError, match="norm2"):
        fisher_rao_distance(1.0, True)
    with pytest.raises(ValueError, match="norm1"):
        fisher_rao_distance(torch.ones(2), 1.0)
