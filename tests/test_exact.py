"""Tests of the exact reference path (``nnsim_fast.exact``).

Every reference here is a dense ``N x N`` float64 kernel built in this file
straight from its definition (``F F^T``, ``(F F^T) o (G G^T)``, ...; the transport
map through scipy's matrix square root) and fed to the dense index functions of
``nnsim_fast.indices``.  The exact path, which never holds two N x N kernels and
streams them in tiles, must agree with them to float64 rounding.
"""
from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import tempfile
from typing import Dict, Optional, Tuple

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from nnsim_fast import exact, indices
from nnsim_fast.exact import (ExactRepresentation, exact_kernel, exact_mean_embedding, exact_similarity,
                              exact_similarity_matrix)
from nnsim_fast.extract import features_and_gradients
from nnsim_fast.options import KINDS

TOL = dict(rtol=1e-9, atol=1e-10)
Data = Dict[str, Tuple[torch.Tensor, torch.Tensor]]


@pytest.fixture(autouse=True)
def one_thread(restore_num_threads):
    """The matrices here are tiny: threads only add start-up waits on a busy machine."""
    torch.set_num_threads(1)


# --------------------------------------------------------------------------- data and references

def make_data(seed: int, n: int, widths: Dict[str, int]) -> Data:
    """Post-ReLU-like features (a large mean) and small zero-mean gradients, float32."""
    gen = torch.Generator().manual_seed(seed)
    return {name: (torch.relu(torch.randn(n, d, generator=gen) + 0.5),
                   0.01 * torch.randn(n, d, generator=gen) * torch.rand(n, 1, generator=gen))
            for name, d in widths.items()}


def feed(data: Data, *, batch: int = 9, rows: Optional[torch.Tensor] = None, gradients: bool = True,
         **options) -> ExactRepresentation:
    """A representation fed ``data`` in batches; ``rows`` gives each row's dataset index."""
    rep = ExactRepresentation(**options)
    n = next(iter(data.values()))[0].shape[0]
    for low in range(0, n, batch):
        part = slice(low, low + batch)
        rep.update({k: f[part] for k, (f, _) in data.items()},
                   {k: g[part] for k, (_, g) in data.items()} if gradients else None,
                   rows=None if rows is None else rows[part], label=f"batch {low // batch}")
    return rep


def psd_power(K: np.ndarray, power: float) -> np.ndarray:
    """K^power on the range of K (eigenvalues far below rounding count as 0: a pseudo-inverse)."""
    values, vectors = np.linalg.eigh(K)
    kept = values > 1e-9 * values.max()
    scaled = np.where(kept, np.abs(values), 1.0) ** power * kept
    return (vectors * scaled) @ vectors.T


def transport_reference(Kf: np.ndarray, Kg: np.ndarray) -> np.ndarray:
    """(I/2 + T/2) Kf (I/2 + T/2), T = Kf^-1/2 (Kf^1/2 Kg Kf^1/2)^1/2 Kf^-1/2."""
    root = psd_power(Kf, 0.5)
    inverse_root = psd_power(Kf, -0.5)
    middle = np.real(scipy.linalg.sqrtm(root @ Kg @ root))
    half = (np.eye(len(Kf)) + inverse_root @ middle @ inverse_root) / 2
    return half @ Kf @ half


def dense_kernel(f: torch.Tensor, g: torch.Tensor, kind: str) -> torch.Tensor:
    f, g = f.to(torch.float64), g.to(torch.float64)
    Kf, Kg = f @ f.T, g @ g.T
    if kind == "transport":
        return torch.from_numpy(transport_reference(Kf.numpy(), Kg.numpy()))
    return {"feature": Kf, "gradient": Kg, "hadamard": Kf * Kg, "psi": Kf * Kg, "sum": Kf + Kg,
            "khatri_rao": (f * g) @ (f * g).T}[kind]


def dense_kernels(data: Data, kind: str):
    return [dense_kernel(f, g, kind) for f, g in data.values()]


VARIANTS = [("cka", dict(centered=True)), ("cka", dict(centered=False)), ("cka", dict(debiased=True)),
            ("nbs", dict(centered=True)), ("nbs", dict(centered=False))]


def dense_index(Ks_a, Ks_b, index: str, options: Dict) -> torch.Tensor:
    if index == "cka":
        return indices.cka_matrix(Ks_a, Ks_b, **options)
    return indices.nbs_matrix(Ks_a, Ks_b, **options)


# Two settings: N = 40 with narrow layers (NBS of linear kinds through the d x d
# cross-covariance; a rank-deficient K_f for the transport map) and N = 12 with
# layers wider than N (full rank; NBS of every kind through N x N eigendecompositions).
NARROW = dict(n=40, widths={"conv": 6, "fc": 5})
WIDE = dict(n=12, widths={"conv": 16, "fc": 20})


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [NARROW, WIDE], ids=["narrow", "wide"])
def test_every_index_matches_dense_reference(kind, shape):
    data_a, data_b = make_data(1, **shape), make_data(2, **shape)
    rep_a, rep_b = feed(data_a), feed(data_b, batch=5)
    Ks_a, Ks_b = dense_kernels(data_a, kind), dense_kernels(data_b, kind)
    for index, options in VARIANTS:
        table, names_a, names_b = exact_similarity(rep_a, rep_b, index, kind, block=7, **options)
        assert names_a == names_b == list(shape["widths"])
        assert table.dtype == torch.float64 and table.shape == (2, 2)
        torch.testing.assert_close(table, dense_index(Ks_a, Ks_b, index, options), **TOL,
                                   msg=f"{index} {options}")


def test_debiased_cka_is_the_unbiased_hsic_of_song_et_al():
    data_a, data_b = make_data(3, **NARROW), make_data(4, **NARROW)
    rep_a, rep_b = feed(data_a), feed(data_b)
    table, _, _ = exact_similarity(rep_a, rep_b, "cka", "hadamard", layers="conv", debiased=True)
    K1 = dense_kernel(*data_a["conv"], "hadamard")
    K2 = dense_kernel(*data_b["conv"], "hadamard")
    expected = indices.hsic(K1, K2, debiased=True) / np.sqrt(
        indices.hsic(K1, K1, debiased=True) * indices.hsic(K2, K2, debiased=True))
    assert float(table) == pytest.approx(expected, rel=1e-10)
    assert float(table) == pytest.approx(indices.cka(K1, K2, debiased=True), rel=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_kernel_and_mean_embedding_match_dense_reference(kind):
    data = make_data(5, **WIDE)
    rep = feed(data)
    K = dense_kernel(*data["fc"], kind)
    torch.testing.assert_close(exact_kernel(rep, "fc", kind, centered=False, block=5), K, **TOL)
    torch.testing.assert_close(exact_kernel(rep, "fc", kind, block=5), indices.center_kernel(K), **TOL)
    got = exact_mean_embedding(rep, "fc", kind, block=5)
    expected = indices.mean_embedding_ratios(K)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-9), key


def test_layer_selection_and_self_comparison():
    data = make_data(6, **NARROW)
    rep = feed(data)
    table, names_a, names_b = exact_similarity(rep, rep, "cka", "sum", layers=(["fc"], ["conv", "fc"]))
    assert (names_a, names_b) == (["fc"], ["conv", "fc"])
    assert table.shape == (1, 2) and float(table[0, 1]) == pytest.approx(1.0, abs=1e-12)
    for index in ("cka", "nbs"):
        table, _, _ = exact_similarity(rep, rep, index, "hadamard")
        torch.testing.assert_close(table, table.T, rtol=0, atol=1e-12)
        torch.testing.assert_close(table.diagonal(), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="'missing' is not in this representation"):
        exact_similarity(rep, rep, layers="missing")


def test_model_by_model_matrix_equals_pairwise_similarity():
    datas = [make_data(seed, **NARROW) for seed in (20, 21, 22)]
    shuffled = torch.randperm(40, generator=torch.Generator().manual_seed(2))
    reps = [feed(datas[0], rows=torch.arange(40)), feed(datas[1], rows=torch.arange(40)),
            feed({k: (f[shuffled], g[shuffled]) for k, (f, g) in datas[2].items()}, rows=shuffled)]
    for index, options in VARIANTS:
        table = exact_similarity_matrix(reps, ["fc", "conv", "fc"], index, "hadamard", **options)
        assert table.shape == (3, 3)
        for i, j in [(0, 1), (1, 2), (2, 0), (2, 2)]:
            pair, _, _ = exact_similarity(reps[i], reps[j], index, "hadamard",
                                          layers=(["fc", "conv", "fc"][i], ["fc", "conv", "fc"][j]),
                                          **options)
            assert float(table[i, j]) == pytest.approx(float(pair), rel=1e-11, abs=1e-12)
    with pytest.raises(ValueError, match="one layer per representation"):
        exact_similarity_matrix(reps, ["fc"])


# --------------------------------------------------------------------------- memory-bounded path

def test_disk_and_small_tiles_equal_the_in_ram_path(monkeypatch):
    """Rows split between RAM and disk, several column panels, a gather from disk in
    shuffled order and tiles that do not divide N give the in-RAM numbers."""
    widths = {"conv": 7, "fc": 10}
    data_a, data_b = make_data(7, n=40, widths=widths), make_data(8, n=40, widths=widths)
    in_ram = feed(data_a), feed(data_b)
    monkeypatch.setattr(exact, "PANEL", 3)
    shuffled = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    row_bytes = 2 * (7 + 10) * 4
    bounded_a = feed(data_a, ram_bytes=13 * row_bytes)   # 13 rows in RAM, 27 on disk
    bounded_b = feed({k: (f[shuffled], g[shuffled]) for k, (f, g) in data_b.items()}, rows=shuffled,
                     ram_bytes=0)
    ordered_a = feed(data_a, rows=torch.arange(40))
    assert (bounded_a.ram_rows, bounded_b.ram_rows) == (13, 0)
    assert os.path.isdir(bounded_a.storage_path) and os.path.isdir(bounded_b.storage_path)
    for kind in ("hadamard", "khatri_rao", "sum"):
        for index, options in VARIANTS:
            expected, _, _ = exact_similarity(*in_ram, index, kind, **options)
            got, _, _ = exact_similarity(ordered_a, bounded_b, index, kind, block=6, **options)
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-13)
        got, _, _ = exact_similarity(bounded_a, in_ram[1], "cka", kind, block=11)
        expected, _, _ = exact_similarity(*in_ram, "cka", kind)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(exact_kernel(bounded_b, "fc", block=4), exact_kernel(in_ram[1], "fc"),
                               rtol=1e-12, atol=1e-15)
    expected = exact_mean_embedding(in_ram[0], "conv")
    for key, value in exact_mean_embedding(bounded_a, "conv", block=6).items():
        assert value == pytest.approx(expected[key], rel=1e-12)


def test_temporary_files_are_removed_on_close_and_collection():
    data = make_data(9, n=10, widths={"fc": 4})
    with feed(data, ram_bytes=0) as rep:
        path = rep.storage_path
        assert os.listdir(path)
    assert not os.path.exists(path)
    with pytest.raises(ValueError, match="closed"):
        exact_similarity(rep, rep)
    rep = feed(data, ram_bytes=0)
    path = rep.storage_path
    del rep
    gc.collect()
    assert not os.path.exists(path)


KILLED_CHILD = """
import os, signal, sys, tempfile, torch
from nnsim_fast.exact import ExactRepresentation
tempfile.tempdir = sys.argv[1]
rep = ExactRepresentation(ram_bytes=0)
rep.update({"fc": torch.ones(3, 2)}, {"fc": torch.ones(3, 2)})
print(rep.storage_path, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_directory_of_a_killed_process_is_removed_by_the_next_one(monkeypatch, tmp_path):
    child = subprocess.run([sys.executable, "-c", KILLED_CHILD, str(tmp_path)], capture_output=True,
                           text=True, timeout=120)
    left = child.stdout.strip()
    assert child.returncode == -signal.SIGKILL and os.path.isdir(left), child.stderr
    being_made = tmp_path / "nnsim-exact-new"           # no lock file yet: left alone
    being_made.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    data = make_data(19, n=10, widths={"fc": 4})
    live = feed(data, ram_bytes=0)
    assert not os.path.exists(left) and being_made.exists()
    other = feed(data, ram_bytes=0)                     # a live directory is not taken for dead
    assert os.path.isdir(live.storage_path) and os.path.isdir(other.storage_path)
    torch.testing.assert_close(exact_kernel(live, "fc"), exact_kernel(other, "fc"))


def test_storage_directory_is_kept(tmp_path):
    data = make_data(10, n=10, widths={"fc": 4})
    rep = feed(data, ram_bytes=0, storage=tmp_path / "rows")
    path = rep.storage_path
    assert os.path.dirname(path) == str(tmp_path / "rows")
    rep.close()
    assert os.listdir(path)
    in_ram = feed(data)
    assert in_ram.storage_path is None and in_ram.ram_rows == 20000


def test_iter_rows_gives_the_stored_rows_back_in_arrival_order(monkeypatch):
    """From RAM and disk, across column panels, for stream and index numbering, with or
    without gradients: the same values bit for bit, the same batches, copies not views."""
    monkeypatch.setattr(exact, "PANEL", 3)
    data = make_data(30, n=23, widths={"conv": 7, "fc": 2})
    row_bytes = 2 * (7 + 2) * 4
    shuffled = torch.randperm(23, generator=torch.Generator().manual_seed(2))
    cases = [(feed(data, ram_bytes=10 * row_bytes), torch.arange(23), True),
             (feed(data, rows=shuffled, ram_bytes=0), shuffled, True),
             (feed(data, gradients=False), torch.arange(23), False)]
    for rep, ids, gradients in cases:
        for layer, (f, g) in data.items():
            parts = list(rep.iter_rows(layer, batch=9))
            assert [part[1].shape[0] for part in parts] == [9, 9, 5]       # the fed batches
            assert torch.equal(torch.cat([part[0] for part in parts]), ids)
            assert torch.equal(torch.cat([part[1] for part in parts]), f)
            if gradients:
                assert torch.equal(torch.cat([part[2] for part in parts]), g)
            else:
                assert all(part[2] is None for part in parts)
            assert sum(1 for _ in rep.iter_rows(layer, batch=100)) == 1
    rep = cases[0][0]
    _, first, _ = next(rep.iter_rows("conv", batch=4))
    first.zero_()                                                         # a copy: storage unchanged
    assert torch.equal(next(rep.iter_rows("conv", batch=4))[1], data["conv"][0][:4])
    with pytest.raises(ValueError, match="batch"):
        rep.iter_rows("conv", batch=0)
    with pytest.raises(ValueError, match="not in this representation"):
        rep.iter_rows("nope")
    rep.close()
    with pytest.raises(ValueError, match="closed"):
        rep.iter_rows("conv")


# --------------------------------------------------------------------------- pairing rows

def test_rows_are_paired_by_id_whatever_the_order():
    data_a, data_b = make_data(11, **NARROW), make_data(12, **NARROW)
    ordered = feed(data_a, rows=torch.arange(40)), feed(data_b, rows=torch.arange(40))
    shuffled = torch.randperm(40, generator=torch.Generator().manual_seed(1))
    permuted_b = feed({k: (f[shuffled], g[shuffled]) for k, (f, g) in data_b.items()}, rows=shuffled,
                      batch=4)
    torch.testing.assert_close(permuted_b.row_ids, torch.arange(40))
    for index, options in VARIANTS:
        expected, _, _ = exact_similarity(*ordered, index, "hadamard", **options)
        got, _, _ = exact_similarity(ordered[0], permuted_b, index, "hadamard", **options)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-13)
        swapped, _, _ = exact_similarity(permuted_b, ordered[0], index, "hadamard", **options)
        torch.testing.assert_close(swapped, expected.T, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(exact_kernel(permuted_b, "fc"), exact_kernel(ordered[1], "fc"),
                               rtol=1e-12, atol=1e-15)


def test_different_row_sets_are_refused():
    data = make_data(13, **NARROW)
    full = feed(data, rows=torch.arange(40))
    part = feed({k: (f[:30], g[:30]) for k, (f, g) in data.items()}, rows=torch.arange(30))
    moved = feed(data, rows=torch.arange(40) + 1)
    for other in (part, moved):
        with pytest.raises(ValueError, match="hold different rows"):
            exact_similarity(full, other)
    with pytest.raises(ValueError, match="numbers its rows by index and rep_b by stream"):
        exact_similarity(full, feed(data))


# --------------------------------------------------------------------------- features only

def test_features_only_representation():
    data = make_data(14, **NARROW)
    rep = feed(data, gradients=False)
    assert not rep.has_gradients and rep.widths("fc") == (5, None)
    table, _, _ = exact_similarity(rep, feed(data), "cka", "feature")
    torch.testing.assert_close(table, indices.cka_matrix(dense_kernels(data, "feature"),
                                                         dense_kernels(data, "feature")), **TOL)
    for kind in ("hadamard", "gradient", "transport"):
        with pytest.raises(ValueError, match="needs gradients.*features only"):
            exact_similarity(rep, rep, "cka", kind)
    with pytest.raises(ValueError, match="built without gradients"):
        rep.update({k: f[:2] for k, (f, _) in data.items()}, {k: g[:2] for k, (_, g) in data.items()})


# --------------------------------------------------------------------------- bad input

def _bad_batches(data: Data):
    f = {k: f[:3].clone() for k, (f, _) in data.items()}
    g = {k: g[:3].clone() for k, (_, g) in data.items()}
    nan_g = {**g, "fc": g["fc"].clone().index_fill_(0, torch.tensor([1]), float("nan"))}
    inf_f = {**f, "conv": f["conv"].clone().index_fill_(0, torch.tensor([2]), float("inf"))}
    wide = {**f, "fc": torch.ones(3, 6)}
    f4 = {k: f[:4] for k, (f, _) in data.items()}
    g4 = {k: g[:4] for k, (_, g) in data.items()}
    return [
        (dict(features=f, gradients=nan_g, rows=torch.tensor([90, 91, 92])), FloatingPointError,
         "non-finite gradients at layer 'fc' in batch x"),
        (dict(features=inf_f, gradients=g, rows=torch.tensor([90, 91, 92])), FloatingPointError,
         "non-finite features at layer 'conv'"),
        (dict(features=wide, gradients=g, rows=torch.tensor([90, 91, 92])), ValueError,
         "layer 'fc' in batch x: .* widths changed"),
        (dict(features=f, gradients=g, rows=torch.tensor([90, 91, 91])), ValueError, "duplicate"),
        (dict(features=f, gradients=g, rows=torch.tensor([90, 5, 92])), ValueError, "already held"),
        (dict(features=f, gradients=g, rows=torch.tensor([90, 91])), ValueError, "length 3"),
        (dict(features=f, gradients=g, rows=torch.tensor([90., 91., 92.])), TypeError, "integer"),
        (dict(features=f, gradients=g, rows=torch.tensor([-1, 91, 92])), ValueError, "non-negative"),
        (dict(features=f, gradients=g, rows=None), ValueError, "numbers rows by index"),
        (dict(features=f, gradients=None, rows=torch.tensor([90, 91, 92])), ValueError,
         "built with gradients"),
        (dict(features={"fc": f["fc"]}, gradients={"fc": g["fc"]}, rows=torch.tensor([90, 91, 92])),
         ValueError, "differ from"),
        (dict(features=f, gradients={"fc": g["fc"]}, rows=torch.tensor([90, 91, 92])), ValueError,
         "same layers"),
        (dict(features={**f, "fc": f["fc"][0]}, gradients=g, rows=torch.tensor([90, 91, 92])),
         ValueError, r"\[B, d\]"),
        (dict(features={**f, "fc": f["fc"].to(torch.int64)}, gradients=g, rows=torch.tensor([90, 91, 92])),
         TypeError, "floating"),
        (dict(features={**f, "fc": [1.0]}, gradients=g, rows=torch.tensor([90, 91, 92])), TypeError,
         "torch.Tensor"),
        (dict(features=f4, gradients=g4, rows=torch.tensor([90, 91, 92, 93])), ValueError,
         "44 rows, past max_rows=43"),
    ]


def test_bad_batches_raise_and_leave_the_state_unchanged():
    data = make_data(15, **NARROW)
    rep = feed(data, rows=torch.arange(40), max_rows=43)
    other = feed(data, rows=torch.arange(40))
    before, _, _ = exact_similarity(rep, other, "cka", "hadamard")
    for arguments, error, message in _bad_batches(data):
        with pytest.raises(error, match=message):
            rep.update(arguments["features"], arguments["gradients"], rows=arguments["rows"],
                       label="batch x")
        assert rep.n == 40 and rep.layer_names == ["conv", "fc"]
        torch.testing.assert_close(rep.row_ids, torch.arange(40))
    after, _, _ = exact_similarity(rep, other, "cka", "hadamard")
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_large_finite_values_are_not_taken_for_overflow():
    huge = torch.full((4, 3), 3e38)          # float32: finite, but their sum overflows
    rep = ExactRepresentation()
    rep.update({"fc": huge}, {"fc": huge})
    assert rep.n == 4


def test_argument_checks_and_limits():
    data = make_data(16, **NARROW)
    rep = feed(data)
    with pytest.raises(ValueError, match="index must be one of"):
        exact_similarity(rep, rep, "cosine")
    with pytest.raises(ValueError, match="kind must be one of"):
        exact_similarity(rep, rep, "cka", "nope")
    with pytest.raises(ValueError, match="cannot be combined with centered=False"):
        exact_similarity(rep, rep, debiased=True, centered=False)
    with pytest.raises(ValueError, match="NBS has no debiased form"):
        exact_similarity(rep, rep, "nbs", debiased=True)
    with pytest.raises(TypeError, match="ExactRepresentation"):
        exact_similarity(rep, object())
    with pytest.raises(ValueError, match="empty"):
        exact_similarity(rep, ExactRepresentation())
    with pytest.raises(ValueError, match="khatri_rao.*one width"):
        uneven = feed({"x": (torch.ones(5, 3), torch.ones(5, 4))})
        exact_similarity(uneven, uneven, kind="khatri_rao")
    for call in (lambda: exact_similarity(rep, rep, "nbs", "hadamard", max_dense=39),
                 lambda: exact_similarity(rep, rep, "cka", "transport", max_dense=39),
                 lambda: exact_kernel(rep, "fc", max_dense=39)):
        with pytest.raises(ValueError, match="N = 40 exceeds max_dense = 39"):
            call()
    # Linear kinds stay exact above the dense limit through the cross-covariance.
    table, _, _ = exact_similarity(rep, rep, "nbs", "feature", max_dense=39)
    torch.testing.assert_close(table.diagonal(), torch.ones(2, dtype=torch.float64))
    tiny = feed({k: (f[:3], g[:3]) for k, (f, g) in data.items()})
    with pytest.raises(ValueError, match="needs N > 3"):
        exact_similarity(tiny, tiny, debiased=True)
    with pytest.raises(TypeError, match="dtype"):
        ExactRepresentation(dtype=torch.float16)
    with pytest.raises(ValueError, match="max_rows"):
        ExactRepresentation(max_rows=0)


def test_degenerate_kernels_give_zero_not_nan():
    constant = {"fc": (torch.ones(10, 3), torch.ones(10, 3))}
    varied = make_data(17, n=10, widths={"fc": 3})
    for index, options in VARIANTS:
        table, _, _ = exact_similarity(feed(constant), feed(varied), index, "feature", **options)
        if options.get("centered", True):
            assert float(table) == 0.0
        assert torch.isfinite(table).all()


def test_float64_data_is_stored_in_float64_and_progress_bar_runs():
    data = {k: (f.double() / 3, g.double() / 3) for k, (f, g) in make_data(18, **NARROW).items()}
    rep = feed(data, ram_bytes=0)
    assert rep.layer_names == ["conv", "fc"] and rep._layers["fc"].f.dtype == torch.float64
    table, _, _ = exact_similarity(rep, rep, "cka", "feature", layers="fc", progress=True)
    assert float(table) == pytest.approx(1.0)
    torch.testing.assert_close(exact_kernel(rep, "fc", "feature", centered=False),
                               data["fc"][0] @ data["fc"][0].T, rtol=1e-13, atol=1e-14)


# --------------------------------------------------------------------------- end to end

def test_features_and_gradients_of_a_model_end_to_end():
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
              for _ in range(2)]
    x = torch.randn(30, 2, 6, 6)
    layers = ["1", "3"]
    dense, reps = [], []
    for model in models:
        stats = features_and_gradients(model, x, layers, batch=8)
        rep = ExactRepresentation(max_rows=30)
        for low in range(0, 30, 8):
            rep.update({k: f[low:low + 8] for k, (f, _) in stats.items()},
                       {k: g[low:low + 8] for k, (_, g) in stats.items()})
        reps.append(rep)
        dense.append([dense_kernel(f, g, "hadamard") for f, g in stats.values()])
    for index, options in VARIANTS:
        table, names_a, _ = exact_similarity(*reps, index, "hadamard", **options)
        assert names_a == layers
        torch.testing.assert_close(table, dense_index(*dense, index, options), **TOL)
