"""Generate the run's data once, as a file; downstream tasks receive its path, not the arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from prefect import task

from sngp_models.data import TwoMoonsData, make_dataset

from .cache import CACHE_POLICY, CODE_VERSION, artifact_path, stable_key, write_atomic


@task(name="generate-data", cache_policy=CACHE_POLICY, persist_result=True)
def generate_data(data: dict, seed: int, code_version: str = CODE_VERSION) -> str:
    """Two moons train set, fresh test sample, grid and OOD cluster from one seed -> .npz path."""
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
    path = artifact_path("data", f"two_moons-{stable_key(data, seed, code_version)}.npz")
    arrays = {k: np.asarray(getattr(d, k)) for k in TwoMoonsData.__dataclass_fields__}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    write_atomic(path, write)
    return str(path)


def load_data(path: str) -> TwoMoonsData:
    with np.load(path) as f:
        fields = {k: f[k] for k in f.files}
    fields["grid_shape"] = tuple(int(v) for v in fields["grid_shape"])
    fields["x_range"] = tuple(float(v) for v in fields["x_range"])
    fields["y_range"] = tuple(float(v) for v in fields["y_range"])
    return TwoMoonsData(**fields)
