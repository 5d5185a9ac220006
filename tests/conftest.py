"""Shared by the test files: a seeded RNG, a restored torch thread count, and a
comparison of two sketched representations."""

import math

import numpy as np
import pytest
import torch


@pytest.fixture
def rng() -> np.random.Generator:
    """A numpy generator with a fixed seed, fresh for every test (tests stay order independent)."""
    return np.random.default_rng(20240917)


@pytest.fixture
def torch_generator() -> torch.Generator:
    """A CPU torch generator with a fixed seed, fresh for every test."""
    return torch.Generator().manual_seed(20240917)


@pytest.fixture
def restore_num_threads():
    """Lets a test change ``torch.set_num_threads`` and puts the previous count back afterwards."""
    threads = torch.get_num_threads()
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


def assert_same_representation(a, b, **tol) -> None:
    """Two representations hold the same rows, settings, layers and statistics (to ``tol``)."""
    assert (a.n, a.row_keys, a.row_intervals) == (b.n, b.row_keys, b.row_intervals)
    assert (a.m, a.seed, a.sparsity, a.dtype) == (b.m, b.seed, b.sparsity, b.dtype)
    assert list(a.layers) == list(b.layers)
    for name in a.layers:
        mine, theirs = a.layers[name].tensors(), b.layers[name].tensors()
        assert set(mine) == set(theirs)
        for key in mine:
            torch.testing.assert_close(theirs[key], mine[key], **tol)
    torch.testing.assert_close(b.sketch_ones, a.sketch_ones, **tol)


def dense_sketch(n: int, m: int, seed: int, sparsity: int = 1, rows=None) -> torch.Tensor:
    """The dense float64 m x n sketch matrix from the library's hash: column i holds the
    signs / sqrt(s) of global row ``rows[i]`` (default i) at its buckets."""
    from nnsim_fast import ops
    buckets, signs = ops.sketch_hash(n, m, seed, 0, sparsity, rows=rows)
    S = torch.zeros(m, n, dtype=torch.float64)
    columns = torch.arange(n)
    for j in range(sparsity):
        S[buckets[:, j], columns] = signs[:, j].to(torch.float64) / math.sqrt(sparsity)
    return S


def load_benchmark(filename: str, module_name: str):
    """Import ``benchmarks/<filename>`` as ``module_name`` (registered in ``sys.modules``:
    dataclasses look their module up by name), with its folder on ``sys.path`` while it
    imports its neighbours (``harness``, ``accuracy``)."""
    import importlib.util
    import os
    import sys
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(module_name, os.path.join(folder, filename))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(folder)
