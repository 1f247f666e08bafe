"""Tests for sngp_models.plots (headless, no pyplot)."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure

from sngp_models import plots as P

NY, NX = 6, 8
X_RANGE = (-2.0, 3.0)
Y_RANGE = (-1.5, 2.0)


@pytest.fixture()
def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    x_train = rng.uniform(-1, 2, size=(20, 2))
    y_train = rng.integers(0, 2, size=20)
    x_ood = rng.uniform(-2, 3, size=(10, 2))
    p0 = rng.uniform(0, 1, size=NY * NX)
    return {"x_train": x_train, "y_train": y_train, "x_ood": x_ood, "probs": p0, "unc": p0 * (1 - p0)}


def _common(data: dict[str, np.ndarray]) -> dict[str, object]:
    return {
        "grid_shape": (NY, NX),
        "x_range": X_RANGE,
        "y_range": Y_RANGE,
        "x_train": data["x_train"],
        "y_train": data["y_train"],
        "x_ood": data["x_ood"],
    }


def _image_axes(fig: Figure) -> list:
    return [ax for ax in fig.axes if len(ax.images) > 0]


def test_plot_method_structure(data, tmp_path) -> None:
    fig = P.plot_method(data["probs"], data["unc"], model_name="SNGP", **_common(data))
    assert isinstance(fig, Figure)
    assert tuple(fig.get_size_inches()) == (14.0, 5.0)
    img_axes = _image_axes(fig)
    assert len(img_axes) == 2
    assert all(len(ax.images) == 1 for ax in img_axes)
    assert len(fig.axes) == 4  # two panels + two colorbars
    assert img_axes[0].get_title() == "Class Probability, SNGP"
    assert img_axes[1].get_title() == "(Normalized) Predictive Uncertainty, SNGP"

    prob_img = img_axes[0].images[0]
    unc_img = img_axes[1].images[0]
    np.testing.assert_allclose(np.asarray(prob_img.get_array()), data["probs"].reshape(NY, NX))
    assert np.asarray(unc_img.get_array()).shape == (NY, NX)
    assert float(np.max(unc_img.get_array())) == pytest.approx(1.0)
    assert prob_img.origin == "lower"
    assert tuple(prob_img.get_extent()) == (*X_RANGE, *Y_RANGE)
    assert prob_img.get_clim() == (0.0, 1.0)
    assert img_axes[0].get_xlim() == X_RANGE
    assert img_axes[0].get_ylim() == Y_RANGE
    # training scatter + OOD scatter on each panel
    assert all(len(ax.collections) == 2 for ax in img_axes)

    out = tmp_path / "method.png"
    fig.savefig(out)
    assert out.exists() and out.stat().st_size > 0


def test_plot_method_zero_uncertainty_and_no_ood(data) -> None:
    kwargs = _common(data) | {"x_ood": None}
    fig = P.plot_method(data["probs"], np.zeros(NY * NX), model_name="m", **kwargs)
    img_axes = _image_axes(fig)
    assert np.all(np.asarray(img_axes[1].images[0].get_array()) == 0.0)
    assert all(len(ax.collections) == 1 for ax in img_axes)


def test_plot_comparison(data, tmp_path) -> None:
    surfaces = {
        "deterministic": (data["probs"], data["unc"]),
        "sngp": (data["probs"], 2 * data["unc"]),
        "my_method": (data["probs"], data["unc"]),
    }
    fig = P.plot_comparison(surfaces, **_common(data))
    assert tuple(fig.get_size_inches()) == (14.0, 15.0)
    img_axes = _image_axes(fig)
    assert len(img_axes) == 2 * len(surfaces)
    titles = [ax.get_title() for ax in img_axes]
    assert titles == [
        "Class Probability, Deterministic",
        "(Normalized) Predictive Uncertainty, Deterministic",
        "Class Probability, SNGP",
        "(Normalized) Predictive Uncertainty, SNGP",
        "Class Probability, my_method",
        "(Normalized) Predictive Uncertainty, my_method",
    ]
    for ax in img_axes[1::2]:
        assert float(np.max(ax.images[0].get_array())) == pytest.approx(1.0)
    out = tmp_path / "comparison.png"
    fig.savefig(out, dpi=50)
    assert out.stat().st_size > 0


def test_wrong_grid_size_raises(data) -> None:
    with pytest.raises(ValueError, match="grid_probs"):
        P.plot_method(data["probs"][:-1], data["unc"], model_name="m", **_common(data))
    with pytest.raises(ValueError, match="grid_uncertainty"):
        P.plot_method(data["probs"], np.zeros(5), model_name="m", **_common(data))
    with pytest.raises(ValueError, match="grid_probs"):
        P.plot_comparison({"sngp": (np.zeros(3), data["unc"])}, **_common(data))


def test_other_bad_inputs(data) -> None:
    with pytest.raises(ValueError, match="surfaces"):
        P.plot_comparison({}, **_common(data))
    with pytest.raises(ValueError, match="x_range"):
        P.plot_method(data["probs"], data["unc"], model_name="m", **(_common(data) | {"x_range": (1, 0)}))
    with pytest.raises(ValueError, match="x_train"):
        P.plot_method(
            data["probs"], data["unc"], model_name="m", **(_common(data) | {"x_train": np.zeros(3)})
        )
    with pytest.raises(ValueError, match="y_train"):
        P.plot_method(
            data["probs"], data["unc"], model_name="m", **(_common(data) | {"y_train": np.zeros(3)})
        )
    with pytest.raises(ValueError, match="grid_shape"):
        P.plot_method(data["probs"], data["unc"], model_name="m", **(_common(data) | {"grid_shape": (0, 5)}))
