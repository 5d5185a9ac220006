"""What the default statistics cost: ``sketch_model`` with and without the psi halves.

    python benchmarks/psi_cost.py [--n 2000] [--width 32] [--m 512] [--repeats 2]

The default estimator of the paper's kernel ``K_f o K_g`` reads two TensorSketch halves
of ``psi_i = g_i (x) f_i`` per layer (``psi=True``, the default).  Targets: time at most
1.5x and peak memory at most 2x the same ``sketch_model`` call with ``psi=False``, and
memory flat in N.  A ResNet-18-shaped CNN for 32x32 inputs (``resnet18_cifar``, probed at
its four stages, features flattened as in the paper) sketches N generated images; each
configuration runs in a fresh Python process (``--run``), which builds the model and the
data first, then restarts the kernel's resident-memory high-water mark and times the
``sketch_model`` call alone (CPU time of all threads, which the target is judged on, and wall
time); repeats interleave the configurations.  Configurations: features only (``gradients=False``),
gradients without psi, the default; the default again at N/2 for the memory slope.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Dict, List

import torch

import harness  # noqa: F401  (first: it finds a checkout's nnsim_fast when none is installed)
from nnsim_fast import sketch_model
from nnsim_fast.models import resnet18_cifar
from peers import _reset_peak_rss as _restart_peak      # /proc/self readers shared with peers.py
from peers import _status_bytes

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = {"features_only": {"gradients": False}, "no_psi": {"psi": False}, "default": {}}


def run_one(config: str, n: int, width: int, m: int, batch: int) -> Dict:
    torch.manual_seed(0)
    model = resnet18_cifar(10, width=width).eval()
    images = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    data = [(images[i:i + batch], torch.zeros(len(images[i:i + batch]), dtype=torch.long))
            for i in range(0, n, batch)]
    layers = ["layer1", "layer2", "layer3", "layer4"]
    # One warm-up batch outside the measurement (first-call allocations, thread pools).
    sketch_model(model, data[:1], layers, m=m, progress=False, **CONFIGS[config])
    baseline = _status_bytes("VmRSS")
    _restart_peak()
    cpu_start, start = time.process_time(), time.perf_counter()
    rep = sketch_model(model, data, layers, m=m, progress=False, **CONFIGS[config])
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = _status_bytes("VmHWM")
    return {"config": config, "n": n, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "peak_bytes": peak,
            "peak_over_baseline_bytes": peak - baseline, "rows": rep.n,
            "widths": {name: list(rep.layers[name].dims.values()) for name in layers}}


def measure(config: str, n: int, args) -> Dict:
    command = [sys.executable, os.path.abspath(__file__), "--run", config, "--n", str(n),
               "--width", str(args.width), "--m", str(args.m), "--batch", str(args.batch)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{config} at N={n} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(runs: List[Dict], n: int) -> Dict:
    def median(config: str, key: str, size: int = n) -> float:
        return statistics.median(r[key] for r in runs if r["config"] == config and r["n"] == size)

    base_t, base_m = median("no_psi", "cpu_seconds"), median("no_psi", "peak_over_baseline_bytes")
    out = {config: {"seconds": median(config, "seconds"), "cpu_seconds": median(config, "cpu_seconds"),
                    "peak_over_baseline_mib": median(config, "peak_over_baseline_bytes") / 2 ** 20}
           for config in CONFIGS}
    # CPU time (all threads) is the work done; wall time also carries whatever else the
    # machine was running, so the target is judged on CPU time and wall time is reported.
    out["time_ratio_default_over_no_psi"] = median("default", "cpu_seconds") / base_t
    out["wall_ratio_default_over_no_psi"] = median("default", "seconds") / median("no_psi", "seconds")
    out["memory_ratio_default_over_no_psi"] = median("default", "peak_over_baseline_bytes") / base_m
    out["default_memory_at_half_n_mib"] = median("default", "peak_over_baseline_bytes",
                                                 n // 2) / 2 ** 20
    out["targets"] = {"time <= 1.5x": out["time_ratio_default_over_no_psi"] <= 1.5,
                      "memory <= 2x": out["memory_ratio_default_over_no_psi"] <= 2.0}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--width", type=int, default=32, help="first-stage channels (64 in ResNet-18)")
    parser.add_argument("--m", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--run", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--json", default=os.path.join(HERE, "results", "psi_cost.json"))
    args = parser.parse_args(argv)
    if args.run:
        print(json.dumps(run_one(args.run, args.n, args.width, args.m, args.batch)))
        return 0
    runs = []
    for _repeat in range(args.repeats):
        for config in CONFIGS:
            runs.append(measure(config, args.n, args))
            shown = ("config", "n", "seconds", "cpu_seconds", "peak_over_baseline_bytes")
            print(json.dumps({k: runs[-1][k] for k in shown}),
                  flush=True)
    runs.append(measure("default", args.n // 2, args))
    report = {"command": "python benchmarks/psi_cost.py " + " ".join(argv or sys.argv[1:]),
              "model": f"resnet18_cifar(10, width={args.width}), stages layer1-4, flattened",
              "n": args.n, "m": args.m, "batch": args.batch, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "summary": summarise(runs, args.n), "runs": runs}
    with open(args.json, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=1)
    print(json.dumps(report["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
