"""pytest-benchmark suites for the native ops and their baselines.

Run with ``pytest benchmarks/bench_ops.py --benchmark-only``; results are
grouped by op and size, so that each native op sits beside the baselines it
must beat at the same size.  Sizes
are moderate (each call well under a second).  The normal test run does not
collect this file (``testpaths`` is ``tests/``).

Each case records the bytes (sketch) or nominal FLOPs (Gram) it processes in
``extra_info``, so GB/s and GFLOP/s can be derived from the saved JSON
(``--benchmark-json``).
"""
from __future__ import annotations

import pytest
import torch

from harness import csr_sketch, index_add_sketch, scatter_add_sketch
from nnsim_fast import ops

SEED = 0
# (n, d, m) of the sketch cases: ~100 MB of f and g at the largest.
SKETCH_SIZES = [(50_000, 256, 512), (200_000, 64, 128)]
# Rows per streamed batch in the in-place cases.
STREAM_BATCH = 4096
# (B, m, d) of the Gram cases.
GRAM_SIZES = [(8, 256, 512), (1, 512, 512)]
ROUNDS = 5


def _size_id(size) -> str:
    return "x".join(str(v) for v in size)


@pytest.fixture(scope="module", params=SKETCH_SIZES, ids=_size_id)
def sketch_case(request):
    n, d, m = request.param
    generator = torch.Generator().manual_seed(SEED)
    f = torch.empty(n, d).uniform_(-1.0, 1.0, generator=generator)
    g = torch.empty(n, d).uniform_(-1.0, 1.0, generator=generator)
    buckets, signs = ops.sketch_hash(n, m, SEED)
    return {"f": f, "g": g, "m": m, "buckets": buckets[:, 0].contiguous(),
            "signs": signs[:, 0].contiguous(),
            "bytes": f.nbytes + g.nbytes + 2 * m * d * 4,
            "group": f"countsketch_pair n={n} d={d} m={m}"}


def _run(benchmark, fn, case, native_op: bool = False):
    # One group per size, so each native op is listed beside its baselines.
    benchmark.group = case["group"]
    benchmark.extra_info["bytes"] = case["bytes"]
    benchmark.extra_info["native"] = ops.native_available() if native_op else None
    return benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=1, iterations=1)


def test_countsketch_pair(benchmark, sketch_case):
    f, g, m = sketch_case["f"], sketch_case["g"], sketch_case["m"]
    sketch_f, sketch_g = _run(benchmark, lambda: ops.countsketch_pair(f, g, m, SEED),
                              sketch_case, native_op=True)
    assert sketch_f.shape == (m, f.shape[1]) and sketch_g.shape == (m, g.shape[1])


def test_countsketch_pair_inplace_streamed(benchmark, sketch_case):
    """The same rows fed in batches of STREAM_BATCH with running offsets."""
    f, g, m = sketch_case["f"], sketch_case["g"], sketch_case["m"]
    acc_f = torch.zeros(m, f.shape[1])
    acc_g = torch.zeros(m, g.shape[1])
    n = f.shape[0]

    def stream():
        acc_f.zero_()
        acc_g.zero_()
        for start in range(0, n, STREAM_BATCH):
            stop = min(n, start + STREAM_BATCH)
            ops.countsketch_pair_(acc_f, acc_g, f[start:stop], g[start:stop], SEED,
                                  offset=start)
        return acc_f, acc_g

    _run(benchmark, stream, sketch_case, native_op=True)
    # Streaming must give the one-shot sketch (same hash, same global rows).
    expected_f, _ = ops.countsketch_pair(f, g, m, SEED)
    assert torch.allclose(acc_f, expected_f, rtol=1e-4, atol=1e-3)


def test_baseline_index_add(benchmark, sketch_case):
    c = sketch_case
    _run(benchmark, lambda: index_add_sketch((c["f"], c["g"]), c["buckets"], c["signs"], c["m"]),
         c)


def test_baseline_scatter_add(benchmark, sketch_case):
    c = sketch_case
    _run(benchmark,
         lambda: scatter_add_sketch((c["f"], c["g"]), c["buckets"], c["signs"], c["m"]), c)


def test_baseline_csr_prebuilt(benchmark, sketch_case):
    c = sketch_case
    matrix = csr_sketch(c["buckets"], c["signs"], c["m"])
    _run(benchmark, lambda: (torch.sparse.mm(matrix, c["f"]), torch.sparse.mm(matrix, c["g"])),
         c)


def test_baseline_csr_with_build(benchmark, sketch_case):
    c = sketch_case
    n = c["f"].shape[0]

    def build_and_apply():
        buckets, signs = ops.sketch_hash(n, c["m"], SEED)
        matrix = csr_sketch(buckets[:, 0].contiguous(), signs[:, 0].contiguous(), c["m"])
        return torch.sparse.mm(matrix, c["f"]), torch.sparse.mm(matrix, c["g"])

    _run(benchmark, build_and_apply, c)


@pytest.fixture(scope="module", params=GRAM_SIZES, ids=_size_id)
def gram_case(request):
    batch, m, d = request.param
    generator = torch.Generator().manual_seed(SEED)
    a = torch.randn(batch, m, d, generator=generator)
    b = torch.randn(batch, m, d, generator=generator)
    return {"a": a, "b": b, "flops": 4 * batch * m * m * d + batch * m * m,
            "group": f"hadamard_gram B={batch} m={m} d={d}"}


def test_hadamard_gram(benchmark, gram_case):
    a, b = gram_case["a"], gram_case["b"]
    benchmark.group = gram_case["group"]
    benchmark.extra_info["flops"] = gram_case["flops"]
    benchmark.extra_info["native"] = ops.native_available()
    out = benchmark.pedantic(lambda: ops.hadamard_gram(a, b), rounds=ROUNDS, warmup_rounds=1)
    assert out.shape == (a.shape[0], a.shape[1], a.shape[1])


def test_baseline_bmm_mul(benchmark, gram_case):
    a, b = gram_case["a"], gram_case["b"]
    benchmark.group = gram_case["group"]
    benchmark.extra_info["flops"] = gram_case["flops"]
    benchmark.pedantic(lambda: torch.bmm(a, a.transpose(1, 2)) * torch.bmm(b, b.transpose(1, 2)),
                       rounds=ROUNDS, warmup_rounds=1)
