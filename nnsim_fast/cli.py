"""The ``nnsim-fast`` command: ``demo``, ``compare`` and ``bench``.

``nnsim-fast demo [--out DIR] [--quick] [--seed N]``
    the seed paper's experiments in miniature (see :mod:`nnsim_fast.demo`).
``nnsim-fast compare --model pkg.module:factory --weights a.pt b.pt --data data.pt --out DIR``
    layer x layer similarity of your own models on your own inputs.
``nnsim-fast bench [...]``
    the native-op benchmarks (arguments are passed to :func:`nnsim_fast.bench.main`).

Bad arguments (a missing file, weights that do not fit the model, inputs the model cannot
run on, ...) print one line on stderr and exit with status 2, without a traceback.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import re
import sys
from typing import Any, Dict, List, Optional, Sequence

PROG = "nnsim-fast"
KINDS = ("hadamard", "feature", "gradient", "sum", "khatri_rao", "psi", "transport")


class UsageError(Exception):
    """A bad argument: reported as one line on stderr, exit status 2."""

    def __init__(self, message: str, prog: str = PROG) -> None:
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    # argparse prints the usage block and exits; the CLI wants one line and a return code.
    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)", self.prog)


def _one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        text = error.args[0]
    return re.sub(r"\s+", " ", text)


def _int_at_least(low: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {value}")
        return value
    return parse


_positive_int = _int_at_least(1, "positive")
_non_negative_int = _int_at_least(0, "non-negative")


def _beta(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``nnsim-fast`` command."""
    from . import __version__

    parser = _Parser(prog=PROG, description="Similarity of neural networks with gradients: "
                     "sketched features x gradients kernels compared with CKA / NBS.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{demo,compare,bench}")

    demo = commands.add_parser(
        "demo", help="train small ResNets on three built-in tasks and reproduce the paper's "
        "comparisons (no downloads, CPU)",
        description="Train small residual networks on three built-in tasks (digits, digits "
        "with a finer label space, generated shapes: the roles of CIFAR-10, CIFAR-100 and SVHN "
        "in the seed paper) and reproduce its comparisons. Writes results.json, report.md and "
        "PNG figures, and prints a verdict for each desideratum. Trained weights are cached "
        "under OUT/models, so a second run skips training.")
    demo.add_argument("--out", default="nnsim-demo", metavar="DIR",
                      help="output directory (default: ./nnsim-demo)")
    demo.add_argument("--quick", action="store_true",
                      help="3 models per task and m=128 instead of 5 and m=512 (about a minute "
                           "or two on a laptop CPU)")
    demo.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    demo.add_argument("--seed", type=_non_negative_int, default=0, metavar="N",
                      help="sketch seed and base of the model seeds (default 0)")
    demo.add_argument("--threads", type=_positive_int, default=1, metavar="N",
                      help="torch CPU threads (default 1: the tiny convolutions gain nothing "
                           "from more)")
    demo.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.add_argument("--quiet", action="store_true", help="no step lines on stderr")

    compare = commands.add_parser(
        "compare", help="layer x layer similarity of your own models on your own inputs",
        description="Sketch each model (a factory building the nn.Module, plus one state_dict "
        "file per model) on the same inputs with the same sketch, and write the layer x layer "
        "similarity of every pair of models (JSON, CSV, heatmaps). One weights file gives the "
        "model's own layer x layer similarity.")
    compare.add_argument("--model", required=True, metavar="MODULE:FACTORY",
                         help="import path of a callable returning the nn.Module, e.g. "
                              "mypkg.models:resnet18 (the current directory is importable)")
    compare.add_argument("--model-kwargs", default=None, metavar="JSON",
                         help="keyword arguments for the factory, as a JSON object")
    compare.add_argument("--weights", required=True, nargs="+", metavar="FILE",
                         help="state_dict files (torch.save or .safetensors), one per model")
    compare.add_argument("--data", required=True, metavar="FILE",
                         help="inputs: a tensor [N, ...], a tuple (x, y) or a dict with 'x' and "
                              "optional 'y', saved with torch.save (or .safetensors with x, y)")
    compare.add_argument("--layers", nargs="+", default=None, metavar="NAME",
                         help="module names to probe (default: the model's direct children)")
    compare.add_argument("--m", type=_positive_int, default=512, help="sketch buckets (512)")
    compare.add_argument("--seed", type=_non_negative_int, default=0, help="sketch seed (0)")
    compare.add_argument("--index", choices=("cka", "nbs"), default="cka",
                         help="similarity index (default cka)")
    compare.add_argument("--kind", choices=KINDS, default="hadamard",
                         help="kernel: hadamard = features o gradients (the paper, default)")
    compare.add_argument("--centering", choices=("buckets", "data", "none"), default="buckets",
                         help="kernel centring (default buckets)")
    compare.add_argument("--beta", type=_beta, default=0.5,
                         help="temperature of the predictive for expected gradients (0.5)")
    compare.add_argument("--target", choices=("expected", "labels"), default="expected",
                         help="gradients of the expected loss (default) or of the labels' loss "
                              "(needs labels in --data)")
    compare.add_argument("--spatial", choices=("flatten", "mean"), default="flatten",
                         help="feature maps: keep every position (flatten) or average them")
    compare.add_argument("--batch-size", type=_positive_int, default=256)
    compare.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                         help="sketch accumulator precision (indices always use float64)")
    compare.add_argument("--device", default="cpu", help="torch device (default cpu)")
    compare.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                         help="torch CPU threads (default: torch's own choice)")
    compare.add_argument("--out", required=True, metavar="DIR", help="output directory")
    compare.add_argument("--no-plots", action="store_true", help="skip the PNG heatmaps")
    compare.add_argument("--no-progress", action="store_true", help="no progress bars")

    commands.add_parser("bench", add_help=False,
                        help="benchmarks of the native ops (see nnsim-fast bench --help)")
    return parser


# ------------------------------------------------------------------------------------ demo

def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    mode = "tiny" if args.tiny else ("quick" if args.quick else "full")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out!r} exists and is not a directory", f"{PROG} demo")
    try:
        os.makedirs(args.out, exist_ok=True)
        probe = os.path.join(args.out, ".write-test")
        with open(probe, "w", encoding="utf-8"):
            pass
        os.remove(probe)
    except OSError as error:
        raise UsageError(f"--out {args.out!r} is not writable: {_one_line(error)}",
                         f"{PROG} demo") from None
    try:
        run_demo(args.out, mode=mode, seed=args.seed, threads=args.threads,
                 progress=False if args.no_progress else None, verbose=not args.quiet,
                 figures=not args.no_figures)
    except ImportError as error:
        raise UsageError(f"the demo needs an optional dependency: {_one_line(error)}",
                         f"{PROG} demo") from None
    return 0


# ------------------------------------------------------------------------------------ compare

def _load_factory(spec: str, kwargs_text: Optional[str]):
    prog = f"{PROG} compare"
    if spec.count(":") != 1 or not all(spec.split(":")):
        raise UsageError(f"--model must look like package.module:factory, got {spec!r}", prog)
    module_name, attribute = spec.split(":")
    kwargs: Dict[str, Any] = {}
    if kwargs_text is not None:
        try:
            kwargs = json.loads(kwargs_text)
        except json.JSONDecodeError as error:
            raise UsageError(f"--model-kwargs is not valid JSON: {error}", prog) from None
        if not isinstance(kwargs, dict):
            raise UsageError(f"--model-kwargs must be a JSON object, got {kwargs_text!r}", prog)
    # Console scripts do not put the working directory on sys.path; users expect their own
    # modules next to them to import.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UsageError(f"--model: cannot import {module_name!r}: {_one_line(error)}", prog) from None
    except Exception as error:  # the user's module raised while importing
        raise UsageError(f"--model: importing {module_name!r} raised {type(error).__name__}: "
                         f"{_one_line(error)}", prog) from None
    factory = module
    for part in attribute.split("."):
        if not hasattr(factory, part):
            raise UsageError(f"--model: {module_name!r} has no attribute {attribute!r}", prog)
        factory = getattr(factory, part)
    if not callable(factory):
        raise UsageError(f"--model: {spec!r} is not callable", prog)

    def build():
        import torch

        try:
            model = factory(**kwargs)
        except Exception as error:
            raise UsageError(f"--model: {spec}(**{kwargs}) raised {type(error).__name__}: "
                             f"{_one_line(error)}", prog) from None
        if not isinstance(model, torch.nn.Module):
            raise UsageError(f"--model: {spec} returned {type(model).__name__}, not a "
                             "torch.nn.Module", prog)
        return model

    return build


def _load_tensor_file(path: str, what: str):
    import torch

    prog = f"{PROG} compare"
    if not os.path.isfile(path):
        raise UsageError(f"{what}: no such file {path!r}", prog)
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
            return load_file(path)
        except Exception as error:
            raise UsageError(f"{what}: cannot read {path!r} as safetensors: {_one_line(error)}",
                             prog) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UsageError(f"{what}: cannot read {path!r} with torch.load(weights_only=True): "
                         f"{_one_line(error)}", prog) from None


def _load_data(path: str):
    import torch

    prog = f"{PROG} compare"
    obj = _load_tensor_file(path, "--data")
    x = y = None
    if isinstance(obj, torch.Tensor):
        x = obj
    elif isinstance(obj, (tuple, list)) and 1 <= len(obj) <= 2:
        x = obj[0]
        y = obj[1] if len(obj) == 2 else None
    elif isinstance(obj, dict):
        x = next((obj[k] for k in ("x", "inputs", "input") if k in obj), None)
        y = next((obj[k] for k in ("y", "labels", "label", "target", "targets") if k in obj), None)
        if x is None:
            raise UsageError(f"--data {path!r}: a dict needs an 'x' (or 'inputs') entry, got keys "
                             f"{sorted(map(str, obj))}", prog)
    else:
        raise UsageError(f"--data {path!r} holds a {type(obj).__name__}; expected a tensor, a "
                         "tuple (x, y) or a dict with 'x' and optional 'y'", prog)
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] == 0:
        raise UsageError(f"--data {path!r}: inputs must be a tensor with a non-empty first "
                         f"(sample) axis, got {getattr(x, 'shape', type(x).__name__)}", prog)
    if y is not None:
        if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise UsageError(f"--data {path!r}: labels must be a tensor [N] with N = "
                             f"{x.shape[0]} (inputs {tuple(x.shape)}), got "
                             f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}",
                             prog)
        if y.dtype.is_floating_point or y.dtype == torch.bool:
            raise UsageError(f"--data {path!r}: labels must be integer class indices, got "
                             f"{y.dtype}", prog)
    if not x.dtype.is_floating_point:
        x = x.float()
    return x, y


def _load_weights(model, path: str) -> None:
    import torch

    prog = f"{PROG} compare"
    state = _load_tensor_file(path, "--weights")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"--weights {path!r} is not a state_dict (a dict of tensors)", prog)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems = []
    for name, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                       ("shape mismatches (file vs model)", wrong)):
        if keys:
            shown = ", ".join(keys[:3]) + (f", ... ({len(keys)} in all)" if len(keys) > 3 else "")
            problems.append(f"{name}: {shown}")
    if problems:
        raise UsageError(f"--weights {path!r} does not fit the model: " + "; ".join(problems), prog)
    model.load_state_dict(state)


def _check_forward(model, sample, label: str, data_path: str) -> None:
    """Run two inputs through the model first, so a shape mismatch is one clear error."""
    import torch

    try:
        with torch.no_grad():
            model.eval()
            model(sample)
    except Exception as error:
        raise UsageError(f"model {label} cannot run on --data {data_path!r} (inputs of shape "
                         f"{tuple(sample.shape[1:])} per sample): {type(error).__name__}: "
                         f"{_one_line(error)}", f"{PROG} compare") from None


def _labels_for(paths: Sequence[str]) -> List[str]:
    stems = [os.path.splitext(os.path.basename(p))[0] or f"model{i}" for i, p in enumerate(paths)]
    if len(set(stems)) == len(stems):
        return stems
    return [f"{i}_{stem}" for i, stem in enumerate(stems)]


def _safe_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)


def _format_matrix(rows: Sequence[str], cols: Sequence[str], matrix) -> str:
    width = max(8, max(len(c) for c in cols) + 1)
    lead = max(len(r) for r in rows) + 2
    lines = [" " * lead + "".join(f"{c:>{width}}" for c in cols)]
    for name, row in zip(rows, matrix):
        lines.append(f"{name:<{lead}}" + "".join(f"{float(v):>{width}.3f}" for v in row))
    return "\n".join(lines)


def _run_compare(args: argparse.Namespace) -> int:
    import torch

    from .compare import similarity
    from .extract import resolve_layers, sketch_model

    prog = f"{PROG} compare"
    build = _load_factory(args.model, args.model_kwargs)
    for path in args.weights:
        if not os.path.isfile(path):
            raise UsageError(f"--weights: no such file {path!r}", prog)
    x, y = _load_data(args.data)
    if args.target == "labels" and y is None:
        raise UsageError(f"--target labels needs labels in --data {args.data!r} (a tuple (x, y) "
                         "or a dict with 'y')", prog)
    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except Exception as error:  # unknown names, or CUDA absent (torch raises assorted types)
        raise UsageError(f"--device {args.device!r} is not usable: {_one_line(error)}", prog) from None
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out!r} exists and is not a directory", prog)

    labels = _labels_for(args.weights)
    rows = torch.arange(x.shape[0])
    # Dataset indices travel with each batch, so a sample's bucket never depends on batching.
    if y is None:
        batches: List[Any] = [{"x": x[idx], "index": idx} for idx in rows.split(args.batch_size)]
    else:
        batches = [(idx, x[idx], y[idx]) for idx in rows.split(args.batch_size)]
    reps = []
    layers: Optional[List[str]] = None
    for label, path in zip(labels, args.weights):
        model = build()
        _load_weights(model, path)
        model.to(device)
        try:
            layers = resolve_layers(model, args.layers)
        except ValueError as error:
            raise UsageError(f"--layers: {_one_line(error)}", prog) from None
        _check_forward(model, x[:2].to(device), label, args.data)
        if not args.no_progress:
            print(f"sketching {label} ({path}) on {x.shape[0]} inputs, layers {layers}",
                  file=sys.stderr, flush=True)
        try:
            rep = sketch_model(model, batches, layers=layers, m=args.m, seed=args.seed,
                               beta=args.beta, target=args.target, spatial=args.spatial,
                               dtype=getattr(torch, args.dtype),
                               product=args.kind == "khatri_rao", psi=args.kind == "psi",
                               progress=False if args.no_progress else None)
        except (RuntimeError, ValueError, TypeError, FloatingPointError) as error:
            raise UsageError(f"sketching {label} on --data {args.data!r} (inputs "
                             f"{tuple(x.shape)}) failed: {type(error).__name__}: "
                             f"{_one_line(error)}", prog) from None
        reps.append(rep)

    if len(reps) == 1:
        pairs = [(0, 0)]
    else:
        pairs = [(i, j) for i in range(len(reps)) for j in range(i + 1, len(reps))]
    results: Dict[str, Any] = {
        "index": args.index, "kind": args.kind, "centering": args.centering, "m": args.m,
        "seed": args.seed, "beta": args.beta, "target": args.target, "spatial": args.spatial,
        "n": int(x.shape[0]), "models": [{"label": l, "weights": p}
                                           for l, p in zip(labels, args.weights)],
        "pairs": []}
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--out {args.out!r} cannot be created: {_one_line(error)}", prog) from None
    csv_rows = []
    for i, j in pairs:
        matrix, names_a, names_b = similarity(reps[i], reps[j], index=args.index, kind=args.kind,
                                              centering=args.centering)
        entry = {"a": labels[i], "b": labels[j], "layers_a": names_a, "layers_b": names_b,
                 "matrix": matrix.tolist()}
        results["pairs"].append(entry)
        name = f"{_safe_name(labels[i])}__{_safe_name(labels[j])}"
        with open(os.path.join(args.out, f"{name}.csv"), "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow([f"{labels[i]} \\ {labels[j]}"] + names_b)
            for layer, row in zip(names_a, matrix.tolist()):
                writer.writerow([layer] + [f"{v:.6f}" for v in row])
        for a_index, layer_a in enumerate(names_a):
            for b_index, layer_b in enumerate(names_b):
                csv_rows.append([labels[i], layer_a, labels[j], layer_b,
                                 f"{float(matrix[a_index, b_index]):.6f}"])
        entry["file"] = f"{name}.csv"
    with open(os.path.join(args.out, "similarity.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["model_a", "layer_a", "model_b", "layer_b", args.index])
        writer.writerows(csv_rows)
    with open(os.path.join(args.out, "similarity.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)

    figures: List[str] = []
    if not args.no_plots:
        try:
            from . import plot
        except ImportError:  # pragma: no cover - plot itself imports nothing heavy
            plot = None
        try:
            for entry in results["pairs"]:
                name = os.path.splitext(entry["file"])[0] + ".png"
                plot.heatmap(entry["matrix"], entry["layers_a"], entry["layers_b"],
                             title=f"{args.index.upper()} ({args.kind}): {entry['a']} vs "
                                   f"{entry['b']}", xlabel=entry["b"], ylabel=entry["a"],
                             annotate=max(len(entry["layers_a"]), len(entry["layers_b"])) <= 16,
                             path=os.path.join(args.out, name))
                figures.append(name)
        except ImportError as error:
            print(f"{prog}: warning: heatmaps skipped ({_one_line(error)})", file=sys.stderr)

    for entry in results["pairs"]:
        print(f"\n{args.index.upper()} ({args.kind} kernel), rows: {entry['a']}, columns: "
              f"{entry['b']}")
        print(_format_matrix(entry["layers_a"], entry["layers_b"], entry["matrix"]))
    if len(reps) > 1 and all(e["layers_a"] == e["layers_b"] for e in results["pairs"]):
        print(f"\nlayer-matched {args.index.upper()} (diagonals):")
        print(_format_matrix([f"{e['a']} vs {e['b']}" for e in results["pairs"]],
                             results["pairs"][0]["layers_a"],
                             [[row[k] for k, row in enumerate(e["matrix"])]
                              for e in results["pairs"]]))
    print(f"\nwrote {os.path.join(args.out, 'similarity.json')}, similarity.csv, "
          f"{len(results['pairs'])} pair CSV file(s)" +
          (f" and {len(figures)} heatmap(s)" if figures else ""))
    return 0


# ------------------------------------------------------------------------------------ bench

def _run_bench(argv: Sequence[str]) -> int:
    try:
        from . import bench
    except ImportError as error:
        raise UsageError(f"the benchmarks are unavailable: {_one_line(error)}",
                         f"{PROG} bench") from None
    try:
        code = bench.main(list(argv))
    except SystemExit as exit_:  # its own argparse: --help, or a usage error
        code = exit_.code
    return int(code or 0) if not isinstance(code, str) else 2


# ------------------------------------------------------------------------------------ entry

def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "bench":
            return _run_bench(argv[1:])
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exit_:  # --help / --version
            return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2
        if args.command is None:
            raise UsageError(f"a command is required: demo, compare or bench (see {PROG} --help)")
        if args.command == "demo":
            return _run_demo(args)
        import torch

        threads = torch.get_num_threads()
        try:
            if args.threads is not None:
                torch.set_num_threads(args.threads)
            return _run_compare(args)
        finally:
            torch.set_num_threads(threads)
    except UsageError as error:
        print(f"{error.prog}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
