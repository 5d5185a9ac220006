"""The default estimate against the exact value on a small conv net, end to end.

Two small CNNs (different initialisations, one briefly trained) see the same generated
images; ``sketch_model`` + ``similarity`` (the default estimator) is compared with
``exact_model`` + ``similarity`` (all N x N pairs in float64) for every layer pair.

Tolerance: the estimate's own standard error ``se`` covers the sample-axis sketch; with
|z| <= 4 over the 2 x 16 entries checked a failure by chance has probability below
32 * 6e-5 = 2e-3 (the jackknife errs on the conservative side, docs/estimators.md
section 7).  The TensorSketch halves of psi add a feature-axis error the bar leaves out,
measured at most 0.0015 at the default width (ibid. section 8a): 0.01 more is allowed.
The same tolerance rejects the paper's Algorithm 1 on the same sketches, which shows the
check can fail.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import nnsim_fast as nf
from nnsim_fast.compare import ResolutionWarning
from nnsim_fast.datasets import render_shapes

N, M = 600, 256
LAYERS = ["0", "1", "2", "5"]


def small_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU()),                 # "0": 8x8x8
        nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),  # "1": 16x4x4
        nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()),               # "2"
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))                # "5": logits


@pytest.fixture(scope="module")
def data():
    labels = torch.arange(N) % 10
    images = torch.from_numpy(render_shapes(labels.tolist(), 7))[:, None].float()
    return images, labels


@pytest.fixture(scope="module")
def models(data):
    images, labels = data
    trained = small_cnn(1)
    optimiser = torch.optim.Adam(trained.parameters(), lr=3e-3)
    for _ in range(3):
        for batch in torch.arange(N).split(50):
            optimiser.zero_grad()
            nn.functional.cross_entropy(trained(images[batch]), labels[batch]).backward()
            optimiser.step()
    return small_cnn(0).eval(), trained.eval()


def batches(data):
    images, labels = data
    return [(index, images[index], labels[index]) for index in torch.arange(N).split(100)]


@pytest.mark.parametrize("kind", ["hadamard", "feature"])
def test_default_estimate_lands_on_the_exact_value(data, models, kind, restore_num_threads):
    gradients = kind != "feature"
    sketched = [nf.sketch_model(model, batches(data), LAYERS, m=M, seed=3, dtype=torch.float64,
                                gradients=gradients, progress=False) for model in models]
    exact = [nf.extract.exact_model(model, batches(data), LAYERS, dtype=torch.float64,
                                    gradients=gradients, progress=False) for model in models]
    try:
        truth = nf.similarity(exact[0], exact[1], kind=kind).matrix
    finally:
        for rep in exact:
            rep.close()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResolutionWarning)
        result = nf.similarity(sketched[0], sketched[1], kind=kind)
        paper = nf.similarity(sketched[0], sketched[1], kind=kind, estimator="paper").matrix
    assert result.estimator == "sketch" and result.error is not None
    gap = (result.matrix - truth).abs()
    allowed = 4 * result.error + 0.01
    assert bool((gap <= allowed).all()), (gap, allowed)
    # The same tolerance rejects Algorithm 1 on the same sketches (bucket centring: close to
    # the uncentred alignment, not the centred index).
    assert not bool(((paper - truth).abs() <= allowed).all()), (paper - truth, allowed)
