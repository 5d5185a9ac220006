"""GPU benchmark of the nnsim_fast CUDA ops, with baselines measured in the same run.

Measured (CUDA events, median of a few repetitions after a warm-up):

* device copy bandwidth (a large ``copy_``; bytes read + bytes written) and
  GEMM rate (large float32 and bfloat16 matmuls);
* the fused CountSketch pair (atomic and deterministic paths) against
  ``index_add_`` with the signs applied (run for f and for g), ``scatter_add_``,
  a ``torch.sparse`` CSR matmul (with and without building S) and a dense +-1
  GEMM, over n, d, m and dtype;
* ``hadamard_gram`` (fused kernel and cuBLAS route) against ``torch.bmm`` + mul
  and against the measured GEMM rate.

The baselines get the buckets and signs precomputed (the fused kernel hashes
on the fly), so their times are lower bounds.  ``--sanitize`` instead runs
every op once on small inputs, for compute-sanitizer.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from typing import Callable, Dict, List, Optional

import torch

SKETCH_N = (100_000, 1_000_000, 4_000_000)
SKETCH_D = (64, 512, 2048)
SKETCH_M = (16, 128, 512, 4096)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GRAM_CASES = [(b, m, d) for b in (1, 8) for m in (128, 512, 2048, 4096) for d in (64, 512)]
DENSE_S_MAX_BYTES = 8 << 30


# --------------------------------------------------------------------------- timing

def time_cuda(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    """Median wall time of fn on the GPU in milliseconds (CUDA events)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def reps_for(nbytes: int) -> int:
    return 5 if nbytes < (1 << 30) else 3


def free_bytes() -> int:
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


# --------------------------------------------------------------------------- machine rates

def copy_bandwidth() -> Dict[str, float]:
    n = 1 << 28  # 1 GiB of float32
    src = torch.empty(n, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = time_cuda(lambda: dst.copy_(src), reps=10, warmup=3)
    nbytes = 2 * src.numel() * src.element_size()
    return {"bytes": nbytes, "ms": ms, "GBps": nbytes / ms / 1e6}


def gemm_rates() -> Dict[str, Dict[str, float]]:
    out = {}
    for name, dtype, size in (("fp32", torch.float32, 8192), ("bf16", torch.bfloat16, 8192)):
        a = torch.randn(size, size, device="cuda", dtype=dtype)
        b = torch.randn(size, size, device="cuda", dtype=dtype)
        ms = time_cuda(lambda: torch.mm(a, b), reps=5, warmup=2)
        out[name] = {"size": size, "ms": ms, "TFLOPs": 2 * size ** 3 / ms / 1e9,
                     "allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32)}
    return out


# --------------------------------------------------------------------------- sketch

def sketch_case(ops, f: torch.Tensor, g: torch.Tensor, m: int, copy_GBps: float,
                dtype_name: str) -> Dict:
    n, d = f.shape
    elem = f.element_size()
    acc = torch.float32
    in_bytes = 2 * n * d * elem
    floor_bytes = in_bytes + 2 * m * d * 4
    reps = reps_for(in_bytes)
    row: Dict[str, object] = {"n": n, "d": d, "m": m, "dtype": dtype_name,
                              "floor_bytes": floor_bytes, "ms": {}, "skipped": {}, "errors": {}}
    times = row["ms"]

    def run(name: str, fn: Callable[[], object], extra_bytes: int = 0) -> None:
        if extra_bytes and extra_bytes > 0.8 * free_bytes():
            row["skipped"][name] = f"needs {extra_bytes / 2**30:.1f} GiB of scratch"
            return
        try:
            times[name] = time_cuda(fn, reps)
        except Exception as error:  # keep going: one failed method must not end the run
            row["errors"][name] = f"{type(error).__name__}: {error}"[:300]
        finally:
            torch.cuda.empty_cache()

    run("fused_atomic", lambda: ops.countsketch_pair(f, g, m, 7, deterministic=False))
    run("fused_deterministic", lambda: ops.countsketch_pair(f, g, m, 7, deterministic=True),
        extra_bytes=3 * n * 8 + 2 * m * d * 4 * 4)

    buckets, signs = ops.sketch_hash(n, m, 7, device="cuda")
    bucket, sign = buckets[:, 0].contiguous(), signs[:, 0].contiguous()
    temp = n * d * 4  # one float32 copy of an input, the baselines' scratch

    def index_add():
        for x in (f, g):
            torch.zeros(m, d, dtype=acc, device="cuda").index_add_(0, bucket, x.to(acc) * sign[:, None])

    def scatter_add():
        index = bucket[:, None].expand(n, d)
        for x in (f, g):
            torch.zeros(m, d, dtype=acc, device="cuda").scatter_add_(0, index, x.to(acc) * sign[:, None])

    run("index_add", index_add, extra_bytes=2 * temp)
    run("scatter_add", scatter_add, extra_bytes=2 * temp)

    def build_csr():
        order = torch.argsort(bucket, stable=True)
        counts = torch.bincount(bucket, minlength=m)
        crow = torch.zeros(m + 1, dtype=torch.int64, device="cuda")
        crow[1:] = torch.cumsum(counts, 0)
        return torch.sparse_csr_tensor(crow, order, sign[order].to(acc), size=(m, n))

    try:
        S_csr = build_csr()
        run("csr_build", build_csr)
        run("csr_matmul", lambda: [S_csr @ x.to(acc) for x in (f, g)], extra_bytes=2 * temp)
        if "csr_build" in times and "csr_matmul" in times:
            times["csr_build_and_matmul"] = times["csr_build"] + times["csr_matmul"]
    except Exception as error:
        row["errors"]["csr"] = f"{type(error).__name__}: {error}"[:300]

    dense_bytes = m * n * elem
    if dense_bytes <= DENSE_S_MAX_BYTES and dense_bytes < 0.5 * free_bytes():
        S = torch.zeros(m, n, dtype=f.dtype, device="cuda")
        S[bucket, torch.arange(n, device="cuda")] = sign.to(f.dtype)
        run("dense_gemm", lambda: [S @ x for x in (f, g)])
    else:
        row["skipped"]["dense_gemm"] = f"dense S would take {dense_bytes / 2**30:.1f} GiB"
    if "fused_atomic" in times:
        row["fused_GBps"] = floor_bytes / times["fused_atomic"] / 1e6
        row["fused_fraction_of_copy"] = row["fused_GBps"] / copy_GBps
    if "fused_deterministic" in times:
        row["deterministic_fraction_of_copy"] = floor_bytes / times["fused_deterministic"] / 1e6 / copy_GBps
    if "fused_atomic" in times and "index_add" in times:
        row["speedup_vs_index_add"] = times["index_add"] / times["fused_atomic"]
    if "fused_atomic" in times and "scatter_add" in times:
        row["speedup_vs_scatter_add"] = times["scatter_add"] / times["fused_atomic"]
    return row


def sketch_suite(ops, copy_GBps: float, deadline: float, results: Dict) -> None:
    rows: List[Dict] = results.setdefault("sketch", [])
    total = torch.cuda.get_device_properties(0).total_memory
    for n in SKETCH_N:
        for d in SKETCH_D:
            for dname, dtype in DTYPES.items():
                in_bytes = 2 * n * d * torch.tensor([], dtype=dtype).element_size()
                if in_bytes > 0.4 * total:
                    for m in SKETCH_M:
                        rows.append({"n": n, "d": d, "m": m, "dtype": dname,
                                     "skipped_case": "inputs exceed 40% of device memory"})
                    continue
                if time.time() > deadline:
                    for m in SKETCH_M:
                        rows.append({"n": n, "d": d, "m": m, "dtype": dname,
                                     "skipped_case": "time budget spent"})
                    continue
                gen = torch.Generator(device="cuda").manual_seed(n + d)
                f = torch.randn(n, d, generator=gen, device="cuda", dtype=dtype)
                g = torch.randn(n, d, generator=gen, device="cuda", dtype=dtype)
                for m in SKETCH_M:
                    if time.time() > deadline:
                        rows.append({"n": n, "d": d, "m": m, "dtype": dname,
                                     "skipped_case": "time budget spent"})
                        continue
                    try:
                        rows.append(sketch_case(ops, f, g, m, copy_GBps, dname))
                    except Exception as error:
                        rows.append({"n": n, "d": d, "m": m, "dtype": dname,
                                     "error": f"{type(error).__name__}: {error}"[:300]})
                del f, g
                torch.cuda.empty_cache()


# --------------------------------------------------------------------------- gram

def gram_suite(ops, gemm: Dict, deadline: float, results: Dict) -> None:
    rows: List[Dict] = results.setdefault("gram", [])
    for dname, dtype in DTYPES.items():
        for batch, m, d in GRAM_CASES:
            row: Dict[str, object] = {"batch": batch, "m": m, "da": d, "db": d, "dtype": dname,
                                      "ms": {}, "errors": {}}
            if time.time() > deadline:
                row["skipped_case"] = "time budget spent"
                rows.append(row)
                continue
            a = torch.randn(batch, m, d, device="cuda", dtype=dtype)
            b = torch.randn(batch, m, d, device="cuda", dtype=dtype)
            flops = 2.0 * batch * m * m * 2 * d  # both Grams in full, as bmm computes them
            reps = 5

            def timed(name: str, fn: Callable[[], object]) -> None:
                try:
                    row["ms"][name] = time_cuda(fn, reps)
                except Exception as error:
                    row["errors"][name] = f"{type(error).__name__}: {error}"[:300]

            for route in ("fused", "bmm"):
                os.environ["NNSIM_FAST_GRAM"] = route
                timed(route, lambda: ops.hadamard_gram(a, b))
            os.environ.pop("NNSIM_FAST_GRAM", None)
            timed("default_route", lambda: ops.hadamard_gram(a, b))
            a32, b32 = a.float(), b.float()
            timed("torch_bmm_mul_fp32", lambda: torch.bmm(a32, a32.mT) * torch.bmm(b32, b32.mT))
            if dtype != torch.float32:
                timed("torch_bmm_mul_native", lambda: torch.bmm(a, a.mT) * torch.bmm(b, b.mT))
            rate = gemm.get(dname, {}).get("TFLOPs")
            for name, ms in row["ms"].items():
                row.setdefault("TFLOPs", {})[name] = flops / ms / 1e9
                if rate:
                    row.setdefault("fraction_of_gemm", {})[name] = flops / ms / 1e9 / rate
            if "fused" in row["ms"] and "torch_bmm_mul_fp32" in row["ms"]:
                row["fused_speedup_vs_bmm_mul"] = row["ms"]["torch_bmm_mul_fp32"] / row["ms"]["fused"]
            rows.append(row)


# --------------------------------------------------------------------------- sanitize

def sanitize(ops) -> None:
    """Every op once on small inputs: for compute-sanitizer memcheck/racecheck."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        f = torch.randn(700, 37, generator=gen, device="cuda", dtype=dtype)
        g = torch.randn(700, 16, generator=gen, device="cuda", dtype=dtype)
        for m, sparsity in ((16, 4), (600, 1), (300, 3)):  # shared tile, global, 2-pass sort
            for det in (False, True):
                ops.countsketch_pair(f, g, m, 1, 5, sparsity, deterministic=det)
                ops.countsketch(f[:, 1::2], m, 1, 5, sparsity, deterministic=det)
        rows = torch.randperm(2000, device="cuda")[:700]
        ops.countsketch_pair(f, g, 64, 2, 0, 2, rows=rows, deterministic=True)
        gy = torch.randn(32, 37, generator=gen, device="cuda", dtype=dtype)
        torch.ops.nnsim_fast.countsketch_backward(gy, rows, 700, 3, 1, 4)
        a = torch.randn(2, 70, 19, generator=gen, device="cuda", dtype=dtype)
        b = torch.randn(2, 70, 5, generator=gen, device="cuda", dtype=dtype)
        os.environ["NNSIM_FAST_GRAM"] = "fused"
        ops.hadamard_gram(a, b)
        os.environ.pop("NNSIM_FAST_GRAM", None)
    ops.sketch_hash(1000, 64, 9, 3, 4, device="cuda")
    torch.cuda.synchronize()
    print("sanitize cases ran")


# --------------------------------------------------------------------------- report

def read_stages(path: Optional[str]) -> Dict[str, Dict[str, object]]:
    stages: Dict[str, Dict[str, object]] = {}
    if path and os.path.exists(path):
        with open(path) as handle:
            for line in handle:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= 3:
                    stages[parts[0]] = {"status": parts[1], "seconds": float(parts[2]),
                                        "detail": parts[3] if len(parts) > 3 else ""}
    return stages


def print_table(results: Dict) -> None:
    print()
    copy = results.get("copy_bandwidth", {}).get("GBps")
    gemm = results.get("gemm", {})
    print(f"device: {results['machine'].get('gpu')}; copy {copy and round(copy)} GB/s; "
          f"GEMM fp32 {gemm.get('fp32', {}).get('TFLOPs', float('nan')):.1f} TF/s, "
          f"bf16 {gemm.get('bf16', {}).get('TFLOPs', float('nan')):.1f} TF/s")
    print("countsketch_pair (largest n that fit per dtype, d, m); times in ms")
    print(f"{'dtype':>5} {'n':>8} {'d':>5} {'m':>5} {'atomic':>8} {'determ':>8} {'%copy':>6} "
          f"{'idx_add':>8} {'x':>6} {'csr':>8} {'dense':>8}")
    best: Dict[tuple, Dict] = {}
    for row in results.get("sketch", []):
        if "ms" in row and row["ms"]:
            key = (row["dtype"], row["d"], row["m"])
            if key not in best or row["n"] > best[key]["n"]:
                best[key] = row

    def fmt(value, width=8, digits=2):
        return f"{value:>{width}.{digits}f}" if isinstance(value, (int, float)) else f"{'-':>{width}}"

    for key in sorted(best):
        row = best[key]
        ms = row["ms"]
        frac = row.get("fused_fraction_of_copy")
        print(f"{row['dtype']:>5} {row['n']:>8} {row['d']:>5} {row['m']:>5} "
              f"{fmt(ms.get('fused_atomic'))} {fmt(ms.get('fused_deterministic'))} "
              f"{fmt(100 * frac if frac else None, 6, 0)} {fmt(ms.get('index_add'))} "
              f"{fmt(row.get('speedup_vs_index_add'), 6, 1)} {fmt(ms.get('csr_matmul'))} "
              f"{fmt(ms.get('dense_gemm'))}")
    print("hadamard_gram; times in ms (fraction of the measured GEMM rate)")
    print(f"{'dtype':>5} {'B':>2} {'m':>5} {'d':>4} {'fused':>14} {'cublas':>14} {'bmm+mul':>14}")
    for row in results.get("gram", []):
        if not row.get("ms"):
            continue
        ms, frac = row["ms"], row.get("fraction_of_gemm", {})

        def cell(name):
            if name not in ms:
                return f"{'-':>14}"
            return f"{ms[name]:>7.3f} ({frac.get(name, float('nan')):.2f})"

        print(f"{row['dtype']:>5} {row['batch']:>2} {row['m']:>5} {row['da']:>4} "
              f"{cell('fused')} {cell('bmm')} {cell('torch_bmm_mul_fp32')}")
    for name, stage in results.get("stages", {}).items():
        print(f"stage {name}: {stage['status']} ({stage['seconds']:.0f} s) {stage['detail']}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON output path")
    parser.add_argument("--stages", help="tab-separated stage log from gpu_check.sh")
    parser.add_argument("--budget-s", type=float, default=270.0,
                        help="stop starting new cases after this many seconds")
    parser.add_argument("--sanitize", action="store_true", help="run the small sanitizer cases")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA device visible to torch", file=sys.stderr)
        return 2
    from nnsim_fast import ops
    warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
    if args.sanitize:
        sanitize(ops)
        return 0

    started = time.time()
    deadline = started + args.budget_s
    props = torch.cuda.get_device_properties(0)
    results: Dict[str, object] = {
        "machine": {"gpu": props.name, "sms": props.multi_processor_count,
                    "memory_GiB": round(props.total_memory / 2**30, 1),
                    "torch": torch.__version__, "cuda": torch.version.cuda,
                    "python": platform.python_version(), "host": platform.node(),
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "command": "bash benchmarks/gpu_check.sh"},
        "native_cuda_ops": bool(getattr(ops, "cuda_ops_available", lambda: False)()),
        "stages": read_stages(args.stages),
        "errors": [],
    }
    out_path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                        "gpu_results.json")

    def save() -> None:
        os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
        with open(out_path, "w") as handle:
            json.dump(results, handle, indent=1, default=str)

    for name, step in (("copy_bandwidth", copy_bandwidth), ("gemm", gemm_rates)):
        try:
            results[name] = step()
        except Exception as error:
            results["errors"].append(f"{name}: {type(error).__name__}: {error}")
    save()
    copy_GBps = results.get("copy_bandwidth", {}).get("GBps", float("nan"))
    if not results["native_cuda_ops"]:
        results["errors"].append("the CUDA kernels of nnsim_fast are not built; "
                                 "only baselines could run")
    for name, suite in (("sketch", lambda: sketch_suite(ops, copy_GBps, deadline, results)),
                        ("gram", lambda: gram_suite(ops, results.get("gemm", {}),
                                                    deadline + 30, results))):
        try:
            suite()
        except Exception:
            results["errors"].append(f"{name}: {traceback.format_exc()[-600:]}")
        save()
    results["bench_seconds"] = round(time.time() - started, 1)
    save()
    print_table(results)
    print(f"results written to {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
