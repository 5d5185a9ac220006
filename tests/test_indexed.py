"""Rows keyed by dataset index: ``IndexedDataset`` batches through ``sketch_model``.

With dataset indices, a sample's bucket and sign depend on its index alone, so
the sketch must not depend on shuffling, batch size or how the rows are split
into runs.  The reference is computed here without the library's streaming
code: per-sample features and expected gradients of a small float64 MLP with
plain autograd on the whole dataset at once, the dense ``m x N`` sketch matrix
assembled from ``ops.sketch_hash`` (column ``i`` belongs to dataset index
``i``), and float64 matrix products.
"""
from __future__ import annotations

from typing import Dict, Tuple

import pytest
import torch

from conftest import assert_same_representation
from torch import nn
from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset

from nnsim_fast import IndexedDataset, Representation, ops, sketch_model

N, M, SEED, BETA = 100, 32, 11, 0.5
LAYERS = ["fc1", "fc2"]
TOL = dict(rtol=1e-12, atol=1e-12)


class MLP(nn.Module):
    """5 -> 7 -> 6 -> 4; probed at the two hidden pre-activations."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 7)
        self.act1 = nn.Tanh()
        self.fc2 = nn.Linear(7, 6)
        self.act2 = nn.ReLU()
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act2(self.fc2(self.act1(self.fc1(x)))))


def make_model() -> MLP:
    torch.manual_seed(3)
    return MLP().double()


def make_data() -> Tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(N, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (N,), generator=gen)
    return x, y


Statistics = Dict[str, Tuple[torch.Tensor, torch.Tensor]]


def reference_statistics(model: MLP, x: torch.Tensor) -> Statistics:
    """``(F, G)`` per layer: outputs and expected cross-entropy gradients under q ∝ p^beta.

    For one sample, ``E_q[d CE(logits, y) / d logits] = p - q``; back-propagating
    the per-sample vectors ``p - q`` through the rest of the net gives each row's
    gradient at the layer (rows are independent: no batch coupling in an MLP).
    """
    h1 = model.fc1(x)
    h2 = model.fc2(model.act1(h1))
    logits = model.head(model.act2(h2))
    p = torch.softmax(logits.detach(), dim=1)
    powered = p ** BETA
    q = powered / powered.sum(1, keepdim=True)
    g1, g2 = torch.autograd.grad(logits, [h1, h2], grad_outputs=p - q)
    return {"fc1": (h1.detach(), g1), "fc2": (h2.detach(), g2)}


def dense_sketch(rows: torch.Tensor) -> torch.Tensor:
    """``S`` with one column per entry of ``rows``: the sign at the row's bucket."""
    buckets, signs = ops.sketch_hash(rows.shape[0], M, SEED, 0, 1, rows=rows)
    S = torch.zeros(M, rows.shape[0], dtype=torch.float64)
    S[buckets[:, 0], torch.arange(rows.shape[0])] = signs[:, 0].to(torch.float64)
    return S


def assert_same(a: Representation, b: Representation, tol=TOL) -> None:
    assert_same_representation(a, b, **tol)


def assert_matches_reference(rep: Representation, model: MLP, x: torch.Tensor,
                             rows: torch.Tensor) -> None:
    """``rep`` holds exactly the samples ``x[rows]`` keyed by their indices ``rows``."""
    stats = reference_statistics(model, x[rows])
    S = dense_sketch(rows)
    assert rep.n == rows.shape[0]
    for name, (f, g) in stats.items():
        layer = rep.layers[name]
        torch.testing.assert_close(layer.sketch_f, S @ f, **TOL)
        torch.testing.assert_close(layer.sketch_g, S @ g, **TOL)
        torch.testing.assert_close(layer.sum_f, f.sum(0), **TOL)
        torch.testing.assert_close(layer.sum_g, g.sum(0), **TOL)
        trace = (f.square().sum(1) * g.square().sum(1)).sum()
        torch.testing.assert_close(layer.trace, trace, **TOL)
    torch.testing.assert_close(rep.sketch_ones, S.sum(1, keepdim=True), **TOL)


def sketch(model, data, **kwargs) -> Representation:
    return sketch_model(model, data, layers=LAYERS, m=M, seed=SEED, beta=BETA,
                        dtype=torch.float64, progress=False, **kwargs)


def no_hooks_left(model: nn.Module) -> bool:
    return all(not module._forward_hooks for module in model.modules())


@pytest.fixture(scope="module")
def setting():
    model, (x, y) = make_model(), make_data()
    return model, x, y


@pytest.fixture(scope="module")
def sorted_indexed(setting) -> Representation:
    model, x, y = setting
    return sketch(model, DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=16))


# --------------------------------------------------------------------------- invariance

@pytest.mark.parametrize("batch_size", [1, 13, 64])
@pytest.mark.parametrize("shuffle", [False, True])
def test_indexed_loader_independent_of_order_and_batch_size(setting, sorted_indexed,
                                                             batch_size, shuffle):
    model, x, y = setting
    loader = DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=batch_size,
                        shuffle=shuffle, generator=torch.Generator().manual_seed(batch_size))
    rep = sketch(model, loader)
    assert rep.row_keys == "index" and rep.row_intervals == [[0, N]]
    assert_same(sorted_indexed, rep)
    assert_matches_reference(rep, model, x, torch.arange(N))


def test_shuffled_loader_really_shuffles(setting):
    # Guards the invariance test above: a "shuffled" loader that yields rows in
    # order would make it vacuous.
    x, y = setting[1], setting[2]
    loader = DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=13, shuffle=True,
                        generator=torch.Generator().manual_seed(13))
    order = torch.cat([batch["index"] for batch in loader])
    assert sorted(order.tolist()) == list(range(N))
    assert not torch.equal(order, torch.arange(N))


def test_sorted_indices_equal_stream_order(setting, sorted_indexed):
    # Without indices rows are numbered in stream order, so index order 0..N-1
    # hashes exactly like an unindexed stream of the same rows.
    model, x, y = setting
    stream = sketch(model, DataLoader(TensorDataset(x, y), batch_size=9))
    assert stream.row_keys == "stream" and sorted_indexed.row_keys == "index"
    stream.row_keys = "index"     # the one field that names the numbering
    assert_same(sorted_indexed, stream)
    assert_matches_reference(stream, model, x, torch.arange(N))


def test_index_keys_follow_the_sample_not_its_position(setting):
    # A run over a subset of indices (in a shuffled order) is keyed by those
    # indices: its sketch is S[:, rows] applied to the rows' statistics, which
    # differs from the stream numbering 0..len(rows)-1 of the same samples.
    model, x, y = setting
    rows = torch.randperm(N, generator=torch.Generator().manual_seed(4))[:37]
    sampler = SubsetRandomSampler(rows.tolist(), generator=torch.Generator().manual_seed(8))
    rep = sketch(model, DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=10,
                                   sampler=sampler))
    assert_matches_reference(rep, model, x, rows.sort().values)
    stream = sketch(model, DataLoader(TensorDataset(x[rows], y[rows]), batch_size=10))
    assert not torch.allclose(stream.layers["fc1"].sketch_f, rep.layers["fc1"].sketch_f)


def test_dict_batches_with_index_lists(setting, sorted_indexed):
    model, x, y = setting
    order = torch.randperm(N, generator=torch.Generator().manual_seed(21))
    batches = [{"x": x[chunk], "y": y[chunk], "index": chunk.tolist()} for chunk in order.split(17)]
    assert_same(sorted_indexed, sketch(model, batches))


# --------------------------------------------------------------------------- merge

def test_merge_of_index_disjoint_halves_equals_one_shot(setting, sorted_indexed):
    model, x, y = setting
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(6))
    halves = perm[:N // 2].tolist(), perm[N // 2:].tolist()
    dataset = IndexedDataset(TensorDataset(x, y))
    parts = []
    for half, batch in zip(halves, (7, 12)):
        order = SubsetRandomSampler(half, generator=torch.Generator().manual_seed(batch))
        parts.append(sketch(model, DataLoader(dataset, batch_size=batch, sampler=order)))
    # The halves interleave, so neither is a contiguous block of indices.
    assert len(parts[0].row_intervals) > 1 and len(parts[1].row_intervals) > 1
    for merged in (parts[0].merge(parts[1]), parts[1].merge(parts[0])):
        assert merged.n == N and merged.row_intervals == [[0, N]]
        assert_same(sorted_indexed, merged)
    assert parts[0].n == N // 2  # merge returns a new representation
    with pytest.raises(ValueError, match="overlap"):
        parts[0].merge(parts[0])
    overlapping = sketch(model, DataLoader(dataset, batch_size=8,
                                           sampler=halves[1][:5] + halves[0][:1]))
    with pytest.raises(ValueError, match="overlap"):
        parts[0].merge(overlapping)


def test_merge_of_indexed_with_stream_numbered_raises(setting):
    model, x, y = setting
    indexed = sketch(model, DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=20,
                                       sampler=list(range(50, 70))))
    stream = sketch(model, [(x[:10], y[:10])])
    with pytest.raises(ValueError, match="stream-numbered"):
        indexed.merge(stream)
    with pytest.raises(ValueError, match="stream-numbered"):
        stream.merge(indexed)


# --------------------------------------------------------------------------- errors

def test_duplicate_index_within_a_batch_raises(setting):
    model, x, y = setting
    loader = DataLoader(IndexedDataset(TensorDataset(x, y)),
                        batch_sampler=[[0, 1, 2], [3, 4, 4, 5]])
    with pytest.raises(ValueError, match="duplicate"):
        sketch(model, loader)
    assert no_hooks_left(model)


def test_duplicate_index_across_batches_raises(setting):
    model, x, y = setting
    loader = DataLoader(IndexedDataset(TensorDataset(x, y)),
                        batch_sampler=[[5, 9, 2], [7, 8], [1, 9]])
    with pytest.raises(ValueError, match="already sketched"):
        sketch(model, loader)
    assert no_hooks_left(model)


@pytest.mark.parametrize("indexed_first", [True, False])
def test_mixing_indexed_and_unindexed_batches_raises(setting, indexed_first):
    model, x, y = setting
    indexed = {"x": x[:4], "y": y[:4], "index": torch.arange(40, 44)}
    plain = (x[4:8], y[4:8])
    data = [indexed, plain] if indexed_first else [plain, indexed]
    with pytest.raises(ValueError, match="cannot be mixed"):
        sketch(model, data)
    assert no_hooks_left(model)


def test_negative_index_raises(setting):
    model, x, y = setting
    with pytest.raises(ValueError, match="non-negative"):
        sketch(model, [{"x": x[:3], "y": y[:3], "index": torch.tensor([0, -1, 2])}])


def test_index_length_must_match_the_batch(setting):
    model, x, y = setting
    with pytest.raises(ValueError, match="length 3"):
        sketch(model, [{"x": x[:3], "y": y[:3], "index": torch.tensor([0, 1])}])


# --------------------------------------------------------------------------- the wrapper

def test_indexed_dataset_items():
    x = torch.arange(12.0).reshape(6, 2)
    y = torch.arange(6)
    pairs = IndexedDataset(TensorDataset(x, y))
    assert len(pairs) == 6
    item = pairs[4]
    assert item["index"] == 4 and torch.equal(item["x"], x[4]) and item["y"] == 4
    single = IndexedDataset(TensorDataset(x))
    assert set(single[2]) == {"index", "x"} and torch.equal(single[2]["x"], x[2])
    plain = IndexedDataset(x)  # a tensor indexes like a dataset of bare inputs
    assert torch.equal(plain[5]["x"], x[5]) and plain[5]["index"] == 5
    with pytest.raises(ValueError, match="x or \\(x, y\\)"):
        IndexedDataset(TensorDataset(x, y, y))[0]


def test_indexed_dataset_without_labels_sketches(setting, sorted_indexed):
    # Items without labels work for the default target (expected gradients need none).
    model, x, _ = setting
    rep = sketch(model, DataLoader(IndexedDataset(TensorDataset(x)), batch_size=32, shuffle=True,
                                   generator=torch.Generator().manual_seed(0)))
    assert_same(sorted_indexed, rep)



def test_indexed_dataset_adds_the_index_to_dict_items(setting, sorted_indexed):
    # Hugging Face-style datasets yield dicts of model keyword arguments and labels.
    model, x, y = setting

    class Keywords(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, inputs_embeds):
            return self.inner(inputs_embeds)

    class DictItems(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return N

        def __getitem__(self, i):
            return {"inputs_embeds": x[i], "labels": y[i]}

    item = IndexedDataset(DictItems())[7]
    assert set(item) == {"inputs_embeds", "labels", "index"} and item["index"] == 7
    loader = DataLoader(IndexedDataset(DictItems()), batch_size=11, shuffle=True,
                        generator=torch.Generator().manual_seed(3))
    rep = sketch_model(Keywords(model), loader, layers=["inner.fc1", "inner.fc2"], m=M, seed=SEED,
                       beta=BETA, dtype=torch.float64, progress=False)
    assert rep.row_keys == "index" and rep.row_intervals == [[0, N]]
    for name in LAYERS:
        torch.testing.assert_close(rep.layers[f"inner.{name}"].sketch_g,
                                   sorted_indexed.layers[name].sketch_g, **TOL)
