"""Tests of nnsim_fast.plot: files written, fixed colour scale, annotations, bad input, lazy import."""

import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

from nnsim_fast import plot  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_png(path):
    import matplotlib.image

    with open(path, "rb") as handle:
        assert handle.read(8) == PNG_MAGIC
    return matplotlib.image.imread(path)


def test_importing_the_library_or_plot_does_not_import_matplotlib():
    code = ("import sys, nnsim_fast, nnsim_fast.plot, nnsim_fast.cli, nnsim_fast.app.demo, "
            "nnsim_fast.app.compare; "
            "assert 'matplotlib' not in sys.modules, sorted(m for m in sys.modules if 'matplotlib' in m)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_heatmap_writes_png_with_fixed_scale_and_annotations(tmp_path, rng):
    # Data confined to [0.2, 0.4]: an autoscaled colour map would stretch it over the full range.
    values = 0.2 + 0.2 * rng.random((3, 4))
    path = tmp_path / "sub" / "h.png"
    figure = plot.heatmap(values, ["r0", "r1", "r2"], ["a", "b", "c", "d"], title="t", path=path)
    image = read_png(path)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50
    ax = figure.axes[0]
    assert ax.images[0].get_clim() == (0.0, 1.0)
    texts = sorted(t.get_text() for t in ax.texts)
    assert texts == sorted(f"{v:.2f}" for v in values.ravel())
    assert [t.get_text() for t in ax.get_yticklabels()] == ["r0", "r1", "r2"]


def test_heatmap_colours_follow_the_fixed_scale_not_the_data(rng):
    import matplotlib

    low = plot.heatmap(np.full((2, 2), 0.25))
    wide = plot.heatmap(np.array([[0.0, 0.25], [0.5, 1.0]]))
    # The same value must get the same colour whatever else is in the matrix.
    cmap = matplotlib.colormaps["viridis"]
    for figure in (low, wide):
        image = figure.axes[0].images[0]
        np.testing.assert_allclose(image.to_rgba(np.array([[0.25]]))[0, 0], cmap(0.25), atol=1e-6)


def test_annotation_colour_contrasts_with_the_cell():
    figure = plot.heatmap(np.array([[0.0, 1.0]]))
    colours = {t.get_text(): t.get_color() for t in figure.axes[0].texts}
    # viridis runs from dark purple (0) to light yellow (1).
    assert colours["0.00"] == "white" and colours["1.00"] == "black"


def test_heatmap_accepts_tensors_and_skips_nan_cells():
    matrix = torch.tensor([[0.5, float("nan")], [0.1, 0.9]], dtype=torch.float64)
    figure = plot.heatmap(matrix, annotate=True)
    assert sorted(t.get_text() for t in figure.axes[0].texts) == ["0.10", "0.50", "0.90"]


@pytest.mark.parametrize("kwargs, match", [
    ({"matrix": np.zeros(3)}, "2-D"),
    ({"matrix": np.zeros((0, 2))}, "non-empty"),
    ({"matrix": np.zeros((2, 2)), "row_labels": ["a"]}, "row_labels"),
    ({"matrix": np.zeros((2, 3)), "col_labels": ["a", "b"]}, "col_labels"),
    ({"matrix": np.zeros((2, 2)), "vmin": 1.0, "vmax": 1.0}, "vmin < vmax"),
])
def test_heatmap_rejects_bad_input(kwargs, match):
    matrix = kwargs.pop("matrix")
    with pytest.raises(ValueError, match=match):
        plot.heatmap(matrix, **kwargs)


def test_heatmap_grid_shares_one_scale(tmp_path, rng):
    panels = [{"matrix": rng.random((4, 4)) * scale, "title": f"p{k}"}
              for k, scale in enumerate((0.3, 1.0, 0.6))]
    path = tmp_path / "grid.png"
    figure = plot.heatmap_grid(panels, ncols=2, path=path, suptitle="s")
    read_png(path)
    images = [ax.images[0] for ax in figure.axes if ax.images]
    assert len(images) == 3
    assert all(image.get_clim() == (0.0, 1.0) for image in images)
    with pytest.raises(ValueError, match="panels is empty"):
        plot.heatmap_grid([])
    with pytest.raises(ValueError, match="matrix"):
        plot.heatmap_grid([{"title": "no matrix"}])


def test_layer_curves_draw_error_bars(tmp_path):
    layers = ["b1", "b2", "b3"]
    series = {"x": ([0.2, 0.5, 0.7], [0.05, 0.1, 0.0]), "y": ([0.9, 0.8, 0.6], None)}
    path = tmp_path / "curves.png"
    figure = plot.layer_curves(layers, series, title="t", path=path)
    read_png(path)
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["x", "y"]
    assert ax.get_ylim() == (0.0, 1.0)
    # One errorbar container per series; only "x" carries bars.
    containers = ax.containers
    assert len(containers) == 2
    assert containers[0].has_yerr and not containers[1].has_yerr
    xs, ys = containers[0].lines[0].get_data()
    np.testing.assert_allclose(ys, [0.2, 0.5, 0.7])


def test_layer_curves_log_scale_and_bad_series():
    figure = plot.layer_curves(["a", "b"], {"s": ([1.0, 100.0], [0.1, 1.0])}, logy=True)
    assert figure.axes[0].get_yscale() == "log"
    with pytest.raises(ValueError, match="one value per layer"):
        plot.layer_curves(["a", "b"], {"s": ([1.0], None)})
    with pytest.raises(ValueError, match="pair"):
        plot.layer_curves(["a", "b"], {"s": [1.0, 2.0, 3.0]})
    with pytest.raises(ValueError, match="layers is empty"):
        plot.layer_curves([], {"s": ([], None)})


def test_curve_grid_panels(tmp_path):
    panels = [{"layers": ["1", "2"], "series": {"s": ([0.1, 0.2], [0.0, 0.1])}, "title": f"{k}"}
              for k in range(5)]
    path = tmp_path / "g.png"
    figure = plot.curve_grid(panels, ncols=3, path=path)
    read_png(path)
    drawn = [ax for ax in figure.axes if ax.get_title()]
    assert [ax.get_title() for ax in drawn] == ["0", "1", "2", "3", "4"]
    with pytest.raises(ValueError, match="series"):
        plot.curve_grid([{"layers": ["1"]}])
