"""The default sweep figure (`ibflow._figures.sweep_figure`): its colours and tick labels."""

import matplotlib
import numpy as np
import pytest
import xarray as xr

from ibflow._figures import decade_label, plot_sweep, sweep_figure


@pytest.mark.parametrize("x, label", [(1e-5, "10⁻⁵"), (1.0, "10⁰"), (100.0, "10²"), (1e-300, "10⁻³⁰⁰"),
                                      (2e-3, "0.002"), (0.25, "0.25"), (5e-324, "4.94066e-324"), (0.0, "0")])
def test_decade_label(x, label):
    assert decade_label(x) == label


def _sweep_dataset(passed):
    alphas, shapes = np.logspace(-5, -1, 5), np.array([0.0, 0.5, 0.9])
    err = np.linspace(0.1, 0.9, alphas.size)[:, None, None] * np.ones((1, shapes.size, 1))
    return xr.Dataset(dict(population_error=(("alpha", "shape", "seed"), err),
                           passed=(("alpha", "shape", "seed"), passed)),
                      coords=dict(alpha=alphas, shape=shapes, seed=[0]), attrs=dict(net="diagonal"))


def test_sweep_figure_colours_and_labels(tmp_path):
    """One colour-cycle entry per shape, even with failed points circled (their red overlay once
    took the next shape's colour), and plain-text decade labels on the α axis."""
    passed = np.ones((5, 3, 1), bool)
    passed[1, 0, 0] = passed[3, 1, 0] = False
    fig = sweep_figure(_sweep_dataset(passed))
    ax = fig.axes[0]
    cycle = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    shape_lines = [line for line in ax.get_lines() if line.get_label().startswith("s = ")]
    assert [matplotlib.colors.to_hex(line.get_color()) for line in shape_lines] == [matplotlib.colors.to_hex(c) for c in cycle[:3]]
    circled = [line for line in ax.get_lines() if not line.get_label().startswith("s = ")]
    assert [line.get_xdata().size for line in circled] == [1, 1, 0]
    assert all(matplotlib.colors.to_hex(line.get_markeredgecolor()) == "#ff0000" for line in circled)
    fig.canvas.draw()
    labels = {t.get_text() for t in ax.get_xticklabels() if t.get_text()}
    assert {"10⁻⁵", "10⁻³", "10⁻¹"} <= labels
    assert not any("$" in t for t in labels)
    matplotlib.pyplot.close(fig)
    path = plot_sweep(_sweep_dataset(passed), str(tmp_path / "s.png"))
    assert (tmp_path / "s.png").stat().st_size > 0 and path.endswith("s.png")


def test_sweep_figure_without_test_data_shows_the_limits_l1_norm():
    rng = np.random.default_rng(0)
    alphas, shapes = np.logspace(-3, 0, 4), np.array([0.0, 0.5])
    pred = rng.standard_normal((alphas.size, shapes.size, 1, 7))
    ds = xr.Dataset(dict(predictor=(("alpha", "shape", "seed", "dim"), pred),
                         train_loss=(("alpha", "shape", "seed"), np.full((4, 2, 1), 1e-30))),
                    coords=dict(alpha=alphas, shape=shapes, seed=[0]), attrs=dict(net="diagonal"))
    fig = sweep_figure(ds)
    ax = fig.axes[0]
    assert "ℓ1" in ax.get_ylabel()
    lines = [line for line in ax.get_lines() if line.get_label().startswith("s = ")]
    for j, line in enumerate(lines):
        np.testing.assert_allclose(line.get_ydata(), np.abs(pred[:, j, 0]).sum(-1), rtol=1e-14)
    matplotlib.pyplot.close(fig)
