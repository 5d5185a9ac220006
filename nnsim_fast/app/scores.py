"""Similarity scores as the command line shows them: value, error bar, warnings.

``compare`` and ``demo`` both ask :func:`nnsim_fast.similarity` for a layer x layer matrix
with the estimator the user chose; the result also carries an estimated standard error per
entry (``.error``) and warnings (``.warnings``, e.g. a sketch too small for a layer's
effective rank) when the library provides them.  This module turns the command-line options
into that call and the result into a plain record.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from ..compare import similarity
from .errors import UsageError

__all__ = ["Score", "similarity_options", "effective_options", "score_pair", "format_value"]

# What the "paper" and "plugin" estimators are in terms of centring alone, for a similarity()
# that predates the estimator argument (they need nothing else).
_CENTERING_OF_ESTIMATOR = {"paper": "buckets", "plugin": "data"}


@dataclass
class Score:
    """One layer x layer comparison: ``matrix`` and ``error`` are float64 ``[La, Lb]``."""

    matrix: torch.Tensor
    layers_a: List[str]
    layers_b: List[str]
    error: Optional[torch.Tensor] = None
    warnings: List[str] = field(default_factory=list)


def _parameters() -> Dict[str, inspect.Parameter]:
    return dict(inspect.signature(similarity).parameters)


def similarity_options(estimator: Optional[str] = None, debiased: bool = False,
                       centering: Optional[str] = None) -> Dict[str, Any]:
    """Keyword arguments of :func:`nnsim_fast.similarity` for the command-line options given
    (None / False: the library's default), or a :class:`UsageError` naming the option this
    version of the library does not offer."""
    accepted = _parameters()
    options: Dict[str, Any] = {}
    if estimator is not None:
        if "estimator" in accepted:
            options["estimator"] = estimator
        elif estimator in _CENTERING_OF_ESTIMATOR and centering is None:
            options["centering"] = _CENTERING_OF_ESTIMATOR[estimator]
        else:
            raise UsageError(f"--estimator {estimator} needs a similarity() with an estimator "
                             "argument; this version offers --centering only")
    if debiased:
        if "debiased" not in accepted:
            raise UsageError("--debiased needs a similarity() with a debiased argument; this "
                             "version has none")
        options["debiased"] = True
    if centering is not None:
        if "centering" not in accepted:
            raise UsageError("--centering is not an option of this version's similarity(); use "
                             "--estimator (paper: centred over buckets, plugin: over the data)")
        options["centering"] = centering
    return options


def effective_options(options: Dict[str, Any]) -> Dict[str, Any]:
    """``options`` with the library's defaults filled in for the estimator settings it has."""
    accepted = _parameters()
    out = {}
    for name in ("estimator", "debiased", "centering"):
        if name in options:
            out[name] = options[name]
        elif name in accepted and accepted[name].default is not inspect.Parameter.empty:
            out[name] = accepted[name].default
    return out


def score_pair(rep_a, rep_b, index: str, kind: str, options: Dict[str, Any]) -> Score:
    """Every layer of ``rep_a`` against every layer of ``rep_b``."""
    result = similarity(rep_a, rep_b, index=index, kind=kind, **options)
    matrix, layers_a, layers_b = result
    error = getattr(result, "error", None)
    return Score(matrix.to(torch.float64), list(layers_a), list(layers_b),
                 None if error is None else error.to(torch.float64),
                 [str(w) for w in (getattr(result, "warnings", None) or [])])


def format_value(value: float, error: Optional[float] = None, digits: int = 3) -> str:
    """``0.734`` or, with an error bar, ``0.734 ± 0.006``."""
    text = f"{float(value):.{digits}f}"
    if error is not None and math.isfinite(float(error)):
        text += f" ± {float(error):.{digits}f}"
    return text
