"""Tests of ``kind="psi"``: the sketch of Psi itself, ``K~ = S K S^T`` with ``K = K_f o K_g``.

References, all computed here: per-sample features f and expected gradients g of a small
float64 MLP with plain autograd (one backward per sample and class, the q-weighted
average of the per-class cross-entropy gradients, q ∝ p^beta); the exact kernel
``K = (F F^T) o (G G^T)``; the dense sketch matrix S of ``ops.sketch_matrix``; and the
TensorSketch written out from its definition (``TS(g f^T)[k] = sum over (i, j) with
(h_g(i) + h_f(j)) mod D = k of s_g(i) s_f(j) g_i f_j``).  Statistical checks use fixed
seeds and z-scores at a stated false-alarm rate with standard errors from the
seed-to-seed spread.
"""
from __future__ import annotations

import functools
import math
from statistics import NormalDist
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nnsim_fast
from nnsim_fast import Representation, ops, psi, similarity, sketch_model

F64 = torch.float64
ALPHA = 1e-4          # false-alarm rate of each statistical test
BETA = 0.5
LAYERS = ("0", "2", "3")


def z_two_sided(alpha: float, checks: int = 1) -> float:
    return NormalDist().inv_cdf(1.0 - alpha / (2.0 * checks))


def student_t_quantile(p: float, dof: int) -> float:
    """Quantile of Student's t by the Cornish-Fisher expansion in 1/dof (error O(dof^-3),
    far below what matters for dof > 100; avoids importing scipy.stats)."""
    z = NormalDist().inv_cdf(p)
    return (z + (z ** 3 + z) / (4 * dof)
            + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * dof ** 2))


@pytest.fixture(autouse=True)
def one_thread(restore_num_threads):
    # many tiny problems: thread hand-offs would dominate on a shared machine
    torch.set_num_threads(1)


# --------------------------------------------------------------------------- references

def make_mlp(seed: int, d_in: int = 6, hidden: Tuple[int, int] = (5, 4), classes: int = 3
             ) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden[0]), nn.Tanh(), nn.Linear(hidden[0], hidden[1]),
                         nn.Tanh(), nn.Linear(hidden[1], classes)).to(F64)


def reference_features_and_gradients(model: nn.Sequential, x: torch.Tensor, beta: float = BETA
                                     ) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (F [N, d], G [N, d])} at the outputs of modules 0, 2 and 3 of ``model``.

    The expected gradient is E_{y ~ q} d CE(logits, y) / d h, taken class by class.
    """
    out: Dict[str, Tuple[List[torch.Tensor], List[torch.Tensor]]] = {k: ([], []) for k in LAYERS}
    for i in range(x.shape[0]):
        h0 = model[0](x[i:i + 1])
        h2 = model[2](torch.tanh(h0))
        h3 = torch.tanh(h2)
        logits = model[4](h3)
        p = torch.softmax(logits.detach(), dim=1)[0]
        q = p ** beta / (p ** beta).sum()
        expected = [torch.zeros_like(h[0]) for h in (h0, h2, h3)]
        for y in range(logits.shape[1]):
            grads = torch.autograd.grad(F.cross_entropy(logits, torch.tensor([y])), [h0, h2, h3],
                                        retain_graph=True)
            for acc, grad in zip(expected, grads):
                acc += q[y] * grad[0]
        for name, h, g in zip(LAYERS, (h0, h2, h3), expected):
            out[name][0].append(h.detach()[0])
            out[name][1].append(g)
    return {k: (torch.stack(f), torch.stack(g)) for k, (f, g) in out.items()}


def exact_kernel(f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """K = K_f o K_g, the linear kernel of psi(x) = g f^T."""
    return (f @ f.T) * (g @ g.T)


def center_data(K: torch.Tensor) -> torch.Tensor:
    n = K.shape[0]
    H = torch.eye(n, dtype=F64) - torch.full((n, n), 1.0 / n, dtype=F64)
    return H @ K @ H


@functools.lru_cache(maxsize=None)
def problem(n: int = 37, seed: int = 0):
    """Inputs, two models (different init) and their reference f, g per layer."""
    x = torch.randn(n, 6, generator=torch.Generator().manual_seed(100 + seed), dtype=F64)
    model_a, model_b = make_mlp(1), make_mlp(2)
    return (x, model_a, model_b, reference_features_and_gradients(model_a, x),
            reference_features_and_gradients(model_b, x))


def batches(x: torch.Tensor, sizes: Sequence[int]) -> List[torch.Tensor]:
    out, start = [], 0
    for size in sizes:
        out.append(x[start:start + size])
        start += size
    assert start == x.shape[0]
    return out


# --------------------------------------------------------------------------- exact psi

@pytest.mark.parametrize("sparsity", [1, 2])
def test_exact_psi_kernel_is_S_K_St(sparsity):
    """When df * dg fits the width both halves hold S_p Psi exactly (psi = vec(g f^T)), with
    S_p the sketch of psi_buckets buckets (4 m by default) and the other kinds at m."""
    x, model, _, ref, _ = problem()
    m, seed = 8, 5
    rep = sketch_model(model, batches(x, [10, 15, 12]), layers=list(LAYERS), m=m, seed=seed,
                       sparsity=sparsity, dtype=F64, psi=True)
    mp = rep.options["psi_buckets"]
    assert mp == 4 * m
    S = ops.sketch_matrix(x.shape[0], m, seed, sparsity=sparsity)
    S_p = ops.sketch_matrix(x.shape[0], mp, seed, sparsity=sparsity)
    for name in LAYERS:
        f, g = ref[name]
        width = f.shape[1] * g.shape[1]
        assert rep.layers[name].sketch_psi.shape == (2, mp, width)   # exact mode, two halves
        exact_psi = (g.unsqueeze(2) * f.unsqueeze(1)).reshape(-1, width)
        for half in (0, 1):
            torch.testing.assert_close(rep.layers[name].sketch_psi[half], S_p @ exact_psi,
                                       rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(rep.kernel(name, kind="psi"), S_p @ exact_kernel(f, g) @ S_p.T,
                                   rtol=1e-10, atol=1e-12)
        expected = S @ exact_kernel(f, g) @ S.T
        # Algorithm 1 is a different estimator: (S K_f S^T) o (S K_g S^T), not S K S^T
        algorithm_1 = (S @ f @ f.T @ S.T) * (S @ g @ g.T @ S.T)
        hadamard = rep.kernel(name, kind="hadamard")
        torch.testing.assert_close(hadamard, algorithm_1, rtol=1e-10, atol=1e-12)
        assert float((hadamard - expected).norm()) > 1e-3 * float(expected.norm())


def test_psi_data_centering_is_S_HKH_St():
    x, model, _, ref, _ = problem()
    m, seed = 8, 9
    rep = sketch_model(model, batches(x, [20, 17]), layers=list(LAYERS), m=m, seed=seed,
                       dtype=F64, psi=True, psi_buckets=12)
    S = ops.sketch_matrix(x.shape[0], 12, seed)
    for name in LAYERS:
        expected = S @ center_data(exact_kernel(*ref[name])) @ S.T
        torch.testing.assert_close(rep.kernel(name, kind="psi", centering="data"), expected,
                                   rtol=1e-10, atol=1e-12)
        # bucket centring is the double centring of the uncentred sketch, psi_buckets wide
        H = torch.eye(12, dtype=F64) - 1.0 / 12
        torch.testing.assert_close(rep.kernel(name, kind="psi", centering="buckets"),
                                   H @ S @ exact_kernel(*ref[name]) @ S.T @ H,
                                   rtol=1e-10, atol=1e-12)


def test_similarity_with_kind_psi_is_the_cka_of_sketched_centred_kernels():
    x, model_a, model_b, ref_a, ref_b = problem()
    m, seed = 16, 4
    reps = [sketch_model(model, [x], layers=list(LAYERS), m=m, seed=seed, dtype=F64, psi=True)
            for model in (model_a, model_b)]
    matrix, names_a, names_b = similarity(reps[0], reps[1], kind="psi", estimator="plugin",
                                          centering="data")
    assert (names_a, names_b) == (list(LAYERS), list(LAYERS))
    assert matrix.shape == (3, 3) and matrix.dtype == F64
    S = ops.sketch_matrix(x.shape[0], reps[0].options["psi_buckets"], seed)
    for i, la in enumerate(LAYERS):
        Ka = S @ center_data(exact_kernel(*ref_a[la])) @ S.T
        for j, lb in enumerate(LAYERS):
            Kb = S @ center_data(exact_kernel(*ref_b[lb])) @ S.T
            by_hand = float((Ka * Kb).sum() / (Ka.norm() * Kb.norm()))
            assert float(matrix[i, j]) == pytest.approx(by_hand, rel=1e-9, abs=1e-12)
    # a single layer pair through the public index
    single = nnsim_fast.cka(reps[0].kernel("2", kind="psi", centering="data"),
                            reps[1].kernel("2", kind="psi", centering="data"), centered=False)
    assert float(matrix[1, 1]) == pytest.approx(single, rel=1e-12)


def test_psi_kind_requires_psi_statistics():
    x, model, _, _, _ = problem()
    plain = sketch_model(model, [x], layers=["2"], m=8, seed=0, dtype=F64, psi=False)
    assert plain.layers["2"].sketch_psi is None
    with pytest.raises(ValueError, match="psi"):
        plain.kernel("2", kind="psi")
    with pytest.raises(ValueError, match="psi"):
        similarity(plain, plain, kind="psi")
    with pytest.raises(ValueError, match="kind"):
        plain.kernel("2", kind="psi_exact")


def test_save_load_and_merge_keep_sketch_psi(tmp_path):
    x, model, _, ref, _ = problem()
    m, seed, n = 8, 3, x.shape[0]
    index = torch.arange(n)
    data = [(index[:20], x[:20], torch.zeros(20, dtype=torch.int64)),
            (index[20:], x[20:], torch.zeros(n - 20, dtype=torch.int64))]
    full = sketch_model(model, data, layers=list(LAYERS), m=m, seed=seed, dtype=F64, psi=True)
    first = sketch_model(model, data[:1], layers=list(LAYERS), m=m, seed=seed, dtype=F64, psi=True)
    second = sketch_model(model, data[1:], layers=list(LAYERS), m=m, seed=seed, dtype=F64, psi=True)
    merged = first.merge(second)
    for name in LAYERS:
        torch.testing.assert_close(merged.layers[name].sketch_psi, full.layers[name].sketch_psi,
                                   rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(merged.layers[name].sum_psi, full.layers[name].sum_psi,
                                   rtol=1e-12, atol=1e-12)
    # tensorsketched layers survive too (width 8 < df * dg for every layer)
    ts = sketch_model(model, data, layers=list(LAYERS), m=m, seed=seed, dtype=F64, psi=True,
                      psi_dim=8)
    for rep in (full, ts):
        path = tmp_path / "rep.safetensors"
        rep.save(path)
        loaded = Representation.load(path)
        for name in LAYERS:
            torch.testing.assert_close(loaded.layers[name].sketch_psi, rep.layers[name].sketch_psi,
                                       rtol=0, atol=0)
            torch.testing.assert_close(loaded.layers[name].sum_psi, rep.layers[name].sum_psi,
                                       rtol=0, atol=0)
            for centering in ("none", "data"):
                torch.testing.assert_close(loaded.kernel(name, "psi", centering),
                                           rep.kernel(name, "psi", centering), rtol=0, atol=0)
    assert ts.layers["2"].sketch_psi.shape == (2, ts.options["psi_buckets"], 8)
    # the exact sums are the sums of psi_i = vec(g_i f_i^T), g-major, in both halves
    f, g = ref["2"]
    expected_sum = (g.unsqueeze(2) * f.unsqueeze(1)).sum(0).reshape(-1)
    torch.testing.assert_close(full.layers["2"].sum_psi, expected_sum.expand(2, -1),
                               rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- TensorSketch

def random_rows(n: int, df: int, dg: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, df, generator=gen, dtype=F64) + 0.3,
            torch.randn(n, dg, generator=gen, dtype=F64))


def test_tensorsketch_psi_kernel_approaches_S_K_St_as_psi_dim_grows():
    """K~_TS = S Psi T^T T Psi^T S^T with E[T^T T] = I: its mean-square distance to
    S K S^T is sum of Var<T u_a, T u_b> over the rows u of S Psi, which is O(1/D).

    Over D = 16, 64, 256, 1024 and T seeds (each seed fixes S and the TensorSketch), fit
    the slope of log mean-square relative error against log D; by the delta method
    Var(log mean) = Var(e^2) / (T mean^2), and the least-squares slope's se follows.  The
    slope must be -1 within z se; the error also has to fall at every step."""
    # d_f * d_g = 1200 exceeds every width, so each run really uses the TensorSketch.
    f, g = random_rows(40, 40, 30, seed=3)
    K = exact_kernel(f, g)
    m, trials, widths = 8, 60, (16, 64, 256, 1024)
    reference = {}
    log_mse, var_log = [], []
    for width in widths:
        errors = []
        for seed in range(trials):
            if seed not in reference:
                S = ops.sketch_matrix(40, m, seed)
                reference[seed] = S @ K @ S.T
            rep = Representation(m, seed, dtype=F64, psi_dim=width, psi_buckets=m)
            rep.update({"l": f}, {"l": g})
            assert rep.layers["l"].sketch_psi.shape == (2, m, width)
            ref = reference[seed]
            errors.append(float((rep.kernel("l", "psi") - ref).square().sum() / ref.square().sum()))
        e = np.array(errors)
        log_mse.append(math.log(e.mean()))
        var_log.append(e.var(ddof=1) / (trials * e.mean() ** 2))
    x = np.log(np.array(widths, dtype=np.float64))
    w = (x - x.mean()) / ((x - x.mean()) ** 2).sum()
    slope = float((w * np.array(log_mse)).sum())
    se = math.sqrt(float((w ** 2 * np.array(var_log)).sum()))
    assert abs(slope + 1.0) <= z_two_sided(ALPHA) * se, (slope, se, log_mse)
    assert all(b < a for a, b in zip(log_mse, log_mse[1:])), log_mse


@pytest.mark.parametrize("keyed", [False, True])
def test_tensorsketch_representation_streams_in_chunks(keyed):
    """Rows keep their global keys (stream offset or dataset index), so each half equals
    the dense reference S T_h(Psi) (T_h from psi.tensor_sketch_halves) whatever the
    chunking and order, and sum_psi holds sum_i T_h(psi_i)."""
    f, g = random_rows(23, 5, 4, seed=4)
    m, seed, width, mp = 8, 6, 12, 20
    S = ops.sketch_matrix(23, mp, seed)
    rep = Representation(m, seed, dtype=F64, psi_dim=width, psi_buckets=mp)
    order = torch.randperm(23, generator=torch.Generator().manual_seed(0)) if keyed \
        else torch.arange(23)
    for chunk in order.split(10):
        rep.update({"l": f[chunk]}, {"l": g[chunk]}, rows=chunk if keyed else None)
    for half in (0, 1):
        reference = reference_half(f, g, width, seed, half)
        torch.testing.assert_close(rep.layers["l"].sketch_psi[half], S @ reference,
                                   rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rep.layers["l"].sum_psi[half], reference.sum(0),
                                   rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- accuracy

def test_psi_cka_error_is_smaller_than_algorithm_1():
    """Sketched CKA of two MLPs (different init) at one layer against the exact centred CKA
    of K = K_f o K_g, over T sketch seeds (the same seeds for every estimator, so errors
    are paired).  psi uses centering="data"; Algorithm 1 (kind="hadamard") is taken with
    the bucket centring of the paper's code (the library default) and with data centring.

    * seed-to-seed sd: psi's is smaller than either hadamard's.  Pitman-Morgan test for
      paired variances: Var(h) > Var(p) iff corr(h + p, h - p) > 0, and
      t = r sqrt((T - 2) / (1 - r^2)) is Student-t with T - 2 degrees of freedom;
    * error including bias: psi's mean-square error is smaller than the paper's default
      (hadamard, buckets): the paired d_t = err_h^2 - err_p^2 has mean > t se(d).
    Critical values are one-sided at ALPHA split over the three comparisons.
    """
    n, m, trials, layer = 200, 32, 150, "2"
    x = torch.randn(n, 6, generator=torch.Generator().manual_seed(7), dtype=F64)
    models = [make_mlp(11, hidden=(8, 6), classes=4), make_mlp(12, hidden=(8, 6), classes=4)]
    factors = [reference_features_and_gradients(model, x)[layer] for model in models]
    exact = nnsim_fast.cka(*[exact_kernel(f, g) for f, g in factors])
    estimators = (("psi", "data"), ("hadamard", "buckets"), ("hadamard", "data"))
    errors: Dict[Tuple[str, str], List[float]] = {key: [] for key in estimators}
    for seed in range(trials):
        reps = []
        for f, g in factors:
            rep = Representation(m, seed, dtype=F64)
            rep.update({layer: f}, {layer: g})
            reps.append(rep)
        for kind, centering in estimators:
            value = float(similarity(reps[0], reps[1], kind=kind, estimator="plugin",
                                     centering=centering)[0][0, 0])
            errors[(kind, centering)].append(value - exact)
    critical = student_t_quantile(1 - ALPHA / 3, trials - 2)
    p = np.array(errors[("psi", "data")])
    for key in estimators[1:]:
        h = np.array(errors[key])
        r = np.corrcoef(h + p, h - p)[0, 1]
        t_stat = r * math.sqrt((trials - 2) / (1 - r * r))
        assert t_stat > critical, (key, h.std(), p.std(), t_stat)
    d = np.array(errors[("hadamard", "buckets")]) ** 2 - p ** 2
    assert d.mean() > student_t_quantile(1 - ALPHA / 3, trials - 1) * d.std(ddof=1) / math.sqrt(trials)


# --------------------------------------------------------------------------- two independent halves

def reference_half(f: torch.Tensor, g: torch.Tensor, width: int, seed: int, half: int) -> torch.Tensor:
    """Half ``half`` of the two-halves TensorSketch, from its definition: feature j of f goes
    to bucket b_f(j) with sign s_f(j), block ``half`` of the two-block hash of
    ``tensor_sketch_seeds(seed)[0]`` (likewise g), and ``g_i f_j`` lands in
    ``(b_g(i) + b_f(j)) mod width`` with sign ``s_g(i) s_f(j)``."""
    seed_f, seed_g = psi.tensor_sketch_seeds(seed)
    bucket_f, sign_f = ops.sketch_hash(f.shape[1], 2 * width, seed_f, sparsity=2)
    bucket_g, sign_g = ops.sketch_hash(g.shape[1], 2 * width, seed_g, sparsity=2)
    bucket_f, bucket_g = bucket_f[:, half] - half * width, bucket_g[:, half] - half * width
    out = torch.zeros(f.shape[0], width, dtype=F64)
    for i in range(g.shape[1]):
        for j in range(f.shape[1]):
            k = int(bucket_g[i] + bucket_f[j]) % width
            out[:, k] += float(sign_g[i, half] * sign_f[j, half]) * g[:, i] * f[:, j]
    return out


def test_tensor_sketch_halves_match_their_definition():
    f, g = random_rows(6, 9, 5, seed=20)
    for width, seed in ((16, 0), (37, 5)):
        halves = psi.tensor_sketch_halves(f, g, width, seed)
        assert halves.shape == (2, 6, width) and halves.dtype == F64
        for half in (0, 1):
            expected = reference_half(f, g, width, seed, half)
            torch.testing.assert_close(halves[half], expected, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(psi.tensor_sketch(f, g, width, seed, half), expected,
                                       rtol=1e-12, atol=1e-12)
        assert float((halves[0] - halves[1]).abs().max()) > 0.1     # two different maps


def test_tensor_sketch_halves_exact_when_psi_fits_and_batch_independent():
    """df * dg <= width: both halves are vec(g f^T), g-major.  Otherwise each row's sketch
    does not depend on the batch it came in (float32 input gives float64 output)."""
    f, g = random_rows(5, 4, 3, seed=21)
    exact = torch.einsum("bi,bj->bij", g, f).reshape(5, 12)
    halves = psi.tensor_sketch_halves(f, g, psi.psi_half_width(4, 3, 64), seed=2)
    assert psi.psi_half_width(4, 3, 64) == 12 and psi.psi_half_width(40, 30, 64) == 64
    torch.testing.assert_close(halves, exact.expand(2, 5, 12), rtol=0, atol=0)
    f, g = random_rows(7, 30, 20, seed=22)
    whole64 = psi.tensor_sketch_halves(f, g, 32, 3)
    whole = psi.tensor_sketch_halves(f.float(), g.float(), 32, 3)
    assert whole.dtype == F64
    # float32 data is sketched in float32: equal to the float64 computation to float32
    # rounding (relative to the rows' scale), and row by row to the same rounding.
    scale = float(whole64.abs().max())
    torch.testing.assert_close(whole, whole64, rtol=0, atol=1e-5 * scale)
    for row in range(7):
        single = psi.tensor_sketch_halves(f[row:row + 1], g[row:row + 1], 32, 3)
        torch.testing.assert_close(single[:, 0], whole64[:, row], rtol=1e-12, atol=1e-12)
        single = psi.tensor_sketch_halves(f[row:row + 1].float(), g[row:row + 1].float(), 32, 3)
        torch.testing.assert_close(single[:, 0], whole[:, row], rtol=0, atol=1e-5 * scale)


def test_tensor_sketch_seeds_are_deterministic_and_distinct():
    assert psi.tensor_sketch_seeds(7) == psi.tensor_sketch_seeds(7)
    assert psi.tensor_sketch_seeds(7) != psi.tensor_sketch_seeds(8)
    seed_f, seed_g = psi.tensor_sketch_seeds(7)
    assert seed_f != seed_g
    assert all(0 <= s < 2 ** 63 for s in (seed_f, seed_g))


def test_tensor_sketch_halves_are_unbiased_and_independent():
    """Over T seeds, for rows a, b with u = psi_a, v = psi_b:
    * each half is unbiased: mean <T_h u, T_h v> within z se of <u, v> (h = 0, 1);
    * the halves are independent: mean <T_0 u, T_0 v> <T_1 u, T_1 v> within z se of
      <u, v>^2, whereas one half with itself, <T_0 u, T_0 v>^2, exceeds <u, v>^2 by its
      variance (more than z se here): the bias that pairing different halves avoids.
    z two-sided at ALPHA over the 4 checks."""
    f, g = random_rows(2, 9, 7, seed=23)
    width, trials = 16, 2000
    products = torch.stack([psi.tensor_sketch_halves(f, g, width, seed) for seed in range(trials)])
    inner = (products[:, :, 0] * products[:, :, 1]).sum(-1)            # [T, 2]
    exact = float(exact_kernel(f, g)[0, 1])
    z = z_two_sided(ALPHA, 4)

    def close(values: torch.Tensor, target: float) -> bool:
        return abs(float(values.mean()) - target) <= z * float(values.std()) / math.sqrt(trials)

    assert close(inner[:, 0], exact) and close(inner[:, 1], exact)
    assert close(inner[:, 0] * inner[:, 1], exact ** 2)
    same = inner[:, 0].square()
    assert float(same.mean()) - exact ** 2 > z * float(same.std()) / math.sqrt(trials)


def test_tensor_sketch_bad_input():
    f, g = random_rows(4, 5, 3, seed=24)
    with pytest.raises(ValueError, match="f and g"):
        psi.tensor_sketch_halves(f, g[:3], 8, 0)
    with pytest.raises(ValueError, match="f must be"):
        psi.tensor_sketch_halves(f[0], g, 8, 0)
    with pytest.raises(ValueError, match="width"):
        psi.tensor_sketch_halves(f, g, 0, 0)
    with pytest.raises(ValueError, match="half"):
        psi.tensor_sketch(f, g, 8, 0, 2)
    with pytest.raises(ValueError, match="seed"):
        psi.tensor_sketch_seeds(-1)
    with pytest.raises(TypeError, match="dim"):
        psi.psi_half_width(4, 5, 2.5)
