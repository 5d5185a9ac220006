"""Which layers to probe, the hooks that probe them, and the model's state around a pass.

Thread safety: :func:`model_lock` (taken by :func:`eval_mode`, so by every
extraction) gives each module one re-entrant lock, and a call takes the locks
of every module of its model, always in the same order.  Extractions from one
model -- or from two models that share submodules -- therefore run one at a
time (the others wait), each sees only its own forward passes in its hooks,
and each restores the training flags it found.  Extractions from unrelated
models run in parallel.  A forward pass the caller runs in another thread
without going through this library is not serialised and would reach the
hooks: don't run one on a model that is being sketched.
"""
from __future__ import annotations

import contextlib
import difflib
import threading
import weakref
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["default_layers", "resolve_layers", "suggest_layers", "model_lock", "eval_mode",
           "LayerProbe", "model_device"]

_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


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
    names = _names(layers)
    available = dict(model.named_modules())
    for name in names:
        if name not in available or name == "":
            close = difflib.get_close_matches(name, [n for n in available if n], n=5)
            hint = f"; did you mean {close}?" if close else ""
            raise ValueError(f"layers: {name!r} is not a module of the model{hint} "
                             f"(see model.named_modules())")
    return names


def _names(layers) -> List[str]:
    """``layers`` as a list of distinct strings (a single string is one name)."""
    if isinstance(layers, str):
        layers = [layers]
    try:
        names = list(layers)
    except TypeError:
        raise TypeError(f"layers must be a list of module names from model.named_modules(), got "
                        f"{type(layers).__name__}") from None
    if not names:
        raise ValueError("layers is empty; pass module names from model.named_modules(), or "
                         "layers=None for the model's direct children")
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"layers must hold module names (str) from model.named_modules(), "
                            f"got {name!r} ({type(name).__name__}); e.g. layers=['0'] for the "
                            "first module of an nn.Sequential")
    if len(set(names)) != len(names):
        raise ValueError(f"layers has duplicates: {names}")
    return names


def _is_block_list(module: nn.Module) -> bool:
    return isinstance(module, (nn.ModuleList, nn.ModuleDict))


def _holds_block_list(module: nn.Module, depth: int = 2) -> bool:
    return depth > 0 and any(_is_block_list(child) or _holds_block_list(child, depth - 1)
                             for child in module.children())


def suggest_layers(model: nn.Module, name: str) -> List[str]:
    """Submodules of ``name`` worth probing instead of it: its children, with containers
    of repeated blocks (``nn.ModuleList``, e.g. ``encoder.layer``) opened to their blocks."""
    found: List[str] = []

    def visit(module: nn.Module, prefix: str, depth: int) -> None:
        for child_name, child in module.named_children():
            full = f"{prefix}.{child_name}" if prefix else child_name
            if _is_block_list(child):
                found.extend(f"{full}.{block}" for block, _ in child.named_children())
            elif depth < 2 and _holds_block_list(child):
                visit(child, full, depth + 1)
            else:
                found.append(full)

    visit(dict(model.named_modules())[name], name, 0)
    return found


def _shown(names: List[str], limit: int = 16) -> str:
    if len(names) <= limit:
        return repr(names)
    return repr(names[:limit - 2])[:-1] + f", ..., {names[-1]!r}] ({len(names)} in all)"


@contextlib.contextmanager
def model_lock(model: nn.Module) -> Iterator[None]:
    """Hold the lock of every module of ``model`` (see the module docstring)."""
    with _LOCKS_GUARD:
        locks = {id(module): _LOCKS.setdefault(module, threading.RLock())
                 for module in model.modules()}
    held = []
    try:
        # One global order (by id) for every caller: two calls whose models share
        # modules cannot each hold a lock the other waits for.
        for key in sorted(locks):
            locks[key].acquire()
            held.append(locks[key])
        yield
    finally:
        for lock in reversed(held):
            lock.release()


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode; restore each one's own flag afterwards.

    Holds :func:`model_lock` throughout, so concurrent calls on one model
    cannot save each other's eval flags as the ones to restore.
    """
    with model_lock(model):
        flags = [(module, module.training) for module in model.modules()]
        model.eval()
        try:
            yield
        finally:
            for module, flag in flags:
                module.training = flag


def model_device(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


class LayerProbe:
    """Forward hooks that capture a layer's output and a handle on its gradient.

    With ``gradients`` (default) the hook returns ``output + delta`` with
    ``delta`` a zero leaf tensor that requires grad: the gradient with respect
    to ``delta`` is the gradient with respect to the layer output, even when
    later modules modify their input in place (``ReLU(inplace=True)``) or the
    parameters are frozen.  Without, the hook keeps a copy of the output (a
    later in-place op cannot change it) and leaves the model's data flow alone.
    Hooks are removed on exit, also when the model raises.  ``defaults`` says
    the layers were chosen by default (it only changes error messages).
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], gradients: bool = True,
                 defaults: bool = False) -> None:
        self.model = model
        self.layers = list(layers)
        self.gradients = gradients
        self.defaults = defaults
        self.features: Dict[str, Tensor] = {}
        self.deltas: Dict[str, Tensor] = {}
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
            tensor, rebuild = self._primary(output, name)
            if not self.gradients:
                self.features[name] = tensor.detach().clone()
                return None
            delta = torch.zeros_like(tensor, requires_grad=True)
            self.features[name] = tensor.detach()
            self.deltas[name] = delta
            return rebuild(tensor + delta)
        return hook

    def _primary(self, output, name: str) -> Tuple[Tensor, Callable]:
        if isinstance(output, Tensor):
            return output, lambda t: t
        if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
            kind = type(output)
            return output[0], lambda t: kind([t, *output[1:]]) if kind is list else (t, *output[1:])
        chosen = " (one of the default layers: the model's direct children)" if self.defaults else ""
        inside = suggest_layers(self.model, name)
        example = f", e.g. layers={_shown(inside)}" if inside else ""
        raise TypeError(
            f"layer {name!r}{chosen} returns {type(output).__name__}, not a tensor (or a tuple "
            f"whose first element is one), so it cannot be probed. Pass layers= with modules "
            f"whose output is a tensor{example} (see model.named_modules())")
