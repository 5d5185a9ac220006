"""The demo's PNG figures, drawn from a results dict with :mod:`nnsim_fast.plot`.

``fig1_similarity.png`` (paper fig. 1), ``fig2_task2vec.png`` and ``fig3_fisher_rao.png``
(fig. 2, 3), ``fig4_mean_embedding.png`` (fig. 4), ``fig5_block_heatmaps.png`` (fig. 5),
``fig6_mean_embedding_ratios.png`` (fig. 6) and ``figG_krr.png`` (appendix G).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Sequence

from ...datasets import TASK_NAMES
from .analysis import pair_key
from .settings import INDICES, KIND_LABELS, KINDS, TASK_COLOURS

__all__ = ["write_figures"]

_QUANTITY_NAMES = {"norm": "‖μ‖", "frobenius_factor": "‖K‖_F / N²", "trace_factor": "√Tr K / N",
                   "ratio_frobenius": "‖μ‖ / (‖K‖_F / N²)", "ratio_trace": "‖μ‖ / (√Tr K / N)"}


def _short(layers: Sequence[str]) -> List[str]:
    return [name.replace("block", "b").replace("layer", "L") for name in layers]


def _roles(results: Dict[str, Any]) -> str:
    verb = "is" if results["config"].get("data") == "files" else "~"
    return f"A {verb} CIFAR-10, B {verb} CIFAR-100, C {verb} SVHN"


def _similarity_curves(results: Dict[str, Any], plot):
    panels = []
    for kind in KINDS:
        for index in INDICES:
            stats = results["similarity"][kind][index]["pairs"]
            for t in TASK_NAMES:
                series, styles = {}, {}
                for u in TASK_NAMES:
                    key = pair_key(*sorted((t, u)))
                    if key in stats:
                        series[f"{t} vs {u}"] = (stats[key]["mean"], stats[key]["std"])
                        # One colour per compared task in every panel; same-task pairs bold.
                        styles[f"{t} vs {u}"] = {"color": TASK_COLOURS[u],
                                                 "linewidth": 2.4 if u == t else 1.3}
                panels.append({"layers": _short(results["layers"]), "series": series,
                               "styles": styles, "xlabel": None, "legend": True,
                               "title": f"{KIND_LABELS[kind]}, {index.upper()}, {t}"})
    return plot.curve_grid(panels, ncols=len(INDICES) * len(TASK_NAMES), panel_size=(2.6, 2.1),
                           suptitle="Similarity of block-matched model pairs (mean ± std over "
                                    f"pairs); {_roles(results)}")


def _task2vec(results: Dict[str, Any], plot):
    labels = [m["label"] for m in results["models"]]
    return plot.heatmap(results["baselines"]["task2vec"]["similarity"], labels, labels,
                        title="Task2Vec cosine similarity (whole model)",
                        annotate=len(labels) <= 16, fmt="{:.2f}")


def _fisher_rao(results: Dict[str, Any], plot):
    labels = [m["label"] for m in results["models"]]
    distance = results["baselines"]["fisher_rao"]["distance"]
    top = max(max(row) for row in distance)
    return plot.heatmap(distance, labels, labels, title="Fisher-Rao norm distance (lower = closer)",
                        vmin=0.0, vmax=top if top > 0 else 1.0, annotate=len(labels) <= 16,
                        fmt="{:.2f}", cmap="magma", colorbar_label="distance")


def _mean_embedding_panels(results: Dict[str, Any], quantities: Sequence[str]):
    me = results["mean_embedding"]["per_pair"]
    # With the bundled tasks A and B share their images, so their curves coincide: B is drawn
    # dashed on top.
    shared = results["config"].get("data", "bundled") == "bundled"
    legend = {t: f"T={t}" + (" (A's images)" if shared and t == "B" else "") for t in TASK_NAMES}
    panels = []
    for q in quantities:
        for s in TASK_NAMES:
            series = {legend[t]: (me[s][t][q]["mean"], me[s][t][q]["std"]) for t in TASK_NAMES}
            styles = {legend[t]: {"color": TASK_COLOURS[t], "linewidth": 2.4 if t == s else 1.3,
                                  "linestyle": (0, (3, 2)) if shared and t == "B" else "-"}
                      for t in TASK_NAMES}
            panels.append({"layers": _short(results["layers"]), "series": series,
                           "styles": styles, "logy": True, "ylim": None,
                           "title": f"{_QUANTITY_NAMES[q]}, S={s}", "xlabel": None})
    return panels


def _mean_embedding(results: Dict[str, Any], plot):
    return plot.curve_grid(
        _mean_embedding_panels(results, ("norm", "frobenius_factor", "trace_factor")),
        ncols=len(TASK_NAMES), panel_size=(3.0, 2.3),
        suptitle="Kernel mean embedding: model trained on S, evaluated on T")


def _mean_embedding_ratios(results: Dict[str, Any], plot):
    return plot.curve_grid(
        _mean_embedding_panels(results, ("ratio_frobenius", "ratio_trace")),
        ncols=len(TASK_NAMES), panel_size=(3.0, 2.3),
        suptitle="‖μ‖ over the CKA and NBS normalisers (eq. 19)")


def _block_heatmaps(results: Dict[str, Any], plot):
    short = _short(results["layers"])
    panels = []
    for kind, index in (("hadamard", "cka"), ("feature", "cka")):
        for pair, matrix in results["heatmaps"][f"{kind}/{index}"].items():
            panels.append({"matrix": matrix, "row_labels": short, "col_labels": short,
                           "title": f"{KIND_LABELS[kind]}\n{pair.replace('-', ' vs ')}"})
    return plot.heatmap_grid(panels, ncols=max(len(panels) // 2, 1), panel_size=(2.5, 2.4),
                             suptitle="Block x block CKA (rows: first model)")


def _krr(results: Dict[str, Any], plot):
    styles = {"KRR (sketched)": {}, "probe, 1 epoch": {"linestyle": ":"},
              "probe, converged": {"linestyle": "--"},
              "model": {"linestyle": "-", "marker": "", "color": "grey"}}
    names = {"KRR (sketched)": "krr", "probe, 1 epoch": "probe_one_epoch",
             "probe, converged": "probe_converged"}
    panels = []
    for t in TASK_NAMES:
        entry = results["krr"][t]
        series = {label: (entry[key]["mean"], entry[key]["std"]) for label, key in names.items()}
        series["model"] = ([entry["model_accuracy"][0]] * len(results["layers"]), None)
        panels.append({"layers": _short(results["layers"]), "series": series, "styles": styles,
                       "title": f"task {t} ({results['tasks'][t]['num_classes']} classes)",
                       "ylabel": "test accuracy", "xlabel": None})
    return plot.curve_grid(panels, ncols=len(TASK_NAMES), panel_size=(3.2, 2.6),
                           suptitle="Kernel ridge regression on sketched kernels vs linear probes")


_FIGURES: Dict[str, Callable[[Dict[str, Any], Any], Any]] = {
    "fig1_similarity.png": _similarity_curves,
    "fig2_task2vec.png": _task2vec,
    "fig3_fisher_rao.png": _fisher_rao,
    "fig4_mean_embedding.png": _mean_embedding,
    "fig6_mean_embedding_ratios.png": _mean_embedding_ratios,
    "fig5_block_heatmaps.png": _block_heatmaps,
    "figG_krr.png": _krr,
}


def write_figures(results: Dict[str, Any], out: str) -> List[str]:
    """Write the demo's PNG figures from a results dictionary; returns their file names."""
    from ... import plot

    written = []
    for name, draw in _FIGURES.items():
        plot.save_figure(draw(results, plot), os.path.join(out, name), dpi=100)
        written.append(name)
    return written
