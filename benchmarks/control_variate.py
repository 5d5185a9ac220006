"""The diagonal's control variate: estimated coefficient, fixed coefficient 1, or none.

    python benchmarks/control_variate.py [--n 2000] [--m 512] [--seeds 8] [--json PATH]
    python benchmarks/control_variate.py --quick      # a tiny network, N = 128, m = 32 (seconds)

The default estimator removes the noise of varying row norms from its diagonal term with a
control variate (docs/estimators.md, section 4) whose coefficient it estimates per layer
pair.  This script measures what the coefficient buys on real layers: the ResNet-18 (width 8)
of ``benchmarks/accuracy.py``, its four checkpoints (init, early, two trained seeds), the
features and expected gradients of N generated images, every layer pair of every model pair,
CKA of ``kind="hadamard"`` and ``kind="feature"`` against the exact value over all N x N
pairs (float64), over ``--seeds`` sketch seeds, with the coefficient

* ``estimated``: the library's default;
* ``fixed``: 1 for every pair (the control as first derived);
* ``none``: no control variate (the wide sketch's statistics dropped);

and, as an oracle, ``exact-norms``: the default's HSIC over the exact norms of both kernels
(the estimate's numerator and denominator share the sketch's noise, which the ratio cancels).

Printed per kind: largest |error|, pooled and largest seed-to-seed sd, mean signed error,
and the number of entries off by more than 0.03.  About 5 minutes on 2 cores at the defaults.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from typing import Dict, List

import numpy as np
import torch

import harness  # noqa: F401  (first: it finds a checkout's nnsim_fast when none is installed)
import accuracy
from nnsim_fast import Representation, estimators
from nnsim_fast.extract import exact_model

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ("estimated", "fixed", "none", "exact-norms")


def rows_of(network, models, n: int, batch: int) -> Dict[str, tuple]:
    """Features and gradients ``{model:layer: (f, g)}`` of the first ``n`` evaluation images."""
    batches = accuracy.evaluation_batches(network, n, batch)
    out = {}
    for name, model in models.items():
        rep = exact_model(model, batches, beta=accuracy.BETA, progress=False)
        try:
            for layer in rep.layer_names:
                parts = list(rep.iter_rows(layer, batch))
                out[accuracy.merged_name(name, layer)] = (torch.cat([p[1] for p in parts]),
                                                          torch.cat([p[2] for p in parts]))
        finally:
            rep.close()
    return out


def exact_cka(rows: Dict[str, tuple], kind: str, norms: bool = False):
    """Centred CKA of every pair of layers, from the dense N x N kernels in float64 (and the
    kernels' Frobenius norms with ``norms=True``)."""
    kernels = []
    for f, g in rows.values():
        f, g = f.double(), g.double()
        k = f @ f.T if kind == "feature" else (f @ f.T) * (g @ g.T)
        k = k - k.mean(0, keepdim=True)
        kernels.append((k - k.mean(1, keepdim=True)).float())
    stack = torch.stack(kernels)
    inner = torch.einsum("aij,bij->ab", stack, stack).double()
    size = inner.diagonal().sqrt()
    table = (inner / (size[:, None] * size[None, :])).numpy()
    return (table, size.numpy()) if norms else table


def estimate(grams: estimators.SketchedGram, variant: str, norms: np.ndarray) -> np.ndarray:
    if variant == "exact-norms":
        scale = (grams.n - 1) ** 2 / np.outer(norms, norms)
        return estimators.hsic_matrix(grams).numpy() * scale
    if variant == "none":
        grams = estimators.SketchedGram(grams.kernels, grams.deviation, grams.trace, grams.ones,
                                        grams.n, grams.sparsity, grams.counts)
    original = estimators._control_coefficient
    if variant == "fixed":
        estimators._control_coefficient = lambda **k: torch.ones_like(k["uv"])
    try:
        return estimators.cka_matrix(grams)[0].numpy()
    finally:
        estimators._control_coefficient = original


def summary(values: List[np.ndarray], exact: np.ndarray, cross: np.ndarray) -> Dict[str, float]:
    stack = np.stack(values)
    errors = (stack - exact)[:, cross]
    sd = stack.std(axis=0, ddof=1)[cross]
    return {"max_abs_error": float(np.abs(errors).max()), "pooled_sd": float(np.sqrt((sd ** 2).mean())),
            "max_sd": float(sd.max()), "mean_error": float(errors.mean()),
            "entries_over_0.03": int((np.abs(errors) > 0.03).sum()), "entries": int(errors.size)}


def sweep(rows: Dict[str, tuple], args, norms: Dict[str, np.ndarray], start: float) -> Dict:
    """Every variant's CKA matrix per kind and seed."""
    names = list(rows)
    values = {(kind, v): [] for kind in norms for v in VARIANTS}
    for seed in range(args.seeds):
        rep = Representation(args.m, seed, beta=accuracy.BETA)
        for low in range(0, args.n, 500):
            rep.update({k: f[low:low + 500] for k, (f, _) in rows.items()},
                       {k: g[low:low + 500] for k, (_, g) in rows.items()})
        for kind in norms:
            grams = rep.grams(names, kind)
            for variant in VARIANTS:
                values[(kind, variant)].append(estimate(grams, variant, norms[kind]))
        print(f"seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
    return values


def main(argv=None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="rows (evaluation images)")
    parser.add_argument("--m", type=int, default=512, help="sketch size")
    parser.add_argument("--seeds", type=int, default=8, help="sketch seeds")
    parser.add_argument("--json", default=os.path.join(HERE, "results", "control_variate.json"))
    parser.add_argument("--quick", action="store_true", help="tiny network and sizes (a smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.m, args.seeds = 128, 32, 3
    if args.n < 8 or args.m < 3 or args.seeds < 2:
        raise SystemExit("--n must be >= 8, --m >= 3 and --seeds >= 2")
    start = time.perf_counter()
    network = accuracy.networks(args.quick, 2 if args.quick else 8)[1]
    models, _ = accuracy.train_models(network, lambda message: print(message, flush=True))
    rows = rows_of(network, models, args.n, 500)
    names = list(rows)
    cross = np.array([[a.split(":")[0] != b.split(":")[0] for b in names] for a in names])
    kinds = ("hadamard", "feature")
    exact, norms = {}, {}
    for kind in kinds:
        exact[kind], norms[kind] = exact_cka(rows, kind, norms=True)
    values = sweep(rows, args, norms, start)
    out = {"network": network.title, "quick": args.quick, "n": args.n, "m": args.m, "seeds": args.seeds,
           "layers": names, "seconds": round(time.perf_counter() - start, 1), "results": {}}
    print(f"\n{network.title}, N = {args.n}, m = {args.m}, {args.seeds} seeds, "
          f"{int(cross.sum())} ordered layer pairs across models")
    print(f"{'kind':9s} {'coefficient':11s} {'max|err|':>9s} {'pooled sd':>10s} {'max sd':>8s} "
          f"{'mean err':>9s} {'>0.03':>6s}")
    for kind in kinds:
        for variant in VARIANTS:
            s = summary(values[(kind, variant)], exact[kind], cross)
            out["results"][f"{kind}|{variant}"] = s
            print(f"{kind:9s} {variant:11s} {s['max_abs_error']:9.4f} {s['pooled_sd']:10.4f} "
                  f"{s['max_sd']:8.4f} {s['mean_error']:+9.5f} {s['entries_over_0.03']:6d}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(out, handle, indent=1)
    return out


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main()
    sys.exit(0)
