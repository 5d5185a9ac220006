"""GPU benchmark of the nnsim_fast CUDA ops against baselines measured in the same run.

``python benchmarks/gpu_bench.py [--out FILE] [--budget-s S] [--quick] [--sanitize]``

Cases run in priority order; the issue's targets come first, extras only while
the time budget lasts.  The JSON file is rewritten (atomically) after every
case, so a run that is killed keeps every row it finished.  Sizes of the
targets (float32 unless stated):

* sketch: n = 4e6 rows, d = 512 columns of f and of g, m = 512 buckets.  The
  fused pair (atomic path) against the device copy bandwidth, against the naive
  path (sign multiply + ``index_add_`` for f and for g, buckets and signs
  precomputed, so a lower bound), and the deterministic path against the
  atomic one;
* ``hadamard_gram`` at B = 8, m = 512 against ``torch.bmm`` + mul;
* ``sketch_model`` on a ResNet-18-shaped network (CIFAR stem, 32x32 inputs)
  against the forward + backward passes it rides on.

Times are medians of CUDA-event timings after a warm-up (wall clock with a
synchronisation for ``sketch_model``, which includes host work); every row
states its sizes, bytes and ratios.  ``--sanitize`` instead runs every CUDA op
once on small inputs, for compute-sanitizer.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import statistics
import sys
import time
import traceback
import warnings
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

TARGET_N, TARGET_D, TARGET_M = 4_000_000, 512, 512
GRAM_BATCH, GRAM_M = 8, 512
SEED = 7
# Below this many seconds left, a case is not started (the shell stage has a
# hard limit; what is done by then must already be on disk).
CASE_RESERVE_S = 5.0


# --------------------------------------------------------------------------- timing

def time_cuda(fn: Callable[[], object], reps: int = 5, warmup: int = 1) -> Dict[str, object]:
    """Median and every sample (ms) of fn timed with CUDA events on the current stream."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop))
    return {"median_ms": statistics.median(samples), "samples_ms": [round(t, 4) for t in samples]}


def time_wall(fn: Callable[[], object], reps: int = 3, warmup: int = 1) -> Dict[str, object]:
    """Like time_cuda, with the host's clock: for work that includes host-side logic."""
    for _ in range(warmup):
        fn()
        torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append(1e3 * (time.perf_counter() - start))
    return {"median_ms": statistics.median(samples), "samples_ms": [round(t, 3) for t in samples]}


def median_ms(row: Dict, name: str) -> Optional[float]:
    entry = row.get("times", {}).get(name)
    return entry["median_ms"] if entry else None


def ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


# --------------------------------------------------------------------------- results file

class Results:
    """The JSON document, rewritten after every case."""

    def __init__(self, path: str, budget_s: float):
        self.path = path
        self.started = time.time()
        self.deadline = self.started + budget_s
        self.data: Dict[str, object] = {
            "schema": 1, "status": "running", "machine": machine_info(),
            "config": {"budget_s": budget_s, "target_sizes": {
                "sketch": {"n": TARGET_N, "d": TARGET_D, "m": TARGET_M, "dtype": "float32"},
                "gram": {"batch": GRAM_BATCH, "m": GRAM_M}}},
            "copy": None, "rows": [], "targets": {}, "skipped": [], "errors": [],
        }

    def left_s(self) -> float:
        return self.deadline - time.time()

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.time() - self.started, 1)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        scratch = self.path + ".part"
        with open(scratch, "w") as handle:
            json.dump(self.data, handle, indent=1, default=str)
        os.replace(scratch, self.path)   # a kill mid-write leaves the previous version

    def run_case(self, name: str, case: Callable[[], Optional[Dict]]) -> Optional[Dict]:
        """Runs one case unless the budget is spent; stores its row or its error; saves."""
        if self.left_s() < CASE_RESERVE_S:
            self.data["skipped"].append({"case": name, "reason": "time budget spent"})
            print(f"gpu_bench: skip {name} (time budget spent)", flush=True)
            self.save()
            return None
        started = time.time()
        print(f"gpu_bench: {name} ...", flush=True)
        row = None
        try:
            row = case()
            if row is not None:
                row.setdefault("case", name)
                row["seconds"] = round(time.time() - started, 2)
                self.data["rows"].append(row)
        except Exception as error:  # one failed case must not end the run
            self.data["errors"].append({"case": name, "error": f"{type(error).__name__}: {error}",
                                        "traceback": traceback.format_exc()[-1500:]})
            print(f"gpu_bench: {name} FAILED: {type(error).__name__}: {error}", flush=True)
        finally:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            self.save()
        return row

    def target(self, name: str, value: Optional[float], goal: str, met: Optional[bool],
               detail: str) -> None:
        self.data["targets"][name] = {"value": value, "goal": goal, "met": met, "detail": detail}


def machine_info() -> Dict[str, object]:
    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "sms": props.multi_processor_count,
            "memory_GiB": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "allow_tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


# --------------------------------------------------------------------------- machine rates

def copy_case() -> Dict:
    """Device-to-device copy of 2 GiB: the bandwidth ceiling of a streaming kernel."""
    src = torch.empty(1 << 29, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    timing = time_cuda(lambda: dst.copy_(src), reps=10, warmup=3)
    moved = 2 * src.numel() * src.element_size()          # read + written
    return {"suite": "copy", "bytes_moved": moved, "times": {"copy": timing},
            "GBps": moved / timing["median_ms"] / 1e6}


def gemm_case(dtype: torch.dtype) -> Dict:
    size = 8192
    a = torch.randn(size, size, device="cuda", dtype=dtype)
    b = torch.randn(size, size, device="cuda", dtype=dtype)
    timing = time_cuda(lambda: torch.mm(a, b), reps=5, warmup=2)
    return {"suite": "gemm", "dtype": str(dtype).replace("torch.", ""), "size": size,
            "times": {"mm": timing}, "TFLOPs": 2 * size ** 3 / timing["median_ms"] / 1e9}


# --------------------------------------------------------------------------- sketch

def sketch_inputs(n: int, d: int, dtype: torch.dtype):
    gen = torch.Generator(device="cuda").manual_seed(n + d)
    f = torch.randn(n, d, generator=gen, device="cuda", dtype=dtype)
    g = torch.randn(n, d, generator=gen, device="cuda", dtype=dtype)
    return f, g


def naive_pair(f, g, m: int, bucket, sign):
    """The path the fused kernel replaces: sign multiply + index_add_, for f and for g."""
    outs = []
    for x in (f, g):
        out = torch.zeros(m, x.shape[1], dtype=torch.float32, device="cuda")
        out.index_add_(0, bucket, x.float() * sign[:, None])
        outs.append(out)
    return outs


def sketch_row(ops, f, g, m: int, paths: List[str], copy_GBps: Optional[float]) -> Dict:
    n, d = f.shape
    floor = 2 * n * d * f.element_size() + 2 * m * d * 4   # inputs read once, outputs written once
    row: Dict[str, object] = {"suite": "sketch", "n": n, "d": d, "m": m,
                              "dtype": str(f.dtype).replace("torch.", ""), "floor_bytes": floor,
                              "times": {}}
    timed = row["times"]
    reps = 5 if floor < (8 << 30) else 3
    if "fused" in paths:
        timed["fused"] = time_cuda(lambda: ops.countsketch_pair(f, g, m, SEED,
                                                                deterministic=False), reps)
    if "deterministic" in paths:
        timed["deterministic"] = time_cuda(lambda: ops.countsketch_pair(f, g, m, SEED,
                                                                        deterministic=True), reps)
    if "naive" in paths:
        buckets, signs = ops.sketch_hash(n, m, SEED, device="cuda")
        bucket, sign = buckets[:, 0].contiguous(), signs[:, 0].contiguous()
        timed["naive_index_add"] = time_cuda(lambda: naive_pair(f, g, m, bucket, sign), reps)
    fused = median_ms(row, "fused")
    row["fused_GBps"] = floor / fused / 1e6 if fused else None
    row["fused_fraction_of_copy"] = ratio(row["fused_GBps"], copy_GBps)
    row["speedup_vs_naive"] = ratio(median_ms(row, "naive_index_add"), fused)
    row["deterministic_over_fused"] = ratio(median_ms(row, "deterministic"), fused)
    return row


def more_baselines_row(ops, f, g, m: int) -> Dict:
    """scatter_add_, CSR sparse matmul (with and without building S) and dense S @ X."""
    n, d = f.shape
    buckets, signs = ops.sketch_hash(n, m, SEED, device="cuda")
    bucket, sign = buckets[:, 0].contiguous(), signs[:, 0].contiguous()
    row: Dict[str, object] = {"suite": "sketch_baselines", "n": n, "d": d, "m": m,
                              "dtype": str(f.dtype).replace("torch.", ""), "times": {}}
    timed = row["times"]
    index = bucket[:, None].expand(n, d)

    def scatter_add():
        for x in (f, g):
            torch.zeros(m, d, device="cuda").scatter_add_(0, index, x.float() * sign[:, None])

    def build_csr():
        order = torch.argsort(bucket, stable=True)
        crow = torch.zeros(m + 1, dtype=torch.int64, device="cuda")
        crow[1:] = torch.cumsum(torch.bincount(bucket, minlength=m), 0)
        return torch.sparse_csr_tensor(crow, order, sign[order], size=(m, n))

    timed["scatter_add"] = time_cuda(scatter_add, 3)
    timed["csr_build"] = time_cuda(build_csr, 3)
    csr = build_csr()
    timed["csr_matmul"] = time_cuda(lambda: [csr @ x for x in (f, g)], 3)
    if m * n * 4 < 0.25 * torch.cuda.mem_get_info()[0]:
        dense = torch.zeros(m, n, device="cuda")
        dense[bucket, torch.arange(n, device="cuda")] = sign
        timed["dense_gemm"] = time_cuda(lambda: [dense @ x for x in (f, g)], 3)
    return row


def sketch_targets(results: Results, row: Dict) -> None:
    frac, speedup, det = (row.get("fused_fraction_of_copy"), row.get("speedup_vs_naive"),
                          row.get("deterministic_over_fused"))
    sizes = f"n={row['n']} d={row['d']} m={row['m']} {row['dtype']}"
    results.target("fused_fraction_of_copy", frac, ">= 0.80",
                   None if frac is None else frac >= 0.80, sizes)
    results.target("fused_speedup_vs_naive", speedup, ">= 3",
                   None if speedup is None else speedup >= 3.0, sizes)
    results.target("deterministic_over_fused", det, "<= 2",
                   None if det is None else det <= 2.0, sizes)


# --------------------------------------------------------------------------- gram

def gram_row(ops, d: int, dtype: torch.dtype) -> Dict:
    gen = torch.Generator(device="cuda").manual_seed(d)
    a = torch.randn(GRAM_BATCH, GRAM_M, d, generator=gen, device="cuda", dtype=dtype)
    b = torch.randn(GRAM_BATCH, GRAM_M, d, generator=gen, device="cuda", dtype=dtype)
    row: Dict[str, object] = {"suite": "gram", "batch": GRAM_BATCH, "m": GRAM_M, "da": d, "db": d,
                              "dtype": str(dtype).replace("torch.", ""), "times": {}}
    timed = row["times"]
    timed["default_route"] = time_cuda(lambda: ops.hadamard_gram(a, b), 10)
    for route in ("fused", "bmm"):
        os.environ["NNSIM_FAST_GRAM"] = route
        try:
            timed[f"{route}_route"] = time_cuda(lambda: ops.hadamard_gram(a, b), 10)
        finally:
            os.environ.pop("NNSIM_FAST_GRAM", None)
    a32, b32 = a.float(), b.float()
    timed["torch_bmm_mul"] = time_cuda(
        lambda: torch.bmm(a32, a32.mT) * torch.bmm(b32, b32.mT), 10)
    baseline = median_ms(row, "torch_bmm_mul")
    row["speedup_vs_bmm_mul"] = {name: ratio(baseline, median_ms(row, name))
                                 for name in ("default_route", "fused_route", "bmm_route")}
    row["GFLOP"] = 2.0 * GRAM_BATCH * GRAM_M * GRAM_M * 2 * d / 1e9   # both Grams in full
    return row


# --------------------------------------------------------------------------- sketch_model

class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 with the CIFAR stem (3x3 conv, no max pool), as in the paper's experiments."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU())
        widths, cin, stages = (64, 128, 256, 512), 64, []
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            stages.append(nn.Sequential(BasicBlock(cin, width, stride),
                                        BasicBlock(width, width, 1)))
            cin = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes))

    def forward(self, x):
        x = self.stem(x)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
        return self.head(x)


def forward_backward(model: nn.Module, batches, beta: float = 0.5) -> None:
    """What sketching rides on: a forward and a backward of the expected-gradient
    objective (gradient p - q at the logits) to the parameters, per batch."""
    for x in batches:
        logits = model(x)
        with torch.no_grad():
            log_p = torch.log_softmax(logits.double(), dim=1)
            direction = (log_p.exp() - torch.softmax(beta * log_p, dim=1)).to(logits.dtype)
        model.zero_grad(set_to_none=True)
        (logits * direction).sum().backward()


def sketch_model_row(batch: int, count: int) -> Dict:
    from nnsim_fast import sketch_model   # here: an import problem fails this case alone

    torch.manual_seed(0)
    model = ResNet18().cuda().eval()
    gen = torch.Generator(device="cuda").manual_seed(3)
    batches = [torch.randn(batch, 3, 32, 32, generator=gen, device="cuda") for _ in range(count)]
    layers = ["layer1", "layer2", "layer3", "layer4"]
    row: Dict[str, object] = {"suite": "sketch_model", "model": "ResNet-18 (CIFAR stem)",
                              "input": [3, 32, 32], "batch": batch, "batches": count,
                              "m": TARGET_M, "layers": layers, "spatial": "flatten", "times": {}}
    timed = row["times"]

    def sketched():
        sketch_model(model, batches, layers=layers, m=TARGET_M, seed=0)

    timed["forward_backward"] = time_wall(lambda: forward_backward(model, batches))
    timed["sketch_model"] = time_wall(sketched)
    bare, full = median_ms(row, "forward_backward"), median_ms(row, "sketch_model")
    row["overhead"] = None if not bare else full / bare - 1.0
    return row


# --------------------------------------------------------------------------- sanitize

def sanitize(ops) -> None:
    """Every CUDA op once on small inputs (for compute-sanitizer): the shared-tile
    and global atomic paths, one- and two-pass sorts, a multi-level combine tree,
    strided inputs, dataset rows, the gather, the fused Gram and the hash."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        f = torch.randn(700, 37, generator=gen, device="cuda", dtype=dtype)
        g = torch.randn(700, 16, generator=gen, device="cuda", dtype=dtype)
        for m, sparsity in ((16, 4), (600, 1), (300, 3)):
            for det in (False, True):
                ops.countsketch_pair(f, g, m, 1, 5, sparsity, deterministic=det)
                ops.countsketch(f[:, 1::2], m, 1, 5, sparsity, deterministic=det)
        rows = torch.randperm(2000, device="cuda")[:700]
        ops.countsketch_pair(f, g, 64, 2, 0, 2, rows=rows, deterministic=True)
        gy = torch.randn(32, 37, generator=gen, device="cuda", dtype=dtype)
        torch.ops.nnsim_fast.countsketch_backward(gy, 700, 3, 1, 4, rows)
        a = torch.randn(2, 70, 19, generator=gen, device="cuda", dtype=dtype)
        b = torch.randn(2, 70, 5, generator=gen, device="cuda", dtype=dtype)
        os.environ["NNSIM_FAST_GRAM"] = "fused"
        ops.hadamard_gram(a, b)
        os.environ.pop("NNSIM_FAST_GRAM", None)
    # One bucket of 40 pieces: two levels of the combine tree.
    tall = torch.randn(40 * 256 + 3, 5, generator=gen, device="cuda")
    ops.countsketch_pair(tall, tall[:, :2], 1, 4, deterministic=True)
    ops.sketch_hash(1000, 64, 9, 3, 4, device="cuda")
    torch.cuda.synchronize()
    print("gpu_bench: sanitize cases ran", flush=True)


# --------------------------------------------------------------------------- plan

def run_all(results: Results, ops, quick: bool) -> None:
    copy = results.run_case("copy_bandwidth", copy_case)
    results.data["copy"] = copy
    copy_GBps = copy["GBps"] if copy else None
    n = TARGET_N // 8 if quick else TARGET_N
    inputs = dict(zip("fg", sketch_inputs(n, TARGET_D, torch.float32)))
    main = results.run_case("sketch_target", lambda: sketch_row(
        ops, inputs["f"], inputs["g"], TARGET_M, ["fused", "deterministic", "naive"], copy_GBps))
    if main:
        sketch_targets(results, main)
        results.save()
    for d in (512, 64):
        gram = results.run_case(f"gram_d{d}", lambda d=d: gram_row(ops, d, torch.float32))
        if gram and d == 512:
            value = gram["speedup_vs_bmm_mul"]["default_route"]
            results.target("gram_speedup_vs_bmm_mul", value, ">= 1.3",
                           None if value is None else value >= 1.3,
                           f"B={GRAM_BATCH} m={GRAM_M} d={d} float32, default route")
    model_row = results.run_case("sketch_model_resnet18", lambda: sketch_model_row(
        128 if quick else 256, 4 if quick else 16))
    if model_row:
        value = model_row["overhead"]
        results.target("sketch_model_overhead", value, "<= 0.05",
                       None if value is None else value <= 0.05,
                       "ResNet-18 (CIFAR stem), batch/batches in the row")
    results.save()
    run_extras(results, ops, inputs, copy_GBps)


def run_extras(results: Results, ops, inputs: Dict[str, torch.Tensor],
               copy_GBps: Optional[float]) -> None:
    """Context for the targets, while time lasts: other baselines, other m
    (m = 1 and 16 load the deterministic path's combine tree), bfloat16, GEMM.
    Takes the float32 inputs out of `inputs` before making the bfloat16 ones."""
    results.run_case("sketch_target_more_baselines",
                     lambda: more_baselines_row(ops, inputs["f"], inputs["g"], TARGET_M))
    for m in (1, 16, 128, 4096):
        results.run_case(f"sketch_m{m}", lambda m=m: sketch_row(
            ops, inputs["f"], inputs["g"], m, ["fused", "deterministic"], copy_GBps))
    for name in "fg":
        inputs[name] = inputs.pop(name).bfloat16()
    torch.cuda.empty_cache()
    results.run_case("sketch_target_bf16", lambda: sketch_row(
        ops, inputs["f"], inputs["g"], TARGET_M, ["fused", "deterministic", "naive"], copy_GBps))
    inputs.clear()
    torch.cuda.empty_cache()
    for dtype in (torch.float32, torch.bfloat16):
        results.run_case(f"gemm_{str(dtype).replace('torch.', '')}",
                         lambda dtype=dtype: gemm_case(dtype))


def print_summary(results: Results) -> None:
    data = results.data
    machine = data["machine"]
    copy = data.get("copy") or {}
    print(f"\ngpu_bench: {machine['gpu']}, torch {machine['torch']}, CUDA {machine['cuda']}; "
          f"copy {copy.get('GBps', float('nan')):.0f} GB/s")
    for name, target in data["targets"].items():
        value = target["value"]
        shown = "n/a" if value is None else f"{value:.3f}"
        verdict = {True: "met", False: "MISSED", None: "not measured"}[target["met"]]
        print(f"  {name:28s} {shown:>8s}  goal {target['goal']:8s} {verdict:12s} {target['detail']}")
    for row in data["rows"]:
        times = ", ".join(f"{k} {v['median_ms']:.3f} ms" for k, v in row.get("times", {}).items())
        print(f"  {row['case']}: {times}")
    for error in data["errors"]:
        print(f"  ERROR {error['case']}: {error['error']}")
    for skipped in data["skipped"]:
        print(f"  skipped {skipped['case']}: {skipped['reason']}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                      "results", "gpu_bench.json"))
    parser.add_argument("--budget-s", type=float, default=120.0,
                        help="no case starts after this many seconds (default 120)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    parser.add_argument("--sanitize", action="store_true",
                        help="run every op once on small inputs, for compute-sanitizer")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA device visible to torch; nothing to measure", file=sys.stderr)
        return 3
    from nnsim_fast import ops
    if not ops.cuda_ops_available():
        print("gpu_bench: nnsim_fast was built without its CUDA kernels", file=sys.stderr)
        return 4
    if args.sanitize:
        sanitize(ops)
        return 0
    # The CSR baseline's beta and invariant-check notices are not results.
    warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
    results = Results(args.out, args.budget_s)

    def stop(signum, _frame):
        results.data["status"] = f"killed by signal {signum}"
        results.save()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    results.save()
    try:
        run_all(results, ops, args.quick)
        results.data["status"] = "complete" if not results.data["skipped"] else "budget spent"
    finally:
        results.save()
    print_summary(results)
    print(f"gpu_bench: results in {args.out}")
    return 1 if results.data["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
