"""Tests of ``sketch_model``: features and expected gradients at probed layers.

The reference for every sketched quantity is computed here independently:
each model below has a hand-written functional twin, split into stages at
the probed layers.  For a probed layer the per-sample output ``h`` is made a
leaf tensor, the rest of the network is run from it, and the gradient of the
cross-entropy for every class ``y`` is taken with plain autograd (one backward
per sample and class); the expected gradient is their average under
``q(y|x) = p(y|x)^beta / sum_y' p(y'|x)^beta`` computed in float64.  The dense
sketch matrix ``S`` is assembled from ``ops.sketch_hash`` and the library's
accumulators (float64) are compared with ``S @ F`` and ``S @ G``.
"""
from __future__ import annotations

import sys
import threading
import time
import types
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import dense_sketch
from nnsim_fast import sketch_model
from nnsim_fast.extract import exact_model, features_and_gradients

TOL = dict(rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- references

def tempered_predictive(logits: torch.Tensor, beta: float) -> torch.Tensor:
    """q(y|x) ∝ p(y|x)^beta, float64, straight from the definition."""
    p = torch.softmax(logits.detach().to(torch.float64), dim=-1)
    powered = p ** beta
    return powered / powered.sum(-1, keepdim=True)


Stage = Callable[[torch.Tensor], torch.Tensor]


def run(stages: Sequence[Stage], x: torch.Tensor) -> torch.Tensor:
    for stage in stages:
        x = stage(x)
    return x


def reference_layer(stages: Sequence[Stage], cut: int, x: torch.Tensor, *,
                    beta: float = 0.5, labels: Optional[torch.Tensor] = None,
                    per_sample_loss: Optional[Callable] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample output ``h_i`` after ``stages[:cut]`` and the gradient there.

    Gradient: the q-expectation of the per-class cross-entropy gradients (default),
    the gradient of CE at ``labels[i]``, or of ``per_sample_loss(logits_i, y_i)``.
    Returns ``(H, G)``, each ``[n, *layer_shape]`` float64.
    """
    outputs, gradients = [], []
    for i in range(x.shape[0]):
        with torch.no_grad():
            h = run(stages[:cut], x[i:i + 1])
        h = h.detach().clone().requires_grad_(True)
        logits = run(stages[cut:], h)
        classes = logits.shape[1]
        if per_sample_loss is not None:
            grad, = torch.autograd.grad(per_sample_loss(logits, labels[i:i + 1]).sum(), h)
        elif labels is not None:
            grad, = torch.autograd.grad(F.cross_entropy(logits, labels[i:i + 1]), h)
        else:
            q = tempered_predictive(logits, beta)[0]
            grad = torch.zeros_like(h, dtype=torch.float64)
            for y in range(classes):
                loss = F.cross_entropy(logits, torch.tensor([y]))
                g_y, = torch.autograd.grad(loss, h, retain_graph=True)
                grad += q[y] * g_y.to(torch.float64)
        outputs.append(h.detach().to(torch.float64)[0])
        gradients.append(grad.detach().to(torch.float64)[0])
    return torch.stack(outputs), torch.stack(gradients)


def flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def assert_sketch(rep, name: str, f: torch.Tensor, g: torch.Tensor, S: torch.Tensor,
                  tol: Dict = TOL) -> None:
    layer = rep.layers[name]
    torch.testing.assert_close(layer.sketch_f.to(torch.float64), S @ f, **tol)
    torch.testing.assert_close(layer.sketch_g.to(torch.float64), S @ g, **tol)


# --------------------------------------------------------------------------- models

class MLP(nn.Module):
    """Linear -> ReLU(inplace) -> Linear -> ReLU(inplace) -> Linear."""

    def __init__(self, d_in: int = 5, hidden: Tuple[int, int] = (8, 6), classes: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden[0])
        self.act1 = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.act2 = nn.ReLU(inplace=True)
        self.fc3 = nn.Linear(hidden[1], classes)

    def forward(self, x):
        return self.fc3(self.act2(self.fc2(self.act1(self.fc1(x)))))

    def stages(self) -> Dict[str, Tuple[List[Stage], int]]:
        """Functional twin: the stages and the cut index of every probed layer."""
        s = [lambda x: F.linear(x, self.fc1.weight, self.fc1.bias),
             torch.relu,
             lambda h: F.linear(h, self.fc2.weight, self.fc2.bias),
             torch.relu,
             lambda h: F.linear(h, self.fc3.weight, self.fc3.bias)]
        return {"fc1": (s, 1), "act1": (s, 2), "fc2": (s, 3), "act2": (s, 4), "fc3": (s, 5)}


class SmallCNN(nn.Module):
    """Conv -> BatchNorm -> ReLU -> Conv -> ReLU -> flatten -> Linear."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 3 * 3, classes)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv1(x)))
        return self.fc(torch.relu(self.conv2(h)).flatten(1))

    def stages(self) -> Dict[str, Tuple[List[Stage], int]]:
        bn = self.bn
        s = [lambda x: F.conv2d(x, self.conv1.weight, self.conv1.bias, padding=1),
             lambda h: F.batch_norm(h, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                    training=False, eps=bn.eps),
             lambda h: F.conv2d(torch.relu(h), self.conv2.weight, self.conv2.bias),
             lambda h: F.linear(torch.relu(h).flatten(1), self.fc.weight, self.fc.bias)]
        return {"conv1": (s, 1), "bn": (s, 2), "conv2": (s, 3), "fc": (s, 4)}


def make_mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP().double()


def make_cnn(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    model = SmallCNN().double()
    with torch.no_grad():
        # Non-trivial running statistics: eval mode must use them, train mode would not.
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.3, 0.3)
    return model


def mlp_data(n: int = 10, seed: int = 1, classes: int = 4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def cnn_data(n: int = 9, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 2, 5, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=g))


def batches(x, y, size: int):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, x.shape[0], size)]


def all_forward_hooks(model: nn.Module) -> int:
    return sum(len(module._forward_hooks) + len(module._forward_pre_hooks)
               + len(module._backward_hooks) for module in model.modules())


# --------------------------------------------------------------------------- expected gradients

@pytest.mark.parametrize("beta", [0.5, 0.2])
def test_mlp_expected_gradient_matches_class_by_class_expectation(beta):
    model = make_mlp()
    x, y = mlp_data()
    m, seed = 32, 7
    names = ["fc1", "act1", "fc2", "fc3"]
    rep = sketch_model(model, batches(x, y, 4), layers=names, m=m, seed=seed, beta=beta,
                       dtype=torch.float64)
    S = dense_sketch(x.shape[0], m, seed)
    assert rep.n == x.shape[0] and rep.layer_names == names
    assert rep.meta["beta"] == beta and rep.meta["target"] == "expected"
    for name in names:
        stages, cut = model.stages()[name]
        f, g = reference_layer(stages, cut, x, beta=beta)
        assert_sketch(rep, name, f, g, S)
        # The exact statistics kept beside the sketch.
        layer = rep.layers[name]
        torch.testing.assert_close(layer.sum_f, f.sum(0), **TOL)
        torch.testing.assert_close(layer.sum_g, g.sum(0), **TOL)
        expected_trace = (f.square().sum(1) * g.square().sum(1)).sum()
        torch.testing.assert_close(layer.trace, expected_trace, **TOL)
        assert layer.feature_shape == tuple(f.shape[1:])
    # The expected gradient is not trivially zero at these temperatures.
    assert float(rep.layers["fc1"].sketch_g.abs().max()) > 1e-3


def test_relu_inplace_after_probe_leaves_features_and_gradients_intact():
    # act1 rewrites its input in place; the probe at fc1 must still see the
    # pre-activation (with negative entries) and its gradient must carry the
    # ReLU mask.
    model = make_mlp(3)
    x, y = mlp_data(12, seed=5)
    rep = sketch_model(model, [(x, y)], layers=["fc1"], m=16, seed=0, dtype=torch.float64)
    stages, cut = model.stages()["fc1"]
    f, g = reference_layer(stages, cut, x)
    assert bool((f < 0).any())
    S = dense_sketch(12, 16, 0)
    assert_sketch(rep, "fc1", f, g, S)


def test_float32_model_and_accumulators_close_to_float64_reference():
    model = make_mlp(1)
    x, y = mlp_data(8, seed=3)
    rep = sketch_model(model.float(), [(x.float(), y)], layers=["fc2"], m=16, seed=3)
    assert rep.layers["fc2"].sketch_f.dtype == torch.float32
    model.double()
    stages, cut = model.stages()["fc2"]
    f, g = reference_layer(stages, cut, x)
    assert_sketch(rep, "fc2", f, g, dense_sketch(8, 16, 3), tol=dict(rtol=1e-4, atol=1e-5))


def test_sparsity_two_matches_dense_sketch():
    model = make_mlp(2)
    x, y = mlp_data(11, seed=4)
    rep = sketch_model(model, batches(x, y, 5), layers=["fc2"], m=16, seed=11, sparsity=2,
                       dtype=torch.float64)
    stages, cut = model.stages()["fc2"]
    f, g = reference_layer(stages, cut, x)
    assert_sketch(rep, "fc2", f, g, dense_sketch(11, 16, 11, sparsity=2))


def test_beta_one_gives_zero_expected_gradient_and_a_warning():
    model = make_mlp()
    x, y = mlp_data()
    with pytest.warns(RuntimeWarning, match="beta=1"):
        rep = sketch_model(model, [(x, y)], layers=["fc1"], m=8, beta=1.0, dtype=torch.float64)
    assert float(rep.layers["fc1"].sketch_g.abs().max()) < 1e-12
    assert float(rep.layers["fc1"].sketch_f.abs().max()) > 0.1


def test_default_layers_are_the_direct_children():
    model = make_mlp()
    x, y = mlp_data(6)
    rep = sketch_model(model, [(x, y)], m=8, dtype=torch.float64)
    assert rep.layer_names == ["fc1", "act1", "fc2", "act2", "fc3"]
    S = dense_sketch(6, 8, 0)
    for name in rep.layer_names:
        stages, cut = model.stages()[name]
        f, g = reference_layer(stages, cut, x)
        assert_sketch(rep, name, f, g, S)


# --------------------------------------------------------------------------- CNN, BatchNorm, spatial

@pytest.mark.parametrize("spatial", ["flatten", "mean"])
def test_cnn_with_batchnorm_in_eval_semantics(spatial):
    model = make_cnn()
    model.train()  # the library must switch BatchNorm to its running statistics
    x, y = cnn_data()
    names = ["conv1", "bn", "conv2", "fc"]
    rep = sketch_model(model, batches(x, y, 4), layers=names, m=16, seed=5, spatial=spatial,
                       dtype=torch.float64)
    S = dense_sketch(x.shape[0], 16, 5)
    for name in names:
        stages, cut = model.stages()[name]
        h, grad = reference_layer(stages, cut, x)
        if spatial == "flatten" or h.dim() == 2:
            f, g = flat(h), flat(grad)
        else:
            # Features averaged over positions, gradients summed over them.
            f, g = h.mean(dim=(2, 3)), grad.sum(dim=(2, 3))
        assert_sketch(rep, name, f, g, S)
        assert rep.layers[name].feature_shape == tuple(h.shape[1:])
    assert rep.meta["spatial"] == spatial
    assert model.training and model.bn.training


def test_cnn_result_independent_of_batch_composition():
    model = make_cnn(1)
    x, y = cnn_data(12, seed=8)
    one = sketch_model(model, [(x, y)], layers=["bn", "conv2"], m=16, dtype=torch.float64)
    # Same samples in the same stream positions, but batched with varying sizes.
    uneven = [(x[:1], y[:1]), (x[1:6], y[1:6]), (x[6:], y[6:])]
    other = sketch_model(model, uneven, layers=["bn", "conv2"], m=16, dtype=torch.float64)
    # Samples with the same index but different batch mates (other inputs around them).
    g = torch.Generator().manual_seed(9)
    noise = torch.randn(12, 2, 5, 5, generator=g, dtype=torch.float64) * 10
    interleaved = torch.stack([x, noise], 1).reshape(24, 2, 5, 5)
    idx = torch.arange(12)
    mixed = [{"x": interleaved[:12], "index": torch.stack([idx, idx + 100], 1).reshape(24)[:12]},
             {"x": interleaved[12:], "index": torch.stack([idx, idx + 100], 1).reshape(24)[12:]}]
    with_noise = sketch_model(model, mixed, layers=["bn", "conv2"], m=16, dtype=torch.float64)
    clean = sketch_model(model, [{"x": x, "index": idx}], layers=["bn", "conv2"], m=16,
                         dtype=torch.float64)
    noise_only = sketch_model(model, [{"x": noise, "index": idx + 100}], layers=["bn", "conv2"],
                              m=16, dtype=torch.float64)
    for name in ("bn", "conv2"):
        for key in ("sketch_f", "sketch_g", "sum_f", "sum_g", "trace"):
            a = getattr(one.layers[name], key)
            torch.testing.assert_close(getattr(other.layers[name], key), a, rtol=1e-12, atol=1e-12)
            # Sketches are linear in the samples: noise batch-mates add exactly their own part.
            both = getattr(clean.layers[name], key) + getattr(noise_only.layers[name], key)
            torch.testing.assert_close(getattr(with_noise.layers[name], key), both,
                                       rtol=1e-12, atol=1e-12)


def test_spatial_mean_hand_computation_on_a_map():
    # One conv layer probed with spatial="mean": f_i = mean over positions of the
    # map, g_i = sum over positions of dL/dmap -- the gradient with respect to a
    # per-channel shift of the whole map.
    model = make_cnn(4)
    x, y = cnn_data(5, seed=3)
    rep = sketch_model(model, [(x, y)], layers=["conv1"], m=8, seed=1, spatial="mean",
                       dtype=torch.float64)
    stages, cut = model.stages()["conv1"]
    S = dense_sketch(5, 8, 1)
    f_ref, g_ref = [], []
    for i in range(5):
        with torch.no_grad():
            h = run(stages[:cut], x[i:i + 1])
        shift = torch.zeros(1, 3, 1, 1, dtype=torch.float64, requires_grad=True)
        logits = run(stages[cut:], h + shift)
        q = tempered_predictive(logits, 0.5)[0]
        expected_loss = sum(q[c] * F.cross_entropy(logits, torch.tensor([c])) for c in range(3))
        grad, = torch.autograd.grad(expected_loss, shift)
        f_ref.append(h.mean(dim=(2, 3))[0])
        g_ref.append(grad.reshape(3))
    assert_sketch(rep, "conv1", torch.stack(f_ref), torch.stack(g_ref), S)


# --------------------------------------------------------------------------- targets, losses, outputs

def test_target_labels_is_gradient_of_cross_entropy_at_true_label():
    model = make_mlp()
    x, y = mlp_data(9)
    rep = sketch_model(model, batches(x, y, 4), layers=["fc1", "fc2"], m=16, seed=2,
                       target="labels", dtype=torch.float64)
    S = dense_sketch(9, 16, 2)
    for name in ("fc1", "fc2"):
        stages, cut = model.stages()[name]
        f, g = reference_layer(stages, cut, x, labels=y)
        assert_sketch(rep, name, f, g, S)
    assert rep.meta["target"] == "labels"


@pytest.mark.parametrize("reduce", ["per_sample", "sum"])
def test_loss_fn_gradients(reduce):
    def squared_error(logits, y):
        per_sample = 0.5 * (logits - F.one_hot(y, logits.shape[1]).to(logits.dtype)).square().sum(1)
        return per_sample if reduce == "per_sample" else per_sample.sum()

    model = make_mlp()
    x, y = mlp_data(7)
    rep = sketch_model(model, batches(x, y, 3), layers=["fc2"], m=8, seed=4,
                       loss_fn=squared_error, dtype=torch.float64)
    stages, cut = model.stages()["fc2"]
    f, g = reference_layer(stages, cut, x, labels=y,
                           per_sample_loss=lambda lg, t: 0.5 * (lg - F.one_hot(t, 4)).square().sum(1))
    assert_sketch(rep, "fc2", f, g, dense_sketch(7, 8, 4))
    assert rep.meta["target"] == "loss_fn"


class Wrapped(nn.Module):
    def __init__(self, inner: nn.Module, style: str) -> None:
        super().__init__()
        self.inner = inner
        self.style = style

    def forward(self, x):
        logits = self.inner(x)
        extra = logits.detach() * 0 + 3.0
        if self.style == "tuple":
            return logits, extra
        if self.style == "list":
            return [logits, extra]
        if self.style == "logits":
            return {"aux": extra, "logits": logits}
        return {"aux": extra, "scores": logits}


@pytest.mark.parametrize("style, output_fn", [
    ("logits", None), ("scores", lambda out: out["scores"]), ("tuple", lambda out: out[0]),
    ("list", lambda out: out[0])])
def test_tuple_and_dict_outputs(style, output_fn):
    inner = make_mlp()
    model = Wrapped(inner, style)
    x, y = mlp_data(6)
    rep = sketch_model(model, [(x, y)], layers=["inner.fc1", "inner.fc2"], m=8, seed=3,
                       output_fn=output_fn, dtype=torch.float64)
    S = dense_sketch(6, 8, 3)
    for name in ("fc1", "fc2"):
        stages, cut = inner.stages()[name]
        f, g = reference_layer(stages, cut, x)
        assert_sketch(rep, f"inner.{name}", f, g, S)


@pytest.mark.parametrize("style", ["tuple", "list"])
def test_output_with_several_tensors_needs_output_fn(style):
    # (logits, extra) or (embedding, logits): which one is the logits is not guessed.
    model = Wrapped(make_mlp(), style)
    x, y = mlp_data(4)
    with pytest.raises(TypeError, match="output_fn") as info:
        sketch_model(model, [(x, y)], layers=["inner.fc1"], m=8)
    assert "2 tensors" in str(info.value)
    assert all_forward_hooks(model) == 0


class LogitsAttribute(nn.Module):
    """Returns an object with a ``logits`` attribute (a dataclass-style model output)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = make_mlp()

    def forward(self, x):
        return type("Output", (), {"logits": self.inner(x), "hidden": x})()


def test_single_tensor_tuples_and_logits_attributes_are_read():
    x, y = mlp_data(6)
    plain = sketch_model(make_mlp(), [(x, y)], layers=["fc1"], m=8, dtype=torch.float64)
    single = Wrapped(make_mlp(), "tuple")
    single.forward = lambda t: (single.inner(t), None)        # one tensor among non-tensors
    for model, layer in ((single, "inner.fc1"), (LogitsAttribute(), "inner.fc1")):
        rep = sketch_model(model, [(x, y)], layers=[layer], m=8, dtype=torch.float64)
        torch.testing.assert_close(rep.layers[layer].sketch_g, plain.layers["fc1"].sketch_g, **TOL)


def test_dict_output_without_logits_needs_output_fn():
    model = Wrapped(make_mlp(), "scores")
    x, y = mlp_data(4)
    with pytest.raises(TypeError, match="output_fn"):
        sketch_model(model, [(x, y)], layers=["inner.fc1"], m=8)
    assert all_forward_hooks(model) == 0


class TupleBlock(nn.Module):
    """A block returning (output, side information), like recurrent layers do."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 6)

    def forward(self, x):
        h = self.linear(x)
        return h, h.detach().norm(dim=1)


class TupleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = TupleBlock()
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h, _ = self.block(x)
        return self.head(torch.tanh(h))


def test_probe_of_a_module_returning_a_tuple():
    torch.manual_seed(5)
    model = TupleNet().double()
    x, y = mlp_data(6, classes=3)
    rep = sketch_model(model, [(x, y)], layers=["block"], m=8, dtype=torch.float64)
    stages = [lambda t: F.linear(t, model.block.linear.weight, model.block.linear.bias),
              lambda h: F.linear(torch.tanh(h), model.head.weight, model.head.bias)]
    f, g = reference_layer(stages, 1, x)
    assert_sketch(rep, "block", f, g, dense_sketch(6, 8, 0))


# --------------------------------------------------------------------------- side effects

def test_frozen_parameters_give_the_same_sketch():
    model = make_mlp()
    x, y = mlp_data(8)
    free = sketch_model(model, [(x, y)], layers=["fc1", "fc3"], m=8, dtype=torch.float64)
    for p in model.parameters():
        p.requires_grad_(False)
    frozen = sketch_model(model, [(x, y)], layers=["fc1", "fc3"], m=8, dtype=torch.float64)
    S = dense_sketch(8, 8, 0)
    for name in ("fc1", "fc3"):
        stages, cut = model.stages()[name]
        f, g = reference_layer(stages, cut, x)
        assert_sketch(frozen, name, f, g, S)
        torch.testing.assert_close(frozen.layers[name].sketch_g, free.layers[name].sketch_g,
                                   rtol=0, atol=0)
    assert all(not p.requires_grad for p in model.parameters())


def test_no_parameter_grad_is_created_or_changed():
    model = make_mlp()
    x, y = mlp_data(8)
    model.fc2.weight.grad = torch.full_like(model.fc2.weight, 0.25)
    sketch_model(model, batches(x, y, 3), layers=["fc1", "fc2"], m=8)
    for name, p in model.named_parameters():
        if name == "fc2.weight":
            assert torch.equal(p.grad, torch.full_like(p, 0.25))
        else:
            assert p.grad is None, name


def test_works_under_no_grad_and_leaves_grad_mode():
    model = make_mlp()
    x, y = mlp_data(5)
    with torch.no_grad():
        rep = sketch_model(model, [(x, y)], layers=["fc2"], m=8, dtype=torch.float64)
        assert not torch.is_grad_enabled()
    stages, cut = model.stages()["fc2"]
    f, g = reference_layer(stages, cut, x)
    assert_sketch(rep, "fc2", f, g, dense_sketch(5, 8, 0))


def mixed_mode_flags(model: nn.Module) -> Dict[str, bool]:
    model.train()
    for name, module in model.named_modules():
        if name.endswith("act1") or name.endswith("bn") or name.endswith("fc3"):
            module.eval()
    return {name: module.training for name, module in model.named_modules()}


class Bomb(Exception):
    pass


class Exploding(nn.Module):
    """Runs an MLP but raises inside its forward on a chosen call."""

    def __init__(self, explode_on: int) -> None:
        super().__init__()
        self.net = make_mlp()
        self.calls = 0
        self.explode_on = explode_on
        self.seen_training: List[bool] = []

    def forward(self, x):
        self.calls += 1
        self.seen_training.append(any(m.training for m in self.modules()))
        h = self.net.fc2(self.net.act1(self.net.fc1(x)))
        if self.calls == self.explode_on:
            raise Bomb("boom")
        return self.net.fc3(self.net.act2(h))


def test_hooks_removed_and_modes_restored_after_success():
    model = Exploding(explode_on=-1)
    flags = mixed_mode_flags(model)
    user_calls = []
    handle = model.net.fc1.register_forward_hook(lambda mod, inp, out: user_calls.append(1))
    x, y = mlp_data(9)
    sketch_model(model, batches(x, y, 4), layers=["net.fc1", "net.fc2"], m=8)
    assert model.seen_training == [False, False, False]  # every forward ran in eval mode
    assert {n: mod.training for n, mod in model.named_modules()} == flags
    assert len(model.net.fc1._forward_hooks) == 1 and len(user_calls) == 3
    handle.remove()
    assert all_forward_hooks(model) == 0


@pytest.mark.parametrize("where", ["model", "output_fn", "loss_fn", "data"])
def test_hooks_removed_and_modes_restored_after_exception(where):
    model = Exploding(explode_on=2 if where == "model" else -1)
    flags = mixed_mode_flags(model)
    x, y = mlp_data(9)

    def data():
        yield x[:4], y[:4]
        if where == "data":
            raise Bomb("data")
        yield x[4:], y[4:]

    def output_fn(out):
        if where == "output_fn" and model.calls == 2:
            raise Bomb("output")
        return out

    def loss_fn(logits, t):
        if where == "loss_fn" and model.calls == 2:
            raise Bomb("loss")
        return F.cross_entropy(logits, t, reduction="none")

    with pytest.raises(Bomb):
        sketch_model(model, data(), layers=["net.fc1", "net.fc2"], m=8, output_fn=output_fn,
                     loss_fn=loss_fn)
    assert {n: mod.training for n, mod in model.named_modules()} == flags
    assert all_forward_hooks(model) == 0
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------- batching and order

def test_batch_sizes_give_identical_float64_sketches():
    model = make_mlp(6)
    x, y = mlp_data(64, seed=6)
    reps = [sketch_model(model, batches(x, y, b), layers=["fc1", "fc2"], m=16, seed=9,
                         dtype=torch.float64, product=True, mean_embedding=True)
            for b in (1, 7, 64)]
    for rep in reps[1:]:
        assert rep.n == 64 and rep.row_intervals == [[0, 64]]
        for name in ("fc1", "fc2"):
            for key, value in reps[0].layers[name].tensors().items():
                torch.testing.assert_close(rep.layers[name].tensors()[key], value,
                                           rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rep.sketch_ones, reps[0].sketch_ones, rtol=0, atol=0)


def test_batch_sizes_float32_close():
    model = make_mlp(6).float()
    x, y = mlp_data(64, seed=6)
    x = x.float()
    reps = [sketch_model(model, batches(x, y, b), layers=["fc2"], m=16, seed=9) for b in (1, 7, 64)]
    for rep in reps[1:]:
        torch.testing.assert_close(rep.layers["fc2"].sketch_f, reps[0].layers["fc2"].sketch_f,
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(rep.layers["fc2"].sketch_g, reps[0].layers["fc2"].sketch_g,
                                   rtol=1e-4, atol=1e-5)


class IndexedDataset(torch.utils.data.Dataset):
    def __init__(self, x, y) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i):
        return i, self.x[i], self.y[i]


def assert_same_rep(a, b, names, tol=None) -> None:
    tol = tol or dict(rtol=1e-12, atol=1e-12)
    assert a.n == b.n and a.row_intervals == b.row_intervals
    for name in names:
        for key, value in a.layers[name].tensors().items():
            torch.testing.assert_close(b.layers[name].tensors()[key], value, **tol)
    torch.testing.assert_close(b.sketch_ones, a.sketch_ones, **tol)


def test_shuffled_index_batches_equal_sorted_order():
    model = make_mlp(7)
    x, y = mlp_data(30, seed=7)
    names = ["fc1", "fc2"]
    kwargs = dict(layers=names, m=16, seed=3, dtype=torch.float64)
    ordered = sketch_model(model, [{"x": x[i:i + 8], "y": y[i:i + 8],
                                    "index": torch.arange(i, min(i + 8, 30))}
                                   for i in range(0, 30, 8)], **kwargs)
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(1))
    shuffled = sketch_model(model, [{"x": x[p], "y": y[p], "index": p} for p in perm.split(7)], **kwargs)
    loader = torch.utils.data.DataLoader(IndexedDataset(x, y), batch_size=6, shuffle=True,
                                         generator=torch.Generator().manual_seed(2))
    tuples = sketch_model(model, loader, **kwargs)
    assert ordered.row_keys == "index"
    assert_same_rep(ordered, shuffled, names)
    assert_same_rep(ordered, tuples, names)
    # Index keys 0..n-1 in order are the stream numbering.
    stream = sketch_model(model, batches(x, y, 8), **kwargs)
    assert stream.row_keys == "stream"
    for name in names:
        torch.testing.assert_close(stream.layers[name].sketch_f, ordered.layers[name].sketch_f,
                                   rtol=1e-12, atol=1e-12)
    # And the shuffled result is the hand computation with S keyed by dataset index.
    stages, cut = model.stages()["fc2"]
    f, g = reference_layer(stages, cut, x)
    assert_sketch(shuffled, "fc2", f, g, dense_sketch(30, 16, 3))


def test_product_and_mean_embedding_against_hand_computation():
    model = make_mlp(8)
    x, y = mlp_data(10, seed=8)
    rep = sketch_model(model, batches(x, y, 3), layers=["fc1", "fc2"], m=16, seed=6,
                       product=True, mean_embedding=True, dtype=torch.float64)
    S = dense_sketch(10, 16, 6)
    for name in ("fc1", "fc2"):
        stages, cut = model.stages()[name]
        f, g = reference_layer(stages, cut, x)
        layer = rep.layers[name]
        torch.testing.assert_close(layer.sketch_fg, S @ (f * g), **TOL)
        torch.testing.assert_close(layer.sum_fg, (f * g).sum(0), **TOL)
        psi = sum(torch.outer(g[i], f[i]) for i in range(10))
        torch.testing.assert_close(layer.mean_psi, psi, **TOL)


def test_max_batches_stops_early():
    model = make_mlp()
    x, y = mlp_data(12)
    rep = sketch_model(model, batches(x, y, 4), layers=["fc1"], m=8, max_batches=2,
                       dtype=torch.float64)
    assert rep.n == 8
    stages, cut = model.stages()["fc1"]
    f, g = reference_layer(stages, cut, x[:8])
    assert_sketch(rep, "fc1", f, g, dense_sketch(8, 8, 0))


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("beta, error", [
    (0, ValueError), (0.0, ValueError), (-0.5, ValueError), (1.0000001, ValueError), (2, ValueError),
    (float("nan"), ValueError), (float("inf"), ValueError), (True, TypeError), ("0.5", TypeError),
    (None, TypeError)])
def test_beta_outside_unit_interval(beta, error):
    model = make_mlp()
    x, y = mlp_data(4)
    with pytest.raises(error, match="beta"):
        sketch_model(model, [(x, y)], layers=["fc1"], m=8, beta=beta)
    assert all_forward_hooks(model) == 0


def test_layer_typo_suggests_close_names():
    model = make_mlp()
    x, y = mlp_data(4)
    with pytest.raises(ValueError, match="fcc2") as info:
        sketch_model(model, [(x, y)], layers=["fc1", "fcc2"], m=8)
    assert "'fc2'" in str(info.value) and "did you mean" in str(info.value)
    with pytest.raises(ValueError, match="not a module"):
        sketch_model(model, [(x, y)], layers=["zzzzzz"], m=8)
    assert all_forward_hooks(model) == 0


@pytest.mark.parametrize("layers, match", [([], "empty"), (["fc1", "fc1"], "duplicates"),
                                           ([""], "not a module")])
def test_bad_layer_lists(layers, match):
    model = make_mlp()
    x, y = mlp_data(4)
    with pytest.raises(ValueError, match=match):
        sketch_model(model, [(x, y)], layers=layers, m=8)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(target="logits"), ValueError, "target"),
    (dict(spatial="max"), ValueError, "spatial"),
    (dict(max_batches=0), ValueError, "max_batches"),
    (dict(m=0), ValueError, "m"),
    (dict(m=10, sparsity=3), ValueError, "sparsity"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(dtype=torch.float16), TypeError, "dtype"),
])
def test_bad_settings(kwargs, error, match):
    model = make_mlp()
    x, y = mlp_data(4)
    settings = dict(layers=["fc1"], m=8)
    settings.update(kwargs)
    with pytest.raises(error, match=match):
        sketch_model(model, [(x, y)], **settings)
    assert all_forward_hooks(model) == 0


def test_bad_model_data_and_batches():
    model = make_mlp()
    x, y = mlp_data(4)
    with pytest.raises(TypeError, match="model"):
        sketch_model(lambda t: t, [(x, y)], layers=["fc1"])
    with pytest.raises(ValueError, match="no samples"):
        sketch_model(model, [], layers=["fc1"], m=8)
    with pytest.raises(TypeError, match="batch"):
        sketch_model(model, ["not a tensor"], layers=["fc1"], m=8)
    with pytest.raises(ValueError, match="labels"):
        sketch_model(model, [x], layers=["fc1"], m=8, target="labels")
    with pytest.raises(ValueError, match="'x'"):
        sketch_model(model, [{"inputs_typo": x}], layers=["fc1"], m=8)
    assert all_forward_hooks(model) == 0


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.shared(torch.relu(self.shared(x))))


def test_layer_called_twice_in_one_forward():
    torch.manual_seed(0)
    model = Twice().double()
    model.train()
    x, y = mlp_data(4, classes=3)
    with pytest.raises((RuntimeError, ValueError), match="twice") as info:
        sketch_model(model, [(x, y)], layers=["shared"], m=8)
    assert "'shared'" in str(info.value)
    assert all_forward_hooks(model) == 0
    assert model.training and model.shared.training
    # Probing a module that runs once is fine.
    sketch_model(model, [(x, y)], layers=["head"], m=8)


class Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(5, 3)
        self.spare = nn.Linear(5, 3)

    def forward(self, x):
        return self.used(x)


def test_layer_that_does_not_run():
    model = Unused().double()
    x, y = mlp_data(4, classes=3)
    with pytest.raises((RuntimeError, ValueError), match="spare"):
        sketch_model(model, [(x, y)], layers=["spare"], m=8)
    assert all_forward_hooks(model) == 0


def test_non_finite_features_name_layer_and_batch():
    model = make_mlp()
    x, y = mlp_data(12)
    x = x.clone()
    x[9, 2] = float("nan")  # sample 9 lives in batch 2 (batches of 4)
    with pytest.raises((FloatingPointError, ValueError)) as info:
        sketch_model(model, batches(x, y, 4), layers=["fc2"], m=8)
    message = str(info.value)
    assert "'fc2'" in message and "batch 2" in message and "features" in message
    assert all_forward_hooks(model) == 0


class PoisonedBackward(torch.autograd.Function):
    """Identity forward; its backward turns the incoming gradient of sample 0 into NaN."""

    @staticmethod
    def forward(ctx, h):
        return h.clone()

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        grad[0] = float("nan")
        return grad


class PoisonNet(nn.Module):
    """Finite forward everywhere, non-finite gradient below the poisoned step."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(PoisonedBackward.apply(torch.tanh(self.fc1(x))))


def test_non_finite_gradients_name_layer_and_batch():
    torch.manual_seed(0)
    model = PoisonNet().double()
    x, y = mlp_data(9, classes=3)
    with torch.no_grad():
        assert bool(torch.isfinite(model(x)).all())
    with pytest.raises((FloatingPointError, ValueError)) as info:
        sketch_model(model, batches(x, y, 4), layers=["fc1"], m=8)
    message = str(info.value)
    assert "'fc1'" in message and "batch 0" in message and "gradients" in message
    assert all_forward_hooks(model) == 0


# --------------------------------------------------------------------------- threads

def test_two_threads_sketching_one_model_run_one_at_a_time():
    # Without serialisation each call's hooks also fire on the other thread's forward
    # passes ("called twice", or another batch's features) and one call may save the
    # other's eval flags as the ones to restore.
    model = make_mlp(9)
    flags = mixed_mode_flags(model)
    x, y = mlp_data(12, seed=9)
    pause = model.fc2.register_forward_pre_hook(lambda module, inputs: time.sleep(0.002))
    settings = dict(layers=["fc1", "fc2"], m=16, seed=4, dtype=torch.float64, progress=False)
    expected = sketch_model(model, batches(x, y, 3), **settings)
    results, errors = [], []

    def work():
        try:
            for _ in range(4):
                results.append(sketch_model(model, batches(x, y, 3), **settings))
        except Exception as error:      # collected: an exception in a thread would be lost
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    pause.remove()
    assert errors == []
    assert len(results) == 12
    for rep in results:
        assert_same_rep(expected, rep, ["fc1", "fc2"])
    assert {n: mod.training for n, mod in model.named_modules()} == flags
    assert all_forward_hooks(model) == 0


# --------------------------------------------------------------------------- odd input

def test_empty_batches_mid_stream_are_skipped():
    model = make_cnn(2)
    x, y = cnn_data(10, seed=4)
    names = ["conv1", "conv2"]
    settings = dict(layers=names, m=16, seed=2, dtype=torch.float64)
    expected = sketch_model(model, [(x[:4], y[:4]), (x[4:], y[4:])], **settings)
    with_empty = sketch_model(model, [(x[:0], y[:0]), (x[:4], y[:4]), (x[4:4], y[4:4]),
                                      (x[4:], y[4:])], **settings)
    assert_same_rep(expected, with_empty, names)
    idx = torch.arange(10)
    indexed = sketch_model(model, [{"x": x[:6], "index": idx[:6]}, {"x": x[:0], "index": idx[:0]},
                                   {"x": x[6:], "index": idx[6:]}], **settings)
    for name in names:
        torch.testing.assert_close(indexed.layers[name].sketch_f, expected.layers[name].sketch_f,
                                   **TOL)
    with pytest.raises(ValueError, match="no samples"):
        sketch_model(model, [(x[:0], y[:0])], **settings)


def test_numpy_scalars_work_like_python_numbers():
    model = make_mlp()
    x, y = mlp_data(12)
    numpy_settings = dict(m=np.int64(16), seed=np.int64(3), beta=np.float32(0.5),
                          sparsity=np.int64(2), max_batches=np.int64(3), psi_dim=np.int64(32))
    python_settings = dict(m=16, seed=3, beta=0.5, sparsity=2, max_batches=3, psi_dim=32)
    a = sketch_model(model, batches(x, y, 3), layers=["fc1"], dtype=torch.float64, **numpy_settings)
    b = sketch_model(model, batches(x, y, 3), layers=["fc1"], dtype=torch.float64, **python_settings)
    assert_same_rep(b, a, ["fc1"])
    assert type(a.meta["beta"]) is float and (a.m, a.seed, a.sparsity) == (16, 3, 2)
    assert type(a.m) is int and a.n == 9


@pytest.mark.parametrize("layers, error, match", [
    ([], ValueError, "layers is empty"),
    ([0], TypeError, "layers must hold module names"),
    (["fc1", 3], TypeError, "layers must hold module names"),
    (7, TypeError, "layers must be a list"),
])
def test_layers_that_are_not_names(layers, error, match):
    model = make_mlp()
    x, y = mlp_data(4)
    with pytest.raises(error, match=match):
        sketch_model(model, [(x, y)], layers=layers, m=8)
    assert all_forward_hooks(model) == 0


@pytest.mark.parametrize("data, match", [
    (torch.randn(6, 5, dtype=torch.float64), "single tensor of shape \\(6, 5\\)"),
    ({"x": torch.randn(6, 5, dtype=torch.float64)}, "pass \\[batch\\]"),
    (5, "iterable of batches"),
])
def test_data_that_is_not_a_stream_of_batches(data, match):
    with pytest.raises(TypeError, match=match):
        sketch_model(make_mlp(), data, layers=["fc1"], m=8)


def test_dict_batch_without_x_is_passed_as_keyword_arguments():
    class Keywords(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_mlp()

        def forward(self, features, scale):
            return self.net(features * scale)

    x, y = mlp_data(8)
    model = Keywords()
    plain = sketch_model(model.net, [(2 * x, y)], layers=["fc1"], m=8, target="labels",
                         dtype=torch.float64)
    rep = sketch_model(model, [{"features": x, "scale": 2.0, "labels": y, "index": torch.arange(8)}],
                       layers=["net.fc1"], m=8, target="labels", dtype=torch.float64)
    torch.testing.assert_close(rep.layers["net.fc1"].sketch_g, plain.layers["fc1"].sketch_g, **TOL)
    with pytest.raises(ValueError, match="takes no argument 'extra'"):
        sketch_model(model, [{"features": x, "scale": 2.0, "extra": x}], layers=["net.fc1"], m=8)


# --------------------------------------------------------------------------- autograd off

def test_sketching_under_inference_mode():
    model = make_mlp()
    x, y = mlp_data(8)
    expected = sketch_model(model, [(x, y)], layers=["fc1", "fc2"], m=8, dtype=torch.float64)
    with torch.inference_mode():
        inference_x = x.clone()
        rep = sketch_model(model, [(inference_x, y)], layers=["fc1", "fc2"], m=8,
                           dtype=torch.float64)
        assert torch.is_inference_mode_enabled()
    assert_same_rep(expected, rep, ["fc1", "fc2"])
    assert not rep.layers["fc1"].sketch_f.is_inference()
    rep.update({"fc1": torch.ones(1, 8, dtype=torch.float64), "fc2": torch.ones(1, 6, dtype=torch.float64)},
               {"fc1": torch.ones(1, 8, dtype=torch.float64), "fc2": torch.ones(1, 6, dtype=torch.float64)})


def test_model_made_under_inference_mode_says_what_to_do():
    with torch.inference_mode():
        model = make_mlp()
    x, y = mlp_data(5)
    with pytest.raises(RuntimeError, match="inference_mode") as info:
        sketch_model(model, [(x, y)], layers=["fc1"], m=8)
    assert "gradients=False" in str(info.value) and "element 0" not in str(info.value)
    features = sketch_model(model, [(x, y)], layers=["fc1"], m=8, gradients=False,
                            dtype=torch.float64)
    f = F.linear(x, model.fc1.weight, model.fc1.bias)
    torch.testing.assert_close(features.layers["fc1"].sketch_f, dense_sketch(5, 8, 0) @ f, **TOL)


class NoGradHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(5, 6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        with torch.no_grad():
            return self.head(h)


def test_no_grad_head_says_what_is_wrong_and_what_to_do():
    torch.manual_seed(0)
    model = NoGradHead().double()
    model.train()
    x, y = mlp_data(5)
    with pytest.raises(RuntimeError) as info:
        sketch_model(model, [(x, y)], layers=["body"], m=8)
    message = str(info.value)
    assert "does not require grad" in message and "no_grad" in message
    assert "gradients=False" in message and "element 0" not in message
    assert all_forward_hooks(model) == 0 and model.training
    rep = sketch_model(model, [(x, y)], layers=["body"], m=8, gradients=False)
    assert rep.n == 5 and rep.options["gradients"] is False


class SideBranch(nn.Module):
    """``side`` runs on every batch but its output never reaches the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.side = nn.Linear(5, 3)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        self.last_side = self.side(x)
        return self.head(torch.tanh(self.fc1(x)))


def test_a_layer_with_identically_zero_gradients_gets_a_warning():
    torch.manual_seed(1)
    model = SideBranch().double()
    x, y = mlp_data(9)
    with pytest.warns(RuntimeWarning, match="identically zero") as record:
        rep = sketch_model(model, batches(x, y, 4), layers=["fc1", "side"], m=8)
    message = str(record[0].message)
    assert "'side'" in message and "'fc1'" not in message
    assert float(rep.layers["side"].sketch_g.abs().max()) == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sketch_model(model, batches(x, y, 4), layers=["fc1"], m=8)


class GradModeRecorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_mlp()
        self.grad_modes: List[bool] = []

    def forward(self, x):
        self.grad_modes.append(torch.is_grad_enabled())
        return self.net(x)


def test_features_only_runs_no_backward_and_keeps_no_graph():
    model = GradModeRecorder()
    x, y = mlp_data(10)
    names = ["net.fc1", "net.act1", "net.fc3"]
    rep = sketch_model(model, batches(x, y, 4), layers=names, m=16, seed=2, gradients=False,
                       dtype=torch.float64)
    assert model.grad_modes == [False, False, False]
    assert rep.options == {"gradients": False, "psi_dim": 0, "psi_buckets": 0, "product": False,
                           "mean_embedding": False}
    assert rep.meta["beta"] is None and rep.meta["target"] is None
    S = dense_sketch(10, 16, 2)
    for name in names:
        stages, cut = model.net.stages()[name.split(".")[1]]
        f, _ = reference_layer(stages, cut, x)
        torch.testing.assert_close(rep.layers[name].sketch_f, S @ f, **TOL)
        assert set(rep.layers[name].tensors()).isdisjoint({"sketch_g", "sum_g"})
    # act1 is an in-place ReLU on fc1's output: fc1's features must be the pre-activation.
    assert bool((rep.layers["net.fc1"].sketch_f != rep.layers["net.act1"].sketch_f).any())
    with pytest.raises(ValueError, match="gradients"):
        sketch_model(model, batches(x, y, 4), layers=names, m=16, gradients=False, product=True)


# --------------------------------------------------------------------------- exact_model

class StandIn:
    """The ``ExactRepresentation`` protocol, recording what it is fed."""

    instances: List["StandIn"] = []

    def __init__(self, *, dtype=torch.float32, device=None, max_rows=20000, storage=None,
                 meta=None) -> None:
        self.arguments = dict(dtype=dtype, device=device, max_rows=max_rows, storage=storage)
        self.meta = dict(meta or {})
        self.batches: List[Dict] = []
        self.n = 0
        self.closed = False
        StandIn.instances.append(self)

    def update(self, features, gradients=None, *, rows=None, feature_shapes=None, label=""):
        self.batches.append(dict(features=features, gradients=gradients, rows=rows,
                                 shapes=feature_shapes, label=label))
        self.n += next(iter(features.values())).shape[0]

    def close(self) -> None:
        self.closed = True


def test_exact_model_feeds_the_exact_protocol(monkeypatch):
    # Works whether or not nnsim_fast.exact is importable: exact_model imports it when called.
    stand_in_module = types.ModuleType("nnsim_fast.exact")
    stand_in_module.ExactRepresentation = StandIn
    monkeypatch.setitem(sys.modules, "nnsim_fast.exact", stand_in_module)
    StandIn.instances.clear()
    model = make_cnn(3)
    x, y = cnn_data(7, seed=5)
    idx = torch.tensor([9, 2, 5, 0, 7, 1, 3])
    data = [{"x": x[:4], "y": y[:4], "index": idx[:4]}, {"x": x[4:], "y": y[4:], "index": idx[4:]}]
    rep = exact_model(model, data, layers=["bn", "fc"], spatial="mean", max_rows=50,
                      storage="somewhere", dtype=torch.float64)
    assert rep.arguments == dict(dtype=torch.float64, device=None, max_rows=50, storage="somewhere")
    assert rep.meta == {"beta": 0.5, "target": "expected", "spatial": "mean", "tokens": "mean",
                        "layers": ["bn", "fc"]}
    assert [b["label"] for b in rep.batches] == ["batch 0", "batch 1"]
    assert torch.equal(torch.cat([b["rows"] for b in rep.batches]), idx)
    assert rep.batches[0]["shapes"] == {"bn": (3, 5, 5), "fc": (3,)}
    f_all = torch.cat([b["features"]["bn"] for b in rep.batches])
    g_all = torch.cat([b["gradients"]["bn"] for b in rep.batches])
    stages, cut = model.stages()["bn"]
    h, grad = reference_layer(stages, cut, x)
    torch.testing.assert_close(f_all, h.mean(dim=(2, 3)), **TOL)
    torch.testing.assert_close(g_all, grad.sum(dim=(2, 3)), **TOL)
    features_only = exact_model(model, data, layers=["bn"], gradients=False)
    assert all(b["gradients"] is None for b in features_only.batches)
    # A failing pass closes the exact representation (its files go away).
    with pytest.raises(ValueError, match="labels"):
        exact_model(model, [x[:3]], layers=["bn"], target="labels")
    assert StandIn.instances[-1].closed


def test_exact_model_rows_equal_features_and_gradients():
    exact = pytest.importorskip("nnsim_fast.exact", reason="nnsim_fast.exact is not available")
    model = make_mlp(4)
    x, y = mlp_data(11, seed=4)
    names = ["fc1", "fc3"]
    rep = exact_model(model, batches(x, y, 4), layers=names, dtype=torch.float64)
    try:
        reference = features_and_gradients(model, x, names, batch=5)
        for name in names:
            f, g = reference[name]
            K = exact.exact_kernel(rep, name, kind="hadamard", centered=False)
            torch.testing.assert_close(K, (f @ f.T) * (g @ g.T), **TOL)
            stages, cut = model.stages()[name]
            f_ref, g_ref = reference_layer(stages, cut, x)
            torch.testing.assert_close(f, f_ref, **TOL)
            torch.testing.assert_close(g, g_ref, **TOL)
    finally:
        rep.close()


class CountingData:
    """An iterable of batches that counts how often it is iterated and how far."""

    def __init__(self, batches) -> None:
        self.batches, self.iterations, self.pulled = batches, 0, 0

    def __iter__(self):
        self.iterations += 1
        for batch in self.batches:
            self.pulled += 1
            yield batch


def test_data_is_iterated_once_and_no_further_than_needed():
    model = make_mlp()
    x, y = mlp_data(12)
    data = CountingData(batches(x, y, 3))
    sketch_model(model, data, layers=["fc1"], m=8)
    assert (data.iterations, data.pulled) == (1, 4)
    limited = CountingData(batches(x, y, 3))
    rep = sketch_model(model, limited, layers=["fc1"], m=8, max_batches=2)
    assert (limited.iterations, limited.pulled, rep.n) == (1, 2, 6)
