"""Wall time and peak RSS of exact CKA between two ExactRepresentations.

Each model has ResNet-18 layer widths at 32x32 input (df = dg per layer), filled
with float32 random post-ReLU features and small gradients; the exact centred CKA
of the hadamard kernels of every layer pair is timed.  A float64 GEMM rate
measured before and after puts the time in context on a shared machine.

    python benchmarks/exact_bench.py --n 2000
    python benchmarks/exact_bench.py --n 20000 --widths 8192 --ram-gib 0.25
"""
import argparse
import json
import os
import resource
import time

import torch

from nnsim_fast.exact import ExactRepresentation, exact_similarity


def gemm_rate() -> float:
    a = torch.randn(2048, 4096, dtype=torch.float64)
    b = torch.randn(2048, 4096, dtype=torch.float64)
    a @ b.T
    start = time.perf_counter()
    for _ in range(3):
        a @ b.T
    return 3 * 2 * 2048 * 2048 * 4096 / (time.perf_counter() - start)


def feed(seed: int, args) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    rep = ExactRepresentation(max_rows=args.n, ram_bytes=int(args.ram_gib * 2**30), storage=args.storage)
    spent = 0.0
    for low in range(0, args.n, args.batch):
        rows = min(args.batch, args.n - low)
        f = {f"layer{i}": torch.relu(torch.randn(rows, d, generator=gen) + 0.1)
             for i, d in enumerate(args.widths)}
        g = {f"layer{i}": torch.randn(rows, d, generator=gen) * 1e-3 for i, d in enumerate(args.widths)}
        start = time.perf_counter()
        rep.update(f, g)
        spent += time.perf_counter() - start
    return rep, spent


def disk_bytes(rep) -> int:
    path = rep.storage_path
    if path is None:
        return 0
    return sum(os.stat(os.path.join(path, name)).st_blocks * 512 for name in os.listdir(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--widths", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--ram-gib", type=float, default=4.0)
    parser.add_argument("--block", type=int, default=None)
    parser.add_argument("--storage", default=None)
    args = parser.parse_args()
    rate_before = gemm_rate()
    (a, feed_a), (b, feed_b) = feed(1, args), feed(2, args)
    rss_fed = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    start = time.perf_counter()
    table, _, _ = exact_similarity(a, b, "cka", "hadamard", block=args.block)
    seconds = time.perf_counter() - start
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    rate_after = gemm_rate()
    # Multiply-adds the algebra needs: the upper triangle of every F F^T and G G^T, 2 flops each.
    needed = 2 * args.n * (args.n + 1) / 2 * 2 * sum(args.widths) * 2
    print(json.dumps({
        "n": args.n, "widths": args.widths, "threads": torch.get_num_threads(), "ram_rows": a.ram_rows,
        "disk_gib": round((disk_bytes(a) + disk_bytes(b)) / 2**30, 2),
        "update_s": round(feed_a + feed_b, 1), "cka_s": round(seconds, 1),
        "gflops_achieved": round(needed / seconds / 1e9, 1),
        "gflops_gemm_same_run": [round(rate_before / 1e9, 1), round(rate_after / 1e9, 1)],
        "peak_rss_gib_after_feed": round(rss_fed, 2), "peak_rss_gib": round(rss_peak, 2),
        "cka_diagonal": [round(float(x), 4) for x in table.diagonal()]}))
    a.close()
    b.close()


if __name__ == "__main__":
    main()
