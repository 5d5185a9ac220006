"""The CPU benchmark harness: native ops against PyTorch and SciPy baselines, one run.

Shared by the CPU suites in this folder (``results.py`` writes RESULTS.md,
``bench_ops.py`` holds the pytest-benchmark cases, ``scale.py`` and
``accuracy.py`` record the host) and by ``nnsim-fast bench`` in a source
checkout.  It lives outside the package: nothing here ships in the wheel.

Absolute times on a shared or throttled machine mean little, so every figure
this module reports is a ratio to something measured in the same run:

* the machine: read bandwidth (``tensor.sum()`` over a 1 GiB buffer), copy
  bandwidth (``copy_`` between two 1 GiB buffers) and the fp32 GEMM rate
  (``torch.mm`` of two 2048 x 2048 matrices);
* ``countsketch_pair`` (one fused pass over f and g) against the naive
  ``index_add_`` scatter with the signs applied, ``scatter_add_`` with an
  expanded index, a ``torch.sparse`` CSR matmul (S prebuilt, and S built
  inside the timing), a dense ``S @ X`` (small n only) and
  ``scipy.linalg.clarkson_woodruff_transform``;
* ``hadamard_gram`` against ``torch.bmm`` + elementwise multiply, and against
  the GEMM rate.

Methods of one size are timed round-robin (one sample of each method per
round), so a change in machine load hits all of them alike and their ratios
stay meaningful.  Each reported time is the median of ``repeats`` rounds
after one warm-up call.

Use :func:`run_benchmarks` for a results dict (JSON-serialisable),
:func:`format_table` to print it, :func:`evaluate_targets` for the spec's
performance targets, or :func:`main` as a command line
(``python benchmarks/harness.py --help``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

try:
    from nnsim_fast import ops
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from nnsim_fast import ops
from nnsim_fast.app.errors import UsageError
from nnsim_fast.app.inputs import check_writable_file

__all__ = [
    "FULL_SKETCH_SIZES", "QUICK_SKETCH_SIZES", "FULL_GRAM_SIZES", "QUICK_GRAM_SIZES",
    "SKETCH_BASELINES", "QUICK_BASELINES", "TARGET_SKETCH_SIZE",
    "host_info", "measure_machine", "time_round_robin", "csr_sketch", "index_add_sketch",
    "scatter_add_sketch", "bench_sketch", "bench_gram", "bench_scaling",
    "run_benchmarks", "evaluate_targets", "format_table", "format_machine",
    "format_sketch_table", "format_gram_table", "format_scaling_table", "format_targets",
    "count_text", "load_text", "write_json", "build_parser", "main",
]

GIB = 1 << 30

# (n, d, m): f and g are both [n, d] float32, sketched to [m, d].
FULL_SKETCH_SIZES: List[Tuple[int, int, int]] = [
    (n, d, m) for n in (10**4, 10**5, 10**6) for d in (64, 512, 2048) for m in (128, 512)]
QUICK_SKETCH_SIZES: List[Tuple[int, int, int]] = [(10**5, 512, 512)]
# (B, m, d): a and b both [B, m, d] float32.
FULL_GRAM_SIZES: List[Tuple[int, int, int]] = [
    (B, m, 512) for B in (1, 8, 64) for m in (128, 512)]
QUICK_GRAM_SIZES: List[Tuple[int, int, int]] = [(1, 128, 512), (8, 512, 512)]
# The size at which the spec states its sketch targets.
TARGET_SKETCH_SIZE: Tuple[int, int, int] = (10**6, 512, 512)

SKETCH_BASELINES: Tuple[str, ...] = (
    "index_add", "scatter_add", "csr", "csr_build", "dense", "scipy_cwt")
QUICK_BASELINES: Tuple[str, ...] = ("index_add", "csr", "csr_build", "scipy_cwt")

BASELINE_LABELS: Dict[str, str] = {
    "index_add": "index_add_",
    "scatter_add": "scatter_add_",
    "csr": "CSR",
    "csr_build": "CSR+build",
    "dense": "dense S@X",
    "scipy_cwt": "scipy CWT x2",
}

# Targets of the spec, checked by evaluate_targets.
TARGET_READ_FRACTION = 0.70
TARGET_NAIVE_SPEEDUP = 5.0

# Inputs larger than this (f and g together) are skipped: they would not fit
# beside the baselines' temporaries on a modest machine.
DEFAULT_MAX_INPUT_BYTES = 6 * GIB
# The dense S @ X baseline builds an m x n matrix; only for small n.
DEFAULT_DENSE_MAX_N = 10**4
# Fast calls are repeated inside one sample until it lasts this long, so that
# timer resolution and call overhead do not dominate.
MIN_SAMPLE_SECONDS = 0.05
MAX_CALLS_PER_SAMPLE = 10_000


# --------------------------------------------------------------------------- host

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _meminfo_bytes(field: str) -> Optional[int]:
    try:
        with open("/proc/meminfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _load_average() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _native_library_digest() -> Optional[str]:
    """Short SHA-256 of the loaded extension file: ties the numbers to one kernel build."""
    if not ops.native_available():
        return None
    import hashlib
    try:
        with open(ops._C.__file__, "rb") as handle:
            return hashlib.sha256(handle.read()).hexdigest()[:16]
    except (AttributeError, OSError):
        return None


def host_info() -> Dict[str, object]:
    """What the numbers were measured on: CPU model, cores, memory, versions, date (UTC),
    load average, and a digest of the native library file (which kernel build ran)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    try:
        import numpy
        numpy_version = numpy.__version__
    except ImportError:  # pragma: no cover - numpy ships with torch wheels
        numpy_version = None
    try:
        import scipy
        scipy_version = scipy.__version__
    except ImportError:
        scipy_version = None
    return {
        "cpu_model": _cpu_model(),
        "cores_online": os.cpu_count(),
        "cores_usable": usable,
        "memory_total_gib": _round((_meminfo_bytes("MemTotal") or 0) / GIB, 1),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "mkl": bool(torch.backends.mkl.is_available()),
        "numpy_version": numpy_version,
        "scipy_version": scipy_version,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "native_ops": ops.native_available(),
        "native_library_sha256": _native_library_digest(),
        "load_average": _load_average(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


# --------------------------------------------------------------------------- timing

def _round(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def _timed_call(fn: Callable[[], object]) -> Tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def time_round_robin(fns: Dict[str, Callable[[], object]], repeats: int,
                     min_sample_s: float = MIN_SAMPLE_SECONDS
                     ) -> Tuple[Dict[str, List[float]], Dict[str, object]]:
    """Seconds per call of each function, ``repeats`` samples each, taken round-robin.

    Every function is called once as a warm-up (its result is returned so that
    callers can check the methods agree), then each round takes one sample of
    every function in turn.  A sample of a function faster than
    ``min_sample_s`` averages over enough back-to-back calls to last that long.
    """
    outputs: Dict[str, object] = {}
    calls: Dict[str, int] = {}
    for name, fn in fns.items():
        elapsed, outputs[name] = _timed_call(fn)
        if elapsed < min_sample_s:
            elapsed, _ = _timed_call(fn)  # the first call may include one-off setup
        calls[name] = max(1, min(MAX_CALLS_PER_SAMPLE,
                                 math.ceil(min_sample_s / max(elapsed, 1e-9))))
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            count = calls[name]
            start = time.perf_counter()
            for _ in range(count):
                fn()
            samples[name].append((time.perf_counter() - start) / count)
    return samples, outputs


def _summary(samples: Sequence[float]) -> Dict[str, object]:
    median = statistics.median(samples)
    return {
        "median_s": median,
        "samples_s": [float(s) for s in samples],
        # (max - min) / median: how much the machine moved under this method.
        "spread": (max(samples) - min(samples)) / median if median > 0 else 0.0,
    }


# --------------------------------------------------------------------------- machine

def _bandwidth_samples(numel: int, repeats: int) -> Dict[str, List[float]]:
    # The two buffers live only here, so they are freed before the GEMM allocates.
    source = torch.empty(numel, dtype=torch.float32).fill_(1.0)
    target = torch.empty_like(source).fill_(0.0)  # touch the pages before timing
    samples, _ = time_round_robin({
        "read": lambda: source.sum(),
        "copy": lambda: target.copy_(source),
    }, repeats)
    return samples


def measure_machine(repeats: int = 5, buffer_bytes: int = GIB, gemm_size: int = 2048
                    ) -> Dict[str, object]:
    """Read and copy bandwidth (GB/s, 1e9 bytes/s) and fp32 GEMM rate (GFLOP/s).

    read: ``x.sum()`` over ``buffer_bytes`` of float32 (bytes read / time).
    copy: ``y.copy_(x)`` between two such buffers ((bytes read + bytes written) / time).
    gemm: ``torch.mm`` of two ``gemm_size``-square float32 matrices (2 n^3 / time).
    """
    numel = max(1, buffer_bytes // 4)
    samples = _bandwidth_samples(numel, repeats)
    a = torch.randn(gemm_size, gemm_size)
    b = torch.randn(gemm_size, gemm_size)
    gemm, _ = time_round_robin({"gemm": lambda: torch.mm(a, b)}, repeats)
    read = _summary(samples["read"])
    copy = _summary(samples["copy"])
    gemm_summary = _summary(gemm["gemm"])
    buffer = numel * 4
    return {
        "buffer_bytes": buffer,
        "read_gbs": buffer / read["median_s"] / 1e9,
        "copy_gbs": 2 * buffer / copy["median_s"] / 1e9,
        "gemm_size": gemm_size,
        "gemm_gflops": 2 * gemm_size**3 / gemm_summary["median_s"] / 1e9,
        "read": read,
        "copy": copy,
        "gemm": gemm_summary,
    }


# --------------------------------------------------------------------------- sketch

def csr_sketch(buckets: torch.Tensor, signs: torch.Tensor, m: int) -> torch.Tensor:
    """S (m x n) as a torch.sparse CSR tensor, from one bucket (int64 [n]) and sign per row."""
    n = buckets.shape[0]
    order = torch.argsort(buckets, stable=True)
    crow = torch.zeros(m + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(torch.bincount(buckets, minlength=m), 0)
    with warnings.catch_warnings():
        # torch flags sparse CSR as beta on every construction; noise in a benchmark log.
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, order, signs[order], size=(m, n),
                                       check_invariants=False)


def index_add_sketch(xs: Sequence[torch.Tensor], buckets: torch.Tensor, signs: torch.Tensor,
                     m: int) -> Tuple[torch.Tensor, ...]:
    """The naive scatter: for each x, ``zeros(m, d).index_add_(0, buckets, x * signs)``."""
    column_signs = signs.unsqueeze(1)
    return tuple(torch.zeros(m, x.shape[1], dtype=torch.float32)
                 .index_add_(0, buckets, x * column_signs) for x in xs)


def scatter_add_sketch(xs: Sequence[torch.Tensor], buckets: torch.Tensor, signs: torch.Tensor,
                       m: int) -> Tuple[torch.Tensor, ...]:
    """``scatter_add_`` with the bucket index expanded over the columns (a view, no copy)."""
    column_signs = signs.unsqueeze(1)
    return tuple(torch.zeros(m, x.shape[1], dtype=torch.float32)
                 .scatter_add_(0, buckets.unsqueeze(1).expand(-1, x.shape[1]), x * column_signs)
                 for x in xs)


class _Skip(Exception):
    """A baseline that cannot run at this size or on this machine (the message says why)."""


class _SketchCase:
    """One sketch size: the inputs, and each row's bucket and sign from the native op's hash.

    The baselines get the bucket and sign of every row precomputed (untimed) from
    the same hash as the native op, except CSR+build (which times the hash too)
    and SciPy (which draws its own hash).
    """

    def __init__(self, f: torch.Tensor, g: torch.Tensor, m: int, seed: int,
                 dense_max_n: int) -> None:
        self.f, self.g, self.m, self.seed, self.dense_max_n = f, g, m, seed, dense_max_n
        self.n = f.shape[0]
        buckets, signs = ops.sketch_hash(self.n, m, seed)
        self.buckets, self.signs = buckets[:, 0].contiguous(), signs[:, 0].contiguous()


def _index_add(case: _SketchCase) -> Callable[[], object]:
    return lambda: index_add_sketch((case.f, case.g), case.buckets, case.signs, case.m)


def _scatter_add(case: _SketchCase) -> Callable[[], object]:
    return lambda: scatter_add_sketch((case.f, case.g), case.buckets, case.signs, case.m)


def _csr(case: _SketchCase) -> Callable[[], object]:
    matrix = csr_sketch(case.buckets, case.signs, case.m)
    return lambda: (torch.sparse.mm(matrix, case.f), torch.sparse.mm(matrix, case.g))


def _csr_build(case: _SketchCase) -> Callable[[], object]:
    def run():
        buckets, signs = ops.sketch_hash(case.n, case.m, case.seed)
        built = csr_sketch(buckets[:, 0].contiguous(), signs[:, 0].contiguous(), case.m)
        return torch.sparse.mm(built, case.f), torch.sparse.mm(built, case.g)
    return run


def _dense(case: _SketchCase) -> Callable[[], object]:
    if case.n > case.dense_max_n:
        raise _Skip(f"n > {case.dense_max_n}")
    matrix = ops.sketch_matrix(case.n, case.m, case.seed, dtype=torch.float32)
    return lambda: (matrix @ case.f, matrix @ case.g)


def _scipy_cwt(case: _SketchCase) -> Callable[[], object]:
    try:
        from scipy.linalg import clarkson_woodruff_transform
    except ImportError:
        raise _Skip("scipy not installed") from None
    f_numpy = case.f.numpy()

    def run():
        # One input only; the reported time is doubled for the pair.
        clarkson_woodruff_transform(f_numpy, case.m, seed=case.seed)
        return None
    return run


_BASELINE_BUILDERS: Dict[str, Callable[[_SketchCase], Callable[[], object]]] = {
    "index_add": _index_add, "scatter_add": _scatter_add, "csr": _csr,
    "csr_build": _csr_build, "dense": _dense, "scipy_cwt": _scipy_cwt,
}


def _sketch_methods(f: torch.Tensor, g: torch.Tensor, m: int, seed: int,
                    baselines: Iterable[str], dense_max_n: int
                    ) -> Tuple[Dict[str, Callable[[], object]], Dict[str, str]]:
    """The timed callables for one size (each returns (S f, S g) or None), and the
    baselines skipped with the reason."""
    case = _SketchCase(f, g, m, seed, dense_max_n)
    acc_f = torch.zeros(m, f.shape[1], dtype=torch.float32)
    acc_g = torch.zeros(m, g.shape[1], dtype=torch.float32)
    fns: Dict[str, Callable[[], object]] = {
        # Pure read of the same bytes: the floor any sketch of f and g must pay.
        "read_floor": lambda: (f.sum(), g.sum()),
        "ours": lambda: ops.countsketch_pair(f, g, m, seed),
        # Streaming accumulation: repeated calls keep adding, which costs the same.
        "ours_inplace": lambda: ops.countsketch_pair_(acc_f, acc_g, f, g, seed),
    }
    skipped: Dict[str, str] = {}
    for name in _check_baselines(baselines):
        try:
            fns[name] = _BASELINE_BUILDERS[name](case)
        except _Skip as reason:
            skipped[name] = str(reason)
    return fns, skipped


def _check_baselines(baselines: Iterable[str]) -> Tuple[str, ...]:
    if isinstance(baselines, str):
        raise TypeError("baselines must be a sequence of names, not one string")
    wanted = tuple(baselines)
    unknown = [name for name in wanted if name not in SKETCH_BASELINES]
    if unknown:
        raise ValueError(f"unknown baselines {unknown}; choose from {list(SKETCH_BASELINES)}")
    return wanted


def _agrees(reference: object, candidate: object) -> Optional[bool]:
    """Do two (S f, S g) results match (float32 sums in different orders)?"""
    if not isinstance(candidate, tuple) or not isinstance(reference, tuple):
        return None
    for ours, theirs in zip(reference, candidate):
        theirs = theirs.to_dense() if theirs.layout != torch.strided else theirs
        scale = float(ours.abs().max()) if ours.numel() else 0.0
        if not torch.allclose(ours, theirs.to(ours.dtype), rtol=1e-4, atol=1e-4 * scale + 1e-6):
            return False
    return True


def _memory_needed(n: int, d: int) -> int:
    # f and g, plus the largest temporary of a baseline: SciPy upcasts one
    # input to float64 (its S holds int64 signs); index_add_ holds x * sign.
    return 2 * n * d * 4 + n * d * 8


def bench_sketch(n: int, d: int, m: int, *, repeats: int = 3, seed: int = 0,
                 baselines: Iterable[str] = SKETCH_BASELINES,
                 max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES,
                 dense_max_n: int = DEFAULT_DENSE_MAX_N,
                 read_gbs: Optional[float] = None) -> Dict[str, object]:
    """One row of the sketch table: f, g float32 [n, d] sketched to m buckets (sparsity 1).

    Returns medians of every method, the native op's effective bandwidth
    (bytes of f and g read once + outputs written once, over its median time),
    its fraction of ``read_gbs`` (the machine's read bandwidth; None if not
    given) and the speedup ``t_baseline / t_ours`` over every baseline.  Sizes
    whose inputs exceed ``max_input_bytes``, or do not fit in the memory
    available now, come back with ``status`` "skipped (memory)".
    """
    baselines = _check_baselines(baselines)
    input_bytes = 2 * n * d * 4
    output_bytes = 2 * m * d * 4
    row: Dict[str, object] = {"n": n, "d": d, "m": m, "dtype": "float32", "sparsity": 1,
                              "input_bytes": input_bytes, "output_bytes": output_bytes}
    available = _meminfo_bytes("MemAvailable")
    if input_bytes > max_input_bytes:
        row["status"] = "skipped (memory)"
        row["reason"] = (f"f and g take {input_bytes / GIB:.1f} GiB > limit "
                         f"{max_input_bytes / GIB:.1f} GiB")
        return row
    if available is not None and _memory_needed(n, d) + GIB // 2 > available:
        row["status"] = "skipped (memory)"
        row["reason"] = (f"needs about {_memory_needed(n, d) / GIB:.1f} GiB, "
                         f"{available / GIB:.1f} GiB available")
        return row

    generator = torch.Generator().manual_seed(seed)
    f = torch.empty(n, d).uniform_(-1.0, 1.0, generator=generator)
    g = torch.empty(n, d).uniform_(-1.0, 1.0, generator=generator)
    fns, skipped = _sketch_methods(f, g, m, seed, baselines, dense_max_n)
    samples, outputs = time_round_robin(fns, repeats)

    methods: Dict[str, Dict[str, object]] = {}
    for name, values in samples.items():
        if name == "scipy_cwt":
            values = [2 * v for v in values]
        summary = _summary(values)
        if name in SKETCH_BASELINES and name != "scipy_cwt":
            summary["agrees"] = _agrees(outputs["ours"], outputs[name])
        methods[name] = summary
    if "scipy_cwt" in methods:
        methods["scipy_cwt"]["note"] = ("own hash; one input timed, doubled for the pair; "
                                        "its int64 signs upcast the product to float64")
    if "csr_build" in methods:
        methods["csr_build"]["note"] = "hash + CSR construction + two matmuls"
    ours_s = methods["ours"]["median_s"]
    moved = input_bytes + output_bytes
    row.update({
        "status": "ok",
        "methods": methods,
        "skipped_methods": skipped,
        "effective_gbs": moved / ours_s / 1e9,
        "inplace_effective_gbs": moved / methods["ours_inplace"]["median_s"] / 1e9,
        "fraction_of_read": (moved / ours_s / 1e9 / read_gbs) if read_gbs else None,
        "fraction_of_read_floor": methods["read_floor"]["median_s"] / ours_s,
        "speedup": {name: methods[name]["median_s"] / ours_s
                    for name in methods if name in SKETCH_BASELINES},
    })
    return row


# --------------------------------------------------------------------------- gram

def bench_gram(batch: int, m: int, d: int, *, repeats: int = 3, seed: int = 0,
               gemm_gflops: Optional[float] = None) -> Dict[str, object]:
    """One row of the Gram table: a, b float32 [batch, m, d].

    ``ratio`` = t(bmm + mul) / t(hadamard_gram): above 1 means the native op
    is faster.  GFLOP/s count the nominal work of two full Grams and the
    product, ``2 B m^2 (da + db) + B m^2``, for both methods (the native op
    may skip symmetric blocks; the count stays the same so rates compare).
    """
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, m, d, generator=generator)
    b = torch.randn(batch, m, d, generator=generator)
    samples, outputs = time_round_robin({
        "ours": lambda: ops.hadamard_gram(a, b),
        "bmm_mul": lambda: torch.bmm(a, a.transpose(1, 2)) * torch.bmm(b, b.transpose(1, 2)),
    }, repeats)
    ours, bmm = _summary(samples["ours"]), _summary(samples["bmm_mul"])
    reference = outputs["bmm_mul"]
    scale = float(reference.abs().max())
    agrees = bool(torch.allclose(outputs["ours"], reference, rtol=1e-3, atol=1e-5 * scale))
    flops = 2 * batch * m * m * 2 * d + batch * m * m
    ours_gflops = flops / ours["median_s"] / 1e9
    return {
        "B": batch, "m": m, "d": d, "dtype": "float32", "flops": flops,
        "methods": {"ours": ours, "bmm_mul": bmm},
        "agrees": agrees,
        "ratio": bmm["median_s"] / ours["median_s"],
        "ours_gflops": ours_gflops,
        "bmm_gflops": flops / bmm["median_s"] / 1e9,
        "fraction_of_gemm": ours_gflops / gemm_gflops if gemm_gflops else None,
    }


# --------------------------------------------------------------------------- scaling

def bench_scaling(n: int, d: int, m: int, *, repeats: int = 3, seed: int = 0,
                  buffer_bytes: int = GIB) -> Dict[str, object]:
    """Thread scaling of the native sketch and of a plain read, 1 thread vs all.

    Tells whether the sketch is bound by memory (a read scales the same way)
    or by per-thread work (the sketch scales better than the read).
    """
    threads_all = torch.get_num_threads()
    levels = sorted({1, threads_all})
    generator = torch.Generator().manual_seed(seed)
    f = torch.empty(n, d).uniform_(-1.0, 1.0, generator=generator)
    g = torch.empty(n, d).uniform_(-1.0, 1.0, generator=generator)
    buffer = torch.empty(max(1, buffer_bytes // 4), dtype=torch.float32).fill_(1.0)
    moved = 2 * n * d * 4 + 2 * m * d * 4
    rows = []
    try:
        for threads in levels:
            torch.set_num_threads(threads)
            samples, _ = time_round_robin({
                "read": lambda: buffer.sum(),
                "ours": lambda: ops.countsketch_pair(f, g, m, seed),
            }, repeats)
            read, ours = _summary(samples["read"]), _summary(samples["ours"])
            read_gbs = buffer.numel() * 4 / read["median_s"] / 1e9
            ours_gbs = moved / ours["median_s"] / 1e9
            rows.append({"threads": threads, "read_gbs": read_gbs, "ours_gbs": ours_gbs,
                         "fraction_of_read": ours_gbs / read_gbs,
                         "read": read, "ours": ours})
    finally:
        torch.set_num_threads(threads_all)
    return {"n": n, "d": d, "m": m, "rows": rows}


# --------------------------------------------------------------------------- driver

def _check_sizes(sizes, name: str) -> List[Tuple[int, int, int]]:
    out = []
    for size in sizes:
        if (not isinstance(size, (tuple, list)) or len(size) != 3
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                           for v in size)):
            raise ValueError(f"{name} must hold triples of positive ints, got {size!r}")
        out.append(tuple(size))
    return out


class _Progress:
    """A tqdm bar over the benchmark cases, or nothing."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc="bench", unit="case", file=sys.stderr, leave=False)

    def step(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(label)

    def done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _scaling_size(sketch_rows: Sequence[Dict[str, object]]) -> Optional[Tuple[int, int, int]]:
    """The target size when it was measured, else the largest measured size (None: none)."""
    measured = [(r["n"], r["d"], r["m"]) for r in sketch_rows if r["status"] == "ok"]
    if not measured:
        return None
    if TARGET_SKETCH_SIZE in measured:
        return TARGET_SKETCH_SIZE
    return max(measured, key=lambda s: s[0] * s[1])


def _measure(sizes, gram_sizes, baselines, repeats: int, seed: int, scaling: bool,
             max_input_bytes: int, bar: _Progress) -> Dict[str, object]:
    bar.step("machine")
    machine = measure_machine(repeats)
    bar.done()
    sketch_rows = []
    for n, d, m in sizes:
        bar.step(f"sketch n={n} d={d} m={m}")
        sketch_rows.append(bench_sketch(n, d, m, repeats=repeats, seed=seed, baselines=baselines,
                                        max_input_bytes=max_input_bytes,
                                        read_gbs=machine["read_gbs"]))
        bar.done()
    gram_rows = []
    for batch, m, d in gram_sizes:
        bar.step(f"gram B={batch} m={m} d={d}")
        gram_rows.append(bench_gram(batch, m, d, repeats=repeats, seed=seed,
                                    gemm_gflops=machine["gemm_gflops"]))
        bar.done()
    scaling_result = None
    size = _scaling_size(sketch_rows) if scaling else None
    if size is not None:
        bar.step(f"scaling n={size[0]} d={size[1]} m={size[2]}")
        scaling_result = bench_scaling(*size, repeats=repeats, seed=seed)
        bar.done()
    return {"machine": machine, "sketch": sketch_rows, "gram": gram_rows,
            "scaling": scaling_result}


def run_benchmarks(sizes: Optional[Sequence[Tuple[int, int, int]]] = None, quick: bool = True,
                   repeats: Optional[int] = None, progress: bool = False, *,
                   gram_sizes: Optional[Sequence[Tuple[int, int, int]]] = None,
                   baselines: Optional[Iterable[str]] = None, seed: int = 0,
                   scaling: bool = True,
                   max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES) -> Dict[str, object]:
    """Run the machine, sketch, Gram and thread-scaling benchmarks; return a JSON-able dict.

    sizes: (n, d, m) triples for the sketch (default: the quick or full set).
    quick: the small default set (one sketch size, two Gram sizes, fewer
        baselines; well under a minute on two cores) instead of the full grid.
    repeats: timed rounds per method after the warm-up (>= 1, default 3);
        medians are reported.
    progress: show a progress bar on stderr.
    gram_sizes: (B, m, d) triples for hadamard_gram.
    baselines: names from ``SKETCH_BASELINES``.
    scaling: also time the sketch and a read at 1 thread vs all threads, at
        the target size when it is in ``sizes``, else the largest measured size.
    """
    if repeats is None:
        repeats = 3
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    sizes = _check_sizes(sizes if sizes is not None else
                         (QUICK_SKETCH_SIZES if quick else FULL_SKETCH_SIZES), "sizes")
    gram_sizes = _check_sizes(gram_sizes if gram_sizes is not None else
                              (QUICK_GRAM_SIZES if quick else FULL_GRAM_SIZES), "gram_sizes")
    baselines = _check_baselines(baselines if baselines is not None else
                                 (QUICK_BASELINES if quick else SKETCH_BASELINES))
    host = host_info()
    started = time.perf_counter()
    bar = _Progress(1 + len(sizes) + len(gram_sizes) + (1 if scaling and sizes else 0), progress)
    try:
        measured = _measure(sizes, gram_sizes, baselines, repeats, seed, scaling,
                            max_input_bytes, bar)
    finally:
        bar.close()
    return {
        "host": host,
        "config": {"quick": quick, "repeats": repeats, "seed": seed,
                   "baselines": list(baselines), "sizes": [list(s) for s in sizes],
                   "gram_sizes": [list(s) for s in gram_sizes],
                   "max_input_bytes": max_input_bytes, "dtype": "float32", "sparsity": 1},
        **measured,
        "elapsed_s": time.perf_counter() - started,
        # Other work on the machine shows up here; compare with host.load_average.
        "load_average_after": _load_average(),
    }


# --------------------------------------------------------------------------- targets

def evaluate_targets(results: Dict[str, object]) -> List[Dict[str, object]]:
    """The spec's performance targets, judged from ``results`` alone.

    Each entry has ``target`` (text), ``measured`` (text) and ``met``
    (True / False, or None when this run did not measure it).
    """
    n, d, m = TARGET_SKETCH_SIZE
    where = f"n={count_text(n)}, d={d}, m={m}"
    row = next((r for r in results.get("sketch", [])
                if (r["n"], r["d"], r["m"]) == TARGET_SKETCH_SIZE), None)
    targets = []
    bandwidth = {"target": f"countsketch_pair at {where} reaches >= "
                           f"{TARGET_READ_FRACTION:.0%} of the measured read bandwidth",
                 "measured": "not measured in this run", "met": None}
    naive = {"target": f"countsketch_pair at {where} is >= {TARGET_NAIVE_SPEEDUP:g}x faster "
                       f"than the naive index_add_ scatter",
             "measured": "not measured in this run", "met": None}
    if row is not None and row["status"] == "ok":
        fraction = row["fraction_of_read"]
        if fraction is not None:
            bandwidth["measured"] = (
                f"{fraction:.0%} ({row['effective_gbs']:.1f} GB/s of "
                f"{results['machine']['read_gbs']:.1f} GB/s read); same-row read of f and g: "
                f"{row['fraction_of_read_floor']:.0%}")
            bandwidth["met"] = fraction >= TARGET_READ_FRACTION
        speedup = row["speedup"].get("index_add")
        if speedup is not None:
            naive["measured"] = f"{speedup:.2f}x"
            naive["met"] = speedup >= TARGET_NAIVE_SPEEDUP
    elif row is not None:
        bandwidth["measured"] = naive["measured"] = row["status"]
    targets += [bandwidth, naive]

    gram = {"target": "hadamard_gram is never slower than torch.bmm + mul "
                      "(ratio t_bmm / t_ours >= 1 at every measured size)",
            "measured": "not measured in this run", "met": None}
    gram_rows = results.get("gram", [])
    if gram_rows:
        worst = min(gram_rows, key=lambda r: r["ratio"])
        slower = [r for r in gram_rows if r["ratio"] < 1.0]
        gram["measured"] = (f"lowest ratio {worst['ratio']:.3f} at B={worst['B']}, "
                            f"m={worst['m']}, d={worst['d']} (sample spread "
                            f"{_spread(worst['methods']['ours'])} / "
                            f"{_spread(worst['methods']['bmm_mul'])}); slower at {len(slower)} "
                            f"of {len(gram_rows)} sizes")
        gram["met"] = not slower
    targets.append(gram)
    return targets


# --------------------------------------------------------------------------- formatting

def count_text(value: int) -> str:
    """Powers of ten from 1000 up as ``10^k``, other counts as plain digits."""
    exponent = round(math.log10(value)) if value > 0 else 0
    return f"10^{exponent}" if value == 10**exponent and exponent >= 3 else str(value)


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _rate(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _spread(summary: Dict[str, object]) -> str:
    return f"±{summary['spread'] / 2:.0%}"


def _speedup_cell(row: Dict[str, object], name: str) -> str:
    if name in row["speedup"]:
        cell = f"{row['speedup'][name]:.2f}x"
        if row["methods"][name].get("agrees") is False:
            cell += " (!)"
        return cell
    return "—"


def load_text(load: Optional[Sequence[float]]) -> str:
    """A 1/5/15-minute load average as ``a/b/c``."""
    return "/".join(f"{v:.1f}" for v in load) if load else "unknown"


def format_machine(results: Dict[str, object]) -> str:
    machine, host = results["machine"], results["host"]
    return (f"{host['cpu_model']}, {host['cores_usable']} usable cores, "
            f"torch {host['torch_version']} ({host['torch_threads']} threads), "
            f"native ops: {'yes' if host['native_ops'] else 'NO (pure-PyTorch reference)'}; "
            f"load average {load_text(host.get('load_average'))} at the start, "
            f"{load_text(results.get('load_average_after'))} at the end\n\n"
            f"Measured in this run: read {machine['read_gbs']:.1f} GB/s "
            f"(sum of {machine['buffer_bytes'] / GIB:.0f} GiB), "
            f"copy {machine['copy_gbs']:.1f} GB/s (bytes read + written), "
            f"fp32 GEMM {machine['gemm_gflops']:.0f} GFLOP/s (torch.mm {machine['gemm_size']}^3).")


def format_sketch_table(results: Dict[str, object]) -> str:
    names = [name for name in SKETCH_BASELINES if name in results["config"]["baselines"]]
    header = (["n", "d", "m", "ours ms", "spread", "GB/s", "of read BW", "of read floor",
               "in-place of read BW"] + ["vs " + BASELINE_LABELS[name] for name in names])
    read_gbs = results["machine"]["read_gbs"]
    rows = []
    for row in results["sketch"]:
        head = [count_text(row["n"]), str(row["d"]), str(row["m"])]
        if row["status"] != "ok":
            rows.append(head + [row["status"]] + [""] * (len(header) - 4))
            continue
        rows.append(head + [
            _ms(row["methods"]["ours"]["median_s"]),
            _spread(row["methods"]["ours"]),
            f"{row['effective_gbs']:.1f}",
            f"{row['fraction_of_read']:.0%}" if row["fraction_of_read"] is not None else "—",
            f"{row['fraction_of_read_floor']:.0%}",
            f"{row['inplace_effective_gbs'] / read_gbs:.0%}",
        ] + [_speedup_cell(row, name) for name in names])
    return _markdown_table(header, rows)


def format_gram_table(results: Dict[str, object]) -> str:
    header = ["B", "m", "d", "ours ms", "bmm+mul ms", "spread", "ratio (bmm/ours)", "ours GFLOP/s",
              "bmm+mul GFLOP/s", "ours of GEMM rate"]
    rows = []
    for row in results["gram"]:
        fraction = row["fraction_of_gemm"]
        rows.append([str(row["B"]), str(row["m"]), str(row["d"]),
                     _ms(row["methods"]["ours"]["median_s"]),
                     _ms(row["methods"]["bmm_mul"]["median_s"]),
                     f"{_spread(row['methods']['ours'])} / {_spread(row['methods']['bmm_mul'])}",
                     f"{row['ratio']:.2f}" + ("" if row["agrees"] else " (!)"),
                     _rate(row["ours_gflops"]), _rate(row["bmm_gflops"]),
                     f"{fraction:.0%}" if fraction is not None else "—"])
    return _markdown_table(header, rows)


def format_scaling_table(results: Dict[str, object]) -> str:
    scaling = results.get("scaling")
    if not scaling:
        return ""
    rows = [[str(r["threads"]), f"{r['read_gbs']:.1f}", f"{r['ours_gbs']:.1f}",
             f"{r['fraction_of_read']:.0%}"] for r in scaling["rows"]]
    title = (f"Thread scaling at n={count_text(scaling['n'])}, d={scaling['d']}, "
             f"m={scaling['m']}:\n\n")
    return title + _markdown_table(["threads", "read GB/s", "ours GB/s", "ours of read"], rows)


def format_targets(targets: Sequence[Dict[str, object]]) -> str:
    lines = []
    for target in targets:
        verdict = {True: "MET", False: "NOT MET", None: "NOT MEASURED"}[target["met"]]
        lines.append(f"- **{verdict}** — {target['target']}: {target['measured']}.")
    return "\n".join(lines)


SKETCH_NOTES = (
    "ours = `countsketch_pair` (f and g float32 [n, d], one fused pass, sparsity 1); "
    "GB/s = (bytes of f and g read once + outputs written once) / median time; "
    "'of read BW' divides by the machine's read bandwidth measured at the start of the run; "
    "'of read floor' = t(f.sum() + g.sum()) / t(ours) timed beside it (same bytes, same moment); "
    "'in-place' = `countsketch_pair_` into existing accumulators; "
    "'vs X' = t(X) / t(ours), above 1 means ours is faster; "
    "spread = ±half the (max - min) / median of ours' samples, a gauge of machine noise. "
    "Baselines get each row's bucket and sign precomputed from the same hash "
    "(untimed), except CSR+build (hash, CSR construction and matmuls all timed) and "
    "scipy CWT, which draws its own hash: one input is timed and doubled for the pair. "
    "(!) marks a baseline whose result disagreed with ours; — = not run at this size. "
    "Inputs that fit in cache (small n x d) can exceed the DRAM read bandwidth.")

GRAM_NOTES = (
    "ours = `hadamard_gram(a, b)` with a, b float32 [B, m, d]; baseline = "
    "`torch.bmm(a, a^T) * torch.bmm(b, b^T)`; ratio above 1 means ours is faster; "
    "spread = ±half the (max - min) / median of the samples (ours / bmm+mul). "
    "GFLOP/s count 2 B m^2 (da + db) + B m^2 for both methods; 'of GEMM rate' divides by "
    "the fp32 torch.mm rate measured in this run.")


def format_table(results: Dict[str, object]) -> str:
    """Markdown text of a results dict: machine, sketch, Gram and scaling tables."""
    parts = [format_machine(results),
             "### CountSketch pair\n\n" + format_sketch_table(results) + "\n\n" + SKETCH_NOTES,
             "### Hadamard Gram\n\n" + format_gram_table(results) + "\n\n" + GRAM_NOTES]
    scaling = format_scaling_table(results)
    if scaling:
        parts.append("### Threads\n\n" + scaling)
    return "\n\n".join(parts) + "\n"


# --------------------------------------------------------------------------- command line

def build_parser(prog: str = "python benchmarks/harness.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Benchmark the native ops against PyTorch/SciPy baselines and the "
                    "machine's measured bandwidth and GEMM rate, all in one run.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="small set (default): one sketch size, two Gram sizes")
    mode.add_argument("--full", action="store_true",
                      help="n in {1e4,1e5,1e6} x d in {64,512,2048} x m in {128,512}; "
                           "Gram B in {1,8,64} x m in {128,512} (minutes)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds per method after a warm-up (default 3)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads to use (default: torch's setting)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="also write the tables as Markdown")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def write_json(results: Dict[str, object], path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=1, sort_keys=False)
        handle.write("\n")


def run_from_args(args) -> Optional[Dict[str, object]]:
    """Check ``--repeats``/``--threads`` and run the benchmarks they describe; None (after
    printing the error) when an argument is invalid."""
    if args.repeats is not None and args.repeats < 1:
        print("error: --repeats must be >= 1", file=sys.stderr)
        return None
    if args.threads is not None:
        if args.threads < 1:
            print("error: --threads must be >= 1", file=sys.stderr)
            return None
        torch.set_num_threads(args.threads)
    return run_benchmarks(quick=not args.full, repeats=args.repeats,
                          progress=not args.no_progress)


def main(argv: Optional[Sequence[str]] = None, prog: str = "python benchmarks/harness.py") -> int:
    """Command line: run the benchmarks, print the tables and targets; returns the exit code."""
    args = build_parser(prog).parse_args(argv)
    try:
        # Found now, not after minutes of measuring.
        for option, path in (("--json", args.json), ("--markdown", args.markdown)):
            if path:
                check_writable_file(path, option)
    except UsageError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    results = run_from_args(args)
    if results is None:
        return 2
    targets = evaluate_targets(results)
    results["targets"] = targets
    text = format_table(results) + "\n### Targets\n\n" + format_targets(targets) + "\n"
    print(text)
    if args.json:
        write_json(results, args.json)
    if args.markdown:
        directory = os.path.dirname(os.path.abspath(args.markdown))
        os.makedirs(directory, exist_ok=True)
        with open(args.markdown, "w", encoding="utf-8") as handle:
            handle.write(text)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
