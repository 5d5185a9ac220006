"""Argument checks shared by every public function: one rule per kind of argument.

Each check returns the normalised value (a Python ``int``/``float``/``bool``) or
raises ``TypeError``/``ValueError`` whose message names the argument.  numpy and
torch scalars are accepted where a plain number is (``m=np.int64(16)``), bools
are never taken for numbers (``m=True`` is an error), and the result is always
a builtin type, so it serialises to JSON.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Sequence

import numpy as np

__all__ = ["check_int", "check_float", "check_bool", "check_choice", "check_optional_int"]


def _type_name(value: Any) -> str:
    return type(value).__name__


def check_int(value: Any, name: str, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """An integer (Python, numpy or 0-d integer tensor) in ``[low, high]``, as ``int``."""
    if isinstance(value, (bool, np.bool_)) or str(getattr(value, "dtype", "")).endswith("bool"):
        raise TypeError(f"{name} must be an int, got bool")
    if not isinstance(value, numbers.Integral):
        index = getattr(value, "__index__", None)
        if index is None:
            raise TypeError(f"{name} must be an int, got {_type_name(value)}")
        try:
            value = index()
        except (TypeError, RuntimeError, ValueError):
            raise TypeError(f"{name} must be an int, got {_type_name(value)}") from None
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise ValueError(f"{name} must be in {bounds}, got {value}")
    return value


def check_optional_int(value: Any, name: str, low: Optional[int] = None,
                       high: Optional[int] = None) -> Optional[int]:
    return None if value is None else check_int(value, name, low, high)


def check_float(value: Any, name: str, low: Optional[float] = None, high: Optional[float] = None,
                *, low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number (Python, numpy or 0-d tensor) in the given range, as ``float``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        item = getattr(value, "item", None)
        if isinstance(value, bool) or item is None or getattr(value, "ndim", 0) != 0:
            raise TypeError(f"{name} must be a real number, got {_type_name(value)}")
        value = item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {_type_name(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        raise ValueError(f"{name} must be in {left}{'-inf' if low is None else low}, "
                         f"{'inf' if high is None else high}{right}, got {value}")
    return value


def check_bool(value: Any, name: str) -> bool:
    """A bool (Python or numpy), as ``bool``; numbers are not taken for truth values."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {_type_name(value)}")


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """One of ``choices`` (strings)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value
