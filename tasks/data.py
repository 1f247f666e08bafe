"""Generate (or read) the run's data once, as a file; downstream tasks receive its path, not the arrays.

Every data file is one .npz: the splits (train, test, OOD, and a 2-D grid where the data has one), the
data set's name and `meta`, a small JSON document (`data_facts`) with the row counts, feature and class
names, the data digest and each split's digest. Recording and the registry read `meta` only, never the
arrays (np.load reads an .npz member on demand).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task

from sngp_models.data import TwoMoonsData, make_dataset
from sngp_models.digits import DigitsData, make_digits_dataset
from sngp_models.table import TableData, load_table, table_digest

from .cache import CACHE_POLICY, CODE_VERSION, artifact_path, configured, stable_key, write_atomic

DATASETS = {"two_moons": TwoMoonsData, "digits": DigitsData, "table": TableData}
# Fields of the data classes read back as tuples (numpy arrays in the file).
TUPLE_FIELDS = (
    "grid_shape",
    "x_range",
    "y_range",
    "known_classes",
    "ood_classes",
    "class_names",
    "feature_names",
)


@task(name="generate-data", cache_policy=CACHE_POLICY, persist_result=True)
def generate_data(
    data: dict,
    seed: int,
    dataset: str = "two_moons",
    digits: dict | None = None,
    table: dict | None = None,
    source_digest: str | None = None,
    code_version: str = CODE_VERSION,
) -> str:
    """The run's train set, test set, OOD set (and grid, for 2-D data) -> .npz. Two moons and digits
    are generated from `seed`; a table is read from its files, whose `source_digest` (a hash of their
    names and bytes) keys the cache: an edited or appended file is read again, an untouched one is not."""
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
        source = {"generator": "sngp_models.data.make_dataset", "seed": seed, **data}
    elif dataset == "digits":
        digits = digits or {}
        d = make_digits_dataset(seed=seed, **digits)
        key = stable_key(dataset, digits, seed, code_version)
        source = {"generator": "sngp_models.digits.make_digits_dataset", "seed": seed, **digits}
    elif dataset == "table":
        table = dict(table or {})
        d = load_table(**table_arguments(table, data["grid_size"]))
        release_arrow_memory()
        key = stable_key(dataset, table, data["grid_size"], d.digest, code_version)
        source = table["path"] if table.get("ood_path") is None else f"{table['path']} + {table['ood_path']}"
    else:
        raise ValueError(f"dataset: unknown data set {dataset!r}; allowed: {', '.join(DATASETS)}")
    path = artifact_path("data", f"{dataset}-{key}.npz")
    arrays = {
        f.name: np.asarray(getattr(d, f.name))
        for f in dataclasses.fields(d)
        if getattr(d, f.name) is not None
    }
    arrays["dataset"] = np.asarray(dataset)
    arrays["meta"] = np.asarray(json.dumps(describe(dataset, d, source)))

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    write_atomic(path, write)
    return str(path)


def release_arrow_memory() -> None:
    """Give the memory Arrow kept after reading Parquet back to the system (its allocator holds on to
    it: ~460 MB after a 1M x 32 table, which training would otherwise stack on top of)."""
    import pyarrow

    pyarrow.default_memory_pool().release_unused()


def table_arguments(table: dict, grid_size: int) -> dict[str, Any]:
    """The table section -> sngp_models.table.load_table's keyword arguments."""
    return {**table, "ood_classes": tuple(table.get("ood_classes") or ()), "grid_size": grid_size}


def describe(dataset: str, d: Any, source: str | dict) -> dict[str, Any]:
    """`meta` of a data file: what MLflow records about the data (see data_facts)."""
    num_classes = int(getattr(d, "num_classes", 2))
    feature_names = list(getattr(d, "feature_names", None) or [f"x{i}" for i in range(d.x_train.shape[1])])
    class_names = list(getattr(d, "class_names", None) or [str(c) for c in range(num_classes)])
    splits = {
        "train": (d.x_train, d.y_train),
        "test": (d.x_test, d.y_test),
        "ood": (d.x_ood, None),
    }
    split_digests = {name: array_digest(*arrays) for name, arrays in splits.items()}
    everything = (a for pair in splits.values() for a in pair)
    digest = d.digest if dataset == "table" else array_digest(*everything, length=64)
    return {
        "dataset": dataset,
        "source": source,
        "digest": digest,
        "rows": {name: int(x.shape[0]) for name, (x, _) in splits.items()},
        "split_digests": split_digests,
        "num_classes": num_classes,
        "class_names": class_names,
        "feature_names": feature_names,
        "grid": getattr(d, "x_grid", None) is not None,
    }


def array_digest(*arrays: np.ndarray | None, length: int = 16) -> str:
    """sha256 (its first `length` hex digits) of the arrays' dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for a in arrays:
        if a is None:
            continue
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.data)
    return h.hexdigest()[:length]


def data_file(dataset: str, data: dict, digits: dict, seed: int, table: dict | None = None) -> str:
    """The path of the data set's file, generated (or read) once and cached (generate_data). Two moons
    and digits come from `seed`; a table does not depend on it: its files' digest keys the cache."""
    return configured(generate_data)(**data_file_arguments(dataset, data, digits, seed, table))


def data_file_arguments(
    dataset: str, data: dict, digits: dict, seed: int, table: dict | None = None
) -> dict[str, Any]:
    """generate_data's arguments (its cache key) for these settings: a table's absolute paths and its
    files' digest (hashed, not parsed) instead of the seed."""
    if dataset != "table":
        return {"data": data, "seed": seed, "dataset": dataset, "digits": digits}
    table = resolved_table(table or {})
    digest = table_digest(table["path"], table.get("ood_path"))
    return {"data": data, "seed": 0, "dataset": dataset, "table": table, "source_digest": digest}


def resolved_table(table: dict) -> dict:
    """The table section with `path` and `ood_path` absolute (relative ones: to the working directory),
    so the data file records where the data came from."""
    out = dict(table)
    for key in ("path", "ood_path"):
        if out.get(key) is not None:
            out[key] = os.path.abspath(os.path.expanduser(out[key]))
    return out


def holdout_file(dataset: str, data: dict, digits: dict, table: dict | None, holdout_seed: int) -> str:
    """The data file whose test and OOD splits `retrain` judges candidates on: a fresh sample from the
    fixed `holdout_seed` for generated data; for a table, the table's own stable test side (a row never
    changes sides when files are added, so no candidate ever trained on it)."""
    if dataset == "table":
        return data_file(dataset, data, digits, 0, table)
    return data_file(dataset, data, digits, holdout_seed)


def source_description(settings: dict[str, Any], data_seed: int, holdout_seed: int) -> str:
    """What `retrain` trains and judges on, for its log line (`settings`: data_file's arguments)."""
    if settings["dataset"] == "table":
        return f"the table {settings['table']['path']} (hold-out: its stable test side)"
    return f"{settings['dataset']}, data seed {data_seed}; held-out seed {holdout_seed}"


def data_facts(path: str) -> dict[str, Any]:
    """The data file's `meta` (rows per split, names, digests, source), without reading the arrays."""
    with np.load(path) as f:
        return json.loads(str(f["meta"]))


def data_classes(path: str) -> int:
    """The number of classes the data file's models learn (tables: known only once read)."""
    return int(data_facts(path)["num_classes"])


def row_keys(path: str, split: str) -> np.ndarray:
    """The stable keys of a split's rows: a table's `keys_<split>` (its id, else its feature values'
    hash), else each row's feature values as bytes (generated data has no id)."""
    with np.load(path) as f:
        if f"keys_{split}" in f.files:
            return f[f"keys_{split}"]
        x = np.ascontiguousarray(f[f"x_{split}"])
    # fixed-width bytes (numpy's S type drops trailing NULs, but every row has the same width: exact)
    return x.view(f"S{x.dtype.itemsize * x.shape[1]}").ravel()


def holdout_overlap(data_path: str, holdout_path: str) -> int:
    """How many hold-out (test split) rows of `holdout_path` are training rows of `data_path`."""
    return int(np.isin(row_keys(holdout_path, "test"), row_keys(data_path, "train")).sum())


def load_data(path: str, keys: bool = False) -> TwoMoonsData | DigitsData | TableData:
    """The dataclass written by generate_data (fields absent from the file, e.g. digits' grid, are None).
    A table's row keys (`keys_train`, `keys_test`: 128 bytes a row) are read only with `keys=True`;
    training and evaluation never need them (the hold-out check reads them with row_keys)."""
    skip = {"meta"} if keys else {"meta", "keys_train", "keys_test"}
    with np.load(path) as f:
        stored = {k: f[k] for k in f.files if k not in skip}
    cls = DATASETS[str(stored.pop("dataset"))]
    fields = {}
    for field in dataclasses.fields(cls):
        value = stored.get(field.name)
        if value is not None and value.ndim == 0:
            value = value.item()
        elif value is not None and field.name in TUPLE_FIELDS:
            value = tuple(value.tolist())
        fields[field.name] = value
    return cls(**fields)
