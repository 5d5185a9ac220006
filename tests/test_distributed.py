"""Distributed sketching on ``torch.distributed`` (gloo, two processes on loopback).

One pair of processes is spawned for the whole file; it runs every scenario in
turn and writes each rank's representation (``Representation.save``) or the
error it raised to a temporary directory.  The parent then checks, per scenario,
that both ranks hold the same representation and that it equals a sketch made
in one process (the dataset-index keyed sketch of the whole dataset, or plain
``Representation.update`` on all rows).  The dataset sizes are odd, so a
``DistributedSampler`` pads one rank with a repeat of another rank's sample:
``n`` must still be the dataset size.

Hangs are ruled out with timeouts on both sides: ``init_process_group`` gives
up after 60 s, and the parent kills both children when one fails or when the
pair is not done in time.
"""
from __future__ import annotations

import datetime
import math
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from conftest import assert_same_representation
from nnsim_fast import IndexedDataset, Representation, ops, sketch_model

WORLD = 2
LAYERS = ["fc1", "fc2"]
JOIN_TIMEOUT_S = 120.0
EXACT = dict(rtol=0, atol=0)

# Odd sizes: DistributedSampler pads the shorter rank with a repeat.
N64, M64, SEED64 = 21, 8, 4
N32, M32, SEED32 = 201, 16, 9
N_SHARDS, M_SHARDS, SEED_SHARDS = 30, 8, 2


class MLP(nn.Module):
    """4 -> 9 -> 6 -> 3, probed at the two hidden pre-activations."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 9)
        self.act1 = nn.Tanh()
        self.fc2 = nn.Linear(9, 6)
        self.act2 = nn.Tanh()   # smooth: float32 and float64 runs see the same derivatives
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act2(self.fc2(self.act1(self.fc1(x)))))


def make_model(dtype: torch.dtype) -> MLP:
    torch.manual_seed(12)
    return MLP().to(dtype)


def make_dataset(n: int, dtype: torch.dtype) -> TensorDataset:
    gen = torch.Generator().manual_seed(n)
    x = (3 * torch.randn(n, 4, generator=gen, dtype=torch.float64)).to(dtype)
    return TensorDataset(x, torch.randint(0, 3, (n,), generator=gen))


def make_shard_statistics() -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(31)
    feats = {"a": torch.randn(N_SHARDS, 5, generator=gen, dtype=torch.float64),
             "b": torch.randn(N_SHARDS, 3, generator=gen, dtype=torch.float64) + 1}
    grads = {"a": torch.randn(N_SHARDS, 4, generator=gen, dtype=torch.float64),
             "b": torch.randn(N_SHARDS, 3, generator=gen, dtype=torch.float64)}
    return feats, grads


def shard_rows(rank: int) -> torch.Tensor:
    """Interleaved, shuffled rows: neither shard is a contiguous block of indices."""
    perm = torch.randperm(N_SHARDS, generator=torch.Generator().manual_seed(17))
    return perm[rank::WORLD]


def sampler(dataset, rank: int, seed: int) -> DistributedSampler:
    return DistributedSampler(dataset, num_replicas=WORLD, rank=rank, shuffle=True, seed=seed)


def sketch(model, data, m: int, seed: int, dtype: torch.dtype, **kwargs) -> Representation:
    return sketch_model(model, data, layers=LAYERS, m=m, seed=seed, dtype=dtype, progress=False,
                        **kwargs)


# --------------------------------------------------------------------------- the ranks

def _expect_error(call) -> str:
    try:
        call()
    except ValueError as error:
        return f"ValueError: {error}"
    return "no error"


def _scenarios(rank: int, out: Path) -> None:
    # Float64 over a DistributedSampler: plain (x, y) items, then IndexedDataset items.
    dataset = make_dataset(N64, torch.float64)
    for name, data, batch in (("f64_plain", dataset, 4),
                              ("f64_indexed", IndexedDataset(dataset), 3)):
        loader = DataLoader(data, batch_size=batch, sampler=sampler(data, rank, seed=7))
        sketch(make_model(torch.float64), loader, M64, SEED64, torch.float64,
               distributed=True).save(out / f"{name}.rank{rank}")

    dataset32 = make_dataset(N32, torch.float32)
    loader = DataLoader(dataset32, batch_size=16, sampler=sampler(dataset32, rank, seed=3))
    sketch(make_model(torch.float32), loader, M32, SEED32, torch.float32,
           distributed=True).save(out / f"f32.rank{rank}")

    # Representation.all_reduce on hand-made, index-keyed shards.
    feats, grads = make_shard_statistics()
    rows = shard_rows(rank)
    rep = Representation(M_SHARDS, SEED_SHARDS, beta=0.5, dtype=torch.float64)
    for chunk in rows.split(4):
        rep.update({k: v[chunk] for k, v in feats.items()}, {k: v[chunk] for k, v in grads.items()},
                   rows=chunk)
    rep.all_reduce()
    rep.save(out / f"shards.rank{rank}")

    # Both ranks holding the same rows must not be summed.
    same = Representation(M_SHARDS, SEED_SHARDS, beta=0.5, dtype=torch.float64)
    same.update({k: v[:5] for k, v in feats.items()}, {k: v[:5] for k, v in grads.items()})
    (out / f"overlap.rank{rank}.txt").write_text(_expect_error(same.all_reduce))

    # Distributed run with per-rank checkpoints, then a rerun that finds them complete.
    path = out / "ck.safetensors"
    loader = DataLoader(dataset, batch_size=4, sampler=sampler(dataset, rank, seed=7))
    first = sketch(make_model(torch.float64), loader, M64, SEED64, torch.float64,
                   distributed=True, checkpoint=path, checkpoint_every=2)
    first.save(out / f"ck_first.rank{rank}")
    untouchable = make_model(torch.float64)
    untouchable.register_forward_hook(lambda *args: (_ for _ in ()).throw(
        AssertionError("a complete checkpoint must not run the model")))
    sketch(untouchable, loader, M64, SEED64, torch.float64, distributed=True,
           checkpoint=path, checkpoint_every=2).save(out / f"ck_again.rank{rank}")

    # Structures that cannot be summed: an error on every rank (the checks follow one
    # exchange of descriptions, so the group stays usable afterwards).
    _disagreeing_ranks(rank, out, feats, grads, rows)

    # Ranks disagreeing on m: an error on every rank, not a hang.  Last, because a
    # failed collective may leave the group unusable.
    other = Representation(8 * (rank + 1), SEED_SHARDS, beta=0.5, dtype=torch.float64)
    other.update({"a": feats["a"][rows]}, {"a": grads["a"][rows]}, rows=rows)
    (out / f"mismatch.rank{rank}.txt").write_text(_expect_error(other.all_reduce))


def _disagreeing_ranks(rank: int, out: Path, feats, grads, rows) -> None:
    from nnsim_fast.state import zeros_like_structure

    def rep_with(layer: str, meta=None) -> Representation:
        rep = Representation(M_SHARDS, SEED_SHARDS, beta=0.5, dtype=torch.float64, meta=meta)
        rep.update({layer: feats[layer][rows]}, {layer: grads[layer][rows]}, rows=rows)
        return rep

    # An idle rank (no rows) holding a layer of another width than the active rank's.
    if rank == 0:
        idle_mismatch = rep_with("a")
    else:
        idle_mismatch = Representation(M_SHARDS, SEED_SHARDS, beta=0.5, dtype=torch.float64)
        zeros_like_structure(idle_mismatch, {"a": {"dims": {"df": 7, "dg": 4, "w": 28},
                                                   "feature_shape": [7]}})
    (out / f"idle_width.rank{rank}.txt").write_text(_expect_error(idle_mismatch.all_reduce))
    # Active ranks holding different layers.
    names = rep_with("a" if rank == 0 else "b")
    (out / f"layer_names.rank{rank}.txt").write_text(_expect_error(names.all_reduce))
    # Ranks sketched with different spatial pooling (merge refuses that too).
    pooled = rep_with("a", meta={"spatial": "flatten" if rank == 0 else "mean"})
    (out / f"spatial.rank{rank}.txt").write_text(_expect_error(pooled.all_reduce))


def _edge_scenarios(rank: int, out: Path) -> None:
    """Edge cases (a rank with only padded repeats, a loader without a replayable
    sampler), kept apart from the main pair of processes so that a hang here cannot
    cost the other checks."""
    # One sample, two ranks: rank 1 holds only the sampler's padded repeat.
    tiny = make_dataset(1, torch.float64)
    _save_or_error(out, "tiny", rank, lambda: sketch(
        make_model(torch.float64),
        DataLoader(tiny, batch_size=4, sampler=sampler(tiny, rank, seed=7)),
        M64, SEED64, torch.float64, distributed=True))
    # A loader without a DistributedSampler whose shuffled order changes on every pass.
    dataset = make_dataset(N64, torch.float64)
    _save_or_error(out, "unreplayable", rank, lambda: sketch(
        make_model(torch.float64), DataLoader(dataset, batch_size=4, shuffle=True),
        M64, SEED64, torch.float64, distributed=True))


def _save_or_error(out: Path, name: str, rank: int, call) -> None:
    try:
        rep = call()
    except (ValueError, RuntimeError, TypeError) as error:
        (out / f"{name}.rank{rank}.txt").write_text(f"{type(error).__name__}: {error}")
    else:
        rep.save(out / f"{name}.rank{rank}")


SCENARIOS = {"main": _scenarios, "edge": _edge_scenarios}


def _rank_main(rank: int, port: int, out: str, which: str) -> None:
    """Entry point of a spawned rank; any unexpected error is written down and ends the rank."""
    out_dir = Path(out)
    try:
        torch.set_num_threads(1)
        if "lo" in {name for _, name in socket.if_nameindex()}:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=WORLD, timeout=datetime.timedelta(seconds=60))
        SCENARIOS[which](rank, out_dir)
        (out_dir / f"done.rank{rank}").write_text("ok")
        dist.destroy_process_group()
    except BaseException:
        (out_dir / f"failure.rank{rank}.txt").write_text(traceback.format_exc())
        # Leave at once: the other rank may be blocked in a collective; the parent kills it.
        os._exit(1)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(out: Path, which: str) -> Path:
    """Spawn the ranks on ``SCENARIOS[which]``; fail (never hang) if they do not finish."""
    context = mp.get_context("spawn")
    port = _free_port()
    procs = [context.Process(target=_rank_main, args=(rank, port, str(out), which), daemon=True)
             for rank in range(WORLD)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        while any(proc.is_alive() for proc in procs):
            if time.monotonic() > deadline or any(proc.exitcode not in (None, 0) for proc in procs):
                break
            time.sleep(0.05)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join(10)
    failures = sorted(out.glob("failure.rank*.txt"))
    if failures:
        pytest.fail("a rank failed:\n" + "\n".join(p.read_text() for p in failures))
    if any(proc.exitcode != 0 for proc in procs):
        pytest.fail(f"ranks did not finish within {JOIN_TIMEOUT_S} s (exit codes "
                    f"{[proc.exitcode for proc in procs]}); killed")
    return out


@pytest.fixture(scope="module")
def ranks_output(tmp_path_factory) -> Path:
    return run_ranks(tmp_path_factory.mktemp("distributed"), "main")


@pytest.fixture(scope="module")
def edge_output(tmp_path_factory) -> Path:
    return run_ranks(tmp_path_factory.mktemp("distributed_edge"), "edge")


def load_ranks(out: Path, name: str) -> List[Representation]:
    return [Representation.load(out / f"{name}.rank{rank}") for rank in range(WORLD)]


def assert_same(a: Representation, b: Representation, tol) -> None:
    assert_same_representation(a, b, **tol)


# --------------------------------------------------------------------------- checks

def test_the_sampler_pads_and_shuffles():
    # The premise of the padding test: some index sits on both ranks.
    dataset = make_dataset(N64, torch.float64)
    shards = [list(sampler(dataset, rank, seed=7)) for rank in range(WORLD)]
    everything = shards[0] + shards[1]
    assert len(everything) == N64 + 1 and sorted(set(everything)) == list(range(N64))
    assert shards[0] != list(range(0, N64, WORLD))


@pytest.mark.parametrize("name", ["f64_plain", "f64_indexed"])
def test_float64_ranks_equal_single_process(ranks_output, name):
    ranks = load_ranks(ranks_output, name)
    assert_same(ranks[0], ranks[1], EXACT)
    dataset = make_dataset(N64, torch.float64)
    shuffled = DataLoader(IndexedDataset(dataset), batch_size=5, shuffle=True,
                          generator=torch.Generator().manual_seed(1))
    single = sketch(make_model(torch.float64), shuffled, M64, SEED64, torch.float64)
    assert ranks[0].n == N64                 # the padded repeat is counted once
    assert ranks[0].row_intervals == [[0, N64]] and ranks[0].row_keys == "index"
    assert_same(single, ranks[0], dict(rtol=1e-10, atol=1e-10))


def float32_tolerance(rows: torch.Tensor, rows_per_bucket: int) -> float:
    """Absolute error allowed on a float32 sum of ``rows_per_bucket`` rows like ``rows``.

    Each addition rounds by at most eps/2 of the running sum; a random-sign sum of
    k terms of size a = max |x| has magnitude about sqrt(k) a, and k roundings of
    that size add up (as a random walk) to eps * sqrt(k) * sqrt(k) a.  The factor 8
    leaves room for the float32 forward pass that produced the rows and for the
    sum over ranks.
    """
    magnitude = math.sqrt(rows_per_bucket) * float(rows.abs().max())
    return 8 * torch.finfo(torch.float32).eps * math.sqrt(rows_per_bucket) * magnitude


def row_statistics(model: MLP, x: torch.Tensor) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Per-row features and expected gradients (q ∝ p^0.5) at both layers, by plain autograd."""
    h1 = model.fc1(x)
    h2 = model.fc2(model.act1(h1))
    logits = model.head(model.act2(h2))
    p = torch.softmax(logits.detach(), dim=1)
    q = p.sqrt() / p.sqrt().sum(1, keepdim=True)
    g1, g2 = torch.autograd.grad(logits, [h1, h2], grad_outputs=p - q)
    return {"fc1": (h1.detach(), g1), "fc2": (h2.detach(), g2)}


def test_float32_ranks_within_stated_tolerance(ranks_output):
    ranks = load_ranks(ranks_output, "f32")
    assert_same(ranks[0], ranks[1], EXACT)
    rep = ranks[0]
    assert rep.n == N32 and rep.dtype == torch.float32
    # The truth: float64 arithmetic on the same (float32) weights and inputs.
    model64 = make_model(torch.float32).double()
    x64 = make_dataset(N32, torch.float32).tensors[0].double()
    stats = row_statistics(model64, x64)
    buckets, signs = ops.sketch_hash(N32, M32, SEED32)
    S = torch.zeros(M32, N32, dtype=torch.float64)
    S[buckets[:, 0], torch.arange(N32)] = signs[:, 0].double()
    rows_per_bucket = int(torch.bincount(buckets[:, 0], minlength=M32).max())
    worst = 0.0
    for name, (f, g) in stats.items():
        layer = rep.layers[name]
        for got, rows in ((layer.sketch_f, f), (layer.sketch_g, g)):
            tol = float32_tolerance(rows, rows_per_bucket)
            # Far below one row's size: a lost or doubled sample cannot hide in it.
            assert tol < 1e-2 * float(rows.abs().max())
            error = float((got.double() - S @ rows).abs().max())
            assert error <= tol, (name, error, tol)
            worst = max(worst, error / tol)
        for got, rows in ((layer.sum_f, f), (layer.sum_g, g)):
            torch.testing.assert_close(got, rows.sum(0), rtol=0,
                                       atol=float32_tolerance(rows, N32))
        trace = (f.square().sum(1) * g.square().sum(1)).sum()
        torch.testing.assert_close(layer.trace, trace, rtol=64 * torch.finfo(torch.float32).eps,
                                   atol=0)
    torch.testing.assert_close(rep.sketch_ones, S.sum(1, keepdim=True), **EXACT)
    assert worst < 1.0


def test_all_reduce_of_hand_made_shards(ranks_output):
    ranks = load_ranks(ranks_output, "shards")
    assert_same(ranks[0], ranks[1], EXACT)
    feats, grads = make_shard_statistics()
    together = torch.cat([shard_rows(r) for r in range(WORLD)])
    assert sorted(together.tolist()) == list(range(N_SHARDS))
    single = Representation(M_SHARDS, SEED_SHARDS, beta=0.5, dtype=torch.float64)
    single.update(feats, grads)                 # stream order 0..N-1 = the dataset indices
    single.row_keys = "index"
    assert_same(single, ranks[0], dict(rtol=1e-12, atol=1e-12))
    # And against the dense sketch, independently of update's bookkeeping.
    buckets, signs = ops.sketch_hash(N_SHARDS, M_SHARDS, SEED_SHARDS)
    S = torch.zeros(M_SHARDS, N_SHARDS, dtype=torch.float64)
    S[buckets[:, 0], torch.arange(N_SHARDS)] = signs[:, 0].double()
    for name in feats:
        torch.testing.assert_close(ranks[0].layers[name].sketch_f, S @ feats[name],
                                   rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ranks[0].layers[name].sketch_g, S @ grads[name],
                                   rtol=1e-12, atol=1e-12)


def test_all_reduce_refuses_overlapping_rows(ranks_output):
    for rank in range(WORLD):
        message = (ranks_output / f"overlap.rank{rank}.txt").read_text()
        assert message.startswith("ValueError") and "overlapping" in message, message


@pytest.mark.parametrize("scenario, words", [("idle_width", ["rank 1", "structure"]),
                                              ("layer_names", ["layers"]),
                                              ("spatial", ["spatial", "flatten", "mean"])])
def test_all_reduce_refuses_structures_it_cannot_sum(ranks_output, scenario, words):
    messages = [(ranks_output / f"{scenario}.rank{rank}.txt").read_text() for rank in range(WORLD)]
    assert messages[0] == messages[1], messages          # the same error on every rank
    assert messages[0].startswith("ValueError"), messages[0]
    for word in words:
        assert word in messages[0], messages[0]


def test_all_reduce_with_mismatched_m_raises_on_every_rank(ranks_output):
    for rank in range(WORLD):
        message = (ranks_output / f"mismatch.rank{rank}.txt").read_text()
        assert message.startswith("ValueError") and "m" in message, message
        assert "8" in message and "16" in message, message


def test_distributed_checkpoint_per_rank_and_complete_rerun(ranks_output):
    per_rank = [Representation.load(ranks_output / f"ck.safetensors.rank{r}") for r in range(WORLD)]
    # Each rank checkpoints its own shard before the sum; the shards partition the dataset.
    assert sum(rep.n for rep in per_rank) == N64
    assert all(rep.meta["progress"]["complete"] for rep in per_rank)
    first, again = load_ranks(ranks_output, "ck_first"), load_ranks(ranks_output, "ck_again")
    reference = load_ranks(ranks_output, "f64_plain")[0]
    for rank in range(WORLD):
        assert_same(reference, first[rank], EXACT)
        assert_same(first[rank], again[rank], EXACT)
    assert not [p.name for p in ranks_output.iterdir() if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------- known gaps

def single_process(n: int) -> Representation:
    dataset = make_dataset(n, torch.float64)
    return sketch(make_model(torch.float64), DataLoader(IndexedDataset(dataset), batch_size=4),
                  M64, SEED64, torch.float64)


def test_rank_with_only_padded_repeats(edge_output):
    error = edge_output / "tiny.rank0.txt"
    assert not error.exists(), error.read_text()
    ranks = load_ranks(edge_output, "tiny")
    assert_same(ranks[0], ranks[1], EXACT)
    assert_same(single_process(1), ranks[0], dict(rtol=1e-10, atol=1e-10))


def test_loader_whose_order_changes_between_passes(edge_output):
    error = edge_output / "unreplayable.rank0.txt"
    if error.exists():                      # a clear refusal is acceptable
        assert "sampler" in error.read_text() and "ranks disagree" not in error.read_text(), \
            error.read_text()
        return
    ranks = load_ranks(edge_output, "unreplayable")
    assert_same(ranks[0], ranks[1], EXACT)
    assert_same(single_process(N64), ranks[0], dict(rtol=1e-10, atol=1e-10))
