"""Features and expected gradients at named layers, streamed into a sketch.

For each batch: ONE forward pass with hooks at the chosen layers and ONE
backward pass (``torch.autograd.grad``, so no parameter ``.grad`` is touched).
For categorical outputs the expected gradient of the cross-entropy under the
tempered predictive ``q(y|x) ∝ p(y|x)^beta`` is obtained by back-propagating
``p - q`` from the logits (``E_q[p - e_y] = p - q``); the model is in eval mode
so every sample's gradient is its own.
"""
from __future__ import annotations

import contextlib
import difflib
import json
import os
import sys
from typing import (Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple,
                    Union)

import torch
from torch import nn

from .sketch import Representation

TARGETS = ("expected", "labels")
SPATIAL = ("flatten", "mean")


def default_layers(model: nn.Module) -> List[str]:
    """The default probed layers: the model's direct children (its top-level blocks)."""
    names = [name for name, _ in model.named_children()]
    if not names:
        raise ValueError("the model has no child modules; pass layers=[...] explicitly")
    return names


def resolve_layers(model: nn.Module, layers: Optional[Sequence[str]]) -> List[str]:
    """Check layer names against ``model.named_modules()``; typos get close suggestions."""
    if layers is None:
        return default_layers(model)
    if isinstance(layers, str):
        layers = [layers]
    available = dict(model.named_modules())
    names = list(layers)
    if not names:
        raise ValueError("layers is empty; pass module names from model.named_modules()")
    if len(set(names)) != len(names):
        raise ValueError(f"layers has duplicates: {names}")
    for name in names:
        if name not in available or name == "":
            close = difflib.get_close_matches(name, [n for n in available if n], n=5)
            hint = f"; did you mean {close}?" if close else ""
            raise ValueError(f"layer {name!r} is not a module of the model{hint} "
                             f"(see model.named_modules())")
    return names


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode; restore each one's own flag afterwards."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


class LayerProbe:
    """Forward hooks that capture a layer's output and a handle on its gradient.

    The hook returns ``output + delta`` with ``delta`` a zero leaf tensor that
    requires grad: the gradient with respect to ``delta`` is the gradient with
    respect to the layer output, even when later modules modify their input in
    place (``ReLU(inplace=True)``) or the parameters are frozen.  Hooks are
    removed on exit, also when the model raises.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str]) -> None:
        self.model = model
        self.layers = list(layers)
        self.features: Dict[str, torch.Tensor] = {}
        self.deltas: Dict[str, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> "LayerProbe":
        modules = dict(self.model.named_modules())
        try:
            for name in self.layers:
                self._handles.append(modules[name].register_forward_hook(self._hook(name)))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.reset()

    def reset(self) -> None:
        self.features.clear()
        self.deltas.clear()

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if name in self.features:
                raise ValueError(
                    f"layer {name!r} was called twice in one forward pass; its features are "
                    "ambiguous. Probe a module that runs once per forward (e.g. a parent "
                    "block), or wrap each use in its own module.")
            tensor, rebuild = _primary_tensor(output, name)
            delta = torch.zeros_like(tensor, requires_grad=True)
            self.features[name] = tensor.detach()
            self.deltas[name] = delta
            return rebuild(tensor + delta)
        return hook


def _primary_tensor(output, name: str) -> Tuple[torch.Tensor, Callable]:
    if isinstance(output, torch.Tensor):
        return output, lambda t: t
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        kind = type(output)
        return output[0], lambda t: kind([t, *output[1:]]) if kind is list else (t, *output[1:])
    raise TypeError(f"layer {name!r} returns {type(output).__name__}; only modules returning a "
                    "tensor (or a tuple/list whose first element is a tensor) can be probed")


def default_output_fn(output) -> torch.Tensor:
    """Logits from a model output: a tensor, the first element of a tuple/list, or dict['logits']."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}; "
                    "pass output_fn=lambda out: ... returning the [batch, classes] logits")


def unpack_batch(batch) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(x, y, index)`` from a batch: ``x``, ``(x, y)``, ``(x,)``, or a dict with ``x``/``input``,
    optional ``y``/``label``/``target`` and optional ``index`` (dataset row indices)."""
    if isinstance(batch, torch.Tensor):
        return batch, None, None
    if isinstance(batch, Mapping):
        x = next((batch[k] for k in ("x", "input", "inputs") if k in batch), None)
        if x is None:
            raise ValueError(f"a dict batch needs an 'x' (or 'input') entry, got keys {sorted(batch)}")
        y = next((batch[k] for k in ("y", "label", "labels", "target") if k in batch), None)
        return x, y, batch.get("index")
    if isinstance(batch, (tuple, list)):
        if len(batch) == 1:
            return batch[0], None, None
        if len(batch) == 2:
            return batch[0], batch[1], None
        if len(batch) == 3 and isinstance(batch[0], torch.Tensor) and batch[0].dim() == 1 \
                and not batch[0].is_floating_point() and batch[0].dtype != torch.bool:
            # (index, x, y): a 1-D integer tensor of dataset indices first
            return batch[1], batch[2], batch[0]
    raise TypeError(f"cannot read a batch of type {type(batch).__name__}"
                    f"{' of length ' + str(len(batch)) if isinstance(batch, (tuple, list)) else ''}; "
                    "use x, (x, y), (index, x, y) with 1-D integer indices, or a dict with "
                    "'x', 'y' and 'index'")


def expected_gradient_objective(logits: torch.Tensor, beta: float) -> torch.Tensor:
    """A scalar whose gradient at the logits is ``p - q`` (q ∝ p^beta), per sample."""
    if logits.dim() != 2:
        raise ValueError(f"expected gradients need [batch, classes] logits, got shape "
                         f"{tuple(logits.shape)}; pass output_fn= to select them, or "
                         "target='labels' / loss_fn= for other outputs")
    with torch.no_grad():
        logits64 = logits.detach().to(torch.float64)
        p = torch.softmax(logits64, dim=1)
        q = torch.softmax(beta * torch.log_softmax(logits64, dim=1), dim=1)
        direction = (p - q).to(logits.dtype)
    return (logits * direction).sum()


def _index_tensor(index, batch_index: int) -> torch.Tensor:
    rows = torch.as_tensor(index)
    if rows.dtype == torch.bool or rows.is_floating_point() or rows.is_complex():
        raise TypeError(f"batch {batch_index}: dataset indices must be integers, got {rows.dtype}")
    return rows.to(torch.int64)


def _flatten(t: torch.Tensor, spatial: str, is_gradient: bool) -> torch.Tensor:
    if t.dim() == 1:
        return t.unsqueeze(1)
    if t.dim() == 2 or spatial == "flatten":
        return t.reshape(t.shape[0], -1)
    # Pool spatial positions (dims 2..): features by their mean, gradients by
    # their sum -- the gradient with respect to a per-channel shift of the map.
    dims = tuple(range(2, t.dim()))
    return t.sum(dim=dims) if is_gradient else t.mean(dim=dims)


def _model_device(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _progress_bar(data, progress: Optional[bool]):
    if progress is None:
        progress = sys.stderr.isatty()
    total = None
    # A DataLoader's sampler knows how many samples this process will see (a
    # DistributedSampler shard, a subset); fall back to the dataset's length.
    for source in (getattr(data, "sampler", None), getattr(data, "dataset", None)):
        try:
            total = len(source)
            break
        except TypeError:
            continue
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, unit=" samples", unit_scale=True, disable=not progress,
                desc="sketching", dynamic_ncols=True)


def sketch_model(model: nn.Module, data: Iterable, layers: Optional[Sequence[str]] = None,
                 m: int = 512, seed: int = 0, beta: float = 0.5, sparsity: int = 1, *,
                 target: str = "expected", loss_fn: Optional[Callable] = None,
                 output_fn: Optional[Callable] = None, spatial: str = "flatten",
                 dtype: torch.dtype = torch.float32, device=None, product: bool = False,
                 mean_embedding: bool = False, psi: bool = True,
                 psi_budget: Optional[int] = None, psi_dim: Optional[int] = None,
                 max_batches: Optional[int] = None,
                 progress: Optional[bool] = None,
                 into: Optional[Representation] = None, distributed: bool = False,
                 group=None, checkpoint: Optional[Union[str, os.PathLike]] = None,
                 checkpoint_every: Optional[int] = None) -> Representation:
    """Sketch a model's features and expected gradients at ``layers`` over ``data``.

    Args:
        model: any ``nn.Module``; put in eval mode for the pass and restored after.
        data: a DataLoader or any iterable of batches: ``x``, ``(x, y)``,
            ``(index, x, y)`` or a dict with ``x`` / ``y`` / ``index``.  With
            indices, a sample's bucket and sign depend on its dataset index, so
            shuffling, batch size and sharding do not change the sketch.
        layers: names from ``model.named_modules()``; default: the model's direct
            children (its top-level blocks).
        m: number of sketch buckets (rows of every sketched matrix).
        seed: sketch seed; compare models sketched with the same seed.
        beta: temperature of the predictive ``q ∝ p^beta``, in (0, 1]; at 1 the
            expected gradient is exactly zero.
        sparsity: hash blocks per row (1 = CountSketch).
        target: ``"expected"`` (the paper) or ``"labels"`` (cross-entropy with the
            batch's true labels).
        loss_fn: instead of the above, ``loss_fn(logits, y)`` returning per-sample
            losses or their sum; gradients are of its sum.
        output_fn: maps the model's output to the logits (default: a tensor, the
            first element of a tuple, or ``output['logits']``).
        spatial: ``"flatten"`` keeps every position of a feature map (the paper);
            ``"mean"`` averages features over positions and sums gradients.
        dtype: accumulator precision, float32 (default) or float64.
        device: where the sketch lives (default: the model's device).
        product: also sketch ``f o g`` (for ``kind="khatri_rao"``).
        mean_embedding: also accumulate the exact ``sum_i g_i f_i^T`` (needs
            ``d_f * d_g`` floats per layer) for :func:`mean_embedding_norm`.
        psi: also sketch ``psi(x) = g f^T`` itself (for ``kind="psi"``, the
            estimator ``S K S^T`` the paper's bounds cover): exact while
            ``m * d_f * d_g <= psi_budget`` (default 2^28), otherwise through a
            TensorSketch of width ``psi_dim`` (default 4096).
        max_batches: stop after this many batches.
        progress: show a progress bar (default: when stderr is a terminal).
        into: add to an existing representation instead of a new one.
        distributed: each rank of the initialised ``torch.distributed`` group
            sketches its shard (``data`` a DataLoader over a DistributedSampler);
            rows are keyed by dataset index, a sample repeated across ranks by
            the sampler's padding is counted once, and the ranks' sketches are
            summed with ``all_reduce``: every rank returns the same representation.
        group: the process group for ``distributed`` (default: the world).
        checkpoint: a file path; the partial representation is written there
            atomically every ``checkpoint_every`` batches and at the end.  A rerun
            with the same arguments resumes after the last checkpointed batch
            (skipping those batches without computing them) and gives the same
            result as an uninterrupted run, provided ``data`` yields the same
            batches in the same order.  If a batch raises, the batches before it
            are checkpointed before the error propagates.  With ``distributed``,
            each rank writes ``path.rank<r>``.
        checkpoint_every: batches between checkpoints (default: only at the end).

    Returns:
        A :class:`Representation`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 < beta <= 1.0:
        raise ValueError(f"beta must be in (0, 1], got {beta!r}")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if spatial not in SPATIAL:
        raise ValueError(f"spatial must be one of {SPATIAL}, got {spatial!r}")
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches must be a positive int, got {max_batches!r}")
    names = resolve_layers(model, layers)
    model_device = _model_device(model)
    rep_device = torch.device(device) if device is not None else model_device
    if into is not None:
        rep = into
        wanted = {"m": m, "seed": seed, "sparsity": sparsity, "beta": beta,
                  "target": target if loss_fn is None else "loss_fn", "spatial": spatial}
        have = {"m": rep.m, "seed": rep.seed, "sparsity": rep.sparsity,
                **{key: rep.meta.get(key) for key in ("beta", "target", "spatial")}}
        differ = [key for key in wanted if wanted[key] != have[key]]
        if differ:
            raise ValueError("into was sketched with " +
                             ", ".join(f"{k}={have[k]!r}" for k in differ) + "; this call asks "
                             "for " + ", ".join(f"{k}={wanted[k]!r}" for k in differ))
        asked = {"gradients": True, "psi_dim": rep.options["psi_dim"] if psi else 0,
                 "product": product, "mean_embedding": mean_embedding}
        if psi and psi_dim is not None:
            asked["psi_dim"] = psi_dim
        if asked != rep.options:
            raise ValueError(f"into was sketched with options {rep.options}; this call asks "
                             f"for {asked}")
    else:
        rep = Representation(m, seed, sparsity, beta=beta, dtype=dtype, device=rep_device,
                             psi=psi, psi_dim=psi_dim, product=product,
                             mean_embedding=mean_embedding,
                             meta={"target": target if loss_fn is None else "loss_fn",
                                   "spatial": spatial, "layers": names})
    output_fn = output_fn or default_output_fn
    settings = {"m": m, "seed": seed, "sparsity": sparsity, "beta": beta, "layers": names,
                "target": target, "loss_fn": loss_fn is not None, "spatial": spatial,
                "dtype": str(dtype), "product": product, "mean_embedding": mean_embedding,
                "psi": psi, "psi_budget": psi_budget, "psi_dim": psi_dim,
                "max_batches": max_batches, "distributed": distributed,
                "world_size": _world_size(group) if distributed else 1}
    rank_suffix = ""
    planned_rows: Optional[List[List[int]]] = None
    if distributed:
        planned_rows, rank_suffix = _distributed_plan(data, group)
    done_batches = 0
    if checkpoint is not None:
        checkpoint = os.fspath(checkpoint) + rank_suffix
        if checkpoint_every is not None and (isinstance(checkpoint_every, bool) or
                                             not isinstance(checkpoint_every, int) or
                                             checkpoint_every < 1):
            raise ValueError(f"checkpoint_every must be a positive int, got {checkpoint_every!r}")
        if into is not None:
            raise ValueError("checkpoint= cannot be combined with into=")
        resumed = _resume(checkpoint, settings, rep_device)
        if resumed is not None:
            rep, done_batches, complete = resumed
            if complete:
                return _finish_distributed(rep, distributed, group)
    elif checkpoint_every is not None:
        raise ValueError("checkpoint_every needs checkpoint=path")

    def save_progress(batches: int, complete: bool) -> None:
        rep.meta["progress"] = {"settings": settings, "batches": batches, "complete": complete}
        rep.save(checkpoint)

    bar = _progress_bar(data, progress)
    batch_index = -1
    try:
        with eval_mode(model), LayerProbe(model, names) as probe, torch.enable_grad():
            for batch_index, batch in enumerate(data):
                if max_batches is not None and batch_index >= max_batches:
                    batch_index -= 1
                    break
                x, y, index = unpack_batch(batch)
                if not isinstance(x, torch.Tensor):
                    raise TypeError(f"batch {batch_index}: inputs must be a tensor, got "
                                    f"{type(x).__name__}")
                if batch_index < done_batches:   # already in the resumed checkpoint
                    if bar is not None:
                        bar.update(int(x.shape[0]))
                    continue
                rows = None if index is None else _index_tensor(index, batch_index)
                keep = None
                if planned_rows is not None:
                    rows, keep = _planned_batch_rows(planned_rows, batch_index, rows, x.shape[0])
                features, gradients, shapes = _batch_statistics(
                    model, probe, names, x.to(model_device), y, batch_index, output_fn,
                    target, loss_fn, beta, spatial)
                if keep is not None:
                    features = {k: v[keep] for k, v in features.items()}
                    gradients = {k: v[keep] for k, v in gradients.items()}
                    rows = rows[keep]
                if rows is not None:
                    rows = rows.to(rep.device)
                if rows is None or rows.numel():
                    rep.update(features, gradients, rows=rows, feature_shapes=shapes,
                               label=f"batch {batch_index}")
                if bar is not None:
                    bar.update(int(x.shape[0]))
                if checkpoint is not None and checkpoint_every is not None and \
                        (batch_index + 1) % checkpoint_every == 0:
                    save_progress(batch_index + 1, complete=False)
    except Exception:
        # A batch that fails leaves the representation as it was before it, so the
        # batches already done are kept: a rerun resumes from the failing batch.
        if checkpoint is not None and batch_index > done_batches:
            save_progress(batch_index, complete=False)
        raise
    finally:
        if bar is not None:
            bar.close()
    if rep.n == 0 and not distributed:
        raise ValueError("data yielded no samples")
    if checkpoint is not None:
        save_progress(batch_index + 1, complete=True)
    return _finish_distributed(rep, distributed, group)


def _batch_statistics(model, probe: LayerProbe, names: List[str], x: torch.Tensor, y,
                      batch_index: int, output_fn: Callable, target: str,
                      loss_fn: Optional[Callable], beta: float, spatial: str):
    """Features, expected gradients and feature shapes of one batch at every probed layer."""
    probe.reset()
    logits = output_fn(model(x))
    missing = [name for name in names if name not in probe.features]
    if missing:
        raise ValueError(f"layers {missing} did not run in the forward pass of "
                           f"batch {batch_index}")
    if loss_fn is not None or target == "labels":
        if y is None:
            raise ValueError(f"batch {batch_index} has no labels, but "
                             f"{'loss_fn' if loss_fn else 'target=labels'} needs them")
        y = y.to(logits.device)
        loss = (loss_fn(logits, y) if loss_fn is not None else
                torch.nn.functional.cross_entropy(logits, y, reduction="none"))
        objective = loss.sum()
    else:
        objective = expected_gradient_objective(logits, beta)
    deltas = [probe.deltas[name] for name in names]
    grads = torch.autograd.grad(objective, deltas, allow_unused=True)
    features, gradients, shapes = {}, {}, {}
    for name, grad in zip(names, grads):
        feature = probe.features[name]
        if grad is None:  # the layer does not influence the output
            grad = torch.zeros_like(feature)
        f = _flatten(feature, spatial, is_gradient=False)
        g = _flatten(grad, spatial, is_gradient=True)
        features[name], gradients[name] = f, g
        shapes[name] = tuple(feature.shape[1:])
    probe.reset()
    return features, gradients, shapes


def features_and_gradients(model: nn.Module, x: torch.Tensor, layers: Sequence[str],
                           beta: float = 0.5, *, spatial: str = "flatten", batch: int = 256,
                           target: str = "expected", y: Optional[torch.Tensor] = None,
                           loss_fn: Optional[Callable] = None,
                           output_fn: Optional[Callable] = None
                           ) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Per-sample features and expected gradients, unsketched: ``{layer: (f, g)}``, float64 ``[N, d]``.

    The same quantities :func:`sketch_model` sketches (same options), kept per
    sample -- for small N, tests, or a test point's own ``f`` and ``g`` (e.g.
    kernel ridge regression against sketched buckets).
    """
    names = resolve_layers(model, layers)
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"beta must be in (0, 1], got {beta!r}")
    device = _model_device(model)
    out: Dict[str, Tuple[List[torch.Tensor], List[torch.Tensor]]] = {n: ([], []) for n in names}
    labels = [None] * len(x.split(batch)) if y is None else list(y.split(batch))
    with eval_mode(model), LayerProbe(model, names) as probe, torch.enable_grad():
        for index, (chunk, chunk_y) in enumerate(zip(x.split(batch), labels)):
            feats, grads, _ = _batch_statistics(model, probe, names, chunk.to(device), chunk_y,
                                                index, output_fn or default_output_fn, target,
                                                loss_fn, beta, spatial)
            for name in names:
                out[name][0].append(feats[name].to(torch.float64))
                out[name][1].append(grads[name].to(torch.float64))
    return {name: (torch.cat(fs), torch.cat(gs)) for name, (fs, gs) in out.items()}


def _resume(path: str, settings: Dict, device) -> Optional[Tuple[Representation, int, bool]]:
    """The checkpointed representation, batches done and completion, if ``path`` exists."""
    if not os.path.exists(path):
        return None
    rep = Representation.load(path, device=device)
    progress = rep.meta.get("progress") or {}
    saved = progress.get("settings")
    if saved != json.loads(json.dumps(settings)):
        changed = sorted(k for k in set(saved or {}) | set(settings)
                         if (saved or {}).get(k) != json.loads(json.dumps(settings)).get(k))
        raise ValueError(f"checkpoint {path!r} was written with different settings "
                         f"({', '.join(changed)}); delete it or use another path")
    return rep, int(progress.get("batches", 0)), bool(progress.get("complete", False))


# --------------------------------------------------------------------------- distributed

def _world_size(group) -> int:
    import torch.distributed as dist
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _distributed_plan(data, group) -> Tuple[List[List[int]], str]:
    """Dataset indices of this rank's batches; ``-1`` marks a row another rank owns.

    With a ``DistributedSampler`` (no ``drop_last``), rank r's p-th sample sits at
    position ``r + p * world`` of the padded global order, and positions at or
    past ``len(dataset)`` repeat earlier samples: those rows are dropped, so no
    sample counts twice and nothing is exchanged.  Other samplers must give each
    sample to one rank only (checked when the ranks' rows are summed).
    """
    import torch.distributed as dist
    from torch.utils.data.distributed import DistributedSampler
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("distributed=True needs an initialised torch.distributed process "
                           "group (e.g. launched with torchrun and init_process_group)")
    batch_sampler = getattr(data, "batch_sampler", None)
    sampler = getattr(data, "sampler", None)
    if batch_sampler is None or not isinstance(sampler, DistributedSampler):
        raise TypeError("distributed=True needs a torch DataLoader whose sampler is a "
                        "DistributedSampler (its order is the same on every pass, so each row's "
                        "dataset index is known)")
    world, rank = sampler.num_replicas, sampler.rank
    size = len(sampler.dataset)
    plan, position = [], 0
    for batch in batch_sampler:
        kept = []
        for index in batch:
            padded = not sampler.drop_last and rank + position * world >= size
            kept.append(-1 if padded else int(index))
            position += 1
        plan.append(kept)
    return plan, f".rank{dist.get_rank(group)}"


def _planned_batch_rows(plan: List[List[int]], batch_index: int, rows: Optional[torch.Tensor],
                        batch: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    if batch_index >= len(plan) or len(plan[batch_index]) != batch:
        raise RuntimeError(f"batch {batch_index} does not match the DataLoader's batch sampler; "
                           "the loader must yield its batches in sampler order")
    planned = torch.tensor(plan[batch_index], dtype=torch.int64)
    if rows is not None:
        mask = planned >= 0
        if not torch.equal(rows.cpu()[mask], planned[mask]):
            raise RuntimeError(f"batch {batch_index}: the batch's own indices differ from the "
                               "batch sampler's")
    keep = planned >= 0
    return planned.clamp_min(0), (None if bool(keep.all()) else keep)


def _finish_distributed(rep: Representation, distributed: bool, group) -> Representation:
    if distributed:
        rep.all_reduce(group)
        if rep.n == 0:
            raise ValueError("data yielded no samples on any rank")
    return rep


class IndexedDataset(torch.utils.data.Dataset):
    """Wrap a dataset so each item also carries its index: ``{"index", "x", "y"}``.

    With such batches, a sample's bucket and sign depend on its dataset index,
    not on its position in the stream, so shuffled loaders, any batch size and
    any sharding give the same sketch.  Items of the wrapped dataset may be
    ``x`` or ``(x, y)``.
    """

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        if isinstance(item, (tuple, list)):
            if len(item) == 2:
                return {"index": index, "x": item[0], "y": item[1]}
            if len(item) == 1:
                return {"index": index, "x": item[0]}
            raise ValueError(f"IndexedDataset items must be x or (x, y), got a tuple of "
                             f"{len(item)}")
        return {"index": index, "x": item}
