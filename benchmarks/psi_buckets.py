"""Buckets against width for the psi halves: where the default estimator's memory goes.

    python benchmarks/psi_buckets.py [--network resnet18|cnn] [--n 2000] [--seeds 4]
                                     [--configs 512x4096 2048x1024 2048x4096] [--json PATH]
    python benchmarks/psi_buckets.py --quick      # a tiny network, N = 128 (seconds)

The default estimator of ``kind="hadamard"`` reads two TensorSketch halves of psi, each
``psi_buckets x psi_dim`` (docs/estimators.md, sections 6 and 8).  Its error has a sample-axis
part, which on low-rank layers falls like ``1/sqrt(psi_buckets)``, and a feature-axis part, which
falls with ``psi_dim``.  For each ``BUCKETSxWIDTH`` configuration this script sketches the
features and expected gradients of N generated images through the four checkpoints of a network
of ``benchmarks/accuracy.py`` (every layer pair of every model pair) over ``--seeds`` sketch
seeds and prints the CKA of ``K_f o K_g`` against the exact value over all N x N pairs
(float64): largest |error|, pooled and largest seed-to-seed sd, mean signed error, entries off by
more than 0.03, the halves' memory per layer, and the median time of one estimate (the Grams
and CKA of every layer pair of the four models, at comparison time).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from typing import Dict, List, Optional, Tuple

import numpy as np

import harness  # noqa: F401  (first: it finds a checkout's nnsim_fast when none is installed)
import accuracy
import control_variate
from nnsim_fast import Representation, estimators

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_config(text: str) -> Tuple[int, int]:
    try:
        buckets, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--configs takes BUCKETSxWIDTH, got {text!r}") from None
    if buckets < 3 or width < 1:
        raise argparse.ArgumentTypeError(f"buckets must be >= 3 and width >= 1, got {text!r}")
    return buckets, width


def estimates(rows: Dict[str, tuple], n: int, buckets: int, width: int, seeds: int,
              seconds: Optional[List[float]] = None) -> List[np.ndarray]:
    """The default CKA matrix of every layer pair, one per seed (m stays at its default 512
    unless the halves have fewer buckets; the estimator reads only the halves).  The time of
    each estimate (Grams and CKA of every layer pair, not the sketching) goes to ``seconds``."""
    names, out = list(rows), []
    for seed in range(seeds):
        rep = Representation(min(512, buckets), seed, beta=accuracy.BETA, psi_dim=width,
                             psi_buckets=buckets)
        for low in range(0, n, 500):
            rep.update({k: f[low:low + 500] for k, (f, _) in rows.items()},
                       {k: g[low:low + 500] for k, (_, g) in rows.items()})
        start = time.perf_counter()
        out.append(estimators.cka_matrix(rep.grams(names, "hadamard"))[0].numpy())
        if seconds is not None:
            seconds.append(time.perf_counter() - start)
    return out


def main(argv=None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--network", choices=("resnet18", "cnn"), default="resnet18")
    parser.add_argument("--n", type=int, default=2000, help="rows (evaluation images)")
    parser.add_argument("--seeds", type=int, default=4, help="sketch seeds")
    parser.add_argument("--configs", nargs="+", type=parse_config,
                        default=[(512, 4096), (2048, 1024), (2048, 4096)],
                        help="BUCKETSxWIDTH of the psi halves")
    parser.add_argument("--json", default=None, help="write the numbers here")
    parser.add_argument("--quick", action="store_true", help="tiny network and sizes (a smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.seeds, args.configs = 128, 3, [(16, 64), (64, 16)]
    if args.n < 8 or args.seeds < 2:
        raise SystemExit("--n must be >= 8 and --seeds >= 2")
    start = time.perf_counter()
    network = accuracy.networks(args.quick, 2 if args.quick else 8)[args.network == "resnet18"]
    models, _ = accuracy.train_models(network, lambda message: print(message, flush=True))
    rows = control_variate.rows_of(network, models, args.n, 500)
    names = list(rows)
    cross = np.array([[a.split(":")[0] != b.split(":")[0] for b in names] for a in names])
    exact = control_variate.exact_cka(rows, "hadamard")
    out = {"network": network.title, "quick": args.quick, "n": args.n, "seeds": args.seeds,
           "layers": names, "results": {}}
    print(f"\n{network.title}, N = {args.n}, {args.seeds} seeds, {int(cross.sum())} ordered layer "
          "pairs across models; CKA of K_f o K_g against exact")
    print(f"{'buckets x width':>16s} {'MiB/layer':>9s} {'max|err|':>9s} {'pooled sd':>10s} "
          f"{'max sd':>8s} {'mean err':>9s} {'>0.03':>6s} {'estimate s':>10s}")
    for buckets, width in args.configs:
        seconds: List[float] = []
        s = control_variate.summary(estimates(rows, args.n, buckets, width, args.seeds, seconds),
                                    exact, cross)
        s["halves_mib_per_layer"] = 2 * buckets * width * 4 / 2 ** 20
        s["estimate_seconds"] = float(np.median(seconds))
        out["results"][f"{buckets}x{width}"] = s
        print(f"{f'{buckets} x {width}':>16s} {s['halves_mib_per_layer']:9.1f} "
              f"{s['max_abs_error']:9.4f} {s['pooled_sd']:10.4f} {s['max_sd']:8.4f} "
              f"{s['mean_error']:+9.5f} {s['entries_over_0.03']:6d} {s['estimate_seconds']:10.1f}",
              flush=True)
    out["seconds"] = round(time.perf_counter() - start, 1)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(out, handle, indent=1)
    return out


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main()
    sys.exit(0)
