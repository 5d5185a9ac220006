"""The demo's text outputs: the terminal verdict table and ``report.md``, from a results dict."""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Sequence, Tuple

from ...datasets import TASK_NAMES
from .analysis import mean_std, pair_key
from .settings import INDICES, KIND_LABELS, KINDS, MEAN_EMBEDDING_QUANTITIES, TASK_PAIRS

__all__ = ["format_desiderata", "format_report"]

_KEYS = [pair_key(a, b) for a, b in TASK_PAIRS]


def _verdict(entry: Dict[str, Any]) -> str:
    return "PASS" if entry["pass"] else "FAIL"


def _desiderata_rows(results: Dict[str, Any]) -> List[Tuple[str, str, Dict[str, float],
                                                              Dict[str, Any], str]]:
    rows = []
    layers = len(results["layers"])
    for kind in KINDS:
        for index in INDICES:
            entry = results["similarity"][kind][index]
            passing = entry["layers_passing"]
            note = f"{passing['d1']}/{layers}, {passing['d2']}/{layers}, {passing['d3']}/{layers}"
            rows.append((KIND_LABELS[kind], index.upper(), entry["closeness"],
                         entry["desiderata"], note))
    t2v = results["baselines"]["task2vec"]
    rows.append(("Task2Vec", "cosine", t2v["closeness"], t2v["desiderata"], "whole model"))
    frd = results["baselines"]["fisher_rao"]
    rows.append(("Fisher-Rao norm", "distance (lower = closer)", frd["mean_distance"],
                 frd["desiderata"], "whole model"))
    return rows


def _roles_line(results: Dict[str, Any]) -> str:
    if results["config"].get("data") == "files":
        return "  A is CIFAR-10, B CIFAR-100, C SVHN; values are means over model pairs and blocks."
    return "  A plays CIFAR-10, B CIFAR-100, C SVHN; values are means over model pairs and blocks."


def format_desiderata(results: Dict[str, Any]) -> str:
    """The terminal table: each representation x index, task-pair values and PASS/FAIL verdicts."""
    header = f"{'representation':<20} {'index':<8} " + " ".join(f"{k:>6}" for k in _KEYS) + \
        "   (1)   (2)   (3)"
    lines = ["Desiderata of the paper (docs/demo.md), from block-matched model pairs:",
             "  (1) same task, different init > different tasks   (2) A-B > A-C and A-B > B-C"
             "   (3) A-C > B-C", _roles_line(results), header, "-" * len(header)]
    for rep, index, values, verdicts, _ in _desiderata_rows(results):
        index = "FR dist" if index.startswith("distance") else index
        cells = " ".join(f"{values.get(k, float('nan')):6.3f}" for k in _KEYS)
        marks = " ".join(f"{_verdict(verdicts[d]):>5}" for d in ("d1", "d2", "d3"))
        lines.append(f"{rep:<20} {index:<8} {cells}  {marks}")
    return "\n".join(lines)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def _pm(mean: float, std: float, digits: int = 3) -> str:
    if mean is None or (isinstance(mean, float) and not math.isfinite(mean)):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _num(value: float) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
        return f"{value:.3e}"
    return f"{value:.4f}"


# ------------------------------------------------------------------------------ sections

def _header(results: Dict[str, Any]) -> List[str]:
    cfg = results["config"]
    sketch = cfg["sketch"]
    estimate = {"paper": "Algorithm 1 (kernels centred over buckets)",
                "plugin": "plug-in (sketched kernels centred over the data)",
                "sketch": "collision-corrected data-centred estimator",
                "joint": "CKA from exact within-block kernel entries of all models over the "
                         "same batches (`compare_models`); NBS plug-in on data-centred "
                         "sketches"}.get(
                    sketch.get("estimator", "sketch"), str(sketch.get("estimator"))) + \
        (", debiased HSIC" if sketch.get("debiased") else "")
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in results["timings"].items())
    return [f"# nnsim-fast demo report ({cfg['mode']})", "",
            f"nnsim-fast {results['version']}, torch {cfg['torch']}, native ops: "
            f"{cfg['native_ops']}, {cfg['threads']} CPU thread(s). Sketch: m = {cfg['m']}, "
            f"seed {cfg['seed']}, {sketch['dtype']}, spatial {sketch['spatial']}, beta "
            f"{sketch['beta']}, {estimate}; {sketch['data']}. {cfg['seeds_per_task']} models "
            "per task.", "", f"Timings: {timing}."]


def _tasks_section(results: Dict[str, Any]) -> List[str]:
    return ["", "## Tasks", "", _table(
        ["task", "plays", "classes", "train", "test", "description"],
        [[n, t["role"], t["num_classes"], t["n_train"], t["n_test"], t["description"]]
         for n, t in results["tasks"].items()])]


def _architecture_sentence(results: Dict[str, Any]) -> str:
    cfg = results["config"]
    train = cfg["train"]
    schedule = (f"Adam (lr {train['lr']}, weight decay {train['weight_decay']}, cosine "
                f"schedule), {train['epochs']} epochs, batch {train['batch_size']}.")
    model = cfg.get("model", {"name": "SmallResNet"})
    if model["name"] == "ResNet-18":
        return (f"ResNet-18 for 32x32 images, first-stage width {model['width']} (64 in the "
                f"original), probed at its {len(results['layers'])} stages; " + schedule)
    return (f"SmallResNet, block widths {tuple(train['channels'])}, {len(results['layers'])} "
            "residual blocks; " + schedule)


def _models_section(results: Dict[str, Any]) -> List[str]:
    rows = []
    for t in TASK_NAMES:
        accs = [m["test_accuracy"] for m in results["models"] if m["task"] == t]
        rows.append([t, len(accs), _pm(*mean_std(accs)), ", ".join(f"{a:.3f}" for a in accs)])
    return ["", "## Models", "", _architecture_sentence(results), "",
            _table(["task", "models", "test accuracy", "per model"], rows)]


def _desiderata_section(results: Dict[str, Any]) -> List[str]:
    rows = []
    for rep, index, values, verdicts, note in _desiderata_rows(results):
        rows.append([rep, index] + [f"{values.get(k, float('nan')):.3f}" for k in _KEYS] +
                    [_verdict(verdicts[d]) for d in ("d1", "d2", "d3")] + [note])
    return ["", "## Desiderata", "",
            "Mean similarity of block-matched model pairs, averaged over blocks (same-task "
            "pairs: distinct models). (1) every T-T above every T-U; (2) A-B above A-C and "
            "B-C; (3) A-C above B-C. The last column counts the blocks at which (1), (2), (3) "
            "hold on their own.", "",
            _table(["representation", "index"] + _KEYS + ["(1)", "(2)", "(3)", "blocks"], rows)]


_NBS_NOTE = " (NBS: from the sketches)"


def _exact_section(results: Dict[str, Any]) -> List[str]:
    check = results.get("exact")
    if not check:
        return []
    estimator = results["config"]["sketch"]["estimator"]
    estimates = f"{estimator} estimates" + (_NBS_NOTE if estimator == "joint" else "")
    rows = []
    for kind in KINDS:
        for index in INDICES:
            entry, estimate = check[kind][index], results["similarity"][kind][index]
            covered = entry["within_two_stderr"]
            rows.append([f"{KIND_LABELS[kind]} ({index.upper()})", f"{entry['max_abs_difference']:.3f}",
                         f"{entry['mean_abs_difference']:.3f}",
                         "n/a" if covered is None else f"{100 * covered:.0f}%"] +
                        [f"{_verdict(estimate['desiderata'][d])} / {_verdict(entry['desiderata'][d])}"
                         for d in ("d1", "d2", "d3")])
    return ["", "## Estimates against exact values", "",
            f"Every similarity of the table above computed again over all N × N pairs of the "
            f"N = {check['n']} test rows in float64 (`estimator=\"exact\"`), against the "
            f"{estimates}: largest and mean |estimate − exact| over distinct model "
            "pairs and blocks, the share within two reported standard errors, and each "
            "desideratum as read from the estimates / from the exact values.", "",
            _table(["similarity", "max abs diff", "mean abs diff", "within 2 s.e.",
                    "(1)", "(2)", "(3)"], rows)]


def _mean_error(entry: Dict[str, Any]) -> float:
    values = [v for matrix in entry["errors"] for row in matrix for v in row
              if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else float("nan")


def _per_block_section(results: Dict[str, Any]) -> List[str]:
    layers = results["layers"]
    parts = ["", "## Similarity per block", "",
             "Mean ± std over model pairs of each task pair (paper fig. 1).", ""]
    for kind in KINDS:
        for index in INDICES:
            entry = results["similarity"][kind][index]
            stats = entry["pairs"]
            parts += [f"### {KIND_LABELS[kind]}, {index.upper()}", ""]
            parts.append(_table(["pair"] + layers, [
                [k] + [_pm(m, s) for m, s in zip(stats[k]["mean"], stats[k]["std"])]
                for k in _KEYS if k in stats]))
            if "errors" in entry:
                parts += ["", f"Estimated standard error of one value, averaged over pairs and "
                              f"blocks: {_num(_mean_error(entry))}."]
            parts.append("")
    return parts


def _heatmap_section(results: Dict[str, Any]) -> List[str]:
    layers = results["layers"]
    parts = ["## Block × block similarity", "",
             "Rows: blocks of the first model, columns: blocks of the second (paper fig. 5).", ""]
    for name, maps in results["heatmaps"].items():
        kind, index = name.split("/")
        for pair, matrix in maps.items():
            parts += [f"### {KIND_LABELS[kind]}, {index.upper()}: {pair}", ""]
            parts.append(_table([""] + layers, [[layers[i]] + [f"{v:.3f}" for v in row]
                                                 for i, row in enumerate(matrix)]))
            parts.append("")
    return parts


def _baselines_section(results: Dict[str, Any]) -> List[str]:
    base = results["baselines"]
    return ["## Baselines", "", "Task2Vec: " + base["task2vec"]["note"] + ".", "",
            _table(["pair", "Task2Vec similarity", "Fisher-Rao distance"], [
                [k, f"{base['task2vec']['closeness'][k]:.3f}",
                 f"{base['fisher_rao']['mean_distance'][k]:.3f}"] for k in _KEYS]), "",
            _table(["model", "Fisher-Rao norm"], [
                [m["label"], f"{n:.3f}"]
                for m, n in zip(results["models"], base["fisher_rao"]["norms"])])]


def _mean_embedding_section(results: Dict[str, Any]) -> List[str]:
    layers = results["layers"]
    parts = ["", "## Kernel mean embedding", "",
             "Each model sketched on every task's test split (rows: trained on → evaluated "
             "on), features∘gradients kernel; mean over the models of the source task (paper "
             "fig. 4, 6; eq. 19). `norm` is ‖μ_p‖, `frobenius_factor` ‖K‖_F/N² (an unbiased "
             "estimate of ‖K‖_F² from the two sketch halves of ψ), `trace_factor` √Tr K / N, "
             "`ratio_frobenius` and `ratio_trace` their ratios with ‖μ_p‖.", ""]
    me = results["mean_embedding"]["per_pair"]
    for q in MEAN_EMBEDDING_QUANTITIES:
        parts += [f"### {q}", "", _table(["trained on → evaluated on"] + layers, [
            [f"{s} → {t}"] + [_num(v) for v in me[s][t][q]["mean"]]
            for s in TASK_NAMES for t in TASK_NAMES]), ""]
    if results["config"].get("data", "bundled") == "bundled":
        parts += ["Tasks A and B share their test images, and the representation is label-free "
                  "(expected gradients under the model's own predictive), so a model evaluated "
                  "on A and on B gives the same numbers: these tables separate the digit images "
                  "from the shapes, not the two label spaces.", ""]
    checks = results["mean_embedding"]["checks"]
    parts.append("Is `ratio_frobenius` (block mean) largest on the model's own task? " + ", ".join(
        f"{s}: {'yes' if c['own_task_highest'] else 'no'}" for s, c in checks.items()) + ".")
    return parts


def _krr_section(results: Dict[str, Any]) -> List[str]:
    rows = []
    for t in TASK_NAMES:
        entry = results["krr"][t]
        for i, name in enumerate(results["layers"]):
            rows.append([t, name] + [_pm(entry[key]["mean"][i], entry[key]["std"][i]) for key in
                                     ("krr", "probe_one_epoch", "probe_converged")] +
                        [_pm(*entry["model_accuracy"])])
    return ["", "## Kernel ridge regression (appendix G)", "",
            "Test accuracy (mean ± std over the models of a task) of KRR on the sketched "
            "features∘gradients kernel of the training split (m buckets, unsigned target "
            "sketch, alpha by leave-one-bucket-out), and of logistic-regression probes on the "
            "block's globally pooled features after one epoch and at convergence.", "",
            _table(["task", "block", "KRR", "probe, 1 epoch", "probe, converged", "model"], rows)]


def _closing_sections(results: Dict[str, Any]) -> List[str]:
    parts = []
    if results.get("warnings"):
        parts += ["", "## Warnings", ""] + [f"- {w}" for w in results["warnings"]]
    if results["figures"]:
        parts += ["", "## Figures", ""]
        parts += [f"![{os.path.splitext(f)[0]}]({f})" for f in results["figures"]]
    return parts + [""]


def format_report(results: Dict[str, Any]) -> str:
    """``report.md``: the run's configuration, timings and every table of the demo."""
    sections = (_header, _tasks_section, _models_section, _desiderata_section, _exact_section,
                _per_block_section,
                _heatmap_section, _baselines_section, _mean_embedding_section, _krr_section,
                _closing_sections)
    return "\n".join(line for section in sections for line in section(results))
