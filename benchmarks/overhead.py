"""Sketching overhead over the forward + backward passes it rides on.

``python benchmarks/overhead.py [--samples 10000] [--batch 128] [--m 512] [--repeats 3]``

A small CNN (3x32x32 inputs, three conv blocks, linear head) processes the same
batches three times per repeat: a bare loop (forward, the expected-gradient
objective, backward to the parameters), the extraction alone (hooks and one
backward to the probed layers, nothing sketched), and ``sketch_model`` probing
the three blocks (features flattened, as in the paper).  Prints and returns the median times and
the overhead ratio; ``--json`` writes them.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch
from torch import nn

import harness  # noqa: F401  (first: it finds a checkout's nnsim_fast when none is installed)
import nnsim_fast as nf
from nnsim_fast.extract import (Extraction, LayerProbe, batch_statistics, eval_mode,
                                expected_gradient_objective, read_batch)


def small_cnn() -> nn.Module:
    torch.manual_seed(0)

    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                             nn.MaxPool2d(2))

    return nn.Sequential(block(3, 16), block(16, 32), block(32, 64), nn.Flatten(),
                         nn.Linear(64 * 4 * 4, 10))


def batches(samples: int, batch: int):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(samples, 3, 32, 32, generator=gen)
    return [x[i:i + batch] for i in range(0, samples, batch)]


def bare(model: nn.Module, data) -> float:
    model.eval()
    start = time.perf_counter()
    for x in data:
        objective = expected_gradient_objective(model(x), 0.5)
        model.zero_grad(set_to_none=True)
        objective.backward()
    return time.perf_counter() - start


LAYERS = ["0", "1", "2"]


def extraction_only(model: nn.Module, data) -> float:
    """Hooks + one backward to the probed layers per batch, nothing sketched."""
    extraction = Extraction.build(model, LAYERS)
    start = time.perf_counter()
    with eval_mode(model), LayerProbe(model, LAYERS) as probe, torch.enable_grad():
        for x in data:
            batch_statistics(model, probe, read_batch(x), extraction)
    return time.perf_counter() - start


def sketched(model: nn.Module, data, m: int) -> float:
    start = time.perf_counter()
    nf.sketch_model(model, data, layers=LAYERS, m=m, seed=0, progress=False)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--m", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    model, data = small_cnn(), batches(args.samples, args.batch)
    bare(model, data[:2]), extraction_only(model, data[:2]), sketched(model, data[:2], args.m)
    bare_times, extract_times, sketch_times = [], [], []
    for _ in range(args.repeats):      # interleaved, so load changes hit all three alike
        bare_times.append(bare(model, data))
        extract_times.append(extraction_only(model, data))
        sketch_times.append(sketched(model, data, args.m))
    result = {
        "samples": args.samples, "batch": args.batch, "m": args.m,
        "probed_widths": [16 * 16 * 16, 32 * 8 * 8, 64 * 4 * 4],
        "bare_s": statistics.median(bare_times), "extract_s": statistics.median(extract_times),
        "sketch_s": statistics.median(sketch_times),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    result["overhead"] = result["sketch_s"] / result["bare_s"] - 1.0
    result["sketch_over_extraction"] = result["sketch_s"] / result["extract_s"] - 1.0
    print(f"small CNN, {args.samples} samples, batch {args.batch}, m={args.m}, "
          f"{result['threads']} threads:\n"
          f"  bare forward + backward (to the parameters): {result['bare_s']:.2f} s\n"
          f"  extraction only (hooks, backward to the probed layers): {result['extract_s']:.2f} s\n"
          f"  sketch_model (extraction + sketches + exact statistics): {result['sketch_s']:.2f} s\n"
          f"  overhead over bare: {100 * result['overhead']:+.1f}% (target <= 15%); "
          f"sketching over extraction alone: {100 * result['sketch_over_extraction']:+.1f}%")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
