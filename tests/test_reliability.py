"""Faults lose nothing and hostile input is refused: batches are all-or-nothing,
in-place ops tell autograd, files are checksummed and validated field by field,
crashes leave nothing of ours behind for long, and overflow is an error.

Each test sets up the fault (a bad layer in a batch, a flipped byte, a crafted
field, a dead writer) and checks the observable promise against an independent
copy of the state taken before the fault.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import assert_same_representation
from nnsim_fast import Representation, ops, storage
from nnsim_fast.sketch import FORMAT_VERSION


def batch(seed: int, n: int = 6, widths=(("a", 5, 4), ("b", 3, 3)), dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    feats = {k: torch.randn(n, df, generator=gen, dtype=dtype) + 1 for k, df, _ in widths}
    grads = {k: torch.randn(n, dg, generator=gen, dtype=dtype) for k, _, dg in widths}
    return feats, grads


def filled(**options) -> Representation:
    rep = Representation(16, 3, beta=0.5, dtype=torch.float64, **options)
    for seed in range(3):
        rep.update(*batch(seed))
    return rep


# --------------------------------------------------------------------------- batches

def _bad_second_layer(kind: str):
    feats, grads = batch(10)
    if kind == "non-finite":
        feats["b"][2, 1] = float("nan")
    elif kind == "width":
        feats["b"] = torch.randn(6, 4, dtype=torch.float64)
    elif kind == "overflow":
        feats["b"][0, 0] = 1e300
    return feats, grads


@pytest.mark.parametrize("kind", ["non-finite", "width", "overflow"])
def test_a_batch_with_one_bad_layer_changes_nothing(kind):
    rep = filled()
    before = rep.copy()
    with pytest.raises((ValueError, FloatingPointError), match="'b'"):
        rep.update(*_bad_second_layer(kind))
    assert_same_representation(before, rep, rtol=0, atol=0)
    rep.update(*batch(11))                      # and it keeps working
    assert rep.n == before.n + 6


def test_a_new_layer_refused_in_the_same_batch_creates_no_layer():
    rep = Representation(16, 3, beta=0.5, dtype=torch.float64, product=True)
    feats, grads = batch(0, widths=(("a", 4, 4), ("b", 3, 2)))   # b cannot take the product
    with pytest.raises(ValueError, match="'b'"):
        rep.update(feats, grads)
    assert rep.layers == {} and rep.n == 0 and rep.row_keys is None


def test_repeated_rows_change_nothing():
    rep = Representation(16, 3, beta=0.5, dtype=torch.float64)
    rep.update(*batch(0), rows=torch.arange(6))
    before = rep.copy()
    with pytest.raises(ValueError, match="once"):
        rep.update(*batch(1), rows=torch.arange(5, 11))
    assert_same_representation(before, rep, rtol=0, atol=0)


def test_an_interrupted_batch_makes_the_representation_say_so(monkeypatch):
    rep = filled()
    real = ops.countsketch_pair_
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:                      # the second layer's scatter
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "countsketch_pair_", interrupted)
    with pytest.raises(KeyboardInterrupt):
        rep.update(*batch(5))
    monkeypatch.setattr(ops, "countsketch_pair_", real)
    for use in (lambda: rep.update(*batch(6)), lambda: rep.kernel("a"), rep.copy,
                lambda: rep.save("unused.safetensors")):
        with pytest.raises(RuntimeError, match="unusable"):
            use()


def test_empty_batch_is_a_no_op():
    rep = filled()
    before = rep.copy()
    feats, grads = batch(3, n=0)
    rep.update(feats, grads)
    assert_same_representation(before, rep, rtol=0, atol=0)


def test_float64_values_too_large_for_float32_accumulators_are_refused():
    rep = Representation(16, 3, beta=0.5, dtype=torch.float32)
    feats, grads = batch(0)
    feats["a"][1, 1] = 1e200
    with pytest.raises(FloatingPointError, match="float64"):
        rep.update(feats, grads)
    assert rep.n == 0


def test_large_float32_features_give_finite_exact_traces():
    rep = Representation(16, 3, beta=0.5, dtype=torch.float64)
    feats, grads = batch(0, dtype=torch.float32)
    feats = {k: v * 1e20 for k, v in feats.items()}
    rep.update(feats, grads)
    f64, g64 = feats["a"].double(), grads["a"].double()
    expected = (f64.square().sum(1) * g64.square().sum(1)).sum()
    assert torch.isfinite(rep.layers["a"].trace)
    torch.testing.assert_close(rep.layers["a"].trace, expected, rtol=1e-12, atol=0)


def test_layers_with_different_feature_and_gradient_widths_match_dense():
    feats, grads = batch(4, n=40, widths=(("a", 7, 2),))
    rep = Representation(8, 5, beta=0.5, dtype=torch.float64)
    rep.update({k: v[:25] for k, v in feats.items()}, {k: v[:25] for k, v in grads.items()})
    rep.update({k: v[25:] for k, v in feats.items()}, {k: v[25:] for k, v in grads.items()})
    S = ops.sketch_matrix(40, 8, 5)
    f, g = feats["a"], grads["a"]
    layer = rep.layers["a"]
    torch.testing.assert_close(layer.sketch_f, S @ f)
    torch.testing.assert_close(layer.sketch_g, S @ g)
    psi = (g.unsqueeze(2) * f.unsqueeze(1)).reshape(40, -1)     # 14 <= psi width: exact
    S_p = ops.sketch_matrix(40, rep.options["psi_buckets"], 5)  # the halves' own buckets
    for half in range(2):
        torch.testing.assert_close(layer.sketch_psi[half], S_p @ psi)
    torch.testing.assert_close(layer.sketch_sqnorm_psi, S_p @ (psi.square().sum(1)))
    torch.testing.assert_close(layer.psi_ones, S_p.sum(1))
    torch.testing.assert_close(layer.psi_counts, (S_p != 0).sum(1).to(torch.float64))
    torch.testing.assert_close(layer.quartic_psi, psi.square().sum(1).square().sum())


def test_merging_an_overlapping_one_row_stream_is_refused():
    big = filled()
    one = Representation(16, 3, beta=0.5, dtype=torch.float64)
    feats, grads = batch(7, n=1)
    one.update(feats, grads)                     # stream row 0, which big holds too
    for a, b in ((big, one), (one, big)):
        with pytest.raises(ValueError, match="overlap"):
            a.merge(b)


def test_numpy_scalars_are_plain_numbers_everywhere(tmp_path):
    rep = Representation(np.int64(16), np.int32(3), np.int64(2), beta=np.float32(0.5),
                         dtype=torch.float64, meta={"note": np.float64(1.5)})
    rep.update(*batch(0))
    path = tmp_path / "rep.safetensors"
    rep.save(path)
    back = Representation.load(path)
    assert (back.m, back.seed, back.sparsity, back.meta["beta"], back.meta["note"]) == \
        (16, 3, 2, 0.5, 1.5)
    with pytest.raises(TypeError, match="m must be an int"):
        Representation(True, 3)


def test_empty_is_the_constructor():
    rep = Representation.empty(16, 3, gradients=False, dtype=torch.float64)
    feats, _ = batch(0)
    rep.update(feats)
    assert rep.n == 6 and rep.layers["a"].sketch_g is None
    with pytest.raises(ValueError, match="gradients=False"):
        rep.update(*batch(1))
    with pytest.raises(ValueError, match="gradients"):
        rep.kernel("a", kind="hadamard")


# --------------------------------------------------------------------------- in-place ops

def test_in_place_accumulation_bumps_the_autograd_version():
    f = torch.randn(20, 3)
    g = torch.randn(20, 2)
    acc_f = torch.zeros(8, 3, requires_grad=True)
    acc_g = torch.zeros(8, 2)
    leaf = acc_f * 1.0
    saved = leaf.detach().requires_grad_()
    weight = torch.randn(8, 3, requires_grad=True)
    out = (weight * saved).sum()                 # saves `saved` for backward
    ops.countsketch_pair_(saved.detach(), acc_g, f, g, 1)   # same storage as `saved`
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


def _aliased(case: str):
    f, g = torch.randn(8, 3), torch.randn(8, 2)
    acc_f, acc_g = torch.zeros(8, 3), torch.zeros(8, 2)
    if case == "acc_f is f":
        acc_f = f
    elif case == "acc_g overlaps g":
        buffer = torch.randn(12, 2)
        g, acc_g = buffer[:8], buffer[4:12]
    elif case in ("acc_f overlaps acc_g", "side by side"):
        buffer = torch.zeros(40)
        start = 20 if case == "acc_f overlaps acc_g" else 24
        acc_f, acc_g = buffer[:24].view(8, 3), buffer[start:start + 16].view(8, 2)
    return acc_f, acc_g, f, g


@pytest.mark.parametrize("case", ["acc_f is f", "acc_g overlaps g", "acc_f overlaps acc_g"])
def test_aliasing_accumulators_are_refused(case):
    acc_f, acc_g, f, g = _aliased(case)
    before = (acc_f.clone(), acc_g.clone())
    with pytest.raises(ValueError, match="shares memory"):
        ops.countsketch_pair_(acc_f, acc_g, f, g, 1)
    assert torch.equal(acc_f, before[0]) and torch.equal(acc_g, before[1])


def test_adjacent_views_of_one_buffer_are_fine():
    acc_f, acc_g, f, g = _aliased("side by side")
    ops.countsketch_pair_(acc_f, acc_g, f, g, 1)
    torch.testing.assert_close(acc_f, ops.reference_countsketch(f, 8, 1))
    torch.testing.assert_close(acc_g, ops.reference_countsketch(g, 8, 1))


# --------------------------------------------------------------------------- files

def _rewrite(source, target, edit_meta=None, edit_tensors=None):
    with safe_open(str(source), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    meta = json.loads(metadata["nnsim_fast"])
    if edit_meta is not None:
        edit_meta(meta)
    if edit_tensors is not None:
        edit_tensors(tensors)
        meta["checksums"] = {k: storage.digest(v) for k, v in tensors.items()}
    metadata["nnsim_fast"] = json.dumps(meta)
    save_file(tensors, str(target), metadata=metadata)


def test_a_flipped_byte_in_tensor_data_is_caught(tmp_path):
    good = tmp_path / "good.safetensors"
    filled().save(good)
    data = bytearray(good.read_bytes())
    header = int.from_bytes(data[:8], "little")
    position = 8 + header + (len(data) - 8 - header) // 2     # inside the tensor data
    data[position] ^= 0x10
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        Representation.load(bad)


def _set(path, value):
    def edit(meta):
        target = meta
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return edit


def _share_index(meta):
    names = list(meta["layers"])
    meta["layers"][names[1]]["index"] = meta["layers"][names[0]]["index"]


def _retype(key):
    def edit(tensors):
        tensors[key] = tensors[key].float()
    return edit


@pytest.mark.parametrize("edit_meta, edit_tensors, words", [
    (_set(["n"], -7), None, "n"),
    (_set(["n"], 1e300), None, "n"),
    (_set(["n"], 17), None, "rows"),
    (_set(["row_intervals"], [[0, 10], [5, 18]]), None, "row intervals"),
    (_set(["row_intervals"], [[10, 18], [0, 10]]), None, "row intervals"),
    (_set(["row_intervals"], [[0, "18"]]), None, "row interval"),
    (_share_index, None, "indices"),
    (_set(["options", "psi_dim"], -1), None, "psi_dim"),
    (_set(["options", "gradients"], 1), None, "gradients"),
    (_set(["layers", "a", "dims", "df"], 6), None, "layer 'a'"),
    (_set(["dtype"], "float16"), None, "dtype"),
    (None, _retype("layer0.sum_f"), "sum_f"),
    (None, _retype("layer1.sketch_f"), "sketch_f"),
], ids=["negative-n", "huge-n", "n-vs-rows", "overlapping-intervals", "unsorted-intervals",
        "text-row", "shared-layer-tensor", "negative-psi-dim", "int-for-bool", "width-vs-tensor",
        "accumulator-dtype", "exact-stat-dtype", "sketch-dtype"])
def test_crafted_metadata_is_refused_naming_the_field(tmp_path, edit_meta, edit_tensors, words):
    good = tmp_path / "good.safetensors"
    filled().save(good)
    bad = tmp_path / "bad.safetensors"
    _rewrite(good, bad, edit_meta, edit_tensors)
    with pytest.raises(ValueError, match=words):
        Representation.load(bad)
    # The untouched file, rewritten the same way, still loads: the edit is what is refused.
    same = tmp_path / "same.safetensors"
    _rewrite(good, same)
    assert_same_representation(filled(), Representation.load(same), rtol=0, atol=0)


def test_huge_dataset_indices_cost_nothing_to_hold_or_merge(tmp_path):
    feats, grads = batch(0)
    far = Representation(16, 3, beta=0.5, dtype=torch.float64)
    far.update(feats, grads, rows=torch.tensor([0, 1, 2, 2**40, 2**40 + 1, 2**61]))
    near = Representation(16, 3, beta=0.5, dtype=torch.float64)
    near.update(*batch(1), rows=torch.arange(3, 9))
    both = far.merge(near)
    assert both.n == 12
    assert both.row_intervals == [[0, 9], [2**40, 2**40 + 2], [2**61, 2**61 + 1]]
    path = tmp_path / "far.safetensors"
    both.save(path)
    assert Representation.load(path).row_intervals == both.row_intervals


def test_a_stale_temporary_of_a_dead_writer_is_removed_on_the_next_save(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".rep.safetensors.{pid}.0000{storage.PARTIAL_SUFFIX}"
    stale.write_bytes(b"x" * 100)
    live = tmp_path / f".rep.safetensors.{os.getpid()}.1111{storage.PARTIAL_SUFFIX}"
    live.write_bytes(b"y")
    other = tmp_path / f".other.safetensors.{pid}.2222{storage.PARTIAL_SUFFIX}"
    other.write_bytes(b"z")
    filled().save(tmp_path / "rep.safetensors")
    assert not stale.exists()
    assert live.exists() and other.exists()      # a live writer's, and another file's


def test_load_names_the_actual_problem(tmp_path, monkeypatch):
    path = tmp_path / "rep.safetensors"
    filled().save(path)
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)
    with pytest.raises(PermissionError, match="permission"):
        Representation.load(path)
    monkeypatch.undo()
    with pytest.raises(IsADirectoryError):
        Representation.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        Representation.load(tmp_path / "missing.safetensors")


def test_format_version_is_current():
    assert FORMAT_VERSION == 3


def _format_2_file(path, rep: Representation) -> None:
    """``rep`` written as format 2 wrote it: no psi_buckets (the halves at m buckets), no
    per-layer S_p 1 and bucket loads, the sketched diagonal of K kept with the gradients."""
    tensors, meta = rep.state()
    psi_on = bool(rep.options["psi_dim"])
    assert rep.options["psi_buckets"] == (rep.m if psi_on else 0)
    del meta["options"]["psi_buckets"]
    meta["format"] = 2
    for key in [k for k in tensors if k.endswith((".psi_ones", ".psi_counts"))]:
        del tensors[key]
    if not psi_on:
        for info in meta["layers"].values():
            tensors[f"layer{info['index']}.sketch_sqnorm_psi"] = torch.zeros(rep.m, dtype=torch.float64)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    meta["checksums"] = {k: storage.digest(v) for k, v in tensors.items()}
    storage.write_tensors(path, tensors, {"nnsim_fast": json.dumps(meta)})


@pytest.mark.parametrize("psi", [True, False])
def test_format_2_files_still_load(tmp_path, psi):
    """A file of the previous format (psi halves at the m buckets of S) loads as a
    representation with psi_buckets = m whose kernels and estimates equal the original's."""
    rep = filled(psi=psi, psi_buckets=16) if psi else filled(psi=False)
    path = tmp_path / "old.safetensors"
    _format_2_file(path, rep)
    loaded = Representation.load(path)
    assert loaded.options == rep.options
    assert_same_representation(loaded, rep, rtol=0, atol=0)
    kind = "hadamard" if psi else "feature"
    torch.testing.assert_close(loaded.grams(None, kind).kernels, rep.grams(None, kind).kernels,
                               rtol=0, atol=0)
    loaded.save(tmp_path / "new.safetensors")           # and is written back in the new format
    assert Representation.load(tmp_path / "new.safetensors").options == rep.options
