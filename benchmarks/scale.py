"""Scale benchmark: time and peak memory of ``sketch_model`` as the sample count grows.

    python benchmarks/scale.py            # N = 1e5, 1e6, 4e6 (several minutes)
    python benchmarks/scale.py --quick    # N = 1e4, 1e5 (under a minute)

Synthetic inputs are drawn batch by batch from a seeded generator, so no data
set is ever held in memory: what stays resident is the model and the sketch.
Each (mode, N) runs in a fresh subprocess whose peak resident set size is read
from the kernel's accounting of that child (``os.wait4``), so one run's
allocations cannot hide in another's.  Modes:

* ``bare``: the forward pass and the backward pass to the probed layers that
  ``sketch_model`` rides on, with the same batches and no sketching;
* ``sketch``: ``sketch_model`` over the same batches (rows numbered in stream
  order), so ``sketch / bare`` is the end-to-end overhead of sketching;
* ``indexed``: ``sketch_model`` with rows keyed by dataset index, the indices
  one rank of two sees under a ``DistributedSampler`` without shuffling
  (0, 2, 4, ...), at smaller N (``--indexed-n``).

Memory must stay flat in N (the sketch, not the data, is held) and throughput
must stay constant per sample; the report states whether it does.  Writes
``benchmarks/results/scale.json`` and ``benchmarks/SCALE.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn

import harness  # first: it finds a checkout's nnsim_fast when none is installed
from nnsim_fast import sketch_model
from nnsim_fast.extract import expected_gradient_objective

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

FULL_N = (100_000, 1_000_000, 4_000_000)
QUICK_N = (10_000, 100_000)
FULL_INDEXED_N = (4_000, 8_000, 16_000)
QUICK_INDEXED_N = (2_000, 4_000)
LAYERS = ["hidden1", "hidden2"]
IN_FEATURES, WIDTH, CLASSES = 32, 256, 10
MEMORY_FLAT = 0.10        # peak RSS at the largest N within 10% of the smallest
THROUGHPUT_FLAT = 0.15    # samples/s at every N within 15% of the smallest N's
SEGMENTS = 10             # throughput is also reported per tenth of each run
CHILD_TIMEOUT_S = 600
MIB = 1024 * 1024


class SmallMLP(nn.Module):
    """32 -> 256 -> 256 -> 10 with ReLU; the two hidden blocks are probed."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden1 = nn.Sequential(nn.Linear(IN_FEATURES, WIDTH), nn.ReLU())
        self.hidden2 = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU())
        self.out = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden2(self.hidden1(x)))


class SyntheticStream:
    """``n`` samples in batches, drawn on the fly from a seeded generator.

    With ``index_stride`` set, batches are dicts carrying dataset indices
    ``0, stride, 2 * stride, ...``.  ``marks`` records when each batch was handed out.
    """

    def __init__(self, n: int, batch: int, seed: int = 0, index_stride: Optional[int] = None):
        self.n, self.batch, self.seed, self.index_stride = n, batch, seed, index_stride
        self.marks: List[float] = []

    def __iter__(self) -> Iterator:
        generator = torch.Generator().manual_seed(self.seed)
        for start in range(0, self.n, self.batch):
            rows = min(self.batch, self.n - start)
            x = torch.randn(rows, IN_FEATURES, generator=generator)
            self.marks.append(time.perf_counter())
            if self.index_stride is None:
                yield x
            else:
                index = torch.arange(start, start + rows, dtype=torch.int64) * self.index_stride
                yield {"x": x, "index": index}
        self.marks.append(time.perf_counter())


def bare_pass(model: SmallMLP, data: SyntheticStream) -> None:
    """The work sketch_model rides on: forward, and the gradient at both probed layers."""
    with torch.enable_grad():
        for x in data:
            h1 = model.hidden1(x)
            h2 = model.hidden2(h1)
            objective = expected_gradient_objective(model.out(h2), 0.5)
            torch.autograd.grad(objective, [h1, h2])


def current_rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/status", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def segment_rates(marks: Sequence[float], n: int, batch: int) -> List[float]:
    """Samples/s over each tenth of the batches (a slowdown inside one run shows here)."""
    batches = len(marks) - 1
    if batches < SEGMENTS:
        return []
    rates = []
    for k in range(SEGMENTS):
        lo, hi = k * batches // SEGMENTS, (k + 1) * batches // SEGMENTS
        samples = min(hi * batch, n) - lo * batch
        rates.append(samples / (marks[hi] - marks[lo]))
    return rates


def child(mode: str, n: int, batch: int, m: int, threads: int) -> Dict[str, object]:
    """One measurement, in this (fresh) process."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = SmallMLP().eval()
    stride = 2 if mode == "indexed" else None
    # Warm-up on other samples, so first-call costs do not land in the timing.
    warm = SyntheticStream(2 * batch, batch, seed=1, index_stride=stride)
    if mode == "bare":
        bare_pass(model, warm)
    else:
        sketch_model(model, warm, layers=LAYERS, m=m, progress=False)
    rss_before = current_rss_bytes()
    data = SyntheticStream(n, batch, seed=2, index_stride=stride)
    start = time.perf_counter()
    if mode == "bare":
        bare_pass(model, data)
        rows = n
    else:
        rep = sketch_model(model, data, layers=LAYERS, m=m, progress=False)
        rows = rep.n
    wall = time.perf_counter() - start
    if rows != n:
        raise RuntimeError(f"sketched {rows} rows, expected {n}")
    return {"mode": mode, "n": n, "wall_s": wall, "samples_per_s": n / wall,
            "rss_before_loop_bytes": rss_before, "rss_after_loop_bytes": current_rss_bytes(),
            "segment_samples_per_s": segment_rates(data.marks, n, batch), "threads": threads}


def run_child(mode: str, n: int, args: argparse.Namespace) -> Dict[str, object]:
    """Run ``child`` in a fresh interpreter; its peak RSS comes from the kernel (wait4)."""
    command = [sys.executable, os.path.abspath(__file__), "--child", mode, "--n", str(n),
               "--batch", str(args.batch), "--m", str(args.m), "--threads", str(args.threads)]
    env = dict(os.environ)
    search_path = [ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(search_path)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    timer = threading.Timer(args.child_timeout, proc.kill)
    timer.start()
    try:
        # Read the pipes on threads: a child that fills one must not block wait4.
        chunks: Dict[str, bytes] = {}
        readers = [threading.Thread(target=lambda k=k, s=s: chunks.__setitem__(k, s.read()))
                   for k, s in (("out", proc.stdout), ("err", proc.stderr))]
        for reader in readers:
            reader.start()
        _, status, usage = os.wait4(proc.pid, 0)
        for reader in readers:
            reader.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        timer.cancel()
    if proc.returncode != 0:
        tail = chunks.get("err", b"").decode(errors="replace")[-2000:]
        return {"mode": mode, "n": n, "error": f"exit code {proc.returncode}", "stderr_tail": tail}
    result = json.loads(chunks["out"].decode().strip().splitlines()[-1])
    # ru_maxrss is KiB on Linux and bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    result["peak_rss_bytes"] = usage.ru_maxrss * scale
    return result


def n_text(n: int) -> str:
    """``4·10^6`` for one significant digit times a power of ten (from 10^3), else digits."""
    exponent = len(str(n)) - 1
    lead, rest = divmod(n, 10 ** exponent)
    if exponent >= 3 and rest == 0:
        return f"10^{exponent}" if lead == 1 else f"{lead}·10^{exponent}"
    return f"{n:,d}"


def spread(values: Sequence[float]) -> float:
    """Largest relative distance from the first value."""
    return max(abs(v - values[0]) / values[0] for v in values)


def verdicts(rows: List[Dict[str, object]], mode: str) -> Dict[str, object]:
    done = sorted((r for r in rows if r["mode"] == mode and "error" not in r), key=lambda r: r["n"])
    if len(done) < 2:
        return {}
    rss = [r["peak_rss_bytes"] for r in done]
    rate = [r["samples_per_s"] for r in done]
    return {"mode": mode, "n_smallest": done[0]["n"], "n_largest": done[-1]["n"],
            "peak_rss_change": (rss[-1] - rss[0]) / rss[0],
            "memory_flat": abs(rss[-1] - rss[0]) / rss[0] <= MEMORY_FLAT,
            "throughput_spread": spread(rate), "throughput_flat": spread(rate) <= THROUGHPUT_FLAT}


def markdown(results: Dict[str, object]) -> str:
    host = results["host"]
    lines = [
        "# Scale: sketching as the sample count grows", "",
        f"Command: `{results['command']}`  ",
        f"Date: {host['date_utc']}  ",
        f"Machine: {host['cpu_model']}, {host['cores_usable']} usable cores, "
        f"{host['memory_total_gib']} GiB, torch {host['torch_version']}, "
        f"{results['config']['threads']} torch thread(s) per run, native ops: "
        f"{'yes' if host['native_ops'] else 'NO (pure-PyTorch reference)'}; load average "
        f"{harness.load_text(host.get('load_average'))} at the start, "
        f"{harness.load_text(results.get('load_average_after'))} at the end.", "",
    ]
    if results.get("note"):
        lines += [results["note"], ""]
    cfg = results["config"]
    lines += [
        f"Model: MLP {IN_FEATURES} -> {WIDTH} -> {WIDTH} -> {CLASSES} (ReLU), probed at both "
        f"hidden blocks; m = {cfg['m']}, float32 accumulators, batch {cfg['batch']}; inputs drawn "
        "per batch from a seeded generator (never held). Each row is a fresh process; peak RSS is "
        "the kernel's maximum resident set of that process (imports, model and sketch "
        "included); 'loop growth' is the resident set after the loop minus before it. "
        "`bare` = forward + backward to the probed layers without sketching.", "",
        "| mode | N | wall s | samples/s | sketch / bare | peak RSS MiB | loop growth MiB |"
        " slowest / fastest tenth |",
        "|---|---|---|---|---|---|---|---|",
    ]
    bare = {r["n"]: r for r in results["runs"] if r["mode"] == "bare" and "error" not in r}
    for r in results["runs"]:
        if "error" in r:
            lines.append(f"| {r['mode']} | {n_text(r['n'])} | failed: {r['error']} | | | | | |")
            continue
        paired = r["mode"] != "bare" and r["n"] in bare
        ratio = f"{r['wall_s'] / bare[r['n']]['wall_s']:.2f}" if paired else "—"
        growth = ("—" if r["rss_before_loop_bytes"] is None or r["rss_after_loop_bytes"] is None
                  else f"{(r['rss_after_loop_bytes'] - r['rss_before_loop_bytes']) / MIB:+.1f}")
        tenths = r["segment_samples_per_s"]
        uneven = f"{min(tenths) / max(tenths):.2f}" if tenths else "—"
        lines.append(f"| {r['mode']} | {n_text(r['n'])} | {r['wall_s']:.1f} | "
                     f"{r['samples_per_s']:,.0f} | {ratio} | {r['peak_rss_bytes'] / MIB:.0f} | "
                     f"{growth} | {uneven} |")
    lines += ["", "## Verdicts", ""]
    for v in results["verdicts"]:
        lines.append(
            f"- `{v['mode']}`, N {n_text(v['n_smallest'])} -> {n_text(v['n_largest'])}: "
            f"peak RSS changes by {100 * v['peak_rss_change']:+.1f}% "
            f"({'flat' if v['memory_flat'] else 'NOT flat'}, limit ±{100 * MEMORY_FLAT:.0f}%); "
            f"samples/s spread {100 * v['throughput_spread']:.1f}% "
            f"({'constant' if v['throughput_flat'] else 'NOT constant'}, limit "
            f"{100 * THROUGHPUT_FLAT:.0f}%).")
    lines.append("")
    return "\n".join(lines)


def command_text(args: argparse.Namespace) -> str:
    parts = ["python", "benchmarks/scale.py"]
    if args.quick:
        parts.append("--quick")
    for flag, value, default in (("--batch", args.batch, 1024), ("--m", args.m, 512),
                                 ("--threads", args.threads, 1)):
        if value != default:
            parts += [flag, str(value)]
    return " ".join(parts)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 1e4, 1e5 (under a minute)")
    parser.add_argument("--n", type=int, nargs="+",
                        help="sample counts (overrides the default set)")
    parser.add_argument("--indexed-n", type=int, nargs="*",
                        help="sample counts for the index-keyed mode (empty: skip it)")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--m", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--child-timeout", type=float, default=CHILD_TIMEOUT_S)
    parser.add_argument("--note", default="", help="a sentence for the report (e.g. machine load)")
    parser.add_argument("--json", default=os.path.join(HERE, "results", "scale.json"))
    parser.add_argument("--markdown", default=os.path.join(HERE, "SCALE.md"))
    parser.add_argument("--child", choices=("bare", "sketch", "indexed"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(child(args.child, args.n[0], args.batch, args.m, args.threads)))
        return 0

    sizes = args.n or (QUICK_N if args.quick else FULL_N)
    indexed_sizes = (args.indexed_n if args.indexed_n is not None else
                     (QUICK_INDEXED_N if args.quick else FULL_INDEXED_N))
    results: Dict[str, object] = {
        "host": harness.host_info(), "command": command_text(args), "note": args.note,
        "config": {"batch": args.batch, "m": args.m, "threads": args.threads, "layers": LAYERS,
                   "model": [IN_FEATURES, WIDTH, WIDTH, CLASSES], "sizes": list(sizes),
                   "indexed_sizes": list(indexed_sizes)},
        "runs": [],
    }
    plan = [(mode, n) for n in sizes for mode in ("bare", "sketch")]
    plan += [("indexed", n) for n in indexed_sizes]
    for mode, n in plan:
        row = run_child(mode, n, args)
        results["runs"].append(row)
        shown = row.get("error") or (f"{row['wall_s']:.1f} s, "
                                      f"{row['samples_per_s']:,.0f} samples/s, "
                                      f"peak RSS {row['peak_rss_bytes'] / MIB:.0f} MiB")
        print(f"{mode:8s} N={n:>9,d}: {shown}", flush=True)
    results["load_average_after"] = harness.host_info()["load_average"]
    results["verdicts"] = [v for v in (verdicts(results["runs"], mode)
                                       for mode in ("bare", "sketch", "indexed")) if v]
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=1)
    report = markdown(results)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as handle:
            handle.write(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
