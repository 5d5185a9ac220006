"""Sketch one model on many processes (GPUs or CPU cores, one or many nodes).

    torchrun --nproc_per_node=2 examples/torchrun_sketch.py --check

Every process sketches its shard of the dataset (a ``DistributedSampler``),
the sketches are summed with ``torch.distributed.all_reduce`` and every rank
ends with the same representation; rank 0 saves it.  gloo is used on CPU and
NCCL when CUDA is available (one GPU per process, chosen by ``LOCAL_RANK``).
With ``--check``, rank 0 also sketches the whole dataset in one process and
prints the largest difference (rounding only).  With
``--checkpoint PATH`` an interrupted run, started again with the same command,
resumes where each rank's last checkpoint left off.

Replace ``build_model`` and ``build_dataset`` with your own; the model must be
the same on every rank (load the same weights), and the dataset must be the
same object on every rank (the sampler picks each rank's part).
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from nnsim_fast import IndexedDataset, sketch_model

LAYERS = ["block1", "block2"]


class Net(nn.Module):
    """20 -> 64 -> 64 -> 5; named blocks make readable layer names."""

    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Linear(20, 64), nn.ReLU())
        self.block2 = nn.Sequential(nn.Linear(64, 64), nn.ReLU())
        self.head = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block2(self.block1(x)))


def build_model() -> nn.Module:
    torch.manual_seed(0)       # the same weights on every rank (or load one checkpoint)
    return Net()


def build_dataset(n: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 20, generator=generator),
                         torch.randint(0, 5, (n,), generator=generator))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=10_001, help="dataset size")
    parser.add_argument("--batch-size", type=int, default=128, help="per process")
    parser.add_argument("--buckets", type=int, default=512, help="sketch buckets (m)")
    parser.add_argument("--output", default="representation.safetensors")
    parser.add_argument("--checkpoint", default=None, help="resumable run: checkpoint path")
    parser.add_argument("--checkpoint-every", type=int, default=None, help="batches")
    parser.add_argument("--check", action="store_true",
                        help="rank 0 compares with a one-process sketch of the whole dataset")
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        # NCCL needs each process on its own device before the first collective.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")

    model = build_model().to(device)
    dataset = build_dataset(args.samples)
    # shuffle=True is fine: rows are keyed by dataset index, so the order does not matter,
    # and the sampler's padding (n not divisible by the world size) is counted once.
    sampler = DistributedSampler(dataset, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler)
    checkpoint_every = args.checkpoint_every if args.checkpoint else None
    rep = sketch_model(model, loader, layers=LAYERS, m=args.buckets, dtype=torch.float64,
                       distributed=True, checkpoint=args.checkpoint,
                       checkpoint_every=checkpoint_every, progress=rank == 0)

    if rank == 0:
        print(f"{world} processes ({'nccl' if use_cuda else 'gloo'}): {rep}")
        rep.save(args.output)
        print(f"saved to {args.output}")
        if args.check:
            whole = DataLoader(IndexedDataset(dataset), batch_size=args.batch_size)
            single = sketch_model(model, whole, layers=LAYERS, m=args.buckets,
                                  dtype=torch.float64, progress=False)
            worst = max(float((rep.layers[name].sketch_f - single.layers[name].sketch_f).abs().max()
                              / single.layers[name].sketch_f.abs().max()) for name in LAYERS)
            # The accumulators are float64, but the model runs in its own precision, and a
            # float32 matrix product may round a row differently depending on which rows
            # share its batch: allow a few hundred units of the model's rounding.
            allowed = 100 * torch.finfo(next(model.parameters()).dtype).eps
            print(f"one process: n={single.n}; distributed: n={rep.n}; largest relative "
                  f"difference of the sketches: {worst:.1e} (allowed {allowed:.1e})")
            if single.n != rep.n or worst > allowed:
                raise SystemExit("the distributed sketch differs from the one-process sketch")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
