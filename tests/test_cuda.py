"""CUDA ops against the CPU ops and against dense float64 references.

The references are independent of the CUDA code: the dense sketch matrix S is
built on the CPU from ``nnsim_fast.ops.sketch_matrix`` (the CPU hash), and
sums are formed in float64 (``S @ x``, ``S.T @ y``, ``a @ a.T``).  Every test
skips without a GPU or without the CUDA build of the extension.
"""
from __future__ import annotations

import functools

import pytest
import torch

from nnsim_fast import ops


def _cuda_kernels_registered() -> bool:
    if not torch.cuda.is_available() or not ops.native_available():
        return False
    try:
        return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"nnsim_fast::{name}", "CUDA")
                   for name in ("sketch_hash", "countsketch", "countsketch_pair",
                                "countsketch_pair_", "countsketch_backward", "hadamard_gram"))
    except RuntimeError:
        return False


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not _cuda_kernels_registered(),
                       reason="needs a CUDA device and the CUDA build of nnsim_fast"),
]

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Relative error allowed against sum |S| |x| (the scale of the rounding error).
TOL = {torch.float32: 1e-4, torch.float64: 1e-11}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def random_matrix(n: int, d: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype).cuda()


@functools.lru_cache(maxsize=4)
def _dense_sketch_matrix(n: int, m: int, seed: int, offset: int, sparsity: int) -> torch.Tensor:
    return ops.sketch_matrix(n, m, seed, offset, sparsity, dtype=torch.float64, device="cpu")


def dense_sketch(x: torch.Tensor, m: int, seed: int, offset: int = 0, sparsity: int = 1,
                 rows: torch.Tensor | None = None):
    """(S x, |S| |x|) in float64 on the CPU, S from the CPU hash."""
    if rows is None:
        S = _dense_sketch_matrix(x.shape[0], m, seed, offset, sparsity)
    else:
        S = ops.sketch_matrix(x.shape[0], m, seed, offset, sparsity, rows=rows.cpu(),
                              dtype=torch.float64, device="cpu")
    xd = x.detach().cpu().double()
    return S @ xd, S.abs() @ xd.abs()


def assert_sketch_close(out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor,
                        dtype: torch.dtype) -> None:
    assert out.is_cuda
    assert out.dtype == dtype, (out.dtype, dtype)
    assert tuple(out.shape) == tuple(ref.shape)
    err = (out.detach().cpu().double() - ref).abs()
    limit = TOL[dtype] * bound
    assert bool((err <= limit).all()), (
        f"max error {err.max().item():.3e}, worst ratio "
        f"{(err / limit.clamp_min(1e-300)).max().item():.3e}")


# --------------------------------------------------------------------------- hash

@pytest.mark.parametrize("m,sparsity", [(1, 1), (7, 1), (4096, 1), (4096, 4), (96, 32)])
def test_sketch_hash_matches_cpu_bit_for_bit(m, sparsity):
    gen = torch.Generator().manual_seed(m + sparsity)
    rows = torch.cat([torch.arange(0, 1000), torch.randint(0, 2**62, (5000,), generator=gen),
                      torch.tensor([2**63 - 2, 2**31 - 1, 2**31, 2**32 + 5])])
    for seed in (0, 1, 2**63 - 1):
        b_cpu, s_cpu = torch.ops.nnsim_fast.sketch_hash(rows, m, seed, sparsity)
        b_gpu, s_gpu = torch.ops.nnsim_fast.sketch_hash(rows.cuda(), m, seed, sparsity)
        assert b_gpu.is_cuda and b_gpu.dtype == torch.int64 and s_gpu.dtype == torch.float32
        assert torch.equal(b_gpu.cpu(), b_cpu)
        assert torch.equal(s_gpu.cpu(), s_cpu)
    width = m // sparsity
    block = b_cpu // width
    assert torch.equal(block, torch.arange(sparsity).expand_as(block))


def test_sketch_hash_wrapper_on_cuda_matches_reference():
    rows = torch.randint(0, 10**9, (777,), generator=torch.Generator().manual_seed(3))
    buckets, signs = ops.sketch_hash(777, 64, 11, offset=5, sparsity=4, rows=rows.cuda())
    ref_b, ref_s = ops.reference_sketch_hash(rows + 5, 64, 11, 4)
    assert torch.equal(buckets.cpu(), ref_b)
    assert torch.equal(signs.cpu(), ref_s)


# --------------------------------------------------------------------------- scatter

CASES = [(1, 1), (3, 1), (16, 1), (16, 4), (128, 1), (512, 8), (4096, 1), (4096, 32)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,sparsity", CASES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_countsketch_pair_matches_dense_and_cpu(dtype, m, sparsity, deterministic):
    n = 3000
    f = random_matrix(n, 37, dtype, seed=m)      # odd width: scalar tail
    g = random_matrix(n, 64, dtype, seed=m + 1)  # aligned: 16-byte loads
    seed, offset = 1234 + m, 99
    sf, sg = ops.countsketch_pair(f, g, m, seed, offset, sparsity, deterministic=deterministic)
    for out, x in ((sf, f), (sg, g)):
        ref, bound = dense_sketch(x, m, seed, offset, sparsity)
        assert_sketch_close(out, ref, bound, acc_dtype(dtype))
    cpu_f, cpu_g = ops.countsketch_pair(f.cpu(), g.cpu(), m, seed, offset, sparsity)
    for out, cpu, x in ((sf, cpu_f, f), (sg, cpu_g, g)):
        _, bound = dense_sketch(x, m, seed, offset, sparsity)
        assert_sketch_close(out, cpu.double(), 2 * bound, acc_dtype(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("deterministic", [False, True])
def test_countsketch_single_matches_dense(dtype, deterministic):
    x = random_matrix(2500, 20, dtype, seed=8)
    out = ops.countsketch(x, 48, 5, 3, 2, deterministic=deterministic)
    ref, bound = dense_sketch(x, 48, 5, 3, 2)
    assert_sketch_close(out, ref, bound, acc_dtype(dtype))


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("layout", ["transposed", "column_step", "row_offset", "broadcast", "wide"])
def test_countsketch_any_strides(layout, deterministic):
    base = random_matrix(1500, 130, torch.float32, seed=21)
    if layout == "transposed":
        x = random_matrix(40, 1500, torch.float32, seed=22).t()   # column stride n
    elif layout == "column_step":
        x = base[:, ::3]                                            # column stride 3
    elif layout == "row_offset":
        x = base[:, 1:65]                                           # rows not 16-byte aligned
    elif layout == "broadcast":
        x = base[:1, :16].expand(1500, 16)                          # row stride 0
    else:
        x = random_matrix(1200, 2000, torch.float32, seed=23)      # several shared tiles
    for m in (16, 300):
        out = ops.countsketch(x, m, 77, 0, 1, deterministic=deterministic)
        ref, bound = dense_sketch(x, m, 77)
        assert_sketch_close(out, ref, bound, torch.float32)


@pytest.mark.parametrize("deterministic", [False, True])
def test_rows_and_offset(deterministic):
    n, m = 2000, 64
    rows = torch.randperm(10 * n, generator=torch.Generator().manual_seed(4))[:n].cuda()
    f = random_matrix(n, 12, torch.float64, seed=5)
    g = random_matrix(n, 3, torch.float64, seed=6)
    sf, sg = ops.countsketch_pair(f, g, m, 9, 1000, 2, rows=rows, deterministic=deterministic)
    for out, x in ((sf, f), (sg, g)):
        ref, bound = dense_sketch(x, m, 9, 1000, 2, rows=rows)
        assert_sketch_close(out, ref, bound, torch.float64)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("acc", [torch.float32, torch.float64], ids=str)
def test_streaming_accumulation_equals_one_pass(acc, deterministic):
    n, m = 3000, 32
    f = random_matrix(n, 24, torch.bfloat16, seed=30)
    g = random_matrix(n, 8, torch.bfloat16, seed=31)
    acc_f = torch.zeros(m, 24, dtype=acc, device="cuda")
    acc_g = torch.zeros(m, 8, dtype=acc, device="cuda")
    for start in range(0, n, 700):
        stop = min(n, start + 700)
        ops.countsketch_pair_(acc_f, acc_g, f[start:stop], g[start:stop], 17, offset=start,
                              sparsity=4, deterministic=deterministic)
    for out, x in ((acc_f, f), (acc_g, g)):
        ref, bound = dense_sketch(x, m, 17, 0, 4)
        assert_sketch_close(out, ref, bound, acc)


def test_deterministic_path_is_bitwise_reproducible():
    n = 200_000
    f = random_matrix(n, 48, torch.float32, seed=40)
    g = random_matrix(n, 10, torch.float16, seed=41).float()
    for m, sparsity in ((1, 1), (16, 4), (4096, 1), (70_000, 1)):
        first = ops.countsketch_pair(f, g, m, 3, 0, sparsity, deterministic=True)
        for _ in range(2):
            again = ops.countsketch_pair(f, g, m, 3, 0, sparsity, deterministic=True)
            assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
        fast = ops.countsketch_pair(f, g, m, 3, 0, sparsity, deterministic=False)
        scale = fast[0].abs().max().item() + 1.0
        assert (first[0] - fast[0]).abs().max().item() <= 1e-4 * scale


def integer_matrix(n: int, d: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Small integers: every partial sum of a sketch of them is exact in float32."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-8, 9, (n, d), generator=gen).to(dtype).cuda()


def exact_sketch(x: torch.Tensor, m: int, seed: int, sparsity: int) -> torch.Tensor:
    """S x in float64 on the CPU from the CPU hash (exact for integer x, s in {1, 4})."""
    buckets, signs = ops.sketch_hash(x.shape[0], m, seed, 0, sparsity)
    xd = x.cpu().double()
    out = torch.zeros(m, x.shape[1], dtype=torch.float64)
    for j in range(sparsity):
        out.index_add_(0, buckets[:, j], xd * (signs[:, j].double() / sparsity ** 0.5)[:, None])
    return out


# Rows per bucket straddle the combine tree's fan-in (32) for pieces of 256
# entries: 1 piece (no tree), 2 and 32 (one group), 33 (two groups, two
# levels), 1024 (two full levels) and 1025 (three levels).  With other internal
# sizes the comparison stays exact, only less targeted.
@pytest.mark.parametrize("m,sparsity,rows_per_bucket", [
    (1, 1, 256), (1, 1, 2 * 256), (1, 1, 32 * 256), (1, 1, 33 * 256 - 5), (1, 1, 1024 * 256),
    (1, 1, 1025 * 256 + 7), (3, 1, 40 * 256), (4, 4, 33 * 256)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_deterministic_combine_tree_is_exact(m, sparsity, rows_per_bucket, dtype):
    """Integer data make every order of summation give the same float32 bits, so
    any partial sum lost, added twice or sent to the wrong bucket by the
    combine tree shows as an exact mismatch (the atomic path must agree too)."""
    n = rows_per_bucket * m // sparsity
    f = integer_matrix(n, 3, dtype, seed=rows_per_bucket)
    g = integer_matrix(n, 2, dtype, seed=rows_per_bucket + 1)
    ref_f, ref_g = exact_sketch(f, m, 19, sparsity), exact_sketch(g, m, 19, sparsity)
    for det in (True, False):
        sf, sg = ops.countsketch_pair(f, g, m, 19, 0, sparsity, deterministic=det)
        assert sf.dtype == torch.float32
        assert torch.equal(sf.cpu().double(), ref_f), (det, (sf.cpu().double() - ref_f).abs().max())
        assert torch.equal(sg.cpu().double(), ref_g), (det, (sg.cpu().double() - ref_g).abs().max())
    acc_f = torch.zeros(m, 3, dtype=torch.float64, device="cuda")
    acc_g = torch.zeros(m, 2, dtype=torch.float64, device="cuda")
    ops.countsketch_pair_(acc_f, acc_g, f, g, 19, 0, sparsity, deterministic=True)
    assert torch.equal(acc_f.cpu(), ref_f) and torch.equal(acc_g.cpu(), ref_g)


@pytest.mark.parametrize("m", [1, 2, 16])
def test_deterministic_small_m_repeatable_under_concurrent_load(m):
    """Few buckets, many pieces each (a multi-level combine): the bits must not
    depend on how the blocks are scheduled, so other work runs beside each call."""
    n = 300_000
    f = random_matrix(n, 40, torch.float32, seed=90 + m)
    g = random_matrix(n, 7, torch.float32, seed=91 + m)
    noise = torch.randn(2048, 2048, device="cuda")
    busy = torch.empty_like(noise)
    side = torch.cuda.Stream()
    results = []
    for _ in range(3):
        torch.cuda.synchronize()
        with torch.cuda.stream(side):
            for _ in range(4):
                torch.mm(noise, noise, out=busy)
        results.append(ops.countsketch_pair(f, g, m, 23, 0, 1, deterministic=True))
    torch.cuda.synchronize()
    for sf, sg in results[1:]:
        assert torch.equal(sf, results[0][0]) and torch.equal(sg, results[0][1])
    for out, x in zip(results[0], (f, g)):
        ref, bound = dense_sketch(x, m, 23)
        assert_sketch_close(out, ref, bound, torch.float32)


def test_deterministic_flag_follows_torch_setting():
    x = random_matrix(50_000, 16, torch.float32, seed=42)
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        first = ops.countsketch(x, 8, 1)
        second = ops.countsketch(x, 8, 1)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(first, second)
    assert torch.equal(first, ops.countsketch(x, 8, 1, deterministic=True))


def test_empty_inputs():
    for dtype in (torch.float16, torch.float64):
        x = torch.empty(0, 5, dtype=dtype, device="cuda")
        for det in (False, True):
            out = ops.countsketch(x, 8, 0, deterministic=det)
            assert out.shape == (8, 5) and out.is_cuda and not out.any()
        y = torch.empty(10, 0, dtype=dtype, device="cuda")
        assert ops.countsketch(y, 8, 0).shape == (8, 0)


def test_runs_on_the_current_stream():
    """Input written on a side stream behind a long sleep: a kernel launched on
    any other stream would read the NaNs that are there before the copy."""
    x = random_matrix(2000, 32, torch.float32, seed=50)
    ref, bound = dense_sketch(x, 64, 2)
    y = torch.full_like(x, float("nan"))
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        y.copy_(x)
        outs = [ops.countsketch(y, 64, 2, deterministic=det) for det in (False, True)]
        grad = torch.ops.nnsim_fast.countsketch_backward(y[:64], 100, 2, 0, 1, None)
        gram = ops.hadamard_gram(y[:100], y[:100, :8])
    side.synchronize()
    for out in outs:
        assert_sketch_close(out, ref, bound, torch.float32)
    assert not grad.isnan().any() and not gram.isnan().any()


def test_large_input_int64_offsets():
    """n = 10^7 rows and n * d > 2^31 elements: every offset must be 64-bit."""
    n, d, m = 10_000_000, 224, 512
    gen = torch.Generator(device="cuda").manual_seed(60)
    f = torch.randn(n, d, generator=gen, device="cuda", dtype=torch.float16)
    g = torch.randn(n, 2, generator=gen, device="cuda", dtype=torch.float16)
    assert f.numel() > 2**31
    offset = 123_456_789
    buckets, signs = ops.sketch_hash(n, m, 7, offset)  # CPU hash, independent of CUDA
    buckets, signs = buckets[:, 0].cuda(), signs[:, 0].cuda().double()
    ref_f = torch.zeros(m, d, dtype=torch.float64, device="cuda")
    bound_f = torch.zeros_like(ref_f)
    ref_g = torch.zeros(m, 2, dtype=torch.float64, device="cuda")
    for start in range(0, n, 1_000_000):
        sl = slice(start, start + 1_000_000)
        fd = f[sl].double()
        ref_f.index_add_(0, buckets[sl], fd * signs[sl, None])
        bound_f.index_add_(0, buckets[sl], fd.abs())
        ref_g.index_add_(0, buckets[sl], g[sl].double() * signs[sl, None])
    for det in (False, True):
        sf, sg = ops.countsketch_pair(f, g, m, 7, offset, deterministic=det)
        err = (sf.double() - ref_f).abs()
        assert bool((err <= TOL[torch.float32] * bound_f).all()), err.max().item()
        assert torch.allclose(sg.double(), ref_g, rtol=1e-4, atol=1e-2)


# --------------------------------------------------------------------------- backward

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sparsity", [1, 4, 32])
def test_backward_gather_matches_dense(dtype, sparsity):
    n, m, d = 1500, 64, 40
    gy = random_matrix(m, d, dtype, seed=70 + sparsity)
    rows = torch.randperm(5 * n, generator=torch.Generator().manual_seed(71))[:n]
    out = torch.ops.nnsim_fast.countsketch_backward(gy, n, 13, 4, sparsity, rows.cuda())
    assert out.is_cuda and out.dtype == dtype and out.shape == (n, d)
    S = ops.sketch_matrix(n, m, 13, 4, sparsity, rows=rows, dtype=torch.float64)
    ref = S.t() @ gy.cpu().double()
    bound = S.abs().t() @ gy.cpu().double().abs()
    # The result is rounded once to the output dtype.
    eps = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-6,
           torch.float64: 1e-14}[dtype]
    assert bool(((out.cpu().double() - ref).abs() <= eps * bound).all())
    cpu = torch.ops.nnsim_fast.countsketch_backward(gy.cpu(), n, 13, 4, sparsity, rows)
    assert bool(((out.cpu().double() - cpu.double()).abs() <= 2 * eps * bound).all())


@pytest.mark.parametrize("deterministic", [False, True])
def test_gradcheck(deterministic):
    f = torch.randn(60, 5, dtype=torch.float64, device="cuda", requires_grad=True)
    g = torch.randn(60, 3, dtype=torch.float64, device="cuda", requires_grad=True)
    rows = torch.randperm(200, device="cuda")[:60]
    torch.autograd.gradcheck(
        lambda x: ops.countsketch(x, 12, 3, 2, 4, rows=rows, deterministic=deterministic), (f,))
    torch.autograd.gradcheck(
        lambda a, b: ops.countsketch_pair(a, b, 8, 5, 0, 2, deterministic=deterministic), (f, g))


def test_gradient_of_half_input_is_half_gather():
    x = random_matrix(500, 6, torch.float16, seed=80).requires_grad_(True)
    weight = torch.randn(16, 6, dtype=torch.float32, device="cuda")
    (ops.countsketch(x, 16, 4) * weight).sum().backward()
    S = ops.sketch_matrix(500, 16, 4, dtype=torch.float64)
    ref = S.t() @ weight.cpu().double()
    assert x.grad.dtype == torch.float16
    assert torch.allclose(x.grad.cpu().double(), ref, rtol=2e-3, atol=2e-3)


# --------------------------------------------------------------------------- hadamard gram

def dense_gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a64, b64 = a.cpu().double(), b.cpu().double()
    return (a64 @ a64.transpose(-1, -2)) * (b64 @ b64.transpose(-1, -2))


@pytest.mark.parametrize("route", ["fused", "bmm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,m,da,db", [(1, 1, 3, 2), (3, 5, 17, 9), (2, 64, 64, 8),
                                           (1, 65, 40, 33), (2, 200, 100, 30), (1, 130, 0, 4)])
def test_hadamard_gram_matches_dense(monkeypatch, route, dtype, batch, m, da, db):
    monkeypatch.setenv("NNSIM_FAST_GRAM", route)
    gen = torch.Generator().manual_seed(m + da)
    a = torch.randn(batch, m, da, generator=gen, dtype=torch.float64).to(dtype).cuda()
    b = torch.randn(batch, m, db, generator=gen, dtype=torch.float64).to(dtype).cuda()
    out = ops.hadamard_gram(a, b)
    assert out.is_cuda and out.shape == (batch, m, m) and out.dtype == acc_dtype(dtype)
    ref = dense_gram(a, b)
    a64, b64 = a.cpu().double().abs(), b.cpu().double().abs()
    bound = (a64 @ a64.transpose(1, 2)) * (b64 @ b64.transpose(1, 2))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert bool(((out.cpu().double() - ref).abs() <= tol * bound + 1e-300).all())
    if route == "fused":
        assert torch.equal(out, out.transpose(1, 2))
    cpu = ops.hadamard_gram(a.cpu(), b.cpu())
    assert bool(((out.cpu().double() - cpu.double()).abs() <= 2 * tol * bound + 1e-300).all())


@pytest.mark.parametrize("route", ["fused", "bmm"])
def test_hadamard_gram_strided_inputs_and_2d(monkeypatch, route):
    monkeypatch.setenv("NNSIM_FAST_GRAM", route)
    a = torch.randn(2, 90, 70, device="cuda")[:, :, ::2]           # column stride 2
    b = torch.randn(2, 20, 90, device="cuda").transpose(1, 2)      # column stride 90
    ref = dense_gram(a, b)
    scale = ref.abs().max().item()
    out = ops.hadamard_gram(a, b)
    assert torch.allclose(out.cpu().double(), ref, rtol=1e-4, atol=1e-5 * scale)
    out2d = ops.hadamard_gram(a[1], b[1])
    assert out2d.shape == (90, 90)
    assert torch.allclose(out2d.cpu().double(), ref[1], rtol=1e-4, atol=1e-5 * scale)


# --------------------------------------------------------------------------- validation

def test_native_cuda_ops_reject_bad_input():
    x = torch.randn(10, 4, device="cuda")
    nf = torch.ops.nnsim_fast

    def zeros(*shape, dtype=torch.float32):
        return torch.zeros(*shape, device="cuda", dtype=dtype)

    with pytest.raises(TypeError):
        nf.countsketch(x.int(), 8, 0, 0, 1, None, False)
    with pytest.raises(ValueError):
        nf.countsketch(x, 0, 0, 0, 1, None, False)
    with pytest.raises(ValueError):
        nf.countsketch(x, 8, 0, 0, 3, None, False)          # 3 does not divide 8
    with pytest.raises(ValueError):
        nf.countsketch(x, 8, 0, 0, 1, torch.arange(10), False)  # rows on the CPU
    with pytest.raises(ValueError):
        nf.countsketch_pair(x, torch.randn(9, 2, device="cuda"), 8, 0, 0, 1, None, False)
    with pytest.raises(ValueError):
        nf.countsketch_pair(x, torch.randn(10, 2), 8, 0, 0, 1, None, False)
    with pytest.raises(ValueError):                          # acc_g has the wrong width
        nf.countsketch_pair_(zeros(8, 4), zeros(8, 3), x, zeros(10, 2), 0, 0, 1, None, False)
    with pytest.raises(TypeError):                           # 16-bit accumulators
        nf.countsketch_pair_(zeros(8, 4, dtype=torch.float16), zeros(8, 2, dtype=torch.float16),
                             x, zeros(10, 2), 0, 0, 1, None, False)
    with pytest.raises(ValueError):
        nf.countsketch_backward(x, -1, 0, 0, 1, None)
    with pytest.raises(ValueError):
        nf.hadamard_gram(x, x)                               # 2-D
    with pytest.raises(TypeError):
        nf.hadamard_gram(x[None], x[None].double())
    with pytest.raises(ValueError):
        nf.sketch_hash(torch.arange(4, device="cuda"), 8, -1, 1)


def negative_rows(n: int) -> torch.Tensor:
    rows = torch.arange(n, device="cuda") * 3
    rows[n // 2] = -5
    return rows


@pytest.mark.parametrize("deterministic", [False, True])
def test_native_cuda_ops_refuse_negative_rows(deterministic):
    """As the CPU ops do; the Python wrappers leave the CUDA check to the binding."""
    n = 300
    x = torch.randn(n, 6, device="cuda")
    g = torch.randn(n, 2, device="cuda")
    acc_f, acc_g = torch.zeros(16, 6, device="cuda"), torch.zeros(16, 2, device="cuda")
    nf = torch.ops.nnsim_fast
    calls = [
        lambda r: nf.countsketch(x, 16, 1, 0, 1, r, deterministic),
        lambda r: nf.countsketch_pair(x, g, 16, 1, 0, 1, r, deterministic),
        lambda r: nf.countsketch_pair_(acc_f, acc_g, x, g, 1, 0, 1, r, deterministic),
        lambda r: nf.countsketch_backward(acc_f, n, 1, 0, 1, r),
        lambda r: ops.countsketch(x, 16, 1, rows=r, deterministic=deterministic),
        lambda r: ops.countsketch_pair(x, g, 16, 1, rows=r, deterministic=deterministic),
        lambda r: ops.countsketch_pair_(acc_f, acc_g, x, g, 1, rows=r, deterministic=deterministic),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="non-negative"):
            call(negative_rows(n))                           # a fresh tensor every time
        call(torch.arange(n, device="cuda") * 3)


def test_negative_rows_check_sees_in_place_writes():
    """A rows tensor that passed is not checked again, unless it was written to."""
    x = torch.randn(100, 4, device="cuda")
    rows = torch.arange(100, device="cuda")
    ops.countsketch(x, 8, 0, rows=rows)
    ops.countsketch(x, 8, 0, rows=rows)
    rows[7] = -1
    with pytest.raises(ValueError, match="non-negative"):
        ops.countsketch(x, 8, 0, rows=rows)
    view = rows[:50]
    view[7] = 7                                              # through a view: same counter
    ops.countsketch(x, 8, 0, rows=rows)
    rows[60:] = -rows[60:]
    with pytest.raises(ValueError, match="non-negative"):
        ops.countsketch(x, 8, 0, rows=rows)
    with torch.inference_mode():                             # no version counter: always checked
        frozen = torch.arange(100, device="cuda")
        ops.countsketch(x, 8, 0, rows=frozen)
        frozen[3] = -2
        with pytest.raises(ValueError, match="non-negative"):
            ops.countsketch(x, 8, 0, rows=frozen)


def test_cuda_calls_do_not_wait_for_the_device():
    """No host synchronisation: without rows never, with rows only the first time
    a rows tensor is seen (torch raises on a synchronising call in this mode)."""
    x = torch.randn(5000, 24, device="cuda")
    g = torch.randn(5000, 3, device="cuda")
    rows = torch.randperm(20_000, device="cuda")[:5000]
    acc_f, acc_g = torch.zeros(64, 24, device="cuda"), torch.zeros(64, 3, device="cuda")
    ops.countsketch(x, 64, 1, rows=rows)                     # checks rows once
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for det in (False, True):
            for r in (None, rows):
                ops.countsketch(x, 64, 1, 5, 2, rows=r, deterministic=det)
                ops.countsketch_pair(x, g, 64, 1, 5, 2, rows=r, deterministic=det)
                ops.countsketch_pair_(acc_f, acc_g, x, g, 1, 5, 2, rows=r, deterministic=det)
        ops.hadamard_gram(acc_f[None], acc_g[None])
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    with pytest.raises(RuntimeError):                        # the mode does catch a wait
        torch.cuda.set_sync_debug_mode("error")
        try:
            ops.countsketch(x, 64, 1, rows=rows.clone())
        finally:
            torch.cuda.set_sync_debug_mode(previous)


@pytest.mark.parametrize("deterministic", [False, True])
def test_rows_under_cuda_graph_capture(deterministic):
    """A capture allows no host wait, so the rows check stands aside there; the
    captured sketch replays with whatever rows hold at replay time."""
    n, m = 4000, 32
    x = torch.randn(n, 16, device="cuda")
    rows = torch.randperm(4 * n, device="cuda")[:n]
    eager = ops.countsketch(x, m, 3, rows=rows.clone(), deterministic=deterministic)
    captured_rows = rows.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.countsketch(x, m, 3, rows=captured_rows, deterministic=deterministic)
    graph.replay()
    torch.cuda.synchronize()
    if deterministic:
        assert torch.equal(out, eager)
    else:
        torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5 * eager.abs().max().item())


# --------------------------------------------------------------------------- torch.library

def test_opcheck_all_ops():
    x = torch.randn(300, 7, dtype=torch.float64, device="cuda", requires_grad=True)
    g = torch.randn(300, 3, dtype=torch.float64, device="cuda", requires_grad=True)
    rows = torch.randperm(1000, device="cuda")[:300]
    nf = torch.ops.nnsim_fast
    torch.library.opcheck(nf.sketch_hash.default, (rows, 16, 3, 4))
    for det in (False, True):
        torch.library.opcheck(nf.countsketch.default, (x, 16, 3, 5, 2, rows, det))
        torch.library.opcheck(nf.countsketch_pair.default, (x, g, 16, 3, 5, 2, None, det))
        acc_f = torch.zeros(16, 7, dtype=torch.float64, device="cuda")
        acc_g = torch.zeros(16, 3, dtype=torch.float64, device="cuda")
        torch.library.opcheck(nf.countsketch_pair_.default,
                              (acc_f, acc_g, x.detach(), g.detach(), 3, 5, 2, None, det))
    torch.library.opcheck(nf.countsketch_backward.default,
                          (torch.randn(16, 7, dtype=torch.float64, device="cuda"), 300, 3, 5, 2,
                           rows))
    a = torch.randn(2, 20, 6, device="cuda")
    torch.library.opcheck(nf.hadamard_gram.default, (a, torch.randn(2, 20, 4, device="cuda")))


def test_torch_compile_fullgraph():
    def summary(f, g):
        sf, sg = ops.countsketch_pair(f, g, 64, 21, 0, 1, deterministic=True)
        return ops.hadamard_gram(sf, sg)

    f = torch.randn(5000, 32, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(5000, 10, device="cuda", dtype=torch.bfloat16)
    eager = summary(f, g)
    compiled = torch.compile(summary, fullgraph=True)(f, g)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5 * eager.abs().max().item())


def test_compare_models_on_cuda_matches_cpu():
    """The joint path with both models on the GPU: the same CKA and error bars as on the CPU
    (float64 Grams, so only the order of the sums differs)."""
    import nnsim_fast as nf
    from torch import nn

    def model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 5)).eval()

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, generator=generator)
    y = torch.randint(0, 5, (96,), generator=generator)
    batches = list(zip(x.split(24), y.split(24)))
    options = dict(kind="hadamard", dtype=torch.float64, block=48, progress=False)
    cpu = nf.compare_models(model(0), model(1), batches, ["0", "2"], ["0", "2"], **options)
    cuda = nf.compare_models(model(0).cuda(), model(1).cuda(), batches, ["0", "2"], ["0", "2"],
                             **options)
    torch.testing.assert_close(cuda.matrix, cpu.matrix, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(cuda.error, cpu.error, rtol=1e-6, atol=1e-10)
