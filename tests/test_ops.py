"""Tests of the sketch ops (native kernels and their Python face) against independent references.

The oracle for the hash is a pure-Python-int restatement of the construction documented in
csrc/hash.h.  The oracle for every op is dense (or, for large n, sparse) float64 algebra with the
sketch matrix S assembled here from the buckets and signs of ``sketch_hash``.  Floating-point
comparisons use tolerances derived from the unit roundoff of the accumulating precision and the
number of rows summed into each output element; invariances (batch split, strides, thread count)
are checked bit for bit.
"""

import math
import os

import numpy as np
import pytest
import scipy.sparse
import scipy.stats
import torch

import nnsim_fast.ops as ops

NATIVE = torch.ops.nnsim_fast if ops.native_available() else None
MAX_SEED = 2**63 - 1
MAX_M = 2**31 - 1
DENSE_LIMIT = 4_000_000  # entries of S above which the reference uses a CSR matrix
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8,
                 torch.float32: 2.0**-24, torch.float64: 2.0**-53}
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# False-alarm rate of every statistical test below.  Seeds are fixed, so each test is
# deterministic; alpha only says how unlucky a correct hash would have to be to fail.
ALPHA = 1e-4

# --------------------------------------------------------------------------- hash oracle

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
BLOCK_STRIDE = 0xD1B54A32D192ED03


def splitmix64_finaliser(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def oracle_hash(row: int, m: int, seed: int, sparsity: int):
    """(buckets, signs) of one global row, from the documented construction, in Python ints."""
    width = m // sparsity
    buckets, signs = [], []
    for j in range(sparsity):
        key = splitmix64_finaliser(seed ^ ((BLOCK_STRIDE * (j + 1)) & MASK64))
        h = splitmix64_finaliser((key + GOLDEN * (row + 1)) & MASK64)
        buckets.append(j * width + (((h >> 32) * width) >> 32))
        signs.append(-1.0 if h & 1 else 1.0)
    return buckets, signs


# --------------------------------------------------------------------------- dense references

def sketch_operator(n, m, seed, offset=0, sparsity=1, rows=None):
    """S (m x n, float64; CSR when large) built from sketch_hash, and the rows hashed to each bucket."""
    buckets, signs = ops.sketch_hash(n, m, seed, offset, sparsity, rows=rows)
    assert buckets.shape == (n, sparsity) and signs.shape == (n, sparsity)
    bucket = buckets.numpy().ravel()
    value = signs.numpy().astype(np.float64).ravel() / math.sqrt(sparsity)
    column = np.repeat(np.arange(n), sparsity)
    if m * n <= DENSE_LIMIT:
        S = np.zeros((m, n))
        # Blocks cover disjoint bucket ranges, so no (bucket, row) pair repeats.
        S[bucket, column] = value
    else:
        S = scipy.sparse.csr_matrix((value, (bucket, column)), shape=(m, n))
    return S, np.bincount(bucket, minlength=m)


def as_f64(t: torch.Tensor) -> np.ndarray:
    """A float64 numpy copy (never a view: the ops write into some of their arguments)."""
    return t.detach().to(torch.float64, copy=True).numpy()


def summation_slack(terms):
    """Rounding error of a signed sum of ``terms`` scaled products, in units of roundoff times
    the sum of magnitudes: the worst case for few terms, a generous random-walk bound for many."""
    terms = np.asarray(terms, dtype=np.float64)
    return 3.0 + np.minimum(terms, 8.0 * np.sqrt(terms))


def assert_within(got: torch.Tensor, expected: np.ndarray, tolerance: np.ndarray, what: str):
    got64 = as_f64(got)
    assert got64.shape == expected.shape, f"{what}: shape {got64.shape} != {expected.shape}"
    error = np.abs(got64 - expected)
    bad = ~(error <= tolerance)
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {bad.size} entries off; worst error "
        f"{error[bad].max():.3g} vs tolerance {tolerance[bad][np.argmax(error[bad])]:.3g}")


def assert_sketch(got, S, counts, x64, acc_dtype, what, initial=None):
    """got == initial + S x64 up to the rounding of accumulating in ``acc_dtype``."""
    expected = S @ x64
    magnitude = abs(S) @ np.abs(x64)
    slack = summation_slack(counts)[:, None]
    # Second term: rounding of the float64 reference itself.
    tolerance = (UNIT_ROUNDOFF[acc_dtype] * slack + 2.0**-53 * (counts[:, None] + 2)) * magnitude
    if initial is not None:
        expected = expected + initial
        tolerance = tolerance + 2 * UNIT_ROUNDOFF[acc_dtype] * (np.abs(initial) + magnitude)
    assert got.dtype == acc_dtype, f"{what}: dtype {got.dtype}, expected {acc_dtype}"
    assert_within(got, np.asarray(expected), np.asarray(tolerance), what)


def assert_gather(got, S, sparsity, grad64, out_dtype, what):
    """got == S^T grad64: s terms per row summed in the op-math type, stored in ``out_dtype``."""
    acc_dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    expected = np.asarray(S.T @ grad64)
    magnitude = np.asarray(abs(S).T @ np.abs(grad64))
    tolerance = (UNIT_ROUNDOFF[acc_dtype] * (sparsity + 3) + 2.0**-52) * magnitude
    tolerance = tolerance + UNIT_ROUNDOFF[out_dtype] * (np.abs(expected) + tolerance)
    assert got.dtype == out_dtype, f"{what}: dtype {got.dtype}, expected {out_dtype}"
    assert_within(got, expected, tolerance, what)


def gram_reference(a64, b64):
    return np.einsum("kid,kjd->kij", a64, a64) * np.einsum("kid,kjd->kij", b64, b64)


def assert_gram(got, a64, b64, out_dtype, what):
    expected = gram_reference(a64, b64)
    magnitude = gram_reference(np.abs(a64), np.abs(b64))
    u = UNIT_ROUNDOFF[out_dtype]
    tolerance = (u * (a64.shape[-1] + b64.shape[-1] + 5) + 2.0**-53 * (a64.shape[-1] + b64.shape[-1] + 5)
                 ) * magnitude
    assert got.dtype == out_dtype, f"{what}: dtype {got.dtype}, expected {out_dtype}"
    assert_within(got, expected, tolerance, what)


def output_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- random shapes

def random_shape_cases():
    """Shapes drawn log-uniformly with a fixed seed, plus the edges, keeping n*d and m*d modest."""
    cases = [
        dict(n=100_000, df=3, dg=2, m=1024, sparsity=2, offset=0, rows=False),
        dict(n=0, df=5, dg=2, m=16, sparsity=4, offset=7, rows=False),
        dict(n=0, df=0, dg=0, m=4, sparsity=1, offset=0, rows=True),
        dict(n=9, df=0, dg=3, m=8, sparsity=2, offset=0, rows=False),
        dict(n=11, df=4, dg=0, m=8, sparsity=4, offset=3, rows=True),
        dict(n=1, df=1, dg=1, m=1, sparsity=1, offset=0, rows=False),
        dict(n=3000, df=7, dg=5, m=1, sparsity=1, offset=2**40, rows=False),
        dict(n=40, df=2048, dg=1, m=512, sparsity=4, offset=0, rows=False),
        dict(n=30, df=2, dg=1, m=4096, sparsity=4, offset=0, rows=True),
        dict(n=5, df=3, dg=3, m=3, sparsity=1, offset=0, rows=True),
    ]
    rng = np.random.default_rng(1729)

    def log_uniform(high):
        return max(1, int(np.exp(rng.uniform(0.0, np.log(high)))))

    for _ in range(16):
        sparsity = int(rng.choice([1, 2, 4]))
        m = sparsity * log_uniform(4096 // sparsity)
        n = log_uniform(20_000)
        limit = max(1, min(60_000 // n, 1_000_000 // m))
        df, dg = min(log_uniform(2048), limit), min(log_uniform(2048), limit)
        offset = [0, int(rng.integers(1, 1000)), int(rng.integers(2**32, 2**42))][rng.integers(3)]
        cases.append(dict(n=n, df=df, dg=dg, m=m, sparsity=sparsity, offset=offset,
                          rows=bool(rng.random() < 0.4)))
    for index, case in enumerate(cases):
        case["seed"] = int(rng.integers(0, 2**63, dtype=np.uint64)) if index % 3 else index
    return cases


SHAPE_CASES = random_shape_cases()
SHAPE_IDS = [f"n{c['n']}-d{c['df']}x{c['dg']}-m{c['m']}-s{c['sparsity']}"
             f"{'-rows' if c['rows'] else ''}" for c in SHAPE_CASES]


def case_data(case, dtype=torch.float64):
    """Inputs of one shape case: f [n, df], g [n, dg], rows (or None), all from a fixed seed."""
    rng = np.random.default_rng(case["seed"] % 2**32)
    f = torch.from_numpy(rng.standard_normal((case["n"], case["df"]))).to(dtype)
    g = torch.from_numpy(rng.standard_normal((case["n"], case["dg"]))).to(dtype)
    rows = None
    if case["rows"]:
        # Duplicates allowed (a row index seen twice is the same global row), some beyond 2^32.
        high = 2**34 if case["n"] % 2 else 3 * case["n"] + 1
        rows = torch.from_numpy(rng.integers(0, high, case["n"]))
    return f, g, rows


def case_operator(case, rows):
    return sketch_operator(case["n"], case["m"], case["seed"], case["offset"], case["sparsity"], rows)


# --------------------------------------------------------------------------- the extension

def test_native_extension_loaded():
    assert ops.native_available(), f"native extension failed to load: {ops._NATIVE_ERROR!r}"
    for name in ("sketch_hash", "countsketch", "countsketch_pair", "countsketch_pair_",
                 "countsketch_backward", "hadamard_gram"):
        assert hasattr(torch.ops.nnsim_fast, name)


# --------------------------------------------------------------------------- the hash

def test_oracle_finaliser_is_splitmix64():
    # Published splitmix64 outputs for state 0: the k-th output is the finaliser of k * GOLDEN,
    # so this pins both the mixing constants and the golden-ratio increment of the oracle.
    assert splitmix64_finaliser(GOLDEN) == 0xE220A8397B1DCDAF
    assert splitmix64_finaliser((2 * GOLDEN) & MASK64) == 0x6E789E6AA1B965F4


HASH_GEOMETRIES = [(1, 1), (3, 1), (4, 1), (4, 2), (4, 4), (4096, 1), (4096, 2), (4096, 4),
                   (96, 32), (MAX_M, 1), (2**31 - 2, 2), (2**31 - 4, 4)]
HASH_SEEDS = [0, 1, 12345, 2**32 + 7, 2**62 + 3, MAX_SEED]
HASH_OFFSETS = [0, 17, 2**32 + 5, 2**62]


@pytest.mark.parametrize("m,sparsity", HASH_GEOMETRIES, ids=[f"m{m}-s{s}" for m, s in HASH_GEOMETRIES])
def test_sketch_hash_matches_reference_and_oracle(m, sparsity):
    rng = np.random.default_rng(m + sparsity)
    width = m // sparsity
    for seed in HASH_SEEDS:
        for offset in HASH_OFFSETS:
            spread = torch.from_numpy(rng.integers(0, 2**62, 300))
            global_rows = torch.cat([torch.arange(offset, offset + 700), offset + spread,
                                     torch.tensor([MAX_SEED])])
            buckets, signs = NATIVE.sketch_hash(global_rows, m, seed, sparsity)
            ref_buckets, ref_signs = ops.reference_sketch_hash(global_rows, m, seed, sparsity)
            assert buckets.dtype == torch.int64 and signs.dtype == torch.float32
            assert buckets.shape == signs.shape == (global_rows.shape[0], sparsity)
            assert torch.equal(buckets, ref_buckets) and torch.equal(signs, ref_signs)
            assert bool((signs.abs() == 1).all())
            block_start = torch.arange(sparsity) * width
            assert bool(((buckets >= block_start) & (buckets < block_start + width)).all())
            for index in rng.choice(global_rows.shape[0], 6, replace=False).tolist() + [-1]:
                row = int(global_rows[index])
                expected_buckets, expected_signs = oracle_hash(row, m, seed, sparsity)
                assert buckets[index].tolist() == expected_buckets, (row, seed)
                assert signs[index].tolist() == expected_signs, (row, seed)


def test_sketch_hash_wrapper_batches_rows_and_empty():
    m, seed, sparsity, n = 48, 99, 4, 1000
    whole_b, whole_s = ops.sketch_hash(n, m, seed, 0, sparsity)
    direct_b, direct_s = NATIVE.sketch_hash(torch.arange(n), m, seed, sparsity)
    assert torch.equal(whole_b, direct_b) and torch.equal(whole_s, direct_s)
    # Batches with offsets give the one-shot table.
    cuts = [0, 1, 250, 251, 999, 1000]
    parts = [ops.sketch_hash(hi - lo, m, seed, lo, sparsity) for lo, hi in zip(cuts, cuts[1:])]
    assert torch.equal(torch.cat([p[0] for p in parts]), whole_b)
    assert torch.equal(torch.cat([p[1] for p in parts]), whole_s)
    # rows= and offset address the same global indices.
    rows = torch.tensor([5, 0, 999, 5, 300])
    by_rows = ops.sketch_hash(5, m, seed, 0, sparsity, rows=rows)
    assert torch.equal(by_rows[0], whole_b[rows]) and torch.equal(by_rows[1], whole_s[rows])
    near = rows[rows < 800]
    shifted = ops.sketch_hash(near.shape[0], m, seed, 200, sparsity, rows=near)
    assert torch.equal(shifted[0], whole_b[near + 200]) and torch.equal(shifted[1], whole_s[near + 200])
    # Beyond 2^32, rows + offset meet the reference and the oracle.
    big_rows = torch.tensor([2**33 + 1, 2**40, 3])
    big_b, big_s = ops.sketch_hash(3, m, seed, 2**35, sparsity, rows=big_rows)
    ref_b, ref_s = ops.reference_sketch_hash(big_rows + 2**35, m, seed, sparsity)
    assert torch.equal(big_b, ref_b) and torch.equal(big_s, ref_s)
    assert big_b[0].tolist() == oracle_hash(2**35 + 2**33 + 1, m, seed, sparsity)[0]
    empty_b, empty_s = ops.sketch_hash(0, m, seed, 0, sparsity)
    assert empty_b.shape == (0, sparsity) and empty_s.shape == (0, sparsity)
    assert empty_b.dtype == torch.int64 and empty_s.dtype == torch.float32


def test_sketch_matrix_is_the_assembled_operator():
    rows = torch.tensor([4, 4, 0, 2**33])
    S, _ = sketch_operator(4, 12, 5, 9, 2, rows)
    np.testing.assert_array_equal(ops.sketch_matrix(4, 12, 5, 9, 2, rows=rows).numpy(), S)


# --------------------------------------------------------------------------- ops vs dense algebra

@pytest.mark.parametrize("case", SHAPE_CASES, ids=SHAPE_IDS)
def test_countsketch_matches_dense(case):
    f, _, rows = case_data(case)
    S, counts = case_operator(case, rows)
    args = (case["m"], case["seed"], case["offset"], case["sparsity"])
    for dtype in (torch.float64, torch.float32):
        x = f.to(dtype)
        got = ops.countsketch(x, *args, rows=rows)
        assert_sketch(got, S, counts, as_f64(x), dtype, f"countsketch {dtype}")


@pytest.mark.parametrize("case", SHAPE_CASES, ids=SHAPE_IDS)
def test_countsketch_pair_matches_dense(case):
    f, g, rows = case_data(case, torch.float32)
    S, counts = case_operator(case, rows)
    sketch_f, sketch_g = ops.countsketch_pair(f, g, case["m"], case["seed"], case["offset"],
                                              case["sparsity"], rows=rows)
    assert_sketch(sketch_f, S, counts, as_f64(f), torch.float32, "countsketch_pair f")
    assert_sketch(sketch_g, S, counts, as_f64(g), torch.float32, "countsketch_pair g")


@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", SHAPE_CASES, ids=SHAPE_IDS)
def test_countsketch_pair_inplace_accumulates_batches(case, acc_dtype):
    # Cross the precisions: float32 data into float64 accumulators and the other way round.
    data_dtype = torch.float32 if acc_dtype == torch.float64 else torch.float64
    f, g, rows = case_data(case, data_dtype)
    n, m = case["n"], case["m"]
    S, counts = case_operator(case, rows)
    rng = np.random.default_rng(n + m)
    init_f = rng.standard_normal((m, case["df"]))
    init_g = rng.standard_normal((m, case["dg"]))
    # Copies: the op writes into the accumulators, and init_* must keep the starting values.
    acc_f = torch.from_numpy(init_f).to(acc_dtype, copy=True)
    acc_g = torch.from_numpy(init_g).to(acc_dtype, copy=True)
    start_f, start_g = as_f64(acc_f), as_f64(acc_g)
    cuts = [0] + sorted(rng.integers(0, n + 1, 2).tolist()) + [n]
    for lo, hi in zip(cuts, cuts[1:]):
        if rows is None:
            batch_rows, offset = None, case["offset"] + lo
        else:
            batch_rows, offset = rows[lo:hi], case["offset"]
        returned = ops.countsketch_pair_(acc_f, acc_g, f[lo:hi], g[lo:hi], case["seed"], offset,
                                         case["sparsity"], rows=batch_rows)
        assert returned[0] is acc_f and returned[1] is acc_g
    assert_sketch(acc_f, S, counts, as_f64(f), acc_dtype, "acc_f", start_f)
    assert_sketch(acc_g, S, counts, as_f64(g), acc_dtype, "acc_g", start_g)


@pytest.mark.parametrize("case", SHAPE_CASES, ids=SHAPE_IDS)
def test_countsketch_backward_is_transpose(case):
    f, g, rows = case_data(case)
    n, m, s = case["n"], case["m"], case["sparsity"]
    S, _ = case_operator(case, rows)
    rng = np.random.default_rng(n * 7 + m)
    grad_y = rng.standard_normal((m, case["df"]))
    for dtype in (torch.float64, torch.float32):
        gy = torch.from_numpy(grad_y).to(dtype)
        got = NATIVE.countsketch_backward(gy, n, case["seed"], case["offset"], s, rows)
        assert got.shape == (n, case["df"])
        assert_gather(got, S, s, as_f64(gy), dtype, f"countsketch_backward {dtype}")
    # Through autograd of both differentiable wrappers.
    x = f.clone().requires_grad_()
    y = ops.countsketch(x, m, case["seed"], case["offset"], s, rows=rows)
    y.backward(torch.from_numpy(grad_y))
    assert_gather(x.grad, S, s, grad_y, torch.float64, "countsketch grad")
    f32, g32 = f.float().requires_grad_(), g.float().requires_grad_()
    sketch_f, sketch_g = ops.countsketch_pair(f32, g32, m, case["seed"], case["offset"], s, rows=rows)
    grad_g = rng.standard_normal((m, case["dg"])).astype(np.float32)
    torch.autograd.backward([sketch_f, sketch_g],
                            [torch.from_numpy(grad_y).float(), torch.from_numpy(grad_g)])
    assert_gather(f32.grad, S, s, as_f64(torch.from_numpy(grad_y).float()), torch.float32, "pair grad f")
    assert_gather(g32.grad, S, s, grad_g.astype(np.float64), torch.float32, "pair grad g")


GRAM_SHAPES = [(1, 1, 1, 1), (2, 5, 3, 4), (3, 130, 7, 2), (1, 257, 33, 65), (2, 0, 3, 3),
               (0, 4, 2, 2), (2, 6, 0, 3), (1, 64, 200, 1)]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", GRAM_SHAPES, ids=[str(s) for s in GRAM_SHAPES])
def test_hadamard_gram_matches_dense(shape, dtype):
    batch, m, da, db = shape
    rng = np.random.default_rng(sum(shape))
    a = torch.from_numpy(rng.standard_normal((batch, m, da))).to(dtype)
    b = torch.from_numpy(rng.standard_normal((batch, m, db))).to(dtype)
    out = ops.hadamard_gram(a, b)
    assert out.shape == (batch, m, m)
    assert_gram(out, as_f64(a), as_f64(b), output_dtype(dtype), "hadamard_gram")
    assert torch.equal(out, out.transpose(1, 2))
    if batch:
        single = ops.hadamard_gram(a[-1], b[-1])
        assert single.shape == (m, m) and torch.equal(single, out[-1])


# --------------------------------------------------------------------------- dtypes

@pytest.mark.parametrize("sparsity", [1, 2])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_every_dtype_within_its_precision(dtype, sparsity):
    n, df, dg, m, seed, offset = 3000, 17, 5, 64, 31337, 2**33
    rng = np.random.default_rng(int(sparsity))
    f = torch.from_numpy(rng.standard_normal((n, df))).to(dtype)
    g = torch.from_numpy(rng.standard_normal((n, dg))).to(dtype)
    S, counts = sketch_operator(n, m, seed, offset, sparsity)
    acc = output_dtype(dtype)

    y = ops.countsketch(f, m, seed, offset, sparsity)
    assert_sketch(y, S, counts, as_f64(f), acc, "countsketch")
    sketch_f, sketch_g = ops.countsketch_pair(f, g, m, seed, offset, sparsity)
    assert_sketch(sketch_f, S, counts, as_f64(f), acc, "pair f")
    assert_sketch(sketch_g, S, counts, as_f64(g), acc, "pair g")
    for acc_dtype in (torch.float32, torch.float64):
        acc_f, acc_g = torch.zeros(m, df, dtype=acc_dtype), torch.zeros(m, dg, dtype=acc_dtype)
        ops.countsketch_pair_(acc_f, acc_g, f, g, seed, offset, sparsity)
        assert_sketch(acc_f, S, counts, as_f64(f), acc_dtype, "pair_ f")
        assert_sketch(acc_g, S, counts, as_f64(g), acc_dtype, "pair_ g")

    grad_y = torch.from_numpy(rng.standard_normal((m, df))).to(dtype)
    gathered = NATIVE.countsketch_backward(grad_y, n, seed, offset, sparsity, None)
    assert_gather(gathered, S, sparsity, as_f64(grad_y), dtype, "countsketch_backward")
    x = f.clone().requires_grad_()
    ops.countsketch(x, m, seed, offset, sparsity).backward(grad_y.to(acc))
    assert_gather(x.grad, S, sparsity, as_f64(grad_y.to(acc)), dtype, "countsketch grad")

    a = torch.from_numpy(rng.standard_normal((2, m, 9))).to(dtype)
    b = torch.from_numpy(rng.standard_normal((2, m, 4))).to(dtype)
    assert_gram(ops.hadamard_gram(a, b), as_f64(a), as_f64(b), acc, "hadamard_gram")


def test_half_precision_accumulates_in_float32():
    # 4096 rows, each equal to its own sign, in one bucket: every term adds +1, and a float16
    # accumulator would stall at 2048.
    _, signs = ops.sketch_hash(4096, 1, 0)
    x = signs.expand(4096, 2).half()
    sketch = ops.countsketch(x, 1, 0)
    assert sketch.dtype == torch.float32
    S, _ = sketch_operator(4096, 1, 0)
    np.testing.assert_array_equal(sketch.numpy(), S @ as_f64(x))
    assert sketch.tolist() == [[4096.0, 4096.0]]


# --------------------------------------------------------------------------- strides

def strided_views(n, d, dtype, generator):
    """Non-contiguous views of n x d data: name -> view."""
    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)
    return {
        "transposed": randn(d, n).t(),
        "column_slice": randn(n, d + 3)[:, 2:d + 2],
        "every_other_column": randn(n, 2 * d)[:, ::2],
        "every_other_row": randn(2 * n, d)[::2],
        "transposed_every_other_row": randn(d, 2 * n).t()[::2],
        "expanded_rows": randn(1, d).expand(n, d),
        "expanded_columns": randn(n, 1).expand(n, d),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_strided_inputs_equal_contiguous(dtype, torch_generator):
    n, d, m, seed, offset, sparsity = 1200, 9, 32, 77, 5, 2
    views = strided_views(n, d, dtype, torch_generator)
    rows_storage = torch.randint(0, 2**40, (2 * n,), generator=torch_generator)
    for name, x in views.items():
        assert not x.is_contiguous(), name
        dense = x.contiguous()
        for rows in (None, rows_storage[::2]):
            rows_dense = None if rows is None else rows.contiguous()
            assert torch.equal(ops.countsketch(x, m, seed, offset, sparsity, rows=rows),
                               ops.countsketch(dense, m, seed, offset, sparsity, rows=rows_dense)), name
            other = views["transposed"]
            got = ops.countsketch_pair(x, other, m, seed, offset, sparsity, rows=rows)
            want = ops.countsketch_pair(dense, other.contiguous(), m, seed, offset, sparsity,
                                        rows=rows_dense)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), name
            accs = [torch.ones(m, d, dtype=torch.float64) for _ in range(4)]
            ops.countsketch_pair_(accs[0], accs[1], x, other, seed, offset, sparsity, rows=rows)
            ops.countsketch_pair_(accs[2], accs[3], dense, other.contiguous(), seed, offset,
                                  sparsity, rows=rows_dense)
            assert torch.equal(accs[0], accs[2]) and torch.equal(accs[1], accs[3]), name
    grad_views = strided_views(m, d, dtype, torch_generator)
    for name, grad_y in grad_views.items():
        strided = NATIVE.countsketch_backward(grad_y, n, seed, offset, sparsity, None)
        dense = NATIVE.countsketch_backward(grad_y.contiguous(), n, seed, offset, sparsity, None)
        assert torch.equal(strided, dense), name
    a = torch.randn(3, 7, 40, generator=torch_generator).to(dtype).transpose(1, 2)  # [3, 40, 7]
    b = torch.randn(40, 6, 3, generator=torch_generator).to(dtype).permute(2, 0, 1)  # [3, 40, 6]
    assert torch.equal(ops.hadamard_gram(a, b), ops.hadamard_gram(a.contiguous(), b.contiguous()))
    a2 = a[0].expand(3, 40, 7)
    assert torch.equal(ops.hadamard_gram(a2, b), ops.hadamard_gram(a2.contiguous(), b.contiguous()))


# --------------------------------------------------------------------------- hash statistics

@pytest.mark.parametrize("m,sparsity,seed,offset",
                         [(64, 1, 0, 0), (3, 1, 5, 2**33), (96, 2, MAX_SEED, 0),
                          (256, 4, 12345, 2**40), (2**31 - 4, 4, 2, 0)])
def test_hash_is_uniform_balanced_and_sign_independent(m, sparsity, seed, offset):
    width = m // sparsity
    cells = min(width, 256)
    n = 200 * cells
    buckets, signs = ops.sketch_hash(n, m, seed, offset, sparsity)
    for j in range(sparsity):
        # Huge widths are folded onto 256 equal ranges of the block (uniform ⇒ uniform ranges).
        cell = ((buckets[:, j] - j * width) * cells // width).numpy()
        counts = np.bincount(cell, minlength=cells)
        assert counts.shape == (cells,)
        assert scipy.stats.chisquare(counts).pvalue >= ALPHA, (j, counts)
        negative = int((signs[:, j] < 0).sum())
        assert scipy.stats.binomtest(negative, n, 0.5).pvalue >= ALPHA, (j, negative)
        table = np.zeros((cells, 2))
        np.add.at(table, (cell, (signs[:, j].numpy() < 0).astype(int)), 1)
        assert scipy.stats.chi2_contingency(table).pvalue >= ALPHA, j


def test_hash_is_pairwise_independent_across_rows_and_blocks():
    m, sparsity, seed = 32, 2, 4242
    width = m // sparsity
    n = 2 * 120 * width * width
    buckets, signs = ops.sketch_hash(n, m, seed, 0, sparsity)
    local = (buckets - torch.arange(sparsity) * width).numpy()
    negative = (signs < 0).numpy().astype(int)
    # Neighbouring rows (2i, 2i+1): a weak mixer correlates consecutive counters.
    pair_cells = local[0::2, 0] * width + local[1::2, 0]
    assert scipy.stats.chisquare(np.bincount(pair_cells, minlength=width * width)).pvalue >= ALPHA
    sign_cells = negative[0::2, 0] * 2 + negative[1::2, 0]
    assert scipy.stats.chisquare(np.bincount(sign_cells, minlength=4)).pvalue >= ALPHA
    # The two blocks of one row.
    block_cells = local[:, 0] * width + local[:, 1]
    assert scipy.stats.chisquare(np.bincount(block_cells, minlength=width * width)).pvalue >= ALPHA
    sign_blocks = negative[:, 0] * 2 + negative[:, 1]
    assert scipy.stats.chisquare(np.bincount(sign_blocks, minlength=4)).pvalue >= ALPHA


def test_seeds_and_blocks_give_different_hashes():
    m, n = 64, 20_000
    seeds = [0, 1, 2, 3, 2**32, 2**62, MAX_SEED - 1, MAX_SEED]
    tables = {seed: ops.sketch_hash(n, m, seed, 0, 1) for seed in seeds}
    for i, a in enumerate(seeds):
        for b in seeds[i + 1:]:
            # Two independent hashes agree on a bucket with probability 1/m and on a sign with 1/2.
            same_bucket = int((tables[a][0] == tables[b][0]).sum())
            same_sign = int((tables[a][1] == tables[b][1]).sum())
            assert scipy.stats.binomtest(same_bucket, n, 1 / m).pvalue >= ALPHA, (a, b)
            assert scipy.stats.binomtest(same_sign, n, 0.5).pvalue >= ALPHA, (a, b)
    x = torch.randn(n, 3, dtype=torch.float64)
    assert not torch.allclose(ops.countsketch(x, m, 0), ops.countsketch(x, m, 1))
    buckets, signs = ops.sketch_hash(n, m, 9, 0, 4)
    local = buckets - torch.arange(4) * (m // 4)
    for j in range(4):
        for k in range(j + 1, 4):
            same = int((local[:, j] == local[:, k]).sum())
            assert scipy.stats.binomtest(same, n, 4 / m).pvalue >= ALPHA, (j, k)
            same_sign = int((signs[:, j] == signs[:, k]).sum())
            assert scipy.stats.binomtest(same_sign, n, 0.5).pvalue >= ALPHA, (j, k)


# --------------------------------------------------------------------------- thread counts

GRAM_THREAD_SHAPES = [(2, 300, 17, 1000), (3, 200, 1000, 5), (1, 100, 3000, 7), (1, 9, 4, 4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", GRAM_THREAD_SHAPES, ids=["blocks", "small-m", "one-gram", "tiny"])
def test_hadamard_gram_same_bits_for_any_thread_count(shape, dtype, restore_num_threads,
                                                      torch_generator):
    # The tiling is a function of the shape and each tile is one single-threaded
    # GEMM, so the bits may not move with the thread count -- nor may symmetry
    # break (the BLAS's own X X^T is not symmetric bit for bit on every CPU).
    batch, m, da, db = shape
    a = torch.randn(batch, m, da, generator=torch_generator, dtype=dtype)
    b = torch.randn(batch, m, db, generator=torch_generator, dtype=dtype)
    reference = (a.double() @ a.double().transpose(1, 2)) * (b.double() @ b.double().transpose(1, 2))
    results = {}
    for threads in (1, 2, 3, 4, 8, 16):
        torch.set_num_threads(threads)
        results[threads] = ops.hadamard_gram(a, b)
        assert torch.equal(results[threads], results[threads].transpose(1, 2)), threads
    for threads, out in results.items():
        assert torch.equal(out, results[1]), threads
    tolerance = 1e-5 if dtype == torch.float32 else 1e-13
    assert float((results[1].double() - reference).abs().max() / reference.abs().max()) < tolerance


def run_all_ops(f, g, rows, grad_y, a, b, m, seed, offset, sparsity):
    acc_f = torch.full((m, f.shape[1]), 0.25)
    acc_g = torch.full((m, g.shape[1]), -0.5)
    ops.countsketch_pair_(acc_f, acc_g, f, g, seed, offset, sparsity, rows=rows)
    return (ops.countsketch(f, m, seed, offset, sparsity, rows=rows),
            *ops.countsketch_pair(f, g, m, seed, offset, sparsity, rows=rows),
            acc_f, acc_g,
            NATIVE.countsketch_backward(grad_y, f.shape[0], seed, offset, sparsity, rows),
            ops.hadamard_gram(a, b))


# Above the machine's cores too: a task split that goes wrong only when m or the
# row count is smaller than the thread count shows up there.
THREAD_COUNTS = (1, 2, 3, 4, 8, 16)


# Several row chunks; fewer buckets than threads (work split by columns); many buckets and chunks.
@pytest.mark.parametrize("shape", [(40_000, 40, 24, 200, 2), (3000, 300, 5, 1, 1),
                                   (5000, 37, 29, 3, 1), (20_000, 24, 8, 4096, 4)],
                         ids=["chunks", "one-bucket", "ragged-column-tiles", "many-buckets"])
def test_bitwise_identical_for_any_thread_count(shape, restore_num_threads, torch_generator):
    n, df, dg, m, sparsity = shape
    f = torch.randn(n, df, generator=torch_generator)
    g = torch.randn(n, dg, generator=torch_generator)
    rows = torch.randint(0, 2**36, (n,), generator=torch_generator)
    grad_y = torch.randn(m, df, generator=torch_generator)
    a = torch.randn(2, 300, 17, generator=torch_generator)
    b = torch.randn(2, 300, 5, generator=torch_generator)
    results = {}
    for threads in THREAD_COUNTS:
        torch.set_num_threads(threads)
        results[threads] = [run_all_ops(f, g, r, grad_y, a, b, m, 123, 456, sparsity)
                            for r in (None, rows)]
    for threads in THREAD_COUNTS[1:]:
        for with_rows in (0, 1):
            for index, (one, many) in enumerate(zip(results[1][with_rows], results[threads][with_rows])):
                assert torch.equal(one, many), (threads, with_rows, index)


# ---------------------------------------------------------------- autograd, opcheck, compile

@pytest.mark.parametrize("sparsity,with_rows", [(2, False), (2, True), (1, True)])
def test_gradcheck(sparsity, with_rows):
    gen = torch.Generator().manual_seed(3)
    f = torch.randn(7, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    g = torch.randn(7, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    rows = torch.tensor([3, 0, 2**33, 3, 8, 1, 9]) if with_rows else None
    assert torch.autograd.gradcheck(
        lambda x: ops.countsketch(x, 4, 11, 2**32 + 3, sparsity, rows=rows), (f,))
    assert torch.autograd.gradcheck(
        lambda x, y: ops.countsketch_pair(x, y, 4, 11, 5, sparsity, rows=rows), (f, g))
    # Only one output used: the other input gets no (or a zero) gradient.
    sketch_f, _ = ops.countsketch_pair(f, g, 4, 11, 5, sparsity, rows=rows)
    sketch_f.sum().backward()
    assert g.grad is None or not bool(g.grad.any())
    S, _ = sketch_operator(7, 4, 11, 5, sparsity, rows)
    np.testing.assert_allclose(f.grad.numpy(), S.T @ np.ones((4, 3)), rtol=0, atol=1e-15)


def test_double_backward():
    # The gradient S^T grad_y is linear in grad_y, so differentiating it again must give S.
    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: ops.countsketch(t, 4, 11, 0, 2), (x,))


def _opcheck_samples():
    gen = torch.Generator().manual_seed(11)

    def randn(*shape, dtype=torch.float32, grad=False):
        return torch.randn(*shape, generator=gen).to(dtype).requires_grad_(grad)

    rows = torch.tensor([4, 0, 2**33, 4, 7, 1])
    return {
        "sketch_hash": [(torch.arange(10), 16, 3, 2), (torch.zeros(0, dtype=torch.int64), 4, 0, 1),
                        (torch.tensor([0, 2**62, MAX_SEED]), MAX_M, MAX_SEED, 1)],
        "countsketch": [(randn(6, 3, grad=True), 8, 1, 0, 2, None, False),
                        (randn(6, 3, dtype=torch.float64, grad=True), 8, 1, 2**40, 4, rows, True),
                        (randn(6, 2, dtype=torch.bfloat16), 5, 0, 0, 1, None, False)],
        "countsketch_pair": [(randn(6, 3, grad=True), randn(6, 2, grad=True), 8, 1, 0, 2, None, False),
                             (randn(6, 1, dtype=torch.float64, grad=True),
                              randn(6, 4, dtype=torch.float64, grad=True), 4, 9, 3, 1, rows, False),
                             (randn(6, 2, dtype=torch.float16), randn(6, 2, dtype=torch.float16),
                              2, 0, 0, 2, None, True)],
        "countsketch_pair_": [(torch.zeros(8, 3), torch.ones(8, 2), randn(6, 3), randn(6, 2),
                               1, 0, 2, None, False),
                              (torch.zeros(4, 2, dtype=torch.float64),
                               torch.zeros(4, 1, dtype=torch.float64), randn(6, 2, dtype=torch.float16),
                               randn(6, 1, dtype=torch.float16), 3, 7, 4, rows, True)],
        "countsketch_backward": [(randn(8, 3), 6, 1, 0, 2, None),
                                 (randn(4, 2, dtype=torch.float64), 6, 5, 2**33, 4, rows),
                                 (randn(3, 2, dtype=torch.bfloat16), 0, 5, 0, 1, None)],
        "hadamard_gram": [(randn(2, 5, 3), randn(2, 5, 4)),
                          (randn(1, 3, 2, dtype=torch.float16), randn(1, 3, 2, dtype=torch.float16)),
                          (randn(2, 0, 3, dtype=torch.float64), randn(2, 0, 1, dtype=torch.float64))],
    }


OPCHECK_SAMPLES = _opcheck_samples()


@pytest.mark.parametrize("name", sorted(OPCHECK_SAMPLES))
def test_opcheck(name):
    op = getattr(torch.ops.nnsim_fast, name).default
    for args in OPCHECK_SAMPLES[name]:
        results = torch.library.opcheck(op, args)
        assert all(result == "SUCCESS" for result in results.values()), (name, results)


def _compiled_pipeline(f, g, acc_f, acc_g, rows):
    sketch_f, sketch_g = ops.countsketch_pair(f, g, 16, 3, 5, 2, rows=rows)
    ops.countsketch_pair_(acc_f, acc_g, f, g, 3, offset=100, sparsity=2, rows=rows)
    gram = ops.hadamard_gram(sketch_f.unsqueeze(0), sketch_g.unsqueeze(0))
    return sketch_f, sketch_g, gram, ops.hadamard_gram(acc_f, acc_g)


@pytest.mark.parametrize("backend,with_rows", [("aot_eager", False), ("aot_eager", True),
                                               ("inductor", False)])
def test_compile_fullgraph_matches_eager(backend, with_rows):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(8)
    f = torch.randn(50, 3, generator=gen)
    g = torch.randn(50, 4, generator=gen)
    rows = torch.randint(0, 2**35, (50,), generator=gen) if with_rows else None
    eager_acc = [torch.ones(16, 3), torch.ones(16, 4)]
    compiled_acc = [torch.ones(16, 3), torch.ones(16, 4)]
    eager = _compiled_pipeline(f, g, *eager_acc, rows)
    compiled = torch.compile(_compiled_pipeline, fullgraph=True, backend=backend)
    got = compiled(f, g, *compiled_acc, rows)
    for want, have in zip(eager + tuple(eager_acc), got + tuple(compiled_acc)):
        assert torch.equal(want, have)


# --------------------------------------------------------------------------- reference path

@pytest.mark.parametrize("sparsity,with_rows", [(1, False), (2, True), (4, False), (4, True)])
def test_native_equals_reference(sparsity, with_rows):
    n, df, dg, m, seed, offset = 2500, 6, 3, 64, 2**40 + 1, 2**33
    gen = torch.Generator().manual_seed(sparsity)
    rows = torch.randint(0, 2**34, (n,), generator=gen) if with_rows else None
    S, counts = sketch_operator(n, m, seed, offset, sparsity, rows)
    # Small integers with power-of-two scales (s = 1, 4): every sum is exact, so bit equality.
    exact = sparsity != 2
    if exact:
        f = torch.randint(-8, 9, (n, df), generator=gen).double()
        g = torch.randint(-8, 9, (n, dg), generator=gen).double()
    else:
        f = torch.randn(n, df, generator=gen, dtype=torch.float64)
        g = torch.randn(n, dg, generator=gen, dtype=torch.float64)
    native = NATIVE.countsketch(f, m, seed, offset, sparsity, rows, False)
    reference = ops.reference_countsketch(f, m, seed, offset, sparsity, rows)
    acc_native = [torch.zeros(m, df, dtype=torch.float64), torch.zeros(m, dg, dtype=torch.float64)]
    acc_reference = [torch.zeros(m, df, dtype=torch.float64), torch.zeros(m, dg, dtype=torch.float64)]
    NATIVE.countsketch_pair_(*acc_native, f, g, seed, offset, sparsity, rows, False)
    ops.reference_countsketch_pair_(*acc_reference, f, g, seed, offset, sparsity, rows)
    a, b = torch.randn(2, 40, 5, dtype=torch.float64), torch.randn(2, 40, 2, dtype=torch.float64)
    if exact:
        assert torch.equal(native, reference)
        assert all(torch.equal(got, ref) for got, ref in zip(acc_native, acc_reference))
        np.testing.assert_array_equal(native.numpy(), S @ f.numpy())
    for name, got, ref, x in (("countsketch", native, reference, f),
                              ("pair_ f", acc_native[0], acc_reference[0], f),
                              ("pair_ g", acc_native[1], acc_reference[1], g)):
        assert_sketch(got, S, counts, x.numpy(), torch.float64, f"native {name}")
        assert_sketch(ref, S, counts, x.numpy(), torch.float64, f"reference {name}")
    gram_native = NATIVE.hadamard_gram(a, b)
    gram_reference_path = ops.reference_hadamard_gram(a, b)
    assert_gram(gram_native, a.numpy(), b.numpy(), torch.float64, "native gram")
    assert_gram(gram_reference_path, a.numpy(), b.numpy(), torch.float64, "reference gram")


def test_fallback_path_matches_native_and_still_validates(monkeypatch):
    n, df, dg, m, seed, offset, sparsity = 900, 4, 3, 32, 17, 2**35, 4
    gen = torch.Generator().manual_seed(21)
    f = torch.randint(-8, 9, (n, df), generator=gen).float()
    g = torch.randint(-8, 9, (n, dg), generator=gen).float()
    rows = torch.randint(0, 2**34, (n,), generator=gen)
    a, b = torch.randn(2, 20, 3, generator=gen), torch.randn(2, 20, 2, generator=gen)
    grad_y = torch.randint(-4, 5, (m, df), generator=gen).float()

    def everything():
        hashed = ops.sketch_hash(n, m, seed, offset, sparsity, rows=rows)
        acc_f, acc_g = torch.ones(m, df, dtype=torch.float64), torch.ones(m, dg, dtype=torch.float64)
        ops.countsketch_pair_(acc_f, acc_g, f, g, seed, offset, sparsity, rows=rows)
        x = f.clone().requires_grad_()
        y = ops.countsketch(x, m, seed, offset, sparsity, rows=rows)
        y.backward(grad_y)
        return (*hashed, y.detach(), *ops.countsketch_pair(f, g, m, seed, offset, sparsity),
                acc_f, acc_g, x.grad, ops.hadamard_gram(a[0], b[0]))

    native = everything()
    monkeypatch.setattr(ops, "_NATIVE", False)
    assert not ops.native_available()
    fallback = everything()
    for index, (want, got) in enumerate(zip(native, fallback)):
        assert want.dtype == got.dtype and want.shape == got.shape, index
        if index == len(native) - 1:  # the Gram is a float32 GEMM: compare to its precision
            assert_gram(got[None], as_f64(a[:1]), as_f64(b[:1]), torch.float32, "fallback gram")
        else:  # integer data and a power-of-two scale: exact in any summation order
            assert torch.equal(want, got), index
    with pytest.raises(ValueError, match=r"sparsity \(4\) must divide m \(6\)"):
        ops.countsketch(f, 6, seed, 0, 4)
    with pytest.raises(TypeError, match="f and g must have the same dtype"):
        ops.countsketch_pair(f, g.double(), m, seed)
    with pytest.raises(ValueError, match="rows must be non-negative"):
        ops.countsketch(f[:2], m, seed, rows=torch.tensor([0, -1]))


# --------------------------------------------------------------------------- bad input

X = torch.randn(6, 3)
G = torch.randn(6, 2)


def _sketch_call(op, m=8, seed=1, offset=0, sparsity=2, rows=None):
    """Calls one wrapper with valid defaults; keyword overrides make one argument bad."""
    if op == "countsketch":
        return ops.countsketch(X, m, seed, offset, sparsity, rows=rows)
    if op == "countsketch_pair":
        return ops.countsketch_pair(X, G, m, seed, offset, sparsity, rows=rows)
    if op == "countsketch_pair_":
        return ops.countsketch_pair_(torch.zeros(m, 3), torch.zeros(m, 2), X, G, seed, offset,
                                     sparsity, rows=rows)
    return ops.sketch_hash(6, m, seed, offset, sparsity, rows=rows)


SKETCH_OPS = ["countsketch", "countsketch_pair", "countsketch_pair_", "sketch_hash"]
BAD_SKETCH_ARGS = [
    (dict(m=0), ValueError, r"m must be in \[1, 2147483647\], got 0"),
    (dict(m=6, sparsity=4), ValueError, r"sparsity \(4\) must divide m \(6\)"),
    (dict(sparsity=0), ValueError, r"sparsity must be in \[1, 32\], got 0"),
    (dict(m=66, sparsity=33), ValueError, r"sparsity must be in \[1, 32\], got 33"),
    (dict(seed=-1), ValueError, r"seed must be in \[0, 9223372036854775807\], got -1"),
    (dict(seed=2**63), ValueError, r"seed must be in .*got 9223372036854775808"),
    (dict(offset=-5), ValueError, r"offset must be in \[0, .*got -5"),
    (dict(seed=1.0), TypeError, "seed must be an int, got float"),
    (dict(seed="1"), TypeError, "seed must be an int, got str"),
    (dict(offset=None), TypeError, "offset must be an int, got NoneType"),
    (dict(sparsity=True), TypeError, "sparsity must be an int, got bool"),
    (dict(rows=torch.arange(5)), ValueError, r"rows must be a 1-D tensor of length 6, got shape \(5,\)"),
    (dict(rows=torch.zeros(6, 1, dtype=torch.int64)), ValueError, r"rows must be a 1-D .*\(6, 1\)"),
    (dict(rows=torch.arange(6, dtype=torch.int32)), TypeError, "rows must be int64, got torch.int32"),
    (dict(rows=torch.tensor([0, 1, 2, -3, 4, 5])), ValueError, "rows must be non-negative"),
    (dict(rows=[0, 1, 2, 3, 4, 5]), TypeError, "rows must be a torch.Tensor"),
]
# m is taken from the accumulators in countsketch_pair_, so only the other ops see these.
BAD_M = [
    (dict(m=2**31), ValueError, r"m must be in \[1, 2147483647\], got 2147483648"),
    (dict(m=8.0), TypeError, "m must be an int, got float"),
    (dict(m=True), TypeError, "m must be an int, got bool"),
    (dict(m=torch.tensor(8.0)), TypeError, "m must be an int, got Tensor"),
]


@pytest.mark.parametrize("op", SKETCH_OPS)
@pytest.mark.parametrize("bad,error,message", BAD_SKETCH_ARGS + BAD_M,
                         ids=[",".join(f"{k}={v!r}" for k, v in b.items())[:48]
                              for b, _, _ in BAD_SKETCH_ARGS + BAD_M])
def test_bad_sketch_arguments_are_named(op, bad, error, message):
    if op == "countsketch_pair_" and any(b is bad for b, _, _ in BAD_M):
        pytest.skip("m comes from the accumulator shape")
    with pytest.raises(error, match=message):
        _sketch_call(op, **bad)


def test_integer_like_arguments_are_accepted():
    expected = ops.countsketch(X, 8, 1, 0, 2)
    assert torch.equal(ops.countsketch(X, np.int64(8), np.uint8(1), torch.tensor(0), 2), expected)


BAD_DATA = [
    ("x rank 1", lambda: ops.countsketch(torch.randn(6), 4, 0), ValueError,
     r"x must be a 2-D \[n, d\] tensor, got shape \(6,\)"),
    ("x rank 3", lambda: ops.countsketch(torch.randn(2, 3, 4), 4, 0), ValueError,
     r"x must be a 2-D .*\(2, 3, 4\)"),
    ("x int", lambda: ops.countsketch(torch.ones(6, 3, dtype=torch.int64), 4, 0), TypeError,
     "x must be float16, bfloat16, float32 or float64, got torch.int64"),
    ("x bool", lambda: ops.countsketch(torch.ones(6, 3, dtype=torch.bool), 4, 0), TypeError,
     "x must be float16.*got torch.bool"),
    ("x complex", lambda: ops.countsketch(torch.ones(6, 3, dtype=torch.complex64), 4, 0), TypeError,
     "x must be float16.*complex64"),
    ("x numpy", lambda: ops.countsketch(np.ones((6, 3)), 4, 0), TypeError,
     "x must be a torch.Tensor, got ndarray"),
    ("deterministic", lambda: ops.countsketch(X, 4, 0, deterministic=1), TypeError,
     "deterministic must be a bool or None, got int"),
    ("f rank", lambda: ops.countsketch_pair(torch.randn(6), G, 4, 0), ValueError,
     r"f must be a 2-D .*\(6,\)"),
    ("g int", lambda: ops.countsketch_pair(X, torch.ones(6, 2, dtype=torch.int32), 4, 0),
     TypeError, "g must be float16.*torch.int32"),
    ("f g rows", lambda: ops.countsketch_pair(X, torch.randn(5, 2), 4, 0), ValueError,
     r"f and g must have the same number of rows, got \(6, 3\) and \(5, 2\)"),
    ("f g dtype", lambda: ops.countsketch_pair(X, G.double(), 4, 0), TypeError,
     "f and g must have the same dtype, got torch.float32 and torch.float64"),
    ("pair_ f g rows", lambda: ops.countsketch_pair_(torch.zeros(4, 3), torch.zeros(4, 2), X,
                                                     G[:5], 0), ValueError,
     "f and g must have the same number of rows"),
    ("pair_ f g dtype", lambda: ops.countsketch_pair_(torch.zeros(4, 3), torch.zeros(4, 2), X,
                                                      G.half(), 0), TypeError,
     "f and g must have the same dtype"),
    ("acc_f columns", lambda: ops.countsketch_pair_(torch.zeros(4, 2), torch.zeros(4, 2), X, G, 0),
     ValueError, r"acc_f must have shape \[m, 3\], got \(4, 2\)"),
    ("acc_g rank", lambda: ops.countsketch_pair_(torch.zeros(4, 3), torch.zeros(4), X, G, 0),
     ValueError, r"acc_g must have shape \[m, 2\], got \(4,\)"),
    ("acc_f half", lambda: ops.countsketch_pair_(torch.zeros(4, 3).half(), torch.zeros(4, 2), X,
                                                 G, 0), TypeError,
     "acc_f must be float32 or float64, got torch.float16"),
    ("acc_g int", lambda: ops.countsketch_pair_(torch.zeros(4, 3), torch.zeros(4, 2).long(), X,
                                                G, 0), TypeError,
     "acc_g must be float32 or float64, got torch.int64"),
    ("acc_f strided", lambda: ops.countsketch_pair_(torch.zeros(3, 4).t(), torch.zeros(4, 2), X,
                                                    G, 0), ValueError, "acc_f must be contiguous"),
    ("acc_g strided", lambda: ops.countsketch_pair_(torch.zeros(4, 3), torch.zeros(8, 2)[::2], X,
                                                    G, 0), ValueError, "acc_g must be contiguous"),
    ("acc m", lambda: ops.countsketch_pair_(torch.zeros(4, 3), torch.zeros(8, 2), X, G, 0),
     ValueError, r"acc_f and acc_g must have the same m, got \(4, 3\) and \(8, 2\)"),
    ("acc dtype", lambda: ops.countsketch_pair_(torch.zeros(4, 3), torch.zeros(4, 2).double(), X,
                                                G, 0), TypeError,
     "acc_f and acc_g must have the same dtype, got torch.float32 and torch.float64"),
    ("acc list", lambda: ops.countsketch_pair_([[0.0] * 3] * 4, torch.zeros(4, 2), X, G, 0),
     TypeError, "acc_f must be a torch.Tensor, got list"),
    ("gram m", lambda: ops.hadamard_gram(torch.randn(2, 5, 3), torch.randn(2, 4, 3)), ValueError,
     r"a and b must agree in all but the last dimension, got \(2, 5, 3\) and \(2, 4, 3\)"),
    ("gram batch", lambda: ops.hadamard_gram(torch.randn(2, 5, 3), torch.randn(3, 5, 3)),
     ValueError, r"a and b must agree .*\(2, 5, 3\) and \(3, 5, 3\)"),
    ("gram rank 1", lambda: ops.hadamard_gram(torch.randn(5), torch.randn(5)), ValueError,
     r"a and b must both be 2-D \[m, d\] or 3-D \[B, m, d\], got shapes \(5,\) and \(5,\)"),
    ("gram rank 4", lambda: ops.hadamard_gram(torch.randn(1, 2, 5, 3), torch.randn(1, 2, 5, 3)),
     ValueError, r"a and b must both be 2-D .*\(1, 2, 5, 3\)"),
    ("gram ranks differ", lambda: ops.hadamard_gram(torch.randn(5, 3), torch.randn(1, 5, 3)),
     ValueError, r"a and b must both be .*\(5, 3\) and \(1, 5, 3\)"),
    ("gram dtype", lambda: ops.hadamard_gram(torch.randn(5, 3), torch.randn(5, 3).double()),
     TypeError, "a and b must have the same dtype, got torch.float32 and torch.float64"),
    ("gram int", lambda: ops.hadamard_gram(torch.ones(5, 3, dtype=torch.int64), torch.randn(5, 3)),
     TypeError, "a must be float16.*torch.int64"),
    ("gram b not tensor", lambda: ops.hadamard_gram(torch.randn(5, 3), np.ones((5, 3))),
     TypeError, "b must be a torch.Tensor, got ndarray"),
    ("hash negative n", lambda: ops.sketch_hash(-1, 4, 0), ValueError, r"n must be in \[0, .*got -1"),
    ("hash float n", lambda: ops.sketch_hash(2.0, 4, 0), TypeError, "n must be an int, got float"),
]


@pytest.mark.parametrize("call,error,message", [c[1:] for c in BAD_DATA], ids=[c[0] for c in BAD_DATA])
def test_bad_data_is_named(call, error, message):
    with pytest.raises(error, match=message):
        call()


R6 = torch.arange(6)


def _pair_(acc_f, acc_g, seed, offset, sparsity):
    """The raw in-place op on the shared X, G inputs (for the table of bad arguments)."""
    return NATIVE.countsketch_pair_(acc_f, acc_g, X, G, seed, offset, sparsity, None, False)

BAD_NATIVE = [
    ("x rank", lambda: NATIVE.countsketch(torch.randn(6), 4, 0, 0, 1, None, False), "x must be a 2-D"),
    ("x int", lambda: NATIVE.countsketch(torch.ones(6, 3, dtype=torch.int32), 4, 0, 0, 1, None, False),
     "x must be float16"),
    ("x bool", lambda: NATIVE.countsketch(torch.ones(6, 3, dtype=torch.bool), 4, 0, 0, 1, None, False),
     "x must be float16"),
    ("m zero", lambda: NATIVE.countsketch(X, 0, 0, 0, 1, None, False), "m must be in"),
    ("m huge", lambda: NATIVE.countsketch(X, 2**31, 0, 0, 1, None, False), "m must be in"),
    ("m negative", lambda: NATIVE.countsketch_pair(X, G, -4, 0, 0, 1, None, False), "m must be in"),
    ("seed", lambda: NATIVE.countsketch(X, 4, -1, 0, 1, None, False), "seed must be >= 0"),
    ("offset", lambda: NATIVE.countsketch_pair(X, G, 4, 0, -1, 1, None, False), "offset must be >= 0"),
    ("sparsity 0", lambda: NATIVE.countsketch(X, 4, 0, 0, 0, None, False), "sparsity must be in"),
    ("sparsity 64", lambda: NATIVE.countsketch(X, 64, 0, 0, 64, None, False), "sparsity must be in"),
    ("sparsity divides", lambda: NATIVE.countsketch(X, 6, 0, 0, 4, None, False), "must divide m"),
    ("rows length", lambda: NATIVE.countsketch(X, 4, 0, 0, 1, torch.arange(5), False),
     "rows must be a 1-D tensor of length 6"),
    ("rows dtype", lambda: NATIVE.countsketch_pair(X, G, 4, 0, 0, 1, R6.int(), False),
     "rows must be int64"),
    ("pair rows", lambda: NATIVE.countsketch_pair(X, G[:5], 4, 0, 0, 1, None, False),
     "same number of rows"),
    ("pair dtype", lambda: NATIVE.countsketch_pair(X, G.double(), 4, 0, 0, 1, None, False),
     "same dtype"),
    ("acc shape", lambda: _pair_(torch.zeros(4, 2), torch.zeros(4, 2), 0, 0, 1),
     "acc_f must have shape"),
    ("acc dtype", lambda: _pair_(torch.zeros(4, 3), torch.zeros(4, 2).half(), 0, 0, 1),
     "acc_g must be float32"),
    ("acc strided", lambda: _pair_(torch.zeros(3, 4).t(), torch.zeros(4, 2), 0, 0, 1),
     "acc_f must be contiguous"),
    ("acc m", lambda: _pair_(torch.zeros(4, 3), torch.zeros(5, 2), 0, 0, 1),
     "same m"),
    ("acc empty m", lambda: _pair_(torch.zeros(0, 3), torch.zeros(0, 2), 0, 0, 1),
     "m must be in"),
    ("acc sparsity", lambda: _pair_(torch.zeros(6, 3), torch.zeros(6, 2), 0, 0, 4),
     "must divide m"),
    ("backward n", lambda: NATIVE.countsketch_backward(torch.randn(4, 3), -1, 0, 0, 1, None),
     "n must be >= 0"),
    ("backward rank", lambda: NATIVE.countsketch_backward(torch.randn(4), 6, 0, 0, 1, None),
     "grad_y must be a 2-D"),
    ("backward empty m", lambda: NATIVE.countsketch_backward(torch.randn(0, 3), 6, 0, 0, 1, None),
     "m must be in"),
    ("backward rows", lambda: NATIVE.countsketch_backward(torch.randn(4, 3), 5, 0, 0, 1, R6),
     "rows must be a 1-D tensor of length 5"),
    ("backward int", lambda: NATIVE.countsketch_backward(torch.ones(4, 3).long(), 5, 0, 0, 1, None),
     "grad_y must be float16"),
    ("gram rank", lambda: NATIVE.hadamard_gram(torch.randn(5, 3), torch.randn(5, 3)), "must be 3-D"),
    ("gram shape", lambda: NATIVE.hadamard_gram(torch.randn(1, 5, 3), torch.randn(1, 4, 3)),
     "agree in B and m"),
    ("gram dtype", lambda: NATIVE.hadamard_gram(torch.randn(1, 5, 3), torch.randn(1, 5, 3).double()),
     "share one floating dtype"),
    ("gram int", lambda: NATIVE.hadamard_gram(torch.ones(1, 5, 3).long(), torch.ones(1, 5, 3).long()),
     "share one floating dtype"),
    ("hash rank", lambda: NATIVE.sketch_hash(torch.zeros(2, 2, dtype=torch.int64), 4, 0, 1),
     "rows must be a 1-D"),
    ("hash dtype", lambda: NATIVE.sketch_hash(R6.int(), 4, 0, 1), "rows must be int64"),
    ("hash m", lambda: NATIVE.sketch_hash(R6, 0, 0, 1), "m must be in"),
    ("hash seed", lambda: NATIVE.sketch_hash(R6, 4, -7, 1), "seed must be >= 0"),
    ("hash sparsity", lambda: NATIVE.sketch_hash(R6, 4, 0, 33), "sparsity must be in"),
]


@pytest.mark.parametrize("call,message", [c[1:] for c in BAD_NATIVE], ids=[c[0] for c in BAD_NATIVE])
def test_native_ops_reject_bad_input(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


# --------------------------------------------------------------------------- large indices

def test_offsets_and_rows_beyond_32_bits_use_the_documented_hash():
    m, seed, sparsity = 24, 2**62 + 11, 2
    offset = 2**41 + 3
    rows = torch.tensor([0, 2**32, 2**32 + 1, 2**40, 2**61, 5])
    x = torch.randint(-5, 6, (6, 4)).double()
    # S from the pure-Python oracle alone.
    S = np.zeros((m, 6))
    for i, row in enumerate(rows.tolist()):
        buckets, signs = oracle_hash(offset + row, m, seed, sparsity)
        for bucket, sign in zip(buckets, signs):
            S[bucket, i] += sign / math.sqrt(sparsity)
    expected = S @ x.numpy()
    got = ops.countsketch(x, m, seed, offset, sparsity, rows=rows)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12)
    # The same global rows through the offset alone, one row at a time.
    for i, row in enumerate(rows.tolist()):
        single = ops.countsketch(x[i:i + 1], m, seed, offset + row, sparsity)
        np.testing.assert_allclose(single.numpy(), S[:, i:i + 1] @ x[i:i + 1].numpy(), rtol=0,
                                   atol=1e-12)
    gathered = NATIVE.countsketch_backward(torch.from_numpy(expected), 6, seed, offset, sparsity, rows)
    np.testing.assert_allclose(gathered.numpy(), S.T @ expected, rtol=0, atol=1e-12)


def test_sketch_is_independent_of_batch_split():
    n, d, m, seed, sparsity = 5000, 5, 128, 2024, 4
    gen = torch.Generator().manual_seed(5)
    x = torch.randint(-9, 10, (n, d), generator=gen).double()
    whole = ops.countsketch(x, m, seed, 2**33, sparsity)
    acc = [torch.zeros(m, d, dtype=torch.float64), torch.zeros(m, 1, dtype=torch.float64)]
    total = torch.zeros(m, d, dtype=torch.float64)
    for lo, hi in [(0, 1), (1, 1), (1, 2047), (2047, 4999), (4999, 5000)]:
        ops.countsketch_pair_(acc[0], acc[1], x[lo:hi], x[lo:hi, :1], seed, 2**33 + lo, sparsity)
        total += ops.countsketch(x[lo:hi], m, seed, 2**33 + lo, sparsity)
    # Integer data and scale 1/2: the sums are exact, so any split gives the same bits.
    assert torch.equal(acc[0], whole) and torch.equal(total, whole)
    assert torch.equal(acc[1], whole[:, :1])
    permutation = torch.randperm(n, generator=gen)
    shuffled = ops.countsketch(x[permutation], m, seed, 2**33, sparsity, rows=permutation)
    assert torch.equal(shuffled, whole)


def test_deterministic_flag_does_not_change_cpu_result():
    x = torch.randn(3000, 7)
    with_flag = ops.countsketch(x, 64, 1, 0, 2, deterministic=True)
    assert torch.equal(with_flag, ops.countsketch(x, 64, 1, 0, 2, deterministic=False))
    assert torch.equal(with_flag, ops.countsketch(x, 64, 1, 0, 2))


# --------------------------------------------------------------------------- row ranges

def test_stream_rows_past_the_int64_range_are_refused():
    x = torch.ones(3, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="offset"):
        ops.countsketch(x, 8, 1, offset=2**63 - 2)
    with pytest.raises(ValueError, match="offset"):
        ops.sketch_hash(3, 8, 1, offset=2**63 - 2)
    # The last representable rows are fine, and match the reference.
    got = ops.countsketch(x, 8, 1, offset=2**63 - 3)
    torch.testing.assert_close(got, ops.reference_countsketch(x, 8, 1, offset=2**63 - 3))


def test_calls_longer_than_one_hash_block_equal_the_reference(torch_generator):
    # More rows than the scatter hashes per block (2^20): the blocks must join up.
    n = (1 << 20) + 12_345
    x = torch.randn(n, 2, dtype=torch.float64, generator=torch_generator)
    torch.testing.assert_close(ops.countsketch(x, 64, 5, 7, 2),
                               ops.reference_countsketch(x, 64, 5, 7, 2), rtol=1e-12, atol=1e-9)
    rows = torch.randperm(n, generator=torch_generator) * 3
    torch.testing.assert_close(ops.countsketch(x, 64, 5, 7, 2, rows=rows),
                               ops.reference_countsketch(x, 64, 5, 7, 2, rows=rows),
                               rtol=1e-12, atol=1e-9)


def test_raw_ops_take_the_documented_defaults(torch_generator):
    # The schemas carry offset=0, sparsity=1, rows=None, deterministic=False, so the
    # raw ops can be called as the README's table shows.
    x = torch.randn(50, 3, generator=torch_generator)
    g = torch.randn(50, 2, generator=torch_generator)
    raw = torch.ops.nnsim_fast
    assert torch.equal(raw.countsketch(x, m=8, seed=1), ops.reference_countsketch(x, 8, 1))
    pair = raw.countsketch_pair(x, g, m=8, seed=1)
    assert torch.equal(pair[0], ops.reference_countsketch(x, 8, 1))
    assert torch.equal(pair[1], ops.reference_countsketch(g, 8, 1))
    acc_f, acc_g = torch.zeros(8, 3), torch.zeros(8, 2)
    raw.countsketch_pair_(acc_f, acc_g, x, g, seed=1)
    assert torch.equal(acc_f, pair[0]) and torch.equal(acc_g, pair[1])
    buckets, signs = raw.sketch_hash(torch.arange(50), m=8, seed=1)
    assert torch.equal(buckets, ops.reference_sketch_hash(torch.arange(50), 8, 1)[0])
    grad_y = torch.randn(8, 3, generator=torch_generator)
    S = ops.sketch_matrix(50, 8, 1, dtype=torch.float32)
    torch.testing.assert_close(raw.countsketch_backward(grad_y, n=50, seed=1), S.t() @ grad_y)


@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (1, 300, 2, 3)], ids=["small", "blocked"])
def test_hadamard_gram_gradients(shape):
    # gradcheck feeds random (non-symmetric) upstream gradients, so a backward
    # that assumed a symmetric G would fail here; gradgradcheck covers the
    # backward's own derivative.  Float64 inputs that require grad.
    batch, m, da, db = shape
    gen = torch.Generator().manual_seed(m)
    a = torch.randn(batch, m, da, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(batch, m, db, generator=gen, dtype=torch.float64, requires_grad=True)
    if m <= 8:      # gradcheck costs one backward per output element
        assert torch.autograd.gradcheck(ops.hadamard_gram, (a, b))
        assert torch.autograd.gradgradcheck(ops.hadamard_gram, (a, b))
    # And against the reference's autograd with an explicitly non-symmetric weight.
    weight = torch.randn(batch, m, m, generator=gen, dtype=torch.float64)
    (ops.hadamard_gram(a, b) * weight).sum().backward()
    grad_a, grad_b = a.grad.clone(), b.grad.clone()
    a.grad = b.grad = None
    (ops.reference_hadamard_gram(a, b) * weight).sum().backward()
    torch.testing.assert_close(grad_a, a.grad)
    torch.testing.assert_close(grad_b, b.grad)


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_every_cpu_code_path_gives_the_same_bits(capability):
    # The scatter loop is compiled for several instruction sets; the environment
    # variable selects a lower one in a fresh process.  Bits must not change.
    script = (
        "import torch, nnsim_fast\n"
        "from nnsim_fast import ops, _C\n"
        "gen = torch.Generator().manual_seed(5)\n"
        "f = torch.randn(3000, 37, generator=gen); g = torch.randn(3000, 5, generator=gen)\n"
        "rows = torch.randint(0, 2**40, (3000,), generator=gen)\n"
        "outs = [*ops.countsketch_pair(f, g, 64, 9, rows=rows),\n"
        "        *ops.countsketch_pair(f.double(), g.double(), 64, 9, 3, 4)]\n"
        "torch.save([_C.cpu_capability(), outs], __import__('sys').argv[1])\n")
    import subprocess
    import sys
    import tempfile
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("native", capability):
            env = dict(os.environ)
            env.pop("NNSIM_FAST_CPU_CAPABILITY", None)
            if name != "native":
                env["NNSIM_FAST_CPU_CAPABILITY"] = name
            path = os.path.join(tmp, f"{name}.pt")
            subprocess.run([sys.executable, "-c", script, path], env=env, check=True)
            results[name] = torch.load(path)
    assert results[capability][0] == capability
    for native, lower in zip(results["native"][1], results[capability][1]):
        assert torch.equal(native, lower)
