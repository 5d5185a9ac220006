"""``nnsim-fast bench``: the benchmark harness of a source checkout.

The harness (``benchmarks/harness.py``) does not ship in the wheel: it belongs with the
suites and reports in ``benchmarks/``.  From a source checkout (an editable install, or
``python -m nnsim_fast.cli`` run in the repository) this command finds it next to the
package and passes its arguments on; an installed wheel says where to get it instead.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional, Sequence

from .errors import UsageError, one_line

__all__ = ["harness_path", "load_harness", "run_bench"]


def harness_path() -> Optional[str]:
    """``benchmarks/harness.py`` of the checkout this package was imported from, if any."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(os.path.dirname(package), "benchmarks", "harness.py")
    return path if os.path.isfile(path) else None


def load_harness():
    """The harness module, imported from the checkout (a :class:`UsageError` without one)."""
    path = harness_path()
    if path is None:
        raise UsageError("the benchmarks live in the source repository (benchmarks/harness.py), "
                         "not in the installed package: run them from a checkout, e.g. "
                         "python benchmarks/results.py")
    spec = importlib.util.spec_from_file_location("nnsim_fast_benchmark_harness", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as error:
        raise UsageError(f"the benchmarks are unavailable: {one_line(error)}") from None
    return module


def run_bench(argv: Sequence[str]) -> int:
    """Run the harness's command line with ``argv``; returns its exit status."""
    try:
        harness = load_harness()
    except UsageError as error:
        error.prog = "nnsim-fast bench"
        raise
    try:
        code = harness.main(list(argv), prog="nnsim-fast bench")
    except SystemExit as exit_:  # its own argparse: --help, or a usage error
        code = exit_.code
    return int(code or 0) if not isinstance(code, str) else 2
