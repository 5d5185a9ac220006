"""Fixtures shared by the test files: a seeded RNG and a restored torch thread count."""

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
