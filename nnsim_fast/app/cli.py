"""The ``nnsim-fast`` command: ``demo``, ``compare`` and ``bench``.

``nnsim-fast demo [--out DIR] [--quick] [--data-root DIR] ...``
    the seed paper's experiments (see :mod:`nnsim_fast.app.demo`), on bundled stand-ins or on
    CIFAR-10, CIFAR-100 and SVHN files you have.
``nnsim-fast compare --model pkg.module:factory --weights a.pt b.pt --data data.pt --out DIR``
``nnsim-fast compare --model-a pkg.m:f --weights-a a.pt --model-b pkg.n:g --weights-b b.pt ...``
    layer x layer similarity of your own models on your own inputs
    (see :mod:`nnsim_fast.app.compare`).  ``--model`` imports and calls the named code.
``nnsim-fast bench [...]``
    the native-op benchmarks of a source checkout (``benchmarks/harness.py``).

Bad arguments (a missing file, weights that do not fit the model, labels the model cannot
have, an unwritable output, ...) print one line on stderr and exit with status 2, without a
traceback, and are found before any work is done.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

from .. import options
from .._checks import check_float, check_int
from .errors import PROG, UsageError, one_line

__all__ = ["build_parser", "main", "UsageError"]


class _Parser(argparse.ArgumentParser):
    # argparse prints the usage block and exits; the CLI wants one line and a return code.
    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)", self.prog)


def _int_option(low: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            return check_int(int(text), "value", low)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}") from None
    return parse


_positive_int = _int_option(1, "positive")
_non_negative_int = _int_option(0, "non-negative")


def _beta(text: str) -> float:
    try:
        return check_float(float(text), "beta", 0, 1, low_open=True)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None


# ------------------------------------------------------------------------------ demo

def _add_demo_sizes(demo: argparse.ArgumentParser) -> None:
    sizes = demo.add_argument_group(
        "sizes", "override the mode's settings (defaults: see docs/demo.md; with --data-root "
        "they are chosen for a 2-core CPU)")
    sizes.add_argument("--models-per-task", type=_positive_int, metavar="N",
                       help="models trained per task, with different seeds (2 or more)")
    sizes.add_argument("--n-train", type=_positive_int, metavar="N",
                       help="training images per task (the first N of the split)")
    sizes.add_argument("--n-test", type=_positive_int, metavar="N",
                       help="test images per task (the first N of the split)")
    sizes.add_argument("--epochs", type=_positive_int, metavar="N", help="training epochs")
    sizes.add_argument("--width", type=_positive_int, metavar="N",
                       help="channels of ResNet-18's first stage (--data-root only; 64 is the "
                            "original)")
    sizes.add_argument("--m", type=_positive_int, metavar="M", help="sketch buckets")


def _add_demo_parser(commands) -> None:
    demo = commands.add_parser(
        "demo", help="train small ResNets on three tasks and reproduce the paper's comparisons "
        "(bundled data, or CIFAR/SVHN files with --data-root; no downloads, CPU)",
        description="Train residual networks on three tasks and reproduce the seed paper's "
        "comparisons. By default the tasks are bundled stand-ins (digits, digits with a finer "
        "label space, generated shapes) for CIFAR-10, CIFAR-100 and SVHN; with --data-root "
        "they are those datasets, read from their distributed files, with a ResNet-18. Writes "
        "results.json, report.md and PNG figures, and prints a verdict for each desideratum. "
        "Trained weights are cached under OUT/models, so a second run skips training.")
    demo.add_argument("--out", default="nnsim-demo", metavar="DIR",
                      help="output directory (default: ./nnsim-demo)")
    demo.add_argument("--quick", action="store_true",
                      help="fewer models, smaller sketches (m=128) and, with --data-root, "
                           "fewer images: a minute or two on a laptop CPU")
    demo.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    demo.add_argument("--data-root", metavar="DIR",
                      help="run the paper's setting on CIFAR-10 (DIR/cifar-10-batches-py), "
                           "CIFAR-100 (DIR/cifar-100-python) and SVHN (DIR/train_32x32.mat, "
                           "DIR/test_32x32.mat) as tasks A, B, C; nothing is downloaded")
    demo.add_argument("--seed", type=_non_negative_int, default=0, metavar="N",
                      help="sketch seed and base of the model seeds (default 0)")
    demo.add_argument("--threads", type=_positive_int, default=1, metavar="N",
                      help="torch CPU threads (default 1: the small convolutions gain little "
                           "from more)")
    demo.add_argument("--spatial", choices=options.SPATIAL, default=None,
                      help="feature maps: every position (flatten; bundled tasks' default) or "
                           "their average (mean; the default with --data-root)")
    # The demo always computes the exact values too, beside the estimates it reports.
    demo.add_argument("--estimator", default=None,
                      choices=options.DEMO_ESTIMATORS,
                      help="similarity estimate (default joint: CKA from exact within-block "
                           "kernel entries of every model over the same batches, NBS from the "
                           "sketches; sketch: the data-centred index from the sketches with "
                           "collision terms removed and error bars; plugin: the sketched "
                           "kernels centred over the data; paper: Algorithm 1 as the paper "
                           "reports it)")
    demo.add_argument("--debiased", action="store_true",
                      help="CKA from the debiased (U-statistic) HSIC")
    _add_demo_sizes(demo)
    demo.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.add_argument("--quiet", action="store_true", help="no step lines on stderr")


# ------------------------------------------------------------------------------ compare

def _add_compare_models(compare: argparse.ArgumentParser) -> None:
    one = compare.add_argument_group(
        "one architecture", "a factory and one state_dict per model; every pair is compared")
    one.add_argument("--model", metavar="MODULE:FACTORY",
                     help="import path of a callable returning the nn.Module, e.g. "
                          "mypkg.models:resnet18; it is imported and called (it runs as your "
                          "code), with the current directory importable for that import")
    one.add_argument("--model-kwargs", metavar="JSON",
                     help="keyword arguments for the factory, as a JSON object")
    one.add_argument("--weights", nargs="+", metavar="FILE",
                     help="state_dict files (torch.save or .safetensors), one per model")
    one.add_argument("--layers", nargs="+", metavar="NAME",
                     help="module names to probe (default: the model's direct children)")
    two = compare.add_argument_group(
        "two models", "two factories, possibly different architectures, compared once")
    for side in ("a", "b"):
        two.add_argument(f"--model-{side}", metavar="MODULE:FACTORY",
                         help=f"factory of model {side.upper()} (imported and called)")
        two.add_argument(f"--model-kwargs-{side}", metavar="JSON",
                         help=f"keyword arguments of model {side.upper()}'s factory")
        two.add_argument(f"--weights-{side}", metavar="FILE",
                         help=f"state_dict of model {side.upper()} (default: as built)")
        two.add_argument(f"--layers-{side}", nargs="+", metavar="NAME",
                         help=f"layers of model {side.upper()} (default: its direct children)")


def _add_compare_sketch(compare: argparse.ArgumentParser) -> None:
    compare.add_argument("--data", required=True, metavar="FILE",
                         help="inputs: a tensor [N, ...], a tuple (x, y) or a dict with 'x' and "
                              "optional 'y', saved with torch.save (or .safetensors with x, y)")
    compare.add_argument("--m", type=_positive_int, default=None,
                         help="sketch buckets (512); giving it asks for a sketch estimator")
    compare.add_argument("--psi-buckets", type=_positive_int, default=None, metavar="M",
                         help="buckets of the psi halves that the sketch estimator of "
                              "--kind hadamard reads (default: 4 m up to 2048, never below m); "
                              "giving it asks for a sketch estimator")
    compare.add_argument("--seed", type=_non_negative_int, default=0, help="sketch seed (0)")
    compare.add_argument("--beta", type=_beta, default=0.5,
                         help="temperature of the predictive for expected gradients (0.5)")
    compare.add_argument("--target", choices=options.TARGETS, default="expected",
                         help="gradients of the expected loss (default) or of the labels' loss "
                              "(needs labels in --data)")
    compare.add_argument("--spatial", choices=options.SPATIAL, default="flatten",
                         help="feature maps: keep every position (flatten) or average them")
    compare.add_argument("--batch-size", type=_positive_int, default=256)
    compare.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                         help="sketch accumulators, or the joint estimator's block Gram products "
                              "(indices always use float64)")
    compare.add_argument("--device", default="cpu", help="torch device (default cpu)")
    compare.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                         help="torch CPU threads (default: torch's own choice)")


def _add_compare_index(compare: argparse.ArgumentParser) -> None:
    compare.add_argument("--index", choices=options.INDICES, default="cka",
                         help="similarity index (default cka)")
    compare.add_argument("--kind", choices=options.KINDS, default="hadamard",
                         help="kernel: hadamard = features o gradients (the paper, default)")
    compare.add_argument("--estimator", choices=options.COMPARE_ESTIMATORS, default=None,
                         help="how the index is estimated. joint (the default for CKA): "
                              "every model runs over the same shuffled batches and CKA comes "
                              "from exact within-block kernel entries (the most accurate; no "
                              "sketch kept); sketch (the default for NBS, --kind transport, or "
                              "when --m or --psi-buckets is given): each model sketched on its "
                              "own. The error bar of each value is printed when the estimator "
                              "gives one")
    compare.add_argument("--debiased", action="store_true",
                         help="debiased HSIC (U-statistic) in the index")
    compare.add_argument("--centering", choices=options.CENTERINGS, default=None,
                         help="kernel centring, for the estimators that take one")


def _add_compare_parser(commands) -> None:
    compare = commands.add_parser(
        "compare", help="layer x layer similarity of your own models on your own inputs",
        description="Write the layer x layer similarity of every pair of models on the same "
        "inputs (JSON, CSV, heatmaps): CKA by default from one joint pass of all models over "
        "the same shuffled batches, NBS (or any --estimator but joint) from a sketch of each "
        "model with the same sketch. Name the "
        "models either with --model and one --weights file per model (one file gives the "
        "model's own layer x layer similarity), or with --model-a and --model-b. --model "
        "imports and calls arbitrary code: only name modules you trust.")
    _add_compare_models(compare)
    _add_compare_sketch(compare)
    _add_compare_index(compare)
    compare.add_argument("--out", required=True, metavar="DIR", help="output directory")
    compare.add_argument("--no-plots", action="store_true", help="skip the PNG heatmaps")
    compare.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``nnsim-fast`` command."""
    from .._version import __version__

    parser = _Parser(prog=PROG, description="Similarity of neural networks with gradients: "
                     "sketched features x gradients kernels compared with CKA / NBS.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{demo,compare,bench}")
    _add_demo_parser(commands)
    _add_compare_parser(commands)
    commands.add_parser("bench", add_help=False,
                        help="benchmarks of the native ops, from a source checkout (see "
                             "nnsim-fast bench --help)")
    return parser


# ------------------------------------------------------------------------------ entry

def _run_compare(args: argparse.Namespace) -> int:
    import torch

    from .compare import run_compare

    threads = torch.get_num_threads()
    try:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        return run_compare(args)
    finally:
        torch.set_num_threads(threads)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo.command import run_demo_command

    return run_demo_command(args)


def _dispatch(argv: Sequence[str]) -> int:
    if argv and argv[0] == "bench":
        from .bench import run_bench
        return run_bench(argv[1:])
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help / --version
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2
    if args.command is None:
        raise UsageError(f"a command is required: demo, compare or bench (see {PROG} --help)")
    runner = _run_demo if args.command == "demo" else _run_compare
    try:
        return runner(args)
    except UsageError as error:
        if error.prog == PROG:
            error.prog = f"{PROG} {args.command}"
        raise


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    try:
        return _dispatch(list(sys.argv[1:] if argv is None else argv))
    except UsageError as error:
        print(f"{error.prog}: error: {one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
