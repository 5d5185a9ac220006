"""Tests of sketched kernels, similarity tables and the mean-embedding norm.

References are float64 formulas written here: Grams of the stored sketches,
the explicit centring matrix ``H``, a dense sketch ``S`` of explicitly centred
data, the optimal-transport map from scipy's matrix square root, and loops of
``indices.cka`` / ``indices.nbs`` over kernels centred by hand.
"""
from __future__ import annotations

import copy
import math
import warnings
from typing import Dict, Optional

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from nnsim_fast import (Representation, estimators, indices, mean_embedding_norm, ops, similarity,
                        similarity_matrix, sketch_model)
from nnsim_fast.compare import DifferentRowsWarning, ResolutionWarning

TOL = dict(rtol=1e-10, atol=1e-10)
KINDS = ("feature", "gradient", "hadamard", "sum", "khatri_rao", "transport")


def dense_sketch(n: int, m: int, seed: int, sparsity: int = 1) -> torch.Tensor:
    buckets, signs = ops.sketch_hash(n, m, seed, 0, sparsity)
    S = torch.zeros(m, n, dtype=torch.float64)
    columns = torch.arange(n)
    for j in range(sparsity):
        S[buckets[:, j], columns] = signs[:, j].to(torch.float64) / math.sqrt(sparsity)
    return S


def centring(m: int) -> torch.Tensor:
    return torch.eye(m, dtype=torch.float64) - torch.full((m, m), 1.0 / m, dtype=torch.float64)


def gram(x: torch.Tensor) -> torch.Tensor:
    return x @ x.T


def psd_sqrt(K: torch.Tensor) -> torch.Tensor:
    root = scipy.linalg.sqrtm(K.numpy())
    return torch.from_numpy(np.real(root))


def hand_transport(K_f: torch.Tensor, K_g: torch.Tensor):
    """(I/2 + T/2) K_f (I/2 + T/2) and T, for a full-rank K_f, via scipy's sqrtm and inv."""
    root = psd_sqrt(K_f)
    inv_root = torch.linalg.inv(root)
    T = inv_root @ psd_sqrt(root @ K_g @ root) @ inv_root
    A = (torch.eye(K_f.shape[0], dtype=torch.float64) + T) / 2
    return A @ K_f @ A, T


def hand_kernel(kind: str, sf: torch.Tensor, sg: torch.Tensor, sfg: Optional[torch.Tensor]):
    if kind == "feature":
        return gram(sf)
    if kind == "gradient":
        return gram(sg)
    if kind == "hadamard":
        return gram(sf) * gram(sg)
    if kind == "sum":
        return gram(sf) + gram(sg)
    if kind == "khatri_rao":
        return gram(sfg)
    return hand_transport(gram(sf), gram(sg))[0]


# Square layers (d_f = d_g, needed for the product sketch) of two widths, so the
# batched Gram paths group layers; widths >= m keep K_f full rank for transport.
WIDTHS = {"l1": (14, 14), "l2": (12, 12), "l3": (14, 14)}


def random_data(n: int, seed: int, widths: Dict = WIDTHS):
    g = torch.Generator().manual_seed(seed)
    feats = {k: torch.randn(n, df, generator=g, dtype=torch.float64) + 1.0
             for k, (df, _) in widths.items()}
    grads = {k: torch.randn(n, dg, generator=g, dtype=torch.float64) - 0.5
             for k, (_, dg) in widths.items()}
    return feats, grads


def make_rep(n: int = 40, seed: int = 0, m: int = 8, sketch_seed: int = 1, sparsity: int = 1,
             widths: Dict = WIDTHS, mean_embedding: bool = True):
    feats, grads = random_data(n, seed, widths)
    rep = Representation(m, sketch_seed, sparsity, beta=0.5, dtype=torch.float64,
                         product=all(df == dg for df, dg in widths.values()),
                         mean_embedding=mean_embedding)
    for start in range(0, n, 16):
        sl = slice(start, start + 16)
        rep.update({k: v[sl] for k, v in feats.items()}, {k: v[sl] for k, v in grads.items()})
    return rep, feats, grads


@pytest.fixture(scope="module")
def reps():
    return [make_rep(seed=s)[0] for s in (0, 1, 2)]


# --------------------------------------------------------------------------- kernels

@pytest.mark.parametrize("sparsity", [1, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_kernel_kinds_equal_formulas_on_stored_sketches(kind, sparsity):
    rep, _, _ = make_rep(sparsity=sparsity)
    stack = rep.kernels(kind=kind)
    assert stack.shape == (3, 8, 8) and stack.dtype == torch.float64
    for i, name in enumerate(rep.layer_names):
        layer = rep.layers[name]
        expected = hand_kernel(kind, layer.sketch_f, layer.sketch_g, layer.sketch_fg)
        torch.testing.assert_close(rep.kernel(name, kind=kind), expected, **TOL)
        torch.testing.assert_close(stack[i], expected, **TOL)


def test_default_kind_is_the_papers_hadamard_of_sketched_data():
    rep, feats, grads = make_rep()
    S = dense_sketch(40, 8, 1)
    for name in rep.layer_names:
        expected = gram(S @ feats[name]) * gram(S @ grads[name])
        torch.testing.assert_close(rep.kernel(name), expected, **TOL)
        # khatri_rao: the Gram of the sketch of the elementwise product F o G.
        fg = feats[name] * grads[name]
        torch.testing.assert_close(rep.kernel(name, kind="khatri_rao"), gram(S @ fg), **TOL)


def test_transport_maps_feature_kernel_to_gradient_kernel_full_rank():
    rep, _, _ = make_rep()
    for name in rep.layer_names:
        layer = rep.layers[name]
        K_f, K_g = gram(layer.sketch_f), gram(layer.sketch_g)
        assert int(torch.linalg.matrix_rank(K_f)) == 8
        expected, T = hand_transport(K_f, K_g)
        torch.testing.assert_close(T @ K_f @ T, K_g, rtol=1e-8, atol=1e-8 * float(K_g.abs().max()))
        got = rep.kernel(name, kind="transport")
        scale = float(got.abs().max())
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10 * scale)
        # Equivalent form: (K_f + T K_f + K_f T + K_g) / 4.
        torch.testing.assert_close(got, (K_f + T @ K_f + K_f @ T + K_g) / 4, rtol=1e-8,
                                   atol=1e-8 * scale)
        torch.testing.assert_close(got, got.T, rtol=0, atol=1e-12 * scale)
        assert float(torch.linalg.eigvalsh(got).min()) >= -1e-10 * scale


def test_transport_rank_deficient_is_symmetric_psd_and_maps_on_the_range():
    # d_f = 3 < m = 8: K_f has rank 3; T acts on its range only.
    rep, _, _ = make_rep(widths={"narrow": (3, 5)})
    layer = rep.layers["narrow"]
    K_f, K_g = gram(layer.sketch_f), gram(layer.sketch_g)
    got = rep.kernel("narrow", kind="transport")
    scale = float(got.abs().max())
    torch.testing.assert_close(got, got.T, rtol=0, atol=1e-12 * scale)
    assert float(torch.linalg.eigvalsh(got).min()) >= -1e-9 * scale
    # Hand reference with pseudo-inverse roots on the range of K_f.
    values, vectors = torch.linalg.eigh(K_f)
    keep = values > 1e-9 * values.max()
    assert int(keep.sum()) == 3
    U, lam = vectors[:, keep], values[keep]
    root = U @ torch.diag(lam.sqrt()) @ U.T
    inv_root = U @ torch.diag(lam.rsqrt()) @ U.T
    T = inv_root @ psd_sqrt(root @ K_g @ root) @ inv_root
    P = U @ U.T
    torch.testing.assert_close(T @ K_f @ T, P @ K_g @ P, rtol=1e-6, atol=1e-7 * float(K_g.abs().max()))
    A = (torch.eye(8, dtype=torch.float64) + T) / 2
    torch.testing.assert_close(got, A @ K_f @ A, rtol=1e-6, atol=1e-7 * scale)


@pytest.mark.parametrize("kind", KINDS)
def test_bucket_centering_is_H_K_H(kind):
    rep, _, _ = make_rep()
    H = centring(8)
    for name in rep.layer_names:
        plain = rep.kernel(name, kind=kind)
        torch.testing.assert_close(rep.kernel(name, kind=kind, centering="buckets"), H @ plain @ H,
                                   rtol=1e-10, atol=1e-10 * float(plain.abs().max()))


@pytest.mark.parametrize("sparsity", [1, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_data_centering_equals_sketch_of_centred_data(kind, sparsity):
    rep, feats, grads = make_rep(sparsity=sparsity)
    S = dense_sketch(40, 8, 1, sparsity)
    for name in rep.layer_names:
        f, g = feats[name], grads[name]
        fc, gc = f - f.mean(0), g - g.mean(0)
        fg = f * g
        sfg = S @ (fg - fg.mean(0))
        expected = hand_kernel(kind, S @ fc, S @ gc, sfg)
        got = rep.kernel(name, kind=kind, centering="data")
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-9 * float(expected.abs().max()))


def test_kernel_errors():
    rep, _, _ = make_rep(widths={"a": (4, 3)})
    with pytest.raises(ValueError, match="product=True"):
        rep.kernel("a", kind="khatri_rao")
    with pytest.raises(ValueError, match="kind"):
        rep.kernel("a", kind="hadamard_product")
    with pytest.raises(ValueError, match="centering"):
        rep.kernel("a", centering="rows")
    with pytest.raises(KeyError, match="'b'"):
        rep.kernel("b")
    with pytest.raises(ValueError, match="empty"):
        Representation(8, 0).kernel("a")


# --------------------------------------------------------------------------- similarity

@pytest.mark.parametrize("index", ["cka", "nbs"])
@pytest.mark.parametrize("kind", ["hadamard", "feature", "khatri_rao", "transport"])
def test_self_similarity_has_unit_diagonal(reps, index, kind):
    # transport is not linear in the Grams: only the kernel-based estimators take it.
    estimator = "paper" if kind == "transport" else None
    matrix, names_a, names_b = similarity(reps[0], reps[0], index=index, kind=kind,
                                          estimator=estimator)
    assert names_a == names_b == ["l1", "l2", "l3"]
    assert matrix.shape == (3, 3) and matrix.dtype == torch.float64
    torch.testing.assert_close(matrix.diagonal(), torch.ones(3, dtype=torch.float64),
                               rtol=0, atol=1e-9)
    torch.testing.assert_close(matrix, matrix.T, rtol=0, atol=1e-9)
    assert float(matrix.min()) >= 0.0 and float(matrix.max()) <= 1.0


@pytest.mark.parametrize("centering", ["none", "buckets", "data"])
@pytest.mark.parametrize("index", ["cka", "nbs"])
@pytest.mark.parametrize("kind", ["hadamard", "sum"])
def test_similarity_equals_loop_over_hand_centred_kernels(reps, index, kind, centering):
    rep_a, rep_b = reps[0], reps[1]
    estimator = "paper" if centering == "buckets" else "plugin"
    matrix, names_a, names_b = similarity(rep_a, rep_b, index=index, kind=kind, centering=centering,
                                          estimator=estimator)
    H = centring(8)
    fn = indices.cka if index == "cka" else indices.nbs
    for i, la in enumerate(names_a):
        for j, lb in enumerate(names_b):
            if centering == "data":
                Ka = rep_a.kernel(la, kind=kind, centering="data")
                Kb = rep_b.kernel(lb, kind=kind, centering="data")
            else:
                ya, yb = rep_a.layers[la], rep_b.layers[lb]
                Ka = hand_kernel(kind, ya.sketch_f, ya.sketch_g, None)
                Kb = hand_kernel(kind, yb.sketch_f, yb.sketch_g, None)
                if centering == "buckets":
                    Ka, Kb = H @ Ka @ H, H @ Kb @ H
            expected = fn(Ka, Kb, centered=False)
            assert math.isclose(float(matrix[i, j]), expected, rel_tol=1e-9, abs_tol=1e-12)
    # Off-diagonal values of unrelated random data are not trivially 1.
    assert float(matrix.min()) < 0.999


def test_layer_selection(reps):
    full, _, _ = similarity(reps[0], reps[1], index="cka")
    sub, names_a, names_b = similarity(reps[0], reps[1], layers=(["l3", "l1"], ["l2"]))
    assert names_a == ["l3", "l1"] and names_b == ["l2"]
    torch.testing.assert_close(sub, full[[2, 0]][:, [1]], rtol=0, atol=1e-14)
    same, names_a, names_b = similarity(reps[0], reps[1], layers=["l2", "l3"])
    assert names_a == names_b == ["l2", "l3"]
    torch.testing.assert_close(same, full[1:, 1:], rtol=0, atol=1e-14)
    single, names_a, _ = similarity(reps[0], reps[1], layers="l2")
    assert names_a == ["l2"] and single.shape == (1, 1)
    torch.testing.assert_close(single, full[1:2, 1:2], rtol=0, atol=1e-14)
    with pytest.raises(KeyError, match="nope"):
        similarity(reps[0], reps[1], layers=(["l1"], ["nope"]))


@pytest.mark.parametrize("index", ["cka", "nbs"])
def test_similarity_matrix_of_three_models(reps, index):
    matrix = similarity_matrix(reps, "l2", index=index, estimator="paper")
    assert matrix.shape == (3, 3)
    H = centring(8)
    fn = indices.cka if index == "cka" else indices.nbs
    kernels = [H @ hand_kernel("hadamard", r.layers["l2"].sketch_f, r.layers["l2"].sketch_g, None) @ H
               for r in reps]
    for i in range(3):
        for j in range(3):
            expected = fn(kernels[i], kernels[j], centered=False)
            assert math.isclose(float(matrix[i, j]), expected, rel_tol=1e-9, abs_tol=1e-12)
    torch.testing.assert_close(matrix.diagonal(), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-9)
    # One layer name per model.
    mixed = similarity_matrix(reps, ["l1", "l3", "l1"], index=index, kind="feature",
                              estimator="paper")
    feature_kernels = [H @ gram(r.layers[n].sketch_f) @ H for r, n in zip(reps, ["l1", "l3", "l1"])]
    for i in range(3):
        for j in range(3):
            expected = fn(feature_kernels[i], feature_kernels[j], centered=False)
            assert math.isclose(float(mixed[i, j]), expected, rel_tol=1e-9, abs_tol=1e-12)
    with pytest.raises(ValueError, match="2 names"):
        similarity_matrix(reps, ["l1", "l2"])
    with pytest.raises(ValueError, match="empty"):
        similarity_matrix([], "l1")


@pytest.mark.parametrize("index, debiased", [("cka", False), ("cka", True), ("nbs", False)])
def test_similarity_matrix_of_the_default_estimator_equals_its_pairs(reps, index, debiased):
    """The stacked path (each model's Gram summary built once) gives what similarity()
    gives pair by pair, error bars included, and exactly 1 on the diagonal."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResolutionWarning)
        matrix, error = similarity_matrix(reps, "l2", index=index, debiased=debiased,
                                          with_error=True)
        for i in range(3):
            for j in range(3):
                pair = similarity(reps[i], reps[j], index=index, layers="l2", debiased=debiased)
                assert math.isclose(float(matrix[i, j]), float(pair.matrix[0, 0]), rel_tol=1e-9,
                                    abs_tol=1e-12)
                if index == "cka":
                    assert math.isclose(float(error[i, j]), float(pair.error[0, 0]), rel_tol=1e-6,
                                        abs_tol=1e-12)
    assert (error is None) == (index == "nbs")
    torch.testing.assert_close(matrix.diagonal(), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("field, kwargs", [("m", dict(m=16)), ("seed", dict(sketch_seed=2)),
                                           ("sparsity", dict(sparsity=2))])
def test_comparing_different_sketches_names_the_field(reps, field, kwargs):
    other, _, _ = make_rep(**kwargs)
    with pytest.raises(ValueError, match=f"different {field}"):
        similarity(reps[0], other)
    with pytest.raises(ValueError, match=f"different {field}"):
        similarity(other, reps[0])
    with pytest.raises(ValueError, match=f"different {field}"):
        similarity_matrix([reps[0], reps[1], other], "l1")


def test_similarity_bad_arguments(reps):
    with pytest.raises(TypeError, match="rep_b"):
        similarity(reps[0], torch.eye(8))
    with pytest.raises(ValueError, match="index"):
        similarity(reps[0], reps[1], index="cca")
    with pytest.raises(ValueError, match="kind"):
        similarity(reps[0], reps[1], kind="fisher")
    with pytest.raises(ValueError, match="centering"):
        similarity(reps[0], reps[1], centering="both")
    with pytest.raises(ValueError, match="index"):
        similarity_matrix(reps, "l1", index="cca")


def test_datasets_of_different_sizes_are_comparable():
    small, _, _ = make_rep(n=17, seed=5)
    large, _, _ = make_rep(n=90, seed=5)  # same seed: the first 17 rows are not the same data
    with pytest.warns(DifferentRowsWarning, match="different rows"):
        result = similarity(small, large)
    matrix, _, _ = result
    assert matrix.shape == (3, 3) and bool(torch.isfinite(matrix).all())
    # No exact counterpart over one set of rows: the default says it used the plug-in,
    # which is what estimator="plugin" gives, and an explicit "sketch" is refused.
    assert result.estimator == "plugin" and result.warnings
    plugin, _, _ = similarity(small, large, estimator="plugin")
    torch.testing.assert_close(matrix, plugin, rtol=0, atol=0)
    with pytest.raises(ValueError, match="different rows"):
        similarity(small, large, estimator="sketch")


# --------------------------------------------------------------------------- mean embedding

def test_mean_embedding_norm_against_hand_computation():
    rep, feats, grads = make_rep(n=37, widths={"a": (5, 4), "b": (6, 6)})
    for name in ("a", "b"):
        f, g = feats[name], grads[name]
        out = mean_embedding_norm(rep, name)
        psi_mean = sum(torch.outer(g[i], f[i]) for i in range(37)) / 37
        norm = float(torch.sqrt((psi_mean ** 2).sum()))
        trace = sum(float(f[i] @ f[i]) * float(g[i] @ g[i]) for i in range(37))
        trace_factor = math.sqrt(trace) / 37
        frob = out["frobenius_factor"]
        assert math.isclose(out["norm"], norm, rel_tol=1e-12)
        assert math.isclose(out["trace_factor"], trace_factor, rel_tol=1e-12)
        assert math.isclose(out["ratio_trace"], norm / trace_factor, rel_tol=1e-12)
        assert math.isclose(out["ratio_frobenius"], norm / frob, rel_tol=1e-12)
        assert math.isclose(out["log_ratio_frobenius"], math.log(norm / frob), rel_tol=1e-9,
                            abs_tol=1e-12)
        # ||mu||^2 is the mean of the exact N x N kernel (K_f o K_g)_{ij} = <g_i f_i^T, g_j f_j^T>.
        K_exact = (f @ f.T) * (g @ g.T)
        assert math.isclose(out["norm"] ** 2, float(K_exact.mean()), rel_tol=1e-10)


def test_frobenius_factor_is_unbiased_for_the_exact_kernel():
    # ||K||_F^2 of the exact N x N kernel, estimated from sketches with R independent
    # seeds: the mean must lie within 4 standard errors of the mean (a CLT bound; a
    # false alarm has probability ~6e-5), and the old plug-in ||K~||_F^2 of Algorithm 1,
    # several times too large here, must not.
    R, n = 150, 60
    estimates, plug_in = [], []
    for seed in range(R):
        rep, feats, grads = make_rep(n=n, m=16, sketch_seed=seed, widths={"a": (5, 4)})
        estimates.append((mean_embedding_norm(rep, "a")["frobenius_factor"] * n ** 2) ** 2)
        K_plug = rep.kernel("a", kind="hadamard")
        plug_in.append(float((K_plug ** 2).sum()))
    f, g = feats["a"], grads["a"]
    exact = float((((f @ f.T) * (g @ g.T)) ** 2).sum())
    values = torch.tensor(estimates, dtype=torch.float64)
    standard_error = float(values.std()) / math.sqrt(R)
    assert abs(float(values.mean()) - exact) < 4 * standard_error, (float(values.mean()), exact)
    assert float(torch.tensor(plug_in).mean()) > exact + 4 * standard_error


def test_mean_embedding_norm_needs_the_exact_embedding():
    rep, _, _ = make_rep(widths={"a": (3, 3)}, mean_embedding=False)
    with pytest.raises(ValueError, match="mean_embedding=True"):
        mean_embedding_norm(rep, "a")


# --------------------------------------------------------------------------- the paper's claim on a toy

def toy_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                         nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)).double()


def test_same_network_scores_one_and_reinitialised_scores_lower():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(192, 10, generator=g, dtype=torch.float64)
    layers = ["0", "2", "4", "6"]
    settings = dict(layers=layers, m=32, dtype=torch.float64)
    net = toy_net(0)
    twin = copy.deepcopy(net)
    other = toy_net(1)
    rep = sketch_model(net, [x[i:i + 50] for i in range(0, 192, 50)], **settings)
    # The twin sees the same samples in another order and batching (index keyed).
    perm = torch.randperm(192, generator=torch.Generator().manual_seed(1))
    rep_twin = sketch_model(twin, [{"x": x[p], "index": p} for p in perm.split(64)], **settings)
    rep_other = sketch_model(other, [x], **settings)
    for index in ("cka", "nbs"):
        same, _, _ = similarity(rep, rep_twin, index=index)
        torch.testing.assert_close(same.diagonal(), torch.ones(4, dtype=torch.float64),
                                   rtol=0, atol=1e-9)
        different, _, _ = similarity(rep, rep_other, index=index)
        # Re-initialised weights: clearly lower at the deep layers.
        assert float(different.diagonal()[2:].max()) < 0.9, different.diagonal()


def test_resolution_warning_names_a_sketch_size_that_suffices():
    """Low-rank layers at a small m: the warning names the layer pairs, the largest standard
    error and the m that ``estimators.suggested_m`` derives from it (a power of two above m)."""
    gen = torch.Generator().manual_seed(3)
    n, m = 1000, 32
    base = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    feats = {"a": base @ torch.randn(2, 6, generator=gen, dtype=torch.float64),
             "b": torch.cat([base[:, :1], torch.randn(n, 1, generator=gen, dtype=torch.float64)], 1)}
    rep = Representation(m, 0, dtype=torch.float64, gradients=False)
    rep.update(feats)
    with pytest.warns(ResolutionWarning) as caught:
        result = similarity(rep, rep, kind="feature")
    worst = float(result.error.max())
    suggested = estimators.suggested_m(worst, m)
    assert worst > estimators.RESOLUTION_TOLERANCE and suggested > m
    message = str(caught[0].message)
    assert f"sketch with m={suggested} " in message and f"{worst:.3g}" in message


def test_resolution_warning_for_the_default_kind_names_psi_buckets():
    """kind="hadamard" reads the psi halves, so the warning is about their buckets: it names
    psi_buckets (not m) and the value suggested_m derives from the halves' bucket count."""
    gen = torch.Generator().manual_seed(4)
    n, buckets = 1000, 32
    base = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    feats = {"a": base @ torch.randn(2, 6, generator=gen, dtype=torch.float64),
             "b": torch.cat([base[:, :1], torch.randn(n, 1, generator=gen, dtype=torch.float64)], 1)}
    grads = {name: 1.0 + 0.01 * torch.randn(n, 1, generator=gen, dtype=torch.float64)
             for name in feats}
    rep = Representation(8, 0, dtype=torch.float64, psi_buckets=buckets)
    rep.update(feats, grads)
    with pytest.warns(ResolutionWarning) as caught:
        result = similarity(rep, rep)
    worst = float(result.error.max())
    suggested = estimators.suggested_m(worst, buckets)
    assert worst > estimators.RESOLUTION_TOLERANCE and suggested > buckets
    message = str(caught[0].message)
    assert message.startswith(f"psi_buckets={buckets} is too small")
    assert f"sketch with psi_buckets={suggested} " in message and f"{worst:.3g}" in message
