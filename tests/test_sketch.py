"""Tests of the streaming ``Representation``: update, merge, persistence, errors.

References: the dense sketch matrix ``S`` assembled from ``ops.sketch_hash`` and
float64 matrix products on the full feature/gradient matrices; merges are
compared with one-shot sketches of the same rows; files are inspected and
tampered with through ``safetensors`` directly.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Dict

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import dense_sketch
from nnsim_fast import Representation, sketch_model, state
from nnsim_fast.sketch import FORMAT_VERSION

TOL = dict(rtol=1e-12, atol=1e-12)

WIDTHS = {"conv": (6, 6), "head": (4, 3)}  # (d_f, d_g) per layer


def random_data(n: int, seed: int, widths: Dict = WIDTHS):
    g = torch.Generator().manual_seed(seed)
    feats = {k: torch.randn(n, df, generator=g, dtype=torch.float64) + 0.5 for k, (df, _) in widths.items()}
    grads = {k: torch.randn(n, dg, generator=g, dtype=torch.float64) for k, (_, dg) in widths.items()}
    return feats, grads


def build(feats, grads, m=16, seed=3, sparsity=1, batch=5, rows=None, dtype=torch.float64,
          product=False, mean_embedding=False, beta=0.5, meta=None) -> Representation:
    rep = Representation(m, seed, sparsity, beta=beta, dtype=dtype, meta=meta, product=product,
                         mean_embedding=mean_embedding)
    n = next(iter(feats.values())).shape[0]
    for start in range(0, n, batch):
        sl = slice(start, start + batch)
        rep.update({k: v[sl] for k, v in feats.items()}, {k: v[sl] for k, v in grads.items()},
                   rows=None if rows is None else rows[sl])
    return rep


def assert_same(a: Representation, b: Representation, tol=TOL) -> None:
    assert (a.m, a.seed, a.sparsity, a.n) == (b.m, b.seed, b.sparsity, b.n)
    assert a.row_intervals == b.row_intervals and a.row_keys == b.row_keys
    assert a.layer_names == b.layer_names
    for name in a.layer_names:
        ta, tb = a.layers[name].tensors(), b.layers[name].tensors()
        assert ta.keys() == tb.keys()
        for key in ta:
            torch.testing.assert_close(tb[key], ta[key], **tol)
    torch.testing.assert_close(b.sketch_ones, a.sketch_ones, **tol)


# --------------------------------------------------------------------------- update

@pytest.mark.parametrize("sparsity", [1, 4])
def test_update_matches_dense_sketch_and_exact_statistics(sparsity):
    feats, grads = random_data(23, seed=1)
    rep = build(feats, grads, m=16, seed=5, sparsity=sparsity, batch=6, product=False,
                mean_embedding=True)
    S = dense_sketch(23, 16, 5, sparsity)
    assert rep.n == 23 and rep.row_intervals == [[0, 23]] and rep.row_keys == "stream"
    torch.testing.assert_close(rep.sketch_ones, S @ torch.ones(23, 1, dtype=torch.float64), **TOL)
    for name in WIDTHS:
        f, g = feats[name], grads[name]
        layer = rep.layers[name]
        torch.testing.assert_close(layer.sketch_f, S @ f, **TOL)
        torch.testing.assert_close(layer.sketch_g, S @ g, **TOL)
        torch.testing.assert_close(layer.sum_f, f.sum(0), **TOL)
        torch.testing.assert_close(layer.sum_g, g.sum(0), **TOL)
        trace = sum(float(f[i] @ f[i]) * float(g[i] @ g[i]) for i in range(23))
        assert math.isclose(float(layer.trace), trace, rel_tol=1e-12)
        psi = sum(torch.outer(g[i], f[i]) for i in range(23))
        torch.testing.assert_close(layer.mean_psi, psi, **TOL)
        assert layer.sketch_fg is None and layer.sum_fg is None
        assert layer.feature_shape == (f.shape[1],)


def test_product_sketch_of_f_times_g():
    feats, grads = random_data(17, seed=2, widths={"a": (5, 5)})
    rep = build(feats, grads, m=8, seed=1, batch=4, product=True)
    S = dense_sketch(17, 8, 1)
    fg = feats["a"] * grads["a"]
    torch.testing.assert_close(rep.layers["a"].sketch_fg, S @ fg, **TOL)
    torch.testing.assert_close(rep.layers["a"].sum_fg, fg.sum(0), **TOL)


def test_product_needs_equal_widths():
    feats, grads = random_data(4, seed=2, widths={"a": (5, 3)})
    with pytest.raises(ValueError, match="'a'"):
        build(feats, grads, product=True)


def test_float32_accumulators():
    feats, grads = random_data(20, seed=3)
    rep = build(feats, grads, dtype=torch.float32)
    S = dense_sketch(20, 16, 3)
    assert rep.layers["conv"].sketch_f.dtype == torch.float32
    assert rep.layers["conv"].sum_f.dtype == torch.float64
    for name in WIDTHS:
        torch.testing.assert_close(rep.layers[name].sketch_f.double(), S @ feats[name],
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rep.layers[name].sketch_g.double(), S @ grads[name],
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1), (7, 300), (128, 128), (300, 257), (260, 1000)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_row_sums_against_float64(shape, dtype):
    """Column sums and squared row norms of a batch against float64 sums of the same
    (rounded) values, for shapes with and without full blocks: float64 input exactly
    (same operations), lower precisions within the blocked float32 bound of the
    docstring, SUM_BLOCK * eps32 relative to the sum of magnitudes (a safe factor 2)."""
    gen = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) + 3.0).to(dtype)
    column, norms = state.row_sums(x)
    x64 = x.to(torch.float64)
    assert column.dtype == norms.dtype == torch.float64
    assert column.shape == (shape[1],) and norms.shape == (shape[0],)
    bound = 2 * state.SUM_BLOCK * torch.finfo(torch.float32).eps
    if dtype == torch.float64:
        bound = 0.0
    assert torch.all((column - x64.sum(0)).abs() <= bound * x64.abs().sum(0))
    assert torch.all((norms - x64.square().sum(1)).abs() <= bound * x64.square().sum(1))


def test_row_sums_in_float64_on_request():
    """float64 accumulators ask for float64 sums of float32 rows: the same as summing the
    float64 copy."""
    x = torch.randn(300, 257, generator=torch.Generator().manual_seed(4)) + 3.0
    column, norms = state.row_sums(x, float64=True)
    assert torch.equal(column, x.double().sum(0)) and torch.equal(norms, x.double().square().sum(1))


def test_row_sums_of_huge_float32_values_fall_back_to_float64():
    """Squares beyond the float32 range: the blocked sums overflow, the float64 ones do not."""
    x = torch.full((3, 200), 3e20, dtype=torch.float32)
    column, norms = state.row_sums(x)
    assert torch.isfinite(norms).all()
    assert torch.allclose(norms, torch.full((3,), 200 * 3e20 ** 2, dtype=torch.float64), rtol=1e-6)
    assert torch.allclose(column, torch.full((200,), 9e20, dtype=torch.float64), rtol=1e-6)


def test_rows_in_any_order_equal_stream_numbering():
    feats, grads = random_data(30, seed=4)
    stream = build(feats, grads, batch=7)
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(0))
    shuffled = build({k: v[perm] for k, v in feats.items()}, {k: v[perm] for k, v in grads.items()},
                     batch=4, rows=perm)
    assert shuffled.row_keys == "index" and shuffled.row_intervals == [[0, 30]]
    for name in WIDTHS:
        for key in ("sketch_f", "sketch_g", "sum_f", "sum_g", "trace"):
            torch.testing.assert_close(getattr(shuffled.layers[name], key),
                                       getattr(stream.layers[name], key), **TOL)
    torch.testing.assert_close(shuffled.sketch_ones, stream.sketch_ones, **TOL)


def test_sparse_row_indices_are_tracked():
    feats, grads = random_data(6, seed=5)
    rows = torch.tensor([40, 3, 4, 41, 5, 100])
    rep = build(feats, grads, rows=rows, batch=3)
    assert rep.row_intervals == [[3, 6], [40, 42], [100, 101]] and rep.n == 6
    S = dense_sketch(6, 16, 3, rows=rows)
    torch.testing.assert_close(rep.layers["head"].sketch_g, S @ grads["head"], **TOL)


# --------------------------------------------------------------------------- update errors

def test_update_rejects_mismatched_layers_and_shapes():
    feats, grads = random_data(8, seed=6)
    rep = build(feats, grads)
    f, g = feats["conv"], grads["conv"]
    with pytest.raises(ValueError, match="same layers"):
        rep.update({"conv": f}, {"head": g})
    with pytest.raises(ValueError, match="differ"):
        rep.update({"conv": f}, {"conv": g})  # "head" is missing
    with pytest.raises(ValueError, match="differ"):
        rep.update({**feats, "extra": f}, {**grads, "extra": g})
    with pytest.raises(ValueError, match="at least one"):
        rep.update({}, {})
    with pytest.raises(ValueError, match="width"):
        rep.update({"conv": f[:, :5], "head": feats["head"]}, grads)
    with pytest.raises(ValueError, match=r"\[B, d\]"):
        rep.update({"conv": f[:3], "head": feats["head"][:3]}, {"conv": g[:2], "head": grads["head"][:3]})
    with pytest.raises(ValueError, match=r"\[B, d\]"):
        rep.update({"conv": f.reshape(8, 2, 3), "head": feats["head"]}, grads)
    # A failed update leaves the state untouched.
    assert_same(rep, build(feats, grads))


def test_update_rejects_bad_rows():
    feats, grads = random_data(4, seed=7)
    rep = Representation(8, 0, dtype=torch.float64)
    with pytest.raises(ValueError, match="rows"):
        rep.update(feats, grads, rows=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="duplicate"):
        rep.update(feats, grads, rows=torch.tensor([0, 1, 1, 2]))
    rep.update(feats, grads, rows=torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="once"):
        rep.update(feats, grads, rows=torch.tensor([3, 4, 5, 6]))
    with pytest.raises(ValueError, match="numbers rows by index"):
        rep.update(feats, grads)
    stream = build(feats, grads)
    with pytest.raises(ValueError, match="numbers rows by stream"):
        stream.update(feats, grads, rows=torch.tensor([10, 11, 12, 13]))
    assert rep.n == 4 and rep.row_intervals == [[0, 4]]


@pytest.mark.parametrize("kwargs, error", [
    (dict(m=0, seed=0), ValueError), (dict(m=10, seed=0, sparsity=4), ValueError),
    (dict(m=8, seed=-3), ValueError), (dict(m=8, seed=0, sparsity=0), ValueError),
    (dict(m=8.0, seed=0), TypeError), (dict(m=8, seed=0, dtype=torch.float16), TypeError),
])
def test_constructor_rejects_bad_settings(kwargs, error):
    with pytest.raises(error):
        Representation(**kwargs)


# --------------------------------------------------------------------------- merge

def split_rep(feats, grads, rows: torch.Tensor, **kwargs) -> Representation:
    return build({k: v[rows] for k, v in feats.items()}, {k: v[rows] for k, v in grads.items()},
                 rows=rows, **kwargs)


@pytest.mark.parametrize("extras", [dict(), dict(product=True, mean_embedding=True)])
def test_merge_of_disjoint_halves_equals_one_shot(extras):
    widths = {"a": (5, 5), "b": (3, 3)}
    feats, grads = random_data(26, seed=8, widths=widths)
    one = build(feats, grads, rows=torch.arange(26), batch=26, **extras)
    perm = torch.randperm(26, generator=torch.Generator().manual_seed(3))
    first = split_rep(feats, grads, perm[:11], batch=4, **extras)
    second = split_rep(feats, grads, perm[11:], batch=6, **extras)
    before = first.copy()
    merged = first.merge(second)
    assert_same(one, merged)
    assert_same(one, second.merge(first))
    assert_same(before, first, tol=dict(rtol=0, atol=0))  # inputs untouched
    assert merged.row_intervals == [[0, 26]] and merged.meta["beta"] == 0.5
    # Three shards.
    a, b, c = (split_rep(feats, grads, part, batch=5, **extras) for part in perm.split(9))
    assert_same(one, a.merge(b).merge(c))
    assert_same(one, a.merge(b.merge(c)))


def test_merge_of_stream_numbered_halves_via_update_offset_rows():
    # Two workers on consecutive slices of a stream: the second numbers its rows
    # by dataset index starting where the first stopped; equals one pass.
    feats, grads = random_data(20, seed=9)
    whole = build(feats, grads, rows=torch.arange(20))
    left = split_rep(feats, grads, torch.arange(0, 12))
    right = split_rep(feats, grads, torch.arange(12, 20))
    assert_same(whole, left.merge(right))
    # Stream numbering and index numbering 0..n-1 give the same sketch.
    stream = build(feats, grads)
    for name in WIDTHS:
        torch.testing.assert_close(stream.layers[name].sketch_f, whole.layers[name].sketch_f, **TOL)


def test_merge_of_overlapping_rows_raises():
    feats, grads = random_data(10, seed=10)
    a = build(feats, grads)
    with pytest.raises(ValueError, match="overlap"):
        a.merge(build(feats, grads))  # both are stream rows 0..9
    b = split_rep(feats, grads, torch.arange(0, 6))
    c = split_rep(feats, grads, torch.arange(5, 10))
    with pytest.raises(ValueError, match="overlap"):
        b.merge(c)
    with pytest.raises(ValueError, match="overlap"):
        b.merge(b)


def test_merge_stream_with_index_numbering_raises():
    feats, grads = random_data(10, seed=11)
    indexed = build(feats, grads, rows=torch.arange(50, 60))
    with pytest.raises(ValueError, match="stream"):
        build(feats, grads).merge(indexed)
    with pytest.raises(ValueError, match="stream"):
        indexed.merge(build(feats, grads))


@pytest.mark.parametrize("field, other", [("m", dict(m=32)), ("seed", dict(seed=4)),
                                          ("sparsity", dict(sparsity=2))])
def test_merge_with_different_sketch_settings_names_the_field(field, other):
    feats, grads = random_data(6, seed=12)
    a = split_rep(feats, grads, torch.arange(0, 3))
    b = split_rep(feats, grads, torch.arange(3, 6), **other)
    with pytest.raises(ValueError, match=f"different {field}"):
        a.merge(b)
    with pytest.raises(ValueError, match=f"different {field}"):
        b.merge(a)


def test_merge_with_different_beta_or_layers_raises():
    feats, grads = random_data(6, seed=13)
    a = split_rep(feats, grads, torch.arange(0, 3))
    with pytest.raises(ValueError, match="beta"):
        a.merge(split_rep(feats, grads, torch.arange(3, 6), beta=0.25))
    only_conv = build({"conv": feats["conv"][3:]}, {"conv": grads["conv"][3:]},
                      rows=torch.arange(3, 6))
    with pytest.raises(ValueError, match="layers"):
        a.merge(only_conv)
    with pytest.raises(TypeError, match="Representation"):
        a.merge({"conv": feats["conv"]})


@pytest.mark.parametrize("extra", ["product", "mean_embedding"])
def test_merge_with_and_without_optional_statistics_raises_both_ways(extra):
    # One side carries the product sketch (or mean embedding), the other does not:
    # the merged statistic would cover only part of the rows, so both orders must refuse.
    # (Equal widths: the product f o g needs features and gradients of one width.)
    feats, grads = random_data(8, seed=14, widths={"a": (5, 5), "b": (3, 3)})
    with_extra = split_rep(feats, grads, torch.arange(0, 4), **{extra: True})
    without = split_rep(feats, grads, torch.arange(4, 8))
    with pytest.raises(ValueError):
        without.merge(with_extra)
    with pytest.raises(ValueError):
        with_extra.merge(without)


def test_merge_with_different_target_raises():
    # Expected gradients and label gradients are different quantities; summing
    # their sketches gives a meaningless kernel.
    feats, grads = random_data(8, seed=15)
    expected = split_rep(feats, grads, torch.arange(0, 4), meta={"target": "expected"})
    labels = split_rep(feats, grads, torch.arange(4, 8), meta={"target": "labels"})
    with pytest.raises(ValueError, match="target"):
        expected.merge(labels)


# --------------------------------------------------------------------------- sketch_model: into and merge

def small_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def mlp_batches(n: int = 20):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def test_sketch_model_into_continues_the_stream_and_halves_merge():
    model = small_mlp()
    x, y = mlp_batches()
    kwargs = dict(layers=["0", "2"], m=16, seed=2, dtype=torch.float64, product=True,
                  mean_embedding=True)
    one = sketch_model(model, [(x, y)], **kwargs)
    first = sketch_model(model, [(x[:8], y[:8])], **kwargs)
    continued = sketch_model(model, [(x[8:14], y[8:14]), (x[14:], y[14:])], into=first.copy(), **kwargs)
    assert_same(one, continued)
    # Index-keyed halves from two independent runs merge into the one-shot sketch.
    half_a = sketch_model(model, [(torch.arange(0, 8), x[:8], y[:8])], **kwargs)
    half_b = sketch_model(model, [(torch.arange(8, 20), x[8:], y[8:])], **kwargs)
    indexed = sketch_model(model, [(torch.arange(20), x, y)], **kwargs)
    assert_same(indexed, half_a.merge(half_b))
    for name in ("0", "2"):
        torch.testing.assert_close(indexed.layers[name].sketch_g, one.layers[name].sketch_g, **TOL)
    # Two stream-numbered runs both start at row 0: merging them must refuse.
    second = sketch_model(model, [(x[8:], y[8:])], **kwargs)
    with pytest.raises(ValueError, match="overlap"):
        first.merge(second)


@pytest.mark.parametrize("change", [dict(m=32), dict(seed=9), dict(sparsity=2), dict(beta=0.3)])
def test_sketch_model_into_with_other_settings_raises(change):
    model = small_mlp()
    x, y = mlp_batches(6)
    base = dict(layers=["0"], m=16, seed=2, beta=0.5)
    rep = sketch_model(model, [(x, y)], **base)
    with pytest.raises(ValueError, match=next(iter(change))):
        sketch_model(model, [(x, y)], into=rep, **{**base, **change})
    assert rep.n == 6


def test_sketch_model_into_with_other_target_raises():
    model = small_mlp()
    x, y = mlp_batches(6)
    rep = sketch_model(model, [(x[:3], y[:3])], layers=["0"], m=16)
    with pytest.raises(ValueError, match="target"):
        sketch_model(model, [(x[3:], y[3:])], layers=["0"], m=16, target="labels", into=rep)


# --------------------------------------------------------------------------- copy / to

def test_to_cpu_and_copy():
    feats, grads = random_data(9, seed=16)
    rep = build(feats, grads, product=False, mean_embedding=True)
    assert rep.to("cpu") is rep
    assert rep.to(torch.device("cpu")) is rep
    dup = rep.copy()
    assert_same(rep, dup, tol=dict(rtol=0, atol=0))
    assert dup.meta == rep.meta and dup.dtype == rep.dtype
    dup.layers["conv"].sketch_f += 1.0
    dup.update({k: v[:2] for k, v in feats.items()}, {k: v[:2] for k, v in grads.items()})
    assert_same(rep, build(feats, grads, mean_embedding=True), tol=dict(rtol=0, atol=0))


# --------------------------------------------------------------------------- save / load

def full_rep() -> Representation:
    feats, grads = random_data(15, seed=17, widths={"a": (5, 5), "b.c": (3, 3)})
    rows = torch.tensor([7, 2, 9, 30, 31, 32, 0, 1, 50, 51, 52, 53, 3, 4, 5])
    return build(feats, grads, m=8, seed=123456789012, sparsity=2, rows=rows, batch=4,
                 product=True, mean_embedding=True, beta=0.25,
                 meta={"target": "expected", "spatial": "mean", "layers": ["a", "b.c"]})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_save_load_round_trip(tmp_path, dtype):
    feats, grads = random_data(15, seed=17, widths={"a": (5, 5), "b.c": (3, 3)})
    rep = full_rep() if dtype == torch.float64 else build(feats, grads, dtype=dtype, product=True)
    path = tmp_path / "rep.safetensors"
    rep.save(path)
    loaded = Representation.load(path)
    assert_same(rep, loaded, tol=dict(rtol=0, atol=0))
    assert loaded.meta == rep.meta and loaded.dtype == rep.dtype
    for name in rep.layer_names:
        assert loaded.layers[name].feature_shape == rep.layers[name].feature_shape
        for key, value in loaded.layers[name].tensors().items():
            assert value.dtype == rep.layers[name].tensors()[key].dtype
    torch.testing.assert_close(loaded.kernel(rep.layer_names[0], kind="khatri_rao"),
                               rep.kernel(rep.layer_names[0], kind="khatri_rao"), rtol=0, atol=0)
    # It is a plain safetensors file: no pickle, our metadata under one key.
    tensors = load_file(str(path))
    assert tensors["sketch_ones"].shape == (rep.m, 1)
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()["nnsim_fast"])
    assert header["format"] == FORMAT_VERSION and header["m"] == rep.m and header["n"] == rep.n
    # str paths work too, and no temporary files stay behind.
    loaded_str = Representation.load(str(path))
    assert_same(rep, loaded_str, tol=dict(rtol=0, atol=0))
    assert sorted(os.listdir(tmp_path)) == ["rep.safetensors"]


def test_loaded_representation_keeps_streaming(tmp_path):
    feats, grads = random_data(20, seed=18)
    first = build({k: v[:12] for k, v in feats.items()}, {k: v[:12] for k, v in grads.items()})
    first.save(tmp_path / "part.safetensors")
    resumed = Representation.load(tmp_path / "part.safetensors")
    resumed.update({k: v[12:] for k, v in feats.items()}, {k: v[12:] for k, v in grads.items()})
    assert_same(build(feats, grads), resumed)


def test_save_overwrites_atomically(tmp_path):
    path = tmp_path / "rep.safetensors"
    feats, grads = random_data(5, seed=19)
    build(feats, grads).save(path)
    rep = full_rep()
    rep.save(path)
    assert_same(rep, Representation.load(path), tol=dict(rtol=0, atol=0))
    assert sorted(os.listdir(tmp_path)) == ["rep.safetensors"]


def test_load_rejects_foreign_and_broken_files(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"weight": torch.zeros(3, 3)}, str(plain))
    with pytest.raises(ValueError, match="not a nnsim_fast"):
        Representation.load(plain)
    other_meta = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3)}, str(other_meta), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a nnsim_fast"):
        Representation.load(other_meta)
    text = tmp_path / "notes.txt"
    text.write_text("this is not a representation\n" * 20)
    with pytest.raises(ValueError):
        Representation.load(text)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(ValueError):
        Representation.load(empty)
    good = tmp_path / "good.safetensors"
    full_rep().save(good)
    truncated = tmp_path / "truncated.safetensors"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError):
        Representation.load(truncated)
    with pytest.raises(FileNotFoundError):
        Representation.load(tmp_path / "missing.safetensors")


def rewrite(source: pathlib.Path, target: pathlib.Path, edit_meta=None, edit_tensors=None) -> None:
    with safe_open(str(source), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    if edit_meta is not None:
        metadata["nnsim_fast"] = edit_meta(metadata["nnsim_fast"])
    if edit_tensors is not None:
        edit_tensors(tensors)
    save_file(tensors, str(target), metadata=metadata)


def test_load_rejects_format_version_mismatch(tmp_path):
    good = tmp_path / "good.safetensors"
    full_rep().save(good)
    future = tmp_path / "future.safetensors"

    def bump(text: str) -> str:
        header = json.loads(text)
        header["format"] = FORMAT_VERSION + 1
        return json.dumps(header)

    rewrite(good, future, edit_meta=bump)
    with pytest.raises(ValueError, match="format"):
        Representation.load(future)
    # The untouched copy still loads: the edit itself is what is rejected.
    unchanged = tmp_path / "unchanged.safetensors"
    rewrite(good, unchanged, edit_meta=lambda text: text)
    assert_same(full_rep(), Representation.load(unchanged), tol=dict(rtol=0, atol=0))


def _drop(key):
    def edit(tensors):
        del tensors[key]
    return edit


def _reshape(key):
    def edit(tensors):
        tensors[key] = torch.zeros(tensors[key].shape[0] + 1, *tensors[key].shape[1:],
                                   dtype=tensors[key].dtype)
    return edit


@pytest.mark.parametrize("edit_meta, edit_tensors", [
    (lambda text: "{not json", None),
    (lambda text: "[1, 2, 3]", None),
    (lambda text: json.dumps({"format": FORMAT_VERSION}), None),
    (None, _drop("layer0.sketch_g")),
    (None, _drop("sketch_ones")),
    (None, _reshape("layer1.sketch_f")),
], ids=["bad-json", "json-list", "missing-keys", "missing-layer-tensor", "missing-ones",
        "wrong-shape"])
def test_load_rejects_corrupt_representation_file(tmp_path, edit_meta, edit_tensors):
    good = tmp_path / "good.safetensors"
    full_rep().save(good)
    broken = tmp_path / "broken.safetensors"
    rewrite(good, broken, edit_meta=edit_meta, edit_tensors=edit_tensors)
    with pytest.raises(ValueError):
        Representation.load(broken)
