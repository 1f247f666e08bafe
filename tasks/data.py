"""Generate the run's data once, as a file; downstream tasks receive its path, not the arrays."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from prefect import task

from sngp_models.data import TwoMoonsData, make_dataset
from sngp_models.digits import DigitsData, make_digits_dataset

from .cache import CACHE_POLICY, CODE_VERSION, artifact_path, configured, stable_key, write_atomic

DATASETS = {"two_moons": TwoMoonsData, "digits": DigitsData}


@task(name="generate-data", cache_policy=CACHE_POLICY, persist_result=True)
def generate_data(
    data: dict,
    seed: int,
    dataset: str = "two_moons",
    digits: dict | None = None,
    code_version: str = CODE_VERSION,
) -> str:
    """The run's train set, fresh test sample, OOD set (and grid, for two moons) from one seed -> .npz."""
    if dataset == "two_moons":
        d = make_dataset(
            seed=seed,
            n_per_class=data["n_train_per_class"],
            noise=data["noise"],
            n_test_per_class=data["n_test_per_class"],
            n_grid=data["grid_size"],
            x_range=tuple(data["x_range"]),
            y_range=tuple(data["y_range"]),
            n_ood=data["n_ood"],
            ood_mean=tuple(data["ood_mean"]),
            ood_var=tuple(data["ood_var"]),
        )
        key = stable_key(dataset, data, seed, code_version)
    elif dataset == "digits":
        digits = digits or {}
        d = make_digits_dataset(seed=seed, **digits)
        key = stable_key(dataset, digits, seed, code_version)
    else:
        raise ValueError(f"dataset: unknown data set {dataset!r}; allowed: {', '.join(DATASETS)}")
    path = artifact_path("data", f"{dataset}-{key}.npz")
    arrays = {
        f.name: np.asarray(getattr(d, f.name))
        for f in dataclasses.fields(d)
        if getattr(d, f.name) is not None
    }
    arrays["dataset"] = np.asarray(dataset)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    write_atomic(path, write)
    return str(path)


def data_file(dataset: str, data: dict, digits: dict, seed: int) -> str:
    """The path of the data set's file for `seed`, generated once and cached (generate_data)."""
    return configured(generate_data)(data, seed, dataset, digits)


def load_data(path: str) -> TwoMoonsData | DigitsData:
    """The dataclass written by generate_data (fields absent from the file, e.g. digits' grid, are None)."""
    with np.load(path) as f:
        stored = {k: f[k] for k in f.files}
    cls = DATASETS[str(stored.pop("dataset"))]
    fields = {}
    for field in dataclasses.fields(cls):
        value = stored.get(field.name)
        if value is not None and value.ndim == 0:
            value = value.item()
        elif value is not None and field.name in (
            "grid_shape",
            "x_range",
            "y_range",
            "known_classes",
            "ood_classes",
        ):
            value = tuple(value.tolist())
        fields[field.name] = value
    return cls(**fields)
