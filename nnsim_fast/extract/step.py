"""One batch through the model: features at the probed layers and, unless features only,
the expected loss gradients there, from one forward and one backward pass.

For categorical outputs the expected gradient of the cross-entropy under the
tempered predictive ``q(y|x) ∝ p(y|x)^beta`` is obtained by back-propagating
``p - q`` from the logits (``E_q[p - e_y] = p - q``); the model is in eval mode
so every sample's gradient is its own.  ``torch.autograd.grad`` is used, so no
parameter's ``.grad`` is touched.
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from .._checks import check_bool, check_choice, check_float
from ..options import SPATIAL, TARGETS, TOKENS
from .batches import Batch, check_keywords
from .pooling import pool
from .probe import LayerProbe, resolve_layers

__all__ = ["Extraction", "Statistics", "batch_statistics", "default_output_fn",
           "expected_gradient_objective", "autograd_mode"]


@dataclasses.dataclass(frozen=True)
class Extraction:
    """What is taken from every batch; shared by :func:`~nnsim_fast.sketch_model`,
    :func:`~nnsim_fast.extract.exact_model` and
    :func:`~nnsim_fast.extract.features_and_gradients`.

    Args (of those functions):
        layers: names from ``model.named_modules()``; default: the model's direct
            children (its top-level blocks).
        beta: temperature of the predictive ``q ∝ p^beta``, in (0, 1]; at 1 the
            expected gradient is exactly zero (a warning says so).
        target: ``"expected"`` (the paper) or ``"labels"`` (cross-entropy with the
            batch's true labels).
        loss_fn: instead of the above, ``loss_fn(logits, y)`` returning per-sample
            losses or their sum; gradients are of its sum.
        output_fn: maps the model's output to the ``[batch, classes]`` logits.
            Default: a tensor; the only tensor of a tuple/list; ``output['logits']``
            of a dict or ``ModelOutput``; ``output.logits``.  A tuple holding
            several tensors is refused: say which one is the logits.
        spatial: conv maps ``[B, C, H, W]``: ``"flatten"`` keeps every position
            (the paper), ``"mean"`` averages features over positions and sums
            gradients (see :mod:`nnsim_fast.extract.pooling`).
        tokens: token outputs ``[B, T, D]``: ``"mean"`` over the real tokens
            (the batch's ``attention_mask`` removes padding), ``"first"``, or
            ``"flatten"``.
        gradients: False for features only: no backward pass, no autograd graph
            kept (only ``kind="feature"`` can then be computed).
    """

    layers: Tuple[str, ...]
    beta: float
    target: str                  # "expected", "labels" or "loss_fn"
    spatial: str
    tokens: str
    gradients: bool
    output_fn: Callable = dataclasses.field(compare=False)
    loss_fn: Optional[Callable] = dataclasses.field(default=None, compare=False)
    default_layers: bool = False

    @classmethod
    def build(cls, model: nn.Module, layers=None, *, beta=0.5, target: str = "expected",
              loss_fn: Optional[Callable] = None, output_fn: Optional[Callable] = None,
              spatial: str = "flatten", tokens: str = "mean", gradients=True) -> "Extraction":
        """Validate every extraction argument once, before any work."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        beta = check_float(beta, "beta", 0.0, 1.0, low_open=True)
        check_choice(target, "target", TARGETS)
        for fn, name in ((loss_fn, "loss_fn"), (output_fn, "output_fn")):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
        gradients = check_bool(gradients, "gradients")
        if gradients:
            _check_autograd_possible(model)
        extraction = cls(tuple(resolve_layers(model, layers)), beta,
                         "loss_fn" if loss_fn is not None else target,
                         check_choice(spatial, "spatial", SPATIAL),
                         check_choice(tokens, "tokens", TOKENS), gradients,
                         output_fn or default_output_fn, loss_fn, layers is None)
        if gradients and extraction.target == "expected" and beta == 1.0:
            warnings.warn("beta=1: the tempered predictive q equals p, so the expected gradient "
                          "E_q[d loss / d f] is exactly zero and the sketched gradients are "
                          "rounding noise; use beta in (0, 1) (the paper: 0.5) or "
                          "target='labels'", RuntimeWarning, stacklevel=3)
        return extraction

    def meta(self) -> Dict:
        """The settings a representation records (features only: no beta or target)."""
        return {"beta": self.beta if self.gradients else None,
                "target": self.target if self.gradients else None,
                "spatial": self.spatial, "tokens": self.tokens, "layers": list(self.layers)}


def _check_autograd_possible(model: nn.Module) -> None:
    made = [name for name, t in list(model.named_parameters()) + list(model.named_buffers())
            if t.is_inference()]
    if made:
        raise RuntimeError(
            f"the model's tensors {made[:3]} were created under torch.inference_mode() "
            "(inference tensors), and autograd cannot run through them, so no gradient can be "
            "taken. Create or load the model outside inference_mode (or clone its state_dict "
            "outside it), or pass gradients=False to sketch features only")


@dataclasses.dataclass
class Statistics:
    """One batch's ``[B, d]`` features (and gradients) per layer and the layers' raw shapes."""

    features: Dict[str, Tensor]
    gradients: Optional[Dict[str, Tensor]]
    shapes: Dict[str, Tuple[int, ...]]

    def select(self, keep: Tensor) -> "Statistics":
        """The rows where ``keep`` (bool ``[B]``) is set."""
        def rows(tensors: Optional[Dict[str, Tensor]]) -> Optional[Dict[str, Tensor]]:
            return None if tensors is None else {k: v[keep.to(v.device)] for k, v in tensors.items()}
        return Statistics(rows(self.features), rows(self.gradients), self.shapes)


def default_output_fn(output) -> Tensor:
    """Logits from a model output: a tensor, the only tensor of a tuple/list,
    ``output['logits']`` (dicts, Hugging Face ``ModelOutput``) or ``output.logits``."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)):
        tensors = [t for t in output if isinstance(t, Tensor)]
        if len(tensors) == 1:
            return tensors[0]
        if len(tensors) > 1:
            shapes = ", ".join(str(tuple(t.shape)) for t in tensors)
            raise TypeError(
                f"the model returns a {type(output).__name__} of {len(tensors)} tensors ({shapes}); "
                "which one holds the logits would be a guess: pass output_fn=, e.g. "
                "output_fn=lambda out: out[1]")
    if not isinstance(output, Mapping) and isinstance(getattr(output, "logits", None), Tensor):
        return output.logits
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}; "
                    "pass output_fn=lambda out: ... returning the [batch, classes] logits")


def expected_gradient_objective(logits: Tensor, beta: float) -> Tensor:
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


def _objective(logits: Tensor, labels, extraction: Extraction, label: str) -> Tensor:
    if extraction.target == "expected":
        return expected_gradient_objective(logits, extraction.beta)
    if labels is None:
        raise ValueError(f"{label} has no labels, but "
                         f"{'loss_fn' if extraction.loss_fn else 'target=labels'} needs them")
    labels = torch.as_tensor(labels).to(logits.device)
    if extraction.loss_fn is not None:
        return extraction.loss_fn(logits, labels).sum()
    return nn.functional.cross_entropy(logits, labels, reduction="sum")


_NO_GRADIENT = (
    "the model's output does not require grad, so no gradient can reach the probed layers: part "
    "of the forward pass between them and the logits runs without autograd (torch.no_grad(), "
    ".detach(), torch.inference_mode() inside forward, or a non-differentiable op). Remove it "
    "from the path to the logits, probe layers after it, or pass gradients=False to sketch "
    "features only")


def _layer_gradients(output, probe: LayerProbe, batch: Batch, extraction: Extraction,
                     label: str) -> Dict[str, Tensor]:
    logits = extraction.output_fn(output)
    if not isinstance(logits, Tensor):
        raise TypeError(f"output_fn must return a tensor of logits, got {type(logits).__name__}")
    objective = _objective(logits, batch.labels, extraction, label)
    if not objective.requires_grad:
        raise RuntimeError(f"{label}: {_NO_GRADIENT}")
    names = list(extraction.layers)
    grads = torch.autograd.grad(objective, [probe.deltas[n] for n in names], allow_unused=True)
    # A layer the output does not depend on gets zeros (and a warning at the end of the run).
    return {name: torch.zeros_like(probe.features[name]) if grad is None else grad
            for name, grad in zip(names, grads)}


def batch_statistics(model: nn.Module, probe: LayerProbe, batch: Batch, extraction: Extraction,
                     label: str = "batch") -> Statistics:
    """Features, gradients (None for features only) and raw shapes of one batch at every
    probed layer.  ``batch`` must already be on the model's device, inside
    :func:`autograd_mode` and with ``probe`` entered."""
    probe.reset()
    try:
        check_keywords(model, batch, label)
        output = batch.call(model)
        missing = [name for name in extraction.layers if name not in probe.features]
        if missing:
            raise ValueError(f"layers {missing} did not run in the forward pass of {label}")
        grads = _layer_gradients(output, probe, batch, extraction, label) \
            if extraction.gradients else None
        return _pooled(probe.features, grads, batch, extraction)
    finally:
        probe.reset()


def _pooled(features: Dict[str, Tensor], grads: Optional[Dict[str, Tensor]], batch: Batch,
            extraction: Extraction) -> Statistics:
    out_f, out_g, shapes = {}, ({} if grads is not None else None), {}
    for name in extraction.layers:
        options = dict(spatial=extraction.spatial, tokens=extraction.tokens, mask=batch.mask,
                       layer=name)
        out_f[name] = pool(features[name], gradient=False, **options)
        if grads is not None:
            out_g[name] = pool(grads[name], gradient=True, **options)
        shapes[name] = tuple(features[name].shape[1:])
    return Statistics(out_f, out_g, shapes)


def autograd_mode(gradients: bool):
    """Grad mode for a pass: autograd on (also under a caller's ``no_grad`` or
    ``inference_mode``, which this pass needs to leave) or, for features only, off."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.enable_grad() if gradients else torch.no_grad())
    return stack
