"""``nnsim-fast demo``: the command-line arguments checked, turned into settings, and run."""
from __future__ import annotations

import argparse

from ...datasets import PAPER_DATASETS, missing_files
from .. import inputs
from ..errors import UsageError, one_line
from .run import run_demo
from .settings import DemoSettings, settings_for, with_overrides

__all__ = ["demo_settings", "run_demo_command"]


def demo_settings(args: argparse.Namespace) -> DemoSettings:
    """The settings the arguments describe (a :class:`UsageError` for a bad combination)."""
    mode = "tiny" if args.tiny else ("quick" if args.quick else "full")
    try:
        return with_overrides(settings_for(mode, args.data_root),
                              models_per_task=args.models_per_task, n_train=args.n_train,
                              n_test=args.n_test, epochs=args.epochs, width=args.width, m=args.m,
                              spatial=args.spatial, estimator=args.estimator,
                              debiased=args.debiased)
    except ValueError as error:
        raise UsageError(one_line(error)) from None


def _check_data_root(root: str) -> None:
    # Every file is looked for before anything is trained, so a missing dataset costs nothing.
    missing = missing_files(root, tuple(PAPER_DATASETS.values()))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UsageError(f"--data-root {root!r} lacks {missing[0]!r}{more}; expected CIFAR-10 "
                         "(cifar-10-batches-py/), CIFAR-100 (cifar-100-python/) and SVHN "
                         "(train_32x32.mat, test_32x32.mat) there; nothing is downloaded")


def run_demo_command(args: argparse.Namespace) -> int:
    settings = demo_settings(args)
    if args.data_root is not None:
        _check_data_root(args.data_root)
    inputs.prepare_output_dir(args.out)
    try:
        run_demo(args.out, seed=args.seed, threads=args.threads,
                 progress=False if args.no_progress else None, verbose=not args.quiet,
                 figures=not args.no_figures, settings=settings)
    except ImportError as error:
        raise UsageError(f"the demo needs an optional dependency: {one_line(error)}") from None
    except (FileNotFoundError, ValueError) as error:    # a damaged dataset file
        raise UsageError(one_line(error)) from None
    return 0
