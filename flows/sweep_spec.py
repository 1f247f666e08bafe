"""The sweep file (conf/sweep_*.yaml), typed: SweepSpec, load_sweep, and its points.

A sweep file names a base pipeline config, the methods, a grid of dotted settings (their cartesian
product, scikit-learn's ParameterGrid, or a seeded random sample of it, its ParameterSampler) and the
seeds. Every (method, settings, seed) is a *point* (tasks.sweep_points.Point). A setting multiplies
only the points of the methods it changes. Points are numbered p000, p001, ... in the file's order:
method by method, then the grid with its first key varying slowest, then the seeds.

No Prefect and no MLflow here: `sngp sweep` checks the file before either is imported.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from flows.config import ConfigError, Method, PipelineConfig, load_config, read_yaml_file, validate_config
from sngp_models.config import RELEVANT_FIELDS, ModelConfig
from sngp_models.evaluation import METRIC_NAMES
from tasks.sweep_points import Point, encode_value, format_settings

DEFAULT_METRICS = ("test_accuracy", "ood_auroc", "ood_mean_max_prob", "grid_mean_uncertainty", "ece")
# Pipeline settings that are not swept through `grid:` (seeds and methods have their own keys).
NOT_SWEEPABLE = {
    "seed": "use 'seeds:' for seeds",
    "methods": "use 'methods:' for methods",
    "mlflow": "MLflow settings are not swept; set them in the base config",
    "retrain": "retraining settings do not change what a sweep point trains",
    # Sweep points calibrate abstention at the default target coverage (0.95).
    "serving": "serving settings do not change what a sweep point trains",
}
# Pipeline keys whose library field has another name.
MODEL_FIELD_ALIASES = {"mc_dropout.num_samples": "num_mc_samples"}
DATA_SECTIONS = ("dataset", "data", "digits")
DEFAULT_BASE_CONFIG = Path(__file__).resolve().parent.parent / "conf" / "default.yaml"


class SweepError(ConfigError):
    """A sweep file the user must fix (exit code 2); the message names the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseSpec(Strict):
    """The pipeline config every point starts from: a YAML file plus dotted-key overrides."""

    # Relative paths are looked up beside the sweep file first, then in the working directory.
    # None: the study's settings (conf/default.yaml).
    base_config: str | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)


class RandomSpec(Strict):
    """Sample `n` distinct settings from the grid (seeded) instead of running all of them."""

    n: int = Field(ge=1, le=100_000)
    seed: int = Field(0, ge=0, lt=2**31)


class SweepSpec(Strict):
    base: BaseSpec = BaseSpec()
    methods: list[Method] = Field(min_length=1)
    grid: dict[str, list[Any]] = Field(min_length=1)
    random: RandomSpec | None = None
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    metrics: list[str] = Field(default_factory=lambda: list(DEFAULT_METRICS), min_length=1)

    @model_validator(mode="before")
    @classmethod
    def method_shorthand(cls, raw: Any) -> Any:
        """`method: sngp` is shorthand for `methods: [sngp]`."""
        if isinstance(raw, dict) and "method" in raw:
            raw = dict(raw)
            if "methods" in raw:
                raise ValueError("give either 'method' or 'methods', not both")
            method = raw.pop("method")
            raw["methods"] = method if isinstance(method, list) else [method]
        return raw

    @field_validator("methods")
    @classmethod
    def unique_methods(cls, v: list[str]) -> list[str]:
        return distinct(v, "method")

    @field_validator("seeds")
    @classmethod
    def check_seeds(cls, v: list[int]) -> list[int]:
        bad = [s for s in v if isinstance(s, bool) or not 0 <= s < 2**31]
        if bad:
            raise ValueError(f"seeds must be integers in [0, 2**31), got {bad}")
        return distinct(v, "seed")

    @field_validator("metrics")
    @classmethod
    def check_metrics(cls, v: list[str]) -> list[str]:
        unknown = [m for m in v if m not in METRIC_NAMES]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; allowed: {', '.join(METRIC_NAMES)}")
        return v

    @field_validator("grid")
    @classmethod
    def check_grid(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            check_setting_key(key)
            if not values:
                raise ValueError(f"{key}: give at least one value")
            if any(isinstance(v, dict) for v in values):
                raise ValueError(f"{key}: values must be numbers, strings or lists, not mappings")
            encoded = [encode_value(v) for v in values]
            if len(set(encoded)) != len(encoded):
                raise ValueError(f"{key}: each value may appear once, got {values}")
        return grid

    @model_validator(mode="after")
    def every_key_matters(self) -> SweepSpec:
        for key in self.grid:
            if not any(affects(key, m) for m in self.methods):
                raise ValueError(
                    f"grid.{key}: does not change what {', '.join(self.methods)} trains or predicts; "
                    f"add a method it applies to (e.g. deep_ensemble for deep_ensemble.ensemble_size)"
                )
        size = len(grid_combinations(self))
        if self.random is not None and self.random.n > size:
            raise ValueError(
                f"random.n: {self.random.n} is more than the {size} settings of the grid; lower it or "
                "drop 'random' to run the whole grid"
            )
        return self


def distinct(values: list[Any], what: str) -> list[Any]:
    if len(set(values)) != len(values):
        raise ValueError(f"each {what} may appear once, got {values}")
    return values


def check_setting_key(key: str) -> None:
    """`sngp.spec_norm_bound`, `training.epochs`, `dataset`, ...: a leaf of PipelineConfig, not seeds etc."""
    parts = key.split(".")
    top = parts[0]
    if top in NOT_SWEEPABLE:
        raise ValueError(f"{key}: not sweepable here ({NOT_SWEEPABLE[top]})")
    sections = {
        name: f.annotation for name, f in PipelineConfig.model_fields.items() if name not in NOT_SWEEPABLE
    }
    if top not in sections:
        raise ValueError(f"{key}: unknown setting; allowed sections: {', '.join(sections)}")
    model = sections[top]
    is_section = isinstance(model, type) and issubclass(model, BaseModel)
    if not is_section:
        if len(parts) != 1:
            raise ValueError(f"{key}: {top!r} is a single setting, not a section")
        return
    if len(parts) != 2:
        raise ValueError(f"{key}: expected SECTION.SETTING, e.g. {top}.{next(iter(model.model_fields))}")
    if parts[1] not in model.model_fields:
        raise ValueError(f"{key}: unknown setting; allowed in {top}: {', '.join(model.model_fields)}")


def model_field(key: str) -> str | None:
    """The library (ModelConfig) field a pipeline key sets, or None for data settings."""
    if key.split(".")[0] in DATA_SECTIONS:
        return None
    name = MODEL_FIELD_ALIASES.get(key, key.split(".")[-1])
    if name not in {f.name for f in dataclasses.fields(ModelConfig)}:
        raise ValueError(f"{key}: no model setting of that name")
    return name


def affects(key: str, method: str) -> bool:
    """Does this setting change what `method` trains or predicts? (Data settings change every method.)"""
    name = model_field(key)
    return name is None or name in RELEVANT_FIELDS[method]


# ----------------------------------------------------------------------------------------------------
# Points
# ----------------------------------------------------------------------------------------------------


def method_grids(spec: SweepSpec) -> list[dict[str, list[Any]]]:
    """One ParameterGrid per method: the method and the grid keys that affect it."""
    return [
        {"method": [method], **{k: v for k, v in spec.grid.items() if affects(k, method)}}
        for method in spec.methods
    ]


def grid_combinations(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every combination of the grid: `method` and the settings that affect it (scikit-learn order)."""
    from sklearn.model_selection import ParameterGrid  # lazy: ~1.5 s; Dask workers import this module

    return list(ParameterGrid(method_grids(spec)))


def setting_combinations(spec: SweepSpec) -> list[tuple[str, dict[str, Any]]]:
    """(method, settings) of every method: the grid's combinations, or the `random` sample of them;
    in the file's order (methods as listed, then the grid with its first key varying slowest)."""
    if spec.random is None:
        combos = grid_combinations(spec)
    else:
        from sklearn.model_selection import ParameterSampler  # lazy: as ParameterGrid above

        grids = method_grids(spec)
        combos = list(ParameterSampler(grids, n_iter=spec.random.n, random_state=spec.random.seed))
    # scikit-learn orders a combination's keys alphabetically: back to the file's order.
    positions = {k: {encode_value(v): i for i, v in enumerate(values)} for k, values in spec.grid.items()}

    def position(combo: dict[str, Any]) -> tuple[int, ...]:
        keys = [k for k in spec.grid if k in combo]
        return (spec.methods.index(combo["method"]), *(positions[k][encode_value(combo[k])] for k in keys))

    return [
        (combo["method"], {k: combo[k] for k in spec.grid if k in combo})
        for combo in sorted(combos, key=position)
    ]


def expand(spec: SweepSpec) -> list[Point]:
    """Every point of the sweep: each (method, settings) with each seed."""
    leaves = [k.split(".")[-1] for k in spec.grid]
    # A key is shown by its last part (spec_norm_bound) unless two keys share it.
    names = {k: k.split(".")[-1] for k in spec.grid if leaves.count(k.split(".")[-1]) == 1}
    points = []
    for method, settings in setting_combinations(spec):
        for seed in spec.seeds:
            label = f"{method} {format_settings(settings, names)} seed={seed}".replace("  ", " ")
            points.append(Point(f"p{len(points):03d}", method, settings, seed, label))
    return points


def point_config(base: PipelineConfig, point: Point) -> PipelineConfig:
    """The base config with the point's settings, seed and method, validated like any pipeline config."""
    raw = copy.deepcopy(base.model_dump(mode="json"))
    raw["seed"] = point.seed
    raw["methods"] = [point.method]
    for key, value in point.settings.items():
        node = raw
        *sections, leaf = key.split(".")
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    return validate_config(raw)


@dataclass(frozen=True)
class PointSettings:
    model: dict[str, Any]  # the library settings of the point's method: its cache key and MLflow params
    data: dict[str, Any]  # tasks.data.data_file's arguments (data set, its settings, seed)


def point_settings(
    base: PipelineConfig, points: list[Point]
) -> tuple[dict[str, PointSettings], dict[str, str]]:
    """Each point's settings by point id, and why each invalid point is invalid (it fails alone)."""
    settings, invalid = {}, {}
    for point in points:
        try:
            config = point_config(base, point)
        except ValueError as exc:  # ConfigError: names the setting and what is allowed
            invalid[point.id] = f"{type(exc).__name__}: {exc}"
            continue
        data = {**config.data_settings(), "seed": point.seed}
        settings[point.id] = PointSettings(config.model_settings(point.method), data)
    return settings, invalid


# ----------------------------------------------------------------------------------------------------
# Reading the file
# ----------------------------------------------------------------------------------------------------


def load_sweep(
    path: str | Path, extra_overrides: list[str] | None = None
) -> tuple[SweepSpec, PipelineConfig]:
    """Read and validate a sweep file and its base config; SweepError/ConfigError name the bad key."""
    path = Path(path)
    raw = read_yaml_file(path, "sweep file", SweepError)
    if not isinstance(raw, dict):
        raise SweepError(f"sweep file {str(path)!r} must hold a mapping with at least 'methods' and 'grid'")
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as exc:
        raise SweepError(f"sweep file {str(path)!r}: {describe(exc)}") from None
    base_path = resolve_base_path(spec.base.base_config, path)
    overrides = [f"{k}={json.dumps(v)}" for k, v in spec.base.overrides.items()]
    try:
        base = load_config(base_path, overrides + list(extra_overrides or []))
    except ConfigError as exc:
        raise SweepError(f"sweep file {str(path)!r}, base config: {exc}") from None
    return spec, base


def resolve_base_path(base_config: str | None, sweep_path: Path) -> Path:
    if base_config is None:
        return DEFAULT_BASE_CONFIG
    candidate = Path(base_config)
    if candidate.is_absolute():
        return candidate
    for folder in (sweep_path.resolve().parent, Path.cwd()):
        if (folder / candidate).is_file():
            return folder / candidate
    raise SweepError(
        f"base.base_config: {base_config!r} not found beside the sweep file ({sweep_path.parent}) "
        "or in the working directory"
    )


def describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-")) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key; allowed keys here: {allowed_keys(err['loc'][:-1])}")
            continue
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "required" + (" (e.g. 'method: sngp')" if key == "methods" else "")
        given = err.get("input")
        shown = (
            ""
            if err["type"] in ("missing", "value_error") or isinstance(given, dict)
            else f" (got {given!r})"
        )
        if key == "(top level)" and err["type"] == "value_error":
            lines.append(msg)  # whole-file checks name their keys themselves
        elif key == "grid" and err["type"] == "value_error":
            lines.append(f"grid.{msg}")  # the message starts with the setting's key
        else:
            lines.append(f"{key}: {msg}{shown}")
    return "; ".join(lines)


def allowed_keys(loc: tuple) -> str:
    """The keys allowed at `loc` of a sweep file (for 'unknown key' messages)."""
    model: Any = SweepSpec
    for part in loc:
        annotation = model.model_fields[part].annotation if part in model.model_fields else None
        model = next(
            (
                a
                for a in (annotation, *getattr(annotation, "__args__", ()))
                if isinstance(a, type) and issubclass(a, BaseModel)
            ),
            None,
        )
        if model is None:
            return "?"
    names = list(model.model_fields)
    return ", ".join(names + (["method"] if model is SweepSpec else []))
