"""Figures: annotated similarity heatmaps and per-layer curves with error bars.

matplotlib is optional for the library: it is imported when a function here is first called,
never by ``import nnsim_fast``.  Figures are built as ``matplotlib.figure.Figure`` objects and
rendered by the Agg backend into files; pyplot and its global state are never touched, so these
functions work in scripts, servers and threads without a display.

Similarity heatmaps use a fixed colour scale (default 0 to 1) so that two figures can be compared
by eye: the same colour always means the same similarity.
"""
from __future__ import annotations

import math
import os
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["heatmap", "heatmap_grid", "layer_curves", "curve_grid", "save_figure",
           "draw_heatmap", "draw_curves"]

PathLike = Union[str, "os.PathLike[str]"]
Series = Mapping[str, Tuple[Sequence[float], Optional[Sequence[float]]]]

_DEFAULT_CMAP = "viridis"


def _matplotlib():
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - exercised only without matplotlib
        raise ImportError("nnsim_fast.plot needs matplotlib (pip install matplotlib, or "
                          "pip install 'nnsim-fast[demo]')") from error
    return matplotlib, Figure


def _new_figure(width: float, height: float):
    _, Figure = _matplotlib()
    # A bare Figure renders through Agg on savefig without selecting a global backend.
    return Figure(figsize=(width, height), layout="constrained")


def save_figure(figure, path: PathLike, dpi: int = 110) -> str:
    """Write ``figure`` to ``path`` (format from the extension, PNG by default); returns the path."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    return path


def _as_matrix(matrix: Any, name: str = "matrix") -> np.ndarray:
    try:
        import torch
        if isinstance(matrix, torch.Tensor):
            matrix = matrix.detach().to("cpu", torch.float64).numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    array = np.asarray(matrix, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D matrix, got shape {array.shape}")
    return array


def _check_labels(labels: Optional[Sequence[str]], size: int, name: str) -> List[str]:
    if labels is None:
        return [str(i) for i in range(size)]
    labels = [str(label) for label in labels]
    if len(labels) != size:
        raise ValueError(f"{name} must have one label per {'row' if 'row' in name else 'column'}: "
                         f"{size} expected, got {len(labels)}")
    return labels


def _check_range(vmin: float, vmax: float) -> None:
    if not (math.isfinite(vmin) and math.isfinite(vmax)) or vmin >= vmax:
        raise ValueError(f"the colour scale needs finite vmin < vmax, got vmin={vmin}, vmax={vmax}")


def draw_heatmap(ax, matrix: Any, row_labels: Optional[Sequence[str]] = None,
                 col_labels: Optional[Sequence[str]] = None, *, title: Optional[str] = None,
                 vmin: float = 0.0, vmax: float = 1.0, annotate: bool = True,
                 fmt: str = "{:.2f}", cmap: str = _DEFAULT_CMAP, xlabel: Optional[str] = None,
                 ylabel: Optional[str] = None):
    """Draw one annotated heatmap on an existing matplotlib ``ax``; returns the image artist.

    Colours map ``[vmin, vmax]`` (default the similarity range [0, 1]) whatever the data's own
    range; values outside are drawn in the end colours, NaN cells stay blank.  Each cell is
    annotated with ``fmt.format(value)`` in black or white, whichever reads better on its colour.
    """
    values = _as_matrix(matrix)
    rows = _check_labels(row_labels, values.shape[0], "row_labels")
    cols = _check_labels(col_labels, values.shape[1], "col_labels")
    _check_range(vmin, vmax)
    matplotlib, _ = _matplotlib()
    colormap = matplotlib.colormaps[cmap]
    image = ax.imshow(values, cmap=colormap, vmin=vmin, vmax=vmax, aspect="auto",
                      interpolation="nearest")
    ax.set_xticks(range(len(cols)), labels=cols)
    ax.set_yticks(range(len(rows)), labels=rows)
    ax.tick_params(axis="x", labelrotation=45 if max(len(c) for c in cols) > 3 else 0)
    if title:
        ax.set_title(title, fontsize=10)
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if annotate:
        size = 8 if max(values.shape) <= 8 else 6
        for (i, j), value in np.ndenumerate(values):
            if not math.isfinite(value):
                continue
            red, green, blue, _ = colormap((min(max(value, vmin), vmax) - vmin) / (vmax - vmin))
            luminance = 0.299 * red + 0.587 * green + 0.114 * blue
            ax.text(j, i, fmt.format(value), ha="center", va="center", fontsize=size,
                    color="black" if luminance > 0.5 else "white")
    return image


def heatmap(matrix: Any, row_labels: Optional[Sequence[str]] = None,
            col_labels: Optional[Sequence[str]] = None, *, title: Optional[str] = None,
            path: Optional[PathLike] = None, vmin: float = 0.0, vmax: float = 1.0,
            annotate: bool = True, fmt: str = "{:.2f}", cmap: str = _DEFAULT_CMAP,
            xlabel: Optional[str] = None, ylabel: Optional[str] = None,
            colorbar_label: str = "similarity", dpi: int = 110):
    """An annotated heatmap of ``matrix`` ``[rows, cols]`` on the fixed scale ``[vmin, vmax]``.

    Args:
        matrix: 2-D array-like or tensor (e.g. a layer x layer similarity in [0, 1]).
        row_labels, col_labels: tick labels (default: indices).
        path: if given, the figure is written there (PNG unless the extension says otherwise).
        vmin, vmax: the colour scale; default [0, 1], fixed whatever the data's range.
        annotate: print each value in its cell with ``fmt``.

    Returns:
        The ``matplotlib.figure.Figure``.
    """
    values = _as_matrix(matrix)
    width = min(2.2 + 0.5 * values.shape[1], 9.0)
    height = min(1.5 + 0.42 * values.shape[0], 8.0)
    figure = _new_figure(width, height)
    ax = figure.add_subplot()
    image = draw_heatmap(ax, values, row_labels, col_labels, title=title, vmin=vmin, vmax=vmax,
                         annotate=annotate, fmt=fmt, cmap=cmap, xlabel=xlabel, ylabel=ylabel)
    figure.colorbar(image, ax=ax, label=colorbar_label)
    if path is not None:
        save_figure(figure, path, dpi=dpi)
    return figure


def heatmap_grid(panels: Sequence[Mapping[str, Any]], *, ncols: int = 3,
                 path: Optional[PathLike] = None, suptitle: Optional[str] = None,
                 vmin: float = 0.0, vmax: float = 1.0, annotate: bool = True, fmt: str = "{:.2f}",
                 cmap: str = _DEFAULT_CMAP, colorbar_label: str = "similarity",
                 panel_size: Tuple[float, float] = (3.2, 2.9), dpi: int = 110):
    """Several heatmaps sharing one fixed colour scale and one colour bar.

    Each panel is a mapping with ``matrix`` and optional ``row_labels``, ``col_labels``,
    ``title``, ``xlabel``, ``ylabel``.  Returns the figure (written to ``path`` if given).
    """
    if not panels:
        raise ValueError("panels is empty")
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    _check_range(vmin, vmax)
    ncols = min(ncols, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    figure = _new_figure(panel_size[0] * ncols + 1.0, panel_size[1] * nrows + (0.4 if suptitle else 0))
    axes = figure.subplots(nrows, ncols, squeeze=False)
    image = None
    for k, panel in enumerate(panels):
        if "matrix" not in panel:
            raise ValueError(f"panel {k} has no 'matrix'")
        image = draw_heatmap(axes[k // ncols][k % ncols], panel["matrix"], panel.get("row_labels"),
                             panel.get("col_labels"), title=panel.get("title"), vmin=vmin,
                             vmax=vmax, annotate=annotate, fmt=fmt, cmap=cmap,
                             xlabel=panel.get("xlabel"), ylabel=panel.get("ylabel"))
    for k in range(len(panels), nrows * ncols):
        axes[k // ncols][k % ncols].set_axis_off()
    figure.colorbar(image, ax=axes, label=colorbar_label, shrink=0.8)
    if suptitle:
        figure.suptitle(suptitle)
    if path is not None:
        save_figure(figure, path, dpi=dpi)
    return figure


def _series_arrays(name: str, series: Tuple[Sequence[float], Optional[Sequence[float]]],
                   length: int) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    if not isinstance(series, (tuple, list)) or len(series) != 2:
        raise ValueError(f"series {name!r} must be a pair (mean, std or None)")
    mean = np.asarray(series[0], dtype=np.float64)
    std = None if series[1] is None else np.asarray(series[1], dtype=np.float64)
    if mean.shape != (length,) or (std is not None and std.shape != (length,)):
        raise ValueError(f"series {name!r}: mean and std must have one value per layer "
                         f"({length}), got shapes {mean.shape} and "
                         f"{None if std is None else std.shape}")
    return mean, std


def draw_curves(ax, layers: Sequence[str], series: Series, *, title: Optional[str] = None,
                ylabel: Optional[str] = None, xlabel: Optional[str] = "layer",
                ylim: Optional[Tuple[float, float]] = (0.0, 1.0), logy: bool = False,
                styles: Optional[Mapping[str, Mapping[str, Any]]] = None,
                legend: bool = True) -> None:
    """Per-layer curves on an existing ``ax``: one line per series, error bars = its std.

    ``series`` maps a legend label to ``(mean, std)``, each one value per layer (``std`` may be
    None for a line without error bars).  ``styles`` optionally maps a label to matplotlib line
    keyword arguments (``linestyle``, ``color``, ``marker``...).
    """
    layers = [str(layer) for layer in layers]
    if not layers:
        raise ValueError("layers is empty")
    if not series:
        raise ValueError("series is empty")
    x = np.arange(len(layers))
    for label, values in series.items():
        mean, std = _series_arrays(label, values, len(layers))
        style = {"marker": "o", "markersize": 4, "capsize": 3, "linewidth": 1.4}
        style.update((styles or {}).get(label, {}))
        ax.errorbar(x, mean, yerr=std, label=label, **style)
    ax.set_xticks(x, labels=layers)
    if logy:
        ax.set_yscale("log")
    elif ylim is not None:
        ax.set_ylim(*ylim)
    if title:
        ax.set_title(title, fontsize=10)
    if ylabel:
        ax.set_ylabel(ylabel)
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=7)


def layer_curves(layers: Sequence[str], series: Series, *, title: Optional[str] = None,
                 ylabel: Optional[str] = "similarity", xlabel: Optional[str] = "layer",
                 ylim: Optional[Tuple[float, float]] = (0.0, 1.0), logy: bool = False,
                 styles: Optional[Mapping[str, Mapping[str, Any]]] = None,
                 path: Optional[PathLike] = None, dpi: int = 110):
    """One panel of per-layer curves with error bars (see :func:`draw_curves`); returns the figure."""
    figure = _new_figure(max(4.0, 1.0 + 0.8 * len(layers)), 3.4)
    draw_curves(figure.add_subplot(), layers, series, title=title, ylabel=ylabel, xlabel=xlabel,
                ylim=ylim, logy=logy, styles=styles)
    if path is not None:
        save_figure(figure, path, dpi=dpi)
    return figure


def curve_grid(panels: Sequence[Mapping[str, Any]], *, ncols: int = 3,
               path: Optional[PathLike] = None, suptitle: Optional[str] = None,
               panel_size: Tuple[float, float] = (3.0, 2.5), sharey: bool = False,
               dpi: int = 110):
    """A grid of per-layer curve panels.

    Each panel is a mapping with ``layers`` and ``series`` and optional ``title``, ``ylabel``,
    ``xlabel``, ``ylim``, ``logy``, ``styles``, ``legend`` (see :func:`draw_curves`).
    Returns the figure (written to ``path`` if given).
    """
    if not panels:
        raise ValueError("panels is empty")
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    ncols = min(ncols, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    figure = _new_figure(panel_size[0] * ncols, panel_size[1] * nrows + (0.4 if suptitle else 0))
    axes = figure.subplots(nrows, ncols, squeeze=False, sharey=sharey)
    for k, panel in enumerate(panels):
        for key in ("layers", "series"):
            if key not in panel:
                raise ValueError(f"panel {k} has no {key!r}")
        draw_curves(axes[k // ncols][k % ncols], panel["layers"], panel["series"],
                    title=panel.get("title"), ylabel=panel.get("ylabel"),
                    xlabel=panel.get("xlabel", "layer"), ylim=panel.get("ylim", (0.0, 1.0)),
                    logy=panel.get("logy", False), styles=panel.get("styles"),
                    legend=panel.get("legend", True))
    for k in range(len(panels), nrows * ncols):
        axes[k // ncols][k % ncols].set_axis_off()
    if suptitle:
        figure.suptitle(suptitle)
    if path is not None:
        save_figure(figure, path, dpi=dpi)
    return figure
