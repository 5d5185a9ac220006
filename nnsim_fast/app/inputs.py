"""What users hand the command line, read and checked before any work starts.

``--model`` names a Python callable (``package.module:factory``) that the command imports and
calls: it runs arbitrary code with the user's rights, exactly like ``python -c "import ..."``.
The working directory is importable for that one import only (console scripts do not put it
on ``sys.path``, and users expect a module next to them to import), and is taken off the path
again right after, so later imports -- matplotlib's, say -- never pick up a file that happens
to sit in the working directory.

Every function here raises :class:`~nnsim_fast.app.errors.UsageError` with a message that
names the option, and never a traceback.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import tempfile
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

from .errors import UsageError, one_line

__all__ = ["factory_spec", "factory_kwargs", "import_factory", "load_tensor_file", "load_data",
           "load_weights", "check_model_runs", "prepare_output_dir", "check_writable_file"]


def factory_spec(spec: str, option: str) -> Tuple[str, str]:
    """``package.module:factory`` split into module and attribute (nothing is imported)."""
    if spec.count(":") != 1 or not all(spec.split(":")):
        raise UsageError(f"{option} must look like package.module:factory, got {spec!r}")
    module_name, attribute = spec.split(":")
    return module_name, attribute


def factory_kwargs(text: Optional[str], option: str) -> Dict[str, Any]:
    """The factory's keyword arguments from a JSON object (None: no arguments)."""
    if text is None:
        return {}
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"{option} is not valid JSON: {error}") from None
    if not isinstance(kwargs, dict):
        raise UsageError(f"{option} must be a JSON object, got {text!r}")
    return kwargs


@contextlib.contextmanager
def _working_directory_importable() -> Iterator[None]:
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _import_module(module_name: str, option: str):
    with _working_directory_importable():
        try:
            return importlib.import_module(module_name)
        except ImportError as error:
            raise UsageError(f"{option}: cannot import {module_name!r}: {one_line(error)}") from None
        except Exception as error:  # the user's module raised while importing
            raise UsageError(f"{option}: importing {module_name!r} raised "
                             f"{type(error).__name__}: {one_line(error)}") from None


def import_factory(spec: str, kwargs: Dict[str, Any], option: str) -> Callable[[], Any]:
    """Import the callable ``spec`` names; returns ``build()`` that calls it with ``kwargs``
    and checks that it returned an ``nn.Module``."""
    module_name, attribute = factory_spec(spec, option)
    factory = _import_module(module_name, option)
    for part in attribute.split("."):
        if not hasattr(factory, part):
            raise UsageError(f"{option}: {module_name!r} has no attribute {attribute!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise UsageError(f"{option}: {spec!r} is not callable")

    def build():
        import torch

        try:
            model = factory(**kwargs)
        except Exception as error:
            raise UsageError(f"{option}: {spec}(**{kwargs}) raised {type(error).__name__}: "
                             f"{one_line(error)}") from None
        if not isinstance(model, torch.nn.Module):
            raise UsageError(f"{option}: {spec} returned {type(model).__name__}, not a "
                             "torch.nn.Module")
        return model

    return build


def load_tensor_file(path: str, option: str):
    """A ``torch.save`` file (read with ``weights_only=True``: tensors and containers only,
    no code) or a ``.safetensors`` file."""
    import torch

    if not os.path.isfile(path):
        raise UsageError(f"{option}: no such file {path!r}")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
            return load_file(path)
        except Exception as error:
            raise UsageError(f"{option}: cannot read {path!r} as safetensors: "
                             f"{one_line(error)}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UsageError(f"{option}: cannot read {path!r} with torch.load(weights_only=True): "
                         f"{one_line(error)}") from None


_INPUT_KEYS = ("x", "inputs", "input")
_LABEL_KEYS = ("y", "labels", "label", "target", "targets")


def _split_data(obj, path: str):
    import torch

    if isinstance(obj, torch.Tensor):
        return obj, None
    if isinstance(obj, (tuple, list)) and 1 <= len(obj) <= 2:
        return obj[0], (obj[1] if len(obj) == 2 else None)
    if isinstance(obj, dict):
        x = next((obj[k] for k in _INPUT_KEYS if k in obj), None)
        if x is None:
            raise UsageError(f"--data {path!r}: a dict needs an 'x' (or 'inputs') entry, got keys "
                             f"{sorted(map(str, obj))}")
        return x, next((obj[k] for k in _LABEL_KEYS if k in obj), None)
    raise UsageError(f"--data {path!r} holds a {type(obj).__name__}; expected a tensor, a "
                     "tuple (x, y) or a dict with 'x' and optional 'y'")


def _check_labels(x, y, path: str) -> None:
    import torch

    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]:
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise UsageError(f"--data {path!r}: labels must be a tensor [N] with N = {x.shape[0]} "
                         f"(inputs {tuple(x.shape)}), got {shape}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise UsageError(f"--data {path!r}: labels must be integer class indices, got {y.dtype}")


def load_data(path: str):
    """``(x float [N, ...], y int [N] or None)`` from ``--data``."""
    import torch

    x, y = _split_data(load_tensor_file(path, "--data"), path)
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] == 0:
        raise UsageError(f"--data {path!r}: inputs must be a tensor with a non-empty first "
                         f"(sample) axis, got {getattr(x, 'shape', type(x).__name__)}")
    if y is not None:
        _check_labels(x, y, path)
    return (x if x.dtype.is_floating_point else x.float()), y


def _shown(keys, limit: int = 3) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_weights(model, path: str, option: str) -> None:
    """Load a state_dict file into ``model``, or say exactly which keys or shapes differ."""
    import torch

    state = load_tensor_file(path, option)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{option} {path!r} is not a state_dict (a dict of tensors)")
    expected = model.state_dict()
    problems = {
        "missing keys": [k for k in expected if k not in state],
        "unexpected keys": [k for k in state if k not in expected],
        "shape mismatches (file vs model)": [
            f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
            if k in state and tuple(state[k].shape) != tuple(v.shape)],
    }
    found = [f"{name}: {_shown(keys)}" for name, keys in problems.items() if keys]
    if found:
        raise UsageError(f"{option} {path!r} does not fit the model: " + "; ".join(found))
    model.load_state_dict(state)


def check_model_runs(model, x, y, label: str, data_path: str, labels_needed: bool) -> None:
    """Run two inputs through the model first, so that a shape mismatch, or labels outside
    the model's outputs, is one clear error rather than a failure deep in the sketch."""
    import torch

    sample = x[:2].to(next(model.parameters(), torch.empty(0)).device)
    try:
        with torch.no_grad():
            model.eval()
            output = model(sample)
    except Exception as error:
        raise UsageError(f"model {label} cannot run on --data {data_path!r} (inputs of shape "
                         f"{tuple(sample.shape[1:])} per sample): {type(error).__name__}: "
                         f"{one_line(error)}") from None
    if labels_needed and isinstance(output, torch.Tensor) and output.dim() == 2:
        classes = output.shape[1]
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= classes:
            raise UsageError(f"--data {data_path!r}: labels must lie in [0, {classes}) for model "
                             f"{label} ({classes} outputs), got labels in [{low}, {high}]")


def prepare_output_dir(path: str, option: str = "--out") -> None:
    """Create the output folder and prove it writable, before any work is done."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{option} {path!r} exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise UsageError(f"{option} {path!r} is not writable: {one_line(error)}") from None


def check_writable_file(path: str, option: str) -> None:
    """Prove that ``path`` can be written (its folder is created), leaving no file behind."""
    if os.path.isdir(path):
        raise UsageError(f"{option} {path!r} is a directory, expected a file path")
    directory = os.path.dirname(os.path.abspath(path))
    existed = os.path.exists(path)
    try:
        os.makedirs(directory, exist_ok=True)
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as error:
        raise UsageError(f"{option} {path!r} is not writable: {one_line(error)}") from None
    if not existed:
        os.remove(path)
