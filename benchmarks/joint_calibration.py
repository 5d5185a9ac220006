"""compare_models' estimator against the exact CKA over many random batch orders.

    python benchmarks/joint_calibration.py [--n 2000] [--orders 16] [--blocks 256 600 1024]

The two ResNet-18-shaped models of ``peers.py`` (random initialisation, and the same
briefly trained), their four residual stages flattened, on N generated images.  Each
model's features and expected gradients are taken once (float64); the exact centred CKA of
``feature`` and ``hadamard`` kernels over all N x N pairs is the reference.  Then, for each
block size, the data are put in ``--orders`` random orders and cut into consecutive blocks
(the last one shorter when the size does not divide N), and
:class:`nnsim_fast.pairs.BatchPairs` -- the estimator behind ``compare_models`` -- gives
each 4 x 4 matrix with its standard errors.  Reported per kernel and block size: the mean
error (bias), the root-mean-square error, the root-mean-square reported standard error,
and the share of entries within two reported standard errors.  Results go to
``results/joint_calibration.json`` (``--json``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from typing import Dict, List

import torch

import harness  # noqa: F401  (first: it finds a checkout's nnsim_fast when none is installed)
import peers
from nnsim_fast.extract import features_and_gradients
from nnsim_fast.pairs import BatchPairs

HERE = os.path.dirname(os.path.abspath(__file__))
KINDS = ("feature", "hadamard")


def kernels(n: int, width: int, workdir: str) -> Dict[str, torch.Tensor]:
    """``{kind: [8, N, N]}``: the four stages of model A, then of model B."""
    path = os.path.join(workdir, "weights.pt")
    peers.prepare_models(width, 2000, 1, path)
    models = peers.load_models(width, path)
    x, _ = peers.generated_images(n, peers.EVAL_DATA_SEED)
    layers = list(models[0].block_names)
    out = {kind: [] for kind in KINDS}
    for model in models:
        rows = features_and_gradients(model, x, layers, batch=250)
        for name in layers:
            f, g = rows[name]
            gram_f = f @ f.T
            out["feature"].append(gram_f)
            out["hadamard"].append(gram_f * (g @ g.T))
    return {kind: torch.stack(values) for kind, values in out.items()}


def exact_cka(K: torch.Tensor) -> torch.Tensor:
    """``[4, 4]`` centred CKA of model A's stages (rows) with model B's (columns)."""
    centred = K - K.mean(dim=1, keepdim=True)
    centred = centred - centred.mean(dim=2, keepdim=True)
    flat = centred.reshape(K.shape[0], -1)
    inner = flat @ flat.T
    norms = inner.diagonal().sqrt()
    return (inner / torch.outer(norms, norms))[:4, 4:]


def measure(K: torch.Tensor, exact: torch.Tensor, block: int, orders: int,
            generator: torch.Generator) -> Dict[str, float]:
    n = K.shape[1]
    errors, bars = [], []
    for _ in range(orders):
        order = torch.randperm(n, generator=generator)
        pairs = BatchPairs(K.shape[0])
        for start in range(0, n, block):
            rows = order[start:start + block]
            pairs.add(K[:, rows][:, :, rows])
        estimate, error = pairs.cka()
        errors.append(estimate[:4, 4:] - exact)
        bars.append(error[:4, 4:])
    e, s = torch.stack(errors), torch.stack(bars)
    return {"block": block, "orders": orders, "bias": float(e.mean()),
            "rms_error": float(e.pow(2).mean().sqrt()), "max_error": float(e.abs().max()),
            "rms_standard_error": float(s.pow(2).mean().sqrt()),
            "within_2se": float((e.abs() <= 2 * s).float().mean())}


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--orders", type=int, default=16)
    parser.add_argument("--blocks", type=int, nargs="+", default=[256, 600, 1024])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=os.path.join(HERE, "results", "joint_calibration.json"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        grams = kernels(args.n, args.width, workdir)
    generator = torch.Generator().manual_seed(args.seed)
    rows = []
    for kind in KINDS:
        exact = exact_cka(grams[kind])
        for block in args.blocks:
            row = {"kind": kind, **measure(grams[kind], exact, block, args.orders, generator)}
            rows.append(row)
            print(f"{kind:9s} block {block:5d}: bias {row['bias']:+.5f}  rms err {row['rms_error']:.5f}"
                  f"  max {row['max_error']:.5f}  rms SE {row['rms_standard_error']:.5f}  "
                  f"within 2 SE {row['within_2se']:.0%}", flush=True)
    report = {"command": "python benchmarks/joint_calibration.py " + " ".join(argv),
              "n": args.n, "width": args.width, "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "seconds": round(time.perf_counter() - start, 1),
              "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
