"""Similarity scores as the command line shows them: value, error bar, warnings.

``compare`` and ``demo`` both ask :func:`nnsim_fast.similarity` for a layer x layer matrix
with the estimator the user chose; the result also carries an estimated standard error per
entry (``.error``, for the default estimator) and warnings (``.warnings``, e.g. a sketch
too small for a layer's effective rank).  This module turns the command-line options
into that call and the result into a plain record.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from ..compare import DifferentRowsWarning, ResolutionWarning, similarity
from .errors import UsageError

__all__ = ["Score", "similarity_options", "effective_options", "score_pair", "format_value"]

#: The centring each kernel-based estimator uses unless told otherwise.
_DEFAULT_CENTERING = {"paper": "buckets", "plugin": "data"}


@dataclass
class Score:
    """One layer x layer comparison: ``matrix`` and ``error`` are float64 ``[La, Lb]``."""

    matrix: torch.Tensor
    layers_a: List[str]
    layers_b: List[str]
    error: Optional[torch.Tensor] = None
    warnings: List[str] = field(default_factory=list)
    estimator: str = "sketch"


def similarity_options(estimator: Optional[str] = None, debiased: bool = False,
                       centering: Optional[str] = None) -> Dict[str, Any]:
    """Keyword arguments of :func:`nnsim_fast.similarity` for the command-line options given
    (None / False: the library's default), or a :class:`UsageError` for a combination the
    library would refuse -- raised before any work starts."""
    options: Dict[str, Any] = {}
    if estimator is not None:
        options["estimator"] = estimator
    if debiased:
        options["debiased"] = True
    if centering is not None:
        if (estimator or "sketch") not in _DEFAULT_CENTERING:
            raise UsageError(f"--centering applies to --estimator plugin or paper; the "
                             f"{estimator or 'default'} estimator always centres over the data")
        options["centering"] = centering
    return options


def effective_options(options: Dict[str, Any]) -> Dict[str, Any]:
    """``options`` with the library's defaults filled in (for sketched representations)."""
    estimator = options.get("estimator") or "sketch"
    out: Dict[str, Any] = {"estimator": estimator, "debiased": bool(options.get("debiased", False))}
    if estimator in _DEFAULT_CENTERING:
        out["centering"] = options.get("centering") or _DEFAULT_CENTERING[estimator]
    return out


def score_pair(rep_a, rep_b, index: str, kind: str, options: Dict[str, Any]) -> Score:
    """Every layer of ``rep_a`` against every layer of ``rep_b``."""
    with warnings.catch_warnings():
        # The result carries these as .warnings, which the command line prints once, its way.
        warnings.simplefilter("ignore", ResolutionWarning)
        warnings.simplefilter("ignore", DifferentRowsWarning)
        result = similarity(rep_a, rep_b, index=index, kind=kind, **options)
    matrix, layers_a, layers_b = result
    error = result.error
    return Score(matrix.to(torch.float64), list(layers_a), list(layers_b),
                 None if error is None else error.to(torch.float64),
                 [str(w) for w in result.warnings], result.estimator)


def format_value(value: float, error: Optional[float] = None, digits: int = 3) -> str:
    """``0.734`` or, with an error bar, ``0.734 ± 0.006``."""
    text = f"{float(value):.{digits}f}"
    if error is not None and math.isfinite(float(error)):
        text += f" ± {float(error):.{digits}f}"
    return text
