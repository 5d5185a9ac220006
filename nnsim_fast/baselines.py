"""Baselines the seed paper compares against: Task2Vec and the Fisher–Rao norm distance.

Task2Vec (Achille et al., 2019) represents a model on a dataset by the diagonal of the Fisher
information matrix with respect to the parameters,

    v_i = E_{x ~ data} E_{y ~ p_theta(y|x)} [ (d log p_theta(y|x) / d theta_i)^2 ],

and compares two such vectors with a cosine distance. The seed paper (section 2, eq. 1–2) uses
plain cosine similarity on the embeddings, so that is the default here; the symmetric
normalisation of the Task2Vec paper (divide both vectors element-wise by their sum before the
cosine) is available as an option.

The Fisher–Rao norm (Liang et al., 2019) is

    ||theta||_fr^2 = (L + 1)^2 E_{x, y} < f_theta(x), d loss(f_theta(x), y) / d f >^2,

with f the logits, loss the cross-entropy (so d loss / d f = softmax(f) - onehot(y)) and L the
number of hidden layers. Two models are compared by
rho = | ||theta_1||_fr - ||theta_2||_fr | / sqrt(||theta_1||_fr ||theta_2||_fr).

Both baselines expect a classifier: the model maps a batch x[B, ...] to logits [B, C]. The model
is evaluated in eval mode (restored afterwards, also when an error is raised) and must treat
samples independently there, as the per-sample gradients are computed one sample at a time with
``torch.func``. Parameters are passed to the model functionally, so the model itself is never
moved, modified or left with ``.grad`` tensors.

Labels, for both functions, are chosen by ``labels``:

* ``"model"`` — y is drawn from the model's own predictive p_theta(y|x) with a
  ``torch.Generator`` (the Fisher information proper, estimated with one draw per sample);
* ``"expected"`` — the expectation over y ~ p_theta(y|x) is taken exactly (every class,
  weighted by its probability): no sampling noise, C times the gradient work for Task2Vec;
* ``"true"`` — the labels of the batch are used (the "empirical Fisher").
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Tuple, Union

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from ._checks import check_bool, check_choice, check_float, check_int, check_optional_int
from .extract import eval_mode

__all__ = [
    "task2vec_embedding",
    "task2vec_distance",
    "fisher_rao_norm",
    "fisher_rao_distance",
    "default_depth",
]

_LABEL_MODES = ("model", "expected", "true")

_INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)

Batch = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


# ----------------------------------------------------------------------------------------------
# building blocks shared by both baselines
# ----------------------------------------------------------------------------------------------


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _check_generator(generator: Any) -> torch.Generator:
    if generator is None:
        # A fixed default keeps results reproducible run to run; pass a generator to vary it.
        return torch.Generator().manual_seed(0)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


def _resolve_device(model: nn.Module, device: Any) -> torch.device:
    if device is not None:
        try:
            return torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise TypeError(f"device must be a torch.device, a string or None, got {device!r}") from error
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _functional_state(
    model: nn.Module, device: torch.device
) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """Split the model's state into trainable parameters and everything else, on ``device``.

    The tensors are detached copies (or views when already on ``device``), so nothing flows into
    the model's own autograd state.
    """
    trainable: Dict[str, torch.Tensor] = {}
    fixed: Dict[str, torch.Tensor] = {}
    for name, parameter in model.named_parameters():
        target = trainable if parameter.requires_grad else fixed
        target[name] = parameter.detach().to(device)
    for name, buffer in model.named_buffers():
        fixed[name] = buffer.detach().to(device)
    return trainable, fixed


def _split_batch(batch: Any, need_labels: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    if isinstance(batch, torch.Tensor):
        x, y = batch, None
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        x, y = batch
    else:
        length = f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
        raise TypeError(
            f"data must yield tensors x or pairs (x, y); got a batch of type {type(batch).__name__}{length}"
        )
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"data: the inputs x of a batch must be a tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(
            f"data: a batch must have a leading, non-empty batch axis, got x of shape {tuple(x.shape)}"
        )
    if need_labels:
        _check_batch_labels(x, y)
    return x, y


def _check_batch_labels(x: torch.Tensor, y: Any) -> None:
    if y is None:
        raise ValueError('data: labels="true" needs batches (x, y), but a batch holds only x')
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"data: the labels y of a batch must be a tensor, got {type(y).__name__}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"data: labels y must have shape [B] matching x of shape {tuple(x.shape)}, got {tuple(y.shape)}"
        )
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"data: labels y must be an integer tensor of class indices, got dtype {y.dtype}")


def _check_logits(logits: Any, batch_size: int) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"model must return a logits tensor [B, C], got {type(logits).__name__}")
    if logits.dim() != 2 or logits.shape[0] != batch_size or logits.shape[1] < 1:
        raise ValueError(
            f"model must return logits of shape [B, C] = [{batch_size}, C], got {tuple(logits.shape)}"
        )
    if not logits.dtype.is_floating_point:
        raise TypeError(f"model must return floating-point logits, got dtype {logits.dtype}")
    return logits


def _check_true_labels(y: torch.Tensor, num_classes: int) -> None:
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"data: labels must lie in [0, {num_classes}) for logits with {num_classes} classes, "
            f"got values in [{int(y.min())}, {int(y.max())}]"
        )


def _sample_labels(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # Sampling happens where the generator lives so that one seed gives the same labels for any
    # compute device.
    probabilities = torch.softmax(logits.detach().to(torch.float64), dim=-1)
    drawn = torch.multinomial(probabilities.to(generator.device), 1, generator=generator)
    return drawn.squeeze(1).to(logits.device)


def _batch_targets(
    labels: str,
    y: Optional[torch.Tensor],
    logits: torch.Tensor,
    generator: Optional[torch.Generator],
    device: torch.device,
) -> torch.Tensor:
    """The class y of each sample for ``labels="true"`` (the batch's) or ``"model"`` (drawn)."""
    if labels == "true":
        assert y is not None
        _check_true_labels(y, logits.shape[1])
        return y.to(device=device, dtype=torch.long)
    assert generator is not None
    return _sample_labels(logits, generator)


def _progress(iterable: Iterable[Any], enabled: bool, description: str) -> Iterable[Any]:
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress is a convenience, never a requirement
        return iterable
    return tqdm(iterable, desc=description)


def _iterate_batches(
    data: Iterable[Any], need_labels: bool, max_samples: Optional[int], progress: bool, description: str
) -> Iterator[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    if isinstance(data, (torch.Tensor, str, bytes)) or not hasattr(data, "__iter__"):
        raise TypeError(f"data must be an iterable of batches, got {type(data).__name__}")
    seen = 0
    for batch in _progress(data, progress, description):
        x, y = _split_batch(batch, need_labels)
        if max_samples is not None:
            keep = min(x.shape[0], max_samples - seen)
            x = x[:keep]
            y = None if y is None else y[:keep]
        seen += x.shape[0]
        yield x, y
        if max_samples is not None and seen >= max_samples:
            return


# ----------------------------------------------------------------------------------------------
# Task2Vec
# ----------------------------------------------------------------------------------------------


def task2vec_embedding(
    model: nn.Module,
    data: Iterable[Batch],
    *,
    max_samples: Optional[int] = None,
    labels: str = "model",
    generator: Optional[torch.Generator] = None,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = False,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Task2Vec embedding: the diagonal of the Fisher information w.r.t. the trainable parameters.

    Computes ``F_ii = E_x E_y [(d log p(y|x) / d theta_i)^2]`` with exact per-sample gradients
    (``torch.func.vmap`` over ``grad`` of a ``functional_call``), averaged over every sample the
    data yields (or the first ``max_samples``).

    Args:
        model: a classifier mapping x[B, ...] to logits [B, C]. Evaluated in eval mode; its
            training flags are restored afterwards, it is not moved and gets no ``.grad``.
        data: iterable of batches, each ``x`` or ``(x, y)`` with y integer class indices [B].
        max_samples: stop after this many samples (None: use all).
        labels: ``"model"`` (y drawn from p(y|x) with ``generator``; the Fisher information),
            ``"expected"`` (exact expectation over y, C gradients per sample) or ``"true"``
            (the batch labels; the empirical Fisher).
        generator: random source for ``labels="model"``; None means a CPU generator seeded with
            0, so the default is reproducible. Labels are drawn on the generator's device, one
            ``torch.multinomial`` call per batch, in data order.
        device: where to compute (the parameters are copied there, the model is untouched);
            default: the device of the model's parameters.
        progress: show a tqdm progress bar over batches (if tqdm is installed).
        chunk_size: samples per vectorised gradient chunk (bounds memory at roughly
            chunk_size x number of parameters); None processes a whole batch at once.

    Returns:
        float64 vector [P] of non-negative entries, P the number of trainable parameter
        elements, in ``model.named_parameters()`` order, each parameter flattened row-major.
    """
    _check_model(model)
    check_choice(labels, "labels", _LABEL_MODES)
    max_samples = check_optional_int(max_samples, "max_samples", low=1)
    chunk_size = check_optional_int(chunk_size, "chunk_size", low=1)
    progress = check_bool(progress, "progress")
    generator = _check_generator(generator) if labels == "model" else None
    compute_device = _resolve_device(model, device)
    trainable, fixed = _functional_state(model, compute_device)
    if not trainable:
        raise ValueError("model has no trainable parameters (none with requires_grad=True)")
    logits_of, gradient, jacobian = _log_probability_derivatives(model, fixed, chunk_size)

    totals = {
        name: torch.zeros(tensor.shape, dtype=torch.float64, device=compute_device)
        for name, tensor in trainable.items()
    }
    count = 0
    with eval_mode(model):
        for x, y in _iterate_batches(data, labels == "true", max_samples, progress, "task2vec"):
            x = x.to(compute_device)
            with torch.no_grad():
                logits = _check_logits(logits_of(trainable, x), x.shape[0])
            if labels == "expected":
                _add_expected_squares(totals, *jacobian(trainable, x))
            else:
                targets = _batch_targets(labels, y, logits, generator, compute_device)
                _add_squares(totals, gradient(trainable, x, targets))
            count += x.shape[0]
    if count == 0:
        raise ValueError("data yielded no samples")
    return torch.cat([total.reshape(-1) for total in totals.values()]) / count


def _log_probability_derivatives(
    model: nn.Module, fixed: Dict[str, torch.Tensor], chunk_size: Optional[int]
) -> Tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]:
    """The model's logits and the per-sample derivatives of log p(y|x), as functions of the parameters.

    Returns ``(logits_of, gradient, jacobian)``:

    * ``logits_of(params, x)``: logits [B, C] of a batch;
    * ``gradient(params, x, y)``: per parameter, d log p(y_i|x_i) / d theta [B, *shape];
    * ``jacobian(params, x)``: per parameter, the same for every class [B, C, *shape], and
      p(.|x_i) [B, C] (detached).

    The derivatives are vmapped over the batch, ``chunk_size`` samples at a time.
    """

    def logits_of(params: Dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, (params, fixed), (x,))

    def log_probability(params: Dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        log_probabilities = torch.log_softmax(logits_of(params, x.unsqueeze(0)), dim=-1)
        return log_probabilities[0].gather(0, y.reshape(1)).squeeze(0)

    def all_log_probabilities(
        params: Dict[str, torch.Tensor], x: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        log_probabilities = torch.log_softmax(logits_of(params, x.unsqueeze(0)), dim=-1)[0]
        return log_probabilities, log_probabilities.detach().exp()

    gradient = vmap(grad(log_probability), in_dims=(None, 0, 0), chunk_size=chunk_size)
    jacobian = vmap(jacrev(all_log_probabilities, has_aux=True), in_dims=(None, 0), chunk_size=chunk_size)
    return logits_of, gradient, jacobian


def _add_squares(totals: Dict[str, torch.Tensor], gradients: Dict[str, torch.Tensor]) -> None:
    """Add the squared per-sample gradients [B, *shape], summed over the batch, to ``totals``."""
    for name in totals:
        totals[name] += gradients[name].to(torch.float64).square().sum(dim=0)


def _add_expected_squares(
    totals: Dict[str, torch.Tensor], jacobians: Dict[str, torch.Tensor], probabilities: torch.Tensor
) -> None:
    """Add E_{y ~ p(.|x)} of the squared gradients, summed over the batch, to ``totals``.

    The expectation is exact: each class's squared gradient [B, C, *shape] weighted by its
    probability [B, C].
    """
    weights = probabilities.to(torch.float64)
    for name in totals:
        squared = jacobians[name].to(torch.float64).square()
        weighted = squared * weights.reshape(weights.shape + (1,) * (squared.dim() - 2))
        totals[name] += weighted.sum(dim=(0, 1))


def task2vec_distance(e1: torch.Tensor, e2: torch.Tensor, *, normalize: bool = False) -> float:
    """Cosine distance between two Task2Vec embeddings: ``1 - <e1, e2> / (||e1|| ||e2||)``.

    The seed paper compares Task2Vec embeddings with plain cosine similarity, which is the default.
    With ``normalize=True`` both vectors are first divided element-wise by ``e1 + e2`` (the
    symmetric normalisation of Achille et al.; entries where both are zero are left at zero), which
    keeps parameters with large Fisher values in both models from dominating.

    Computed in float64. For non-negative embeddings (Fisher diagonals) the distance lies in
    [0, 1]; for arbitrary real vectors in [0, 2]. 0 means parallel; invariant to scaling either
    embedding by a positive factor. Embeddings of different lengths (different architectures)
    cannot be compared and raise ``ValueError``; so do zero vectors (no direction).
    """
    first = _as_embedding(e1, "e1")
    second = _as_embedding(e2, "e2")
    if first.shape != second.shape:
        raise ValueError(
            "e1 and e2 must have the same length (same architecture), "
            f"got {tuple(first.shape)} and {tuple(second.shape)}"
        )
    normalize = check_bool(normalize, "normalize")
    first = first.to(device=second.device)
    if normalize:
        if bool((first < 0).any()) or bool((second < 0).any()):
            raise ValueError("normalize=True needs non-negative embeddings (Fisher diagonals)")
        total = first + second
        safe_total = torch.where(total > 0, total, torch.ones_like(total))
        first = first / safe_total
        second = second / safe_total
    # Scale each vector by its largest magnitude first so that the norms neither over- nor underflow.
    first = first / first.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    second = second / second.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    norm_first = torch.linalg.vector_norm(first)
    norm_second = torch.linalg.vector_norm(second)
    if float(norm_first) == 0.0 or float(norm_second) == 0.0:
        raise ValueError("e1 and e2 must be non-zero vectors: the cosine of a zero vector is undefined")
    cosine = float(torch.dot(first, second) / (norm_first * norm_second))
    return float(min(2.0, max(0.0, 1.0 - cosine)))


def _as_embedding(value: Any, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != 1:
        raise ValueError(f"{name} must be a vector [P], got shape {tuple(value.shape)}")
    if value.numel() == 0:
        raise ValueError(f"{name} must not be empty")
    if not (value.dtype.is_floating_point or value.dtype in _INTEGER_DTYPES):
        raise TypeError(f"{name} must hold real numbers, got dtype {value.dtype}")
    result = value.detach().to(torch.float64)
    if not bool(torch.isfinite(result).all()):
        raise ValueError(f"{name} must be finite (no NaN or inf)")
    return result


# ----------------------------------------------------------------------------------------------
# Fisher–Rao norm
# ----------------------------------------------------------------------------------------------


def default_depth(model: nn.Module) -> int:
    """Number of hidden layers L assumed by :func:`fisher_rao_norm` when ``depth`` is not given.

    L + 1 is the number of weight layers on the path from input to logits; it is taken to be the
    number of ``nn.Linear`` and convolution (``nn.Conv1d/2d/3d`` and transposed) modules in
    ``model.modules()``, so L = that count - 1. For a bias-free ReLU network built from such
    layers in sequence, this makes ``(L + 1) <f, d loss/d f> = <theta, d loss/d theta>`` (the
    logits are positively homogeneous of degree L + 1 in the parameters). Architectures with
    branches, skip connections or weight layers off the main path should pass ``depth``.
    """
    _check_model(model)
    count = sum(isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) for module in model.modules())
    if count == 0:
        raise ValueError("model has no nn.Linear or convolution modules; pass depth explicitly")
    return count - 1


def fisher_rao_norm(
    model: nn.Module,
    data: Iterable[Batch],
    *,
    labels: str = "model",
    generator: Optional[torch.Generator] = None,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = False,
    depth: Optional[int] = None,
    max_samples: Optional[int] = None,
) -> float:
    """Fisher–Rao norm ``||theta||_fr = (L + 1) sqrt(E_x E_y <f, d loss/d f>^2)``, in [0, inf).

    f are the logits, loss the cross-entropy, so ``<f, d loss/d f> = <f, softmax(f)> - f_y``: only
    forward passes are needed. The mean is over every sample the data yields (float64).

    Args:
        model: a classifier mapping x[B, ...] to logits [B, C]; evaluated in eval mode, restored
            afterwards, never moved.
        data: iterable of batches ``x`` or ``(x, y)``.
        labels: ``"model"`` (y ~ p(y|x) drawn with ``generator``), ``"expected"`` (exact
            expectation over y ~ p(y|x): the variance of f under softmax(f)) or ``"true"``.
        generator: random source for ``labels="model"``; None means a CPU generator seeded with 0.
        device: where to compute; default: the device of the model's parameters.
        progress: show a tqdm progress bar over batches.
        depth: the number of hidden layers L (>= 0); default :func:`default_depth` (number of
            Linear/convolution modules minus 1).
        max_samples: stop after this many samples (None: use all).

    Returns:
        the norm (not its square), a float >= 0.
    """
    _check_model(model)
    check_choice(labels, "labels", _LABEL_MODES)
    max_samples = check_optional_int(max_samples, "max_samples", low=1)
    progress = check_bool(progress, "progress")
    depth = default_depth(model) if depth is None else check_int(depth, "depth", low=0)
    generator = _check_generator(generator) if labels == "model" else None
    compute_device = _resolve_device(model, device)
    trainable, fixed = _functional_state(model, compute_device)

    total = torch.zeros((), dtype=torch.float64, device=compute_device)
    count = 0
    with eval_mode(model), torch.no_grad():
        for x, y in _iterate_batches(data, labels == "true", max_samples, progress, "fisher-rao"):
            x = x.to(compute_device)
            logits = _check_logits(functional_call(model, (trainable, fixed), (x,)), x.shape[0])
            logits64 = logits.to(torch.float64)
            probabilities = torch.softmax(logits64, dim=-1)
            mean_logit = (probabilities * logits64).sum(dim=-1)  # <f, softmax(f)>
            if labels == "expected":
                # E_y (<f, p> - f_y)^2 over y ~ p is the variance of the logits under p.
                total += (probabilities * (logits64 - mean_logit[:, None]).square()).sum()
            else:
                targets = _batch_targets(labels, y, logits, generator, compute_device)
                inner = mean_logit - logits64.gather(1, targets[:, None]).squeeze(1)
                total += inner.square().sum()
            count += x.shape[0]
    if count == 0:
        raise ValueError("data yielded no samples")
    return float((depth + 1) * math.sqrt(float(total) / count))


def fisher_rao_distance(norm1: float, norm2: float) -> float:
    """Fisher–Rao norm distance ``rho = |n1 - n2| / sqrt(n1 n2)``, in [0, inf).

    Symmetric, 0 exactly when the norms are equal, invariant to scaling both norms by the same
    positive factor. Norms must be finite and > 0 (the distance is undefined otherwise).
    """
    first = _as_positive_norm(norm1, "norm1")
    second = _as_positive_norm(norm2, "norm2")
    # Written as |sqrt(a/b) - sqrt(b/a)| so that neither the product nor the difference overflows.
    ratio = math.sqrt(first) / math.sqrt(second)
    return float(abs(ratio - 1.0 / ratio))


def _as_positive_norm(value: Any, name: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    return check_float(value, name, low=0.0, low_open=True)
