"""Reading what a data loader yields: model inputs, labels, dataset indices, attention mask.

Accepted batches:

* ``x`` (a tensor), ``(x,)``, ``(x, y)``, or ``(index, x, y)`` with ``index`` a
  1-D integer tensor of dataset indices;
* a dict with ``x`` (or ``input`` / ``inputs``): ``x`` is the model's one
  positional input (other entries except the mask are ignored);
* a dict without those (Hugging Face style, e.g. ``{"input_ids",
  "attention_mask", "labels"}``): every entry except the label keys
  :data:`LABEL_KEYS` and the index keys :data:`INDEX_KEYS` is passed to the
  model as a keyword argument.

In a dict, labels come from the first of :data:`LABEL_KEYS` present, dataset
indices from ``index``, and an ``attention_mask`` entry (``[batch, tokens]``,
nonzero for real tokens) tells token pooling which positions are padding.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = ["Batch", "read_batch", "unpack_batch", "check_data", "IndexedDataset",
           "LABEL_KEYS", "INDEX_KEYS", "INPUT_KEYS", "MASK_KEY"]

#: Dict keys read as labels (never passed to the model).
LABEL_KEYS = ("y", "label", "labels", "target")
#: Dict keys read as dataset indices (never passed to the model).
INDEX_KEYS = ("index",)
#: Dict keys read as the model's single positional input.
INPUT_KEYS = ("x", "input", "inputs")
#: The dict key of the padding mask used to pool token outputs.
MASK_KEY = "attention_mask"


@dataclasses.dataclass
class Batch:
    """One batch, read: how to call the model and what else came with the inputs."""

    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    labels: Any
    index: Any
    mask: Optional[Tensor]
    size: int

    def call(self, model: nn.Module):
        return model(*self.args, **self.kwargs)

    def to(self, device: torch.device) -> "Batch":
        """The batch with its model inputs on ``device`` (labels and mask move when used)."""
        return dataclasses.replace(self, args=tuple(_to(a, device) for a in self.args),
                                   kwargs={k: _to(v, device) for k, v in self.kwargs.items()})

    def rows(self, label: str) -> Optional[Tensor]:
        """The batch's dataset indices as int64 ``[size]``, or None (stream numbering)."""
        if self.index is None:
            return None
        rows = torch.as_tensor(self.index)
        if rows.dtype == torch.bool or rows.is_floating_point() or rows.is_complex():
            raise TypeError(f"{label}: dataset indices must be integers, got {rows.dtype}")
        return rows.to(torch.int64)


def _to(value, device: torch.device):
    if not isinstance(value, Tensor):
        return value
    value = value.to(device)
    # Tensors made under torch.inference_mode() cannot take part in autograd; a
    # clone made outside it can (the pass itself runs with inference mode off).
    return value.clone() if value.is_inference() else value


def read_batch(batch, label: str = "batch") -> Batch:
    """A :class:`Batch` from any accepted form (see the module docstring)."""
    if isinstance(batch, Tensor):
        return _positional(batch, None, None, None, label)
    if isinstance(batch, Mapping):
        return _from_mapping(batch, label)
    if isinstance(batch, (tuple, list)):
        return _from_sequence(batch, label)
    raise TypeError(f"{label}: cannot read a batch of type {type(batch).__name__}; use x, (x, y), "
                    "(index, x, y) with 1-D integer indices, or a dict (with 'x', or keyword "
                    "arguments for the model such as 'input_ids')")


def _positional(x, labels, index, mask, label: str) -> Batch:
    if not isinstance(x, Tensor):
        raise TypeError(f"{label}: inputs must be a tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError(f"{label}: inputs must have a batch axis, got a 0-d tensor")
    return Batch((x,), {}, labels, index, mask, int(x.shape[0]))


def _from_sequence(batch, label: str) -> Batch:
    if len(batch) == 1:
        return _positional(batch[0], None, None, None, label)
    if len(batch) == 2:
        return _positional(batch[0], batch[1], None, None, label)
    first = batch[0]
    if len(batch) == 3 and isinstance(first, Tensor) and first.dim() == 1 \
            and not first.is_floating_point() and first.dtype != torch.bool:
        return _positional(batch[1], batch[2], first, None, label)
    raise TypeError(f"{label}: cannot read a {type(batch).__name__} of length {len(batch)}; use "
                    "x, (x, y), (index, x, y) with 1-D integer indices, or a dict")


def _from_mapping(batch: Mapping, label: str) -> Batch:
    labels = next((batch[k] for k in LABEL_KEYS if k in batch), None)
    index = next((batch[k] for k in INDEX_KEYS if k in batch), None)
    mask = batch.get(MASK_KEY)
    mask = mask if isinstance(mask, Tensor) else None
    x = next((batch[k] for k in INPUT_KEYS if k in batch), None)
    if x is not None:
        return _positional(x, labels, index, mask, label)
    kwargs = {k: v for k, v in batch.items() if k not in LABEL_KEYS + INDEX_KEYS}
    sizes = [int(v.shape[0]) for v in kwargs.values() if isinstance(v, Tensor) and v.dim()]
    if not sizes:
        raise ValueError(f"{label}: a dict batch needs model inputs: an 'x' entry, or tensors to "
                         f"pass to the model as keyword arguments (e.g. 'input_ids'); got keys "
                         f"{sorted(batch)}")
    return Batch((), kwargs, labels, index, mask, sizes[0])


def check_keywords(model: nn.Module, batch: Batch, label: str) -> None:
    """Refuse keyword inputs the model's ``forward`` does not take, before calling it."""
    if not batch.kwargs:
        return
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):    # a builtin or C++ forward: let the call decide
        return
    if any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
        return
    unknown = sorted(set(batch.kwargs) - set(parameters))
    if unknown:
        raise ValueError(
            f"{label}: the model's forward takes no argument {', '.join(map(repr, unknown))}. A "
            f"dict batch without an 'x' entry is passed to the model as keyword arguments (all "
            f"keys but the labels {LABEL_KEYS} and the index {INDEX_KEYS}); forward takes "
            f"({', '.join(parameters)}). Rename the entries, or put the input under 'x'.")


def unpack_batch(batch) -> Tuple[Any, Any, Any]:
    """``(inputs, labels, index)`` of a batch; ``inputs`` is the tensor ``x``, or the dict of
    keyword arguments for a dict batch without ``x``."""
    read = read_batch(batch)
    return (read.args[0] if read.args else read.kwargs), read.labels, read.index


def check_data(data) -> None:
    """Refuse ``data`` that iterates into something other than batches."""
    if isinstance(data, Tensor):
        raise TypeError(
            f"data is a single tensor of shape {tuple(data.shape)}; data must yield batches, and "
            "iterating a tensor would give single samples without their batch axis. Pass [x] "
            "for one batch, list(x.split(256)) for batches of 256, or a DataLoader")
    if isinstance(data, (Mapping, str, bytes)):
        raise TypeError(f"data is a {type(data).__name__}; data must yield batches: pass "
                        "[batch] for one batch, or a DataLoader")
    # Not iter(data): starting a DataLoader's iterator draws from its generator (the
    # shuffle order would change) and may start worker processes.
    if not (hasattr(type(data), "__iter__") or hasattr(type(data), "__getitem__")):
        raise TypeError(f"data must be an iterable of batches (a DataLoader, a list, a "
                        f"generator), got {type(data).__name__}")


class IndexedDataset(torch.utils.data.Dataset):
    """Wrap a dataset so each item also carries its index.

    With such batches, a sample's bucket and sign depend on its dataset index,
    not on its position in the stream, so shuffled loaders, any batch size and
    any sharding give the same sketch.  Items of the wrapped dataset may be
    ``x`` or ``(x, y)`` (giving ``{"index", "x", "y"}``), or dicts (Hugging Face
    style), which get an ``index`` entry.
    """

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        if isinstance(item, Mapping):
            return {**item, "index": index}
        if isinstance(item, (tuple, list)):
            if len(item) == 2:
                return {"index": index, "x": item[0], "y": item[1]}
            if len(item) == 1:
                return {"index": index, "x": item[0]}
            raise ValueError(f"IndexedDataset items must be x or (x, y), got a tuple of "
                             f"{len(item)}")
        return {"index": index, "x": item}
