"""Typed pipeline configuration: YAML file + `--set key=value` overrides, validated before anything runs.

The YAML sections mirror the flow's parameters (seed, methods, data, digits, table, model, training, sngp,
mc_dropout, deep_ensemble, serving, mlflow), so a deployment's `--param training='{"epochs": 5}'` and the
CLI's `--set training.epochs=5` mean the same thing. Unknown keys are errors, not silently ignored.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from sngp_models.config import ALL_METHODS, METHODS, ModelConfig
from sngp_models.digits import check_known_classes

Method = Literal["deterministic", "sngp", "mc_dropout", "deep_ensemble", "exact_gp"]
Dataset = Literal["two_moons", "digits", "table"]


class Section(BaseModel):
    # allow_inf_nan=False: .nan/.inf are never valid settings ("Input should be a finite number").
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic would read YAML's `true` as 1 (epochs: true -> one epoch): a number must be a number.
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and annotation in (int, float, int | None, float | None):
            raise ValueError(f"expected a number, got the boolean {value}")
        return value


class DataConfig(Section):
    """Two moons (train and a fresh test sample), the evaluation grid and the OOD cluster."""

    n_train_per_class: int = Field(500, ge=1, le=1_000_000)
    noise: float = Field(0.1, ge=0, le=10)
    n_test_per_class: int = Field(250, ge=1, le=1_000_000)
    grid_size: int = Field(100, ge=2, le=2000)
    x_range: tuple[float, float] = (-3.5, 3.5)
    y_range: tuple[float, float] = (-2.5, 2.5)
    n_ood: int = Field(500, ge=1, le=1_000_000)
    ood_mean: tuple[float, float] = (2.5, -1.75)
    ood_var: tuple[float, float] = (0.01, 0.01)

    @field_validator("x_range", "y_range")
    @classmethod
    def _increasing(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (math.isfinite(v[0]) and math.isfinite(v[1]) and v[0] < v[1]):
            raise ValueError("must be [low, high] with low < high")
        return v

    @field_validator("ood_var")
    @classmethod
    def _positive(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(x > 0 for x in v):
            raise ValueError("variances must be > 0")
        return v


class DigitsConfig(Section):
    """scikit-learn's bundled 8x8 digits: train on `known_classes`, the other digits are the OOD set."""

    known_classes: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4], min_length=2, max_length=9)
    test_fraction: float = Field(0.3, gt=0, lt=1)

    @field_validator("known_classes")
    @classmethod
    def _digits(cls, v: list[int]) -> list[int]:
        return list(check_known_classes(v))


class TableConfig(Section):
    """Your own labelled table (`dataset: table`): a CSV or Parquet file, or a glob of them (all matches
    concatenated in name order). The keys are DESIGN.md's; sngp_models.table.load_table reads them."""

    path: str | None = Field(None, min_length=1)  # required with dataset: table
    label: str | None = Field(None, min_length=1)  # required with dataset: table
    features: list[str] | None = Field(None, min_length=1)  # None: every numeric column but label and id
    id_column: str | None = Field(None, min_length=1)  # stable split by this column, else by feature values
    test_fraction: float = Field(0.2, gt=0, lt=1)
    ood_path: str | None = Field(None, min_length=1)  # optional OOD inputs (the same feature columns)
    ood_classes: list[int | str] = Field(default_factory=list)  # label values held out as the OOD set
    missing: Literal["error", "drop"] = "error"

    @field_validator("features", "ood_classes")
    @classmethod
    def _distinct(cls, v: list | None, info: ValidationInfo) -> list | None:
        if v is not None and len({str(x) for x in v}) != len(v):
            raise ValueError("each value may appear once")
        return v

    @field_validator("ood_classes", mode="before")
    @classmethod
    def _labels(cls, v: Any) -> Any:
        if isinstance(v, list) and any(isinstance(x, bool) or not isinstance(x, (int, str)) for x in v):
            raise ValueError("must be a list of label values (integers or strings)")
        return v

    @model_validator(mode="after")
    def _columns(self) -> TableConfig:
        if self.label is not None and self.label == self.id_column:
            raise ValueError(f"id_column: must differ from the label column {self.label!r}")
        named = [c for c in (self.label, self.id_column) if c is not None and c in (self.features or [])]
        if named:
            raise ValueError(f"features: {named[0]!r} is the label or id column, not a feature")
        return self

    def loader_arguments(self, grid_size: int) -> dict[str, Any]:
        """sngp_models.table.load_table's keyword arguments."""
        return {**self.model_dump(), "ood_classes": tuple(self.ood_classes), "grid_size": grid_size}


class ExactGPConfig(Section):
    """The optional gold-standard reference: scikit-learn's exact GP classifier (RBF kernel)."""

    gp_max_train: int = Field(1000, ge=2, le=5000)


class ModelSection(Section):
    """The residual network shared by every method."""

    num_layers: int = Field(6, ge=0, le=100)
    num_hidden: int = Field(128, ge=1, le=8192)
    dropout_rate: float = Field(0.1, ge=0, lt=1)


class TrainingConfig(Section):
    epochs: int = Field(100, ge=1, le=100_000)
    batch_size: int = Field(128, ge=1, le=1_000_000)
    learning_rate: float = Field(1e-4, gt=0, le=10)


class SNGPConfig(Section):
    spec_norm_bound: float = Field(0.9, gt=0, le=1000)
    num_inducing: int = Field(1024, ge=1, le=16384)
    gp_cov_momentum: float = -1.0
    gp_cov_ridge_penalty: float = Field(1.0, gt=0)
    # The random features' RBF length scale: a number, or "auto" (chosen from the data by the library,
    # recorded as the sngp run's param gp_kernel_scale_chosen). None: the data set's default, which
    # PipelineConfig fills in: 1.0 (the study's) for two moons, "auto" for every other data set.
    gp_kernel_scale: float | Literal["auto"] | None = None
    mean_field_factor: float = Field(math.pi / 8, ge=0)

    @field_validator("gp_kernel_scale", mode="before")
    @classmethod
    def _kernel_scale(cls, v: Any) -> Any:
        if v is None or v == "auto":
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError("must be a number > 0 or 'auto'")
        return float(v)

    @field_validator("gp_cov_momentum")
    @classmethod
    def _momentum(cls, v: float) -> float:
        if not (v == -1 or 0 < v < 1):
            raise ValueError("must be -1 (exact sum over an epoch) or in (0, 1)")
        return v


class MCDropoutConfig(Section):
    num_samples: int = Field(10, ge=1, le=1000)


class DeepEnsembleConfig(Section):
    ensemble_size: int = Field(10, ge=1, le=100)


class ServingConfig(Section):
    """How the logged models abstain: the threshold on uncertainty accepts `target_coverage` of the
    in-distribution test split (sngp_models.abstention.calibrate); above it a prediction says `abstain`."""

    target_coverage: float = Field(0.95, gt=0, le=1)


class MlflowConfig(Section):
    experiment: str = Field("sngp-uncertainty", min_length=1, max_length=200)
    # None: MLFLOW_TRACKING_URI if set, else sqlite:///mlflow.db in the working directory.
    tracking_uri: str | None = None


class RetrainConfig(Section):
    """Scheduled retraining: fresh data, evaluation on a fixed held-out sample, champion/challenger."""

    # None: a fresh random data seed every run (recorded on the run); an int pins it.
    data_seed: int | None = Field(None, ge=0, lt=2**31)
    holdout_seed: int = Field(20_261_126, ge=0, lt=2**31)
    # A challenger becomes champion unless its held-out accuracy drops by more than accuracy_tolerance
    # or its OOD AUROC drops by more than auroc_tolerance (both absolute).
    accuracy_tolerance: float = Field(0.01, ge=0, le=1)
    auroc_tolerance: float = Field(0.02, ge=0, le=1)
    registry_prefix: str = Field(
        "sngp-uncertainty", min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.-]+$"
    )


class PipelineConfig(Section):
    seed: int = Field(0, ge=0, lt=2**31)
    dataset: Dataset = "two_moons"
    methods: list[Method] = Field(default_factory=lambda: list(METHODS), min_length=1)
    data: DataConfig = DataConfig()
    digits: DigitsConfig = DigitsConfig()
    table: TableConfig = TableConfig()
    model: ModelSection = ModelSection()
    training: TrainingConfig = TrainingConfig()
    sngp: SNGPConfig = SNGPConfig()
    mc_dropout: MCDropoutConfig = MCDropoutConfig()
    deep_ensemble: DeepEnsembleConfig = DeepEnsembleConfig()
    exact_gp: ExactGPConfig = ExactGPConfig()
    serving: ServingConfig = ServingConfig()
    mlflow: MlflowConfig = MlflowConfig()
    retrain: RetrainConfig = RetrainConfig()

    @model_validator(mode="after")
    def _unique_methods(self) -> PipelineConfig:
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods: each method may appear once, got {self.methods}")
        return self

    @model_validator(mode="after")
    def _table_source(self) -> PipelineConfig:
        if self.dataset == "table":
            for key in ("path", "label"):
                if getattr(self.table, key) is None:
                    raise ValueError(
                        f"table.{key}: required with dataset: table (see conf/table_example.yaml)"
                    )
        return self

    @model_validator(mode="after")
    def _dataset_defaults(self) -> PipelineConfig:
        # frozen sections: fill the data set's default in by replacing the section
        if self.sngp.gp_kernel_scale is None:
            scale = 1.0 if self.dataset == "two_moons" else "auto"
            object.__setattr__(self, "sngp", self.sngp.model_copy(update={"gp_kernel_scale": scale}))
        return self

    def model_config_for(self, method: str, num_classes: int | None = None) -> ModelConfig:
        """The library config for one method (the study's defaults where the pipeline has no field).
        `num_classes`: the data's (tables know it only once read; see tasks.data.data_facts)."""
        return ModelConfig(
            num_classes=self.num_classes if num_classes is None else num_classes,
            # The input scaling is fitted inside the model on real data; two moons stays the study's.
            standardize=self.dataset != "two_moons",
            seed=self.seed,
            num_mc_samples=self.mc_dropout.num_samples,
            **self.model.model_dump(),
            **self.training.model_dump(),
            **self.sngp.model_dump(),
            **self.deep_ensemble.model_dump(),
            **self.exact_gp.model_dump(),
        )

    def model_settings(self, method: str, num_classes: int | None = None) -> dict[str, Any]:
        """The library settings that matter for `method`: its training cache key and MLflow params."""
        return self.model_config_for(method, num_classes).relevant(method)

    def training_settings(self, num_classes: int | None = None) -> dict[str, dict[str, Any]]:
        """model_settings of every configured method, and of `deterministic`, which MC Dropout wraps."""
        methods = dict.fromkeys([*self.methods, "deterministic"])
        return {m: self.model_settings(m, num_classes) for m in methods}

    def method_settings(self, num_classes: int | None = None) -> dict[str, dict[str, Any]]:
        """model_settings of every configured method (what each method's MLflow run records)."""
        return {m: self.model_settings(m, num_classes) for m in self.methods}

    def data_settings(self) -> dict[str, Any]:
        """Which data set, and its settings (tasks.data.data_file's arguments, but the seed)."""
        return {
            "dataset": self.dataset,
            "data": self.data.model_dump(mode="json"),
            "digits": self.digits.model_dump(mode="json"),
            "table": self.table.model_dump(mode="json"),
        }

    def record_settings(self) -> dict[str, Any]:
        """What a flow's parent MLflow run records: where, its params, its config.yaml."""
        return {
            "tracking_uri": self.mlflow.tracking_uri,
            "experiment": self.mlflow.experiment,
            "params": self.flat(),
            "config": self.model_dump(mode="json"),
        }

    @property
    def num_classes(self) -> int:
        """Two moons: 2; digits: the known classes. A table's classes are known only once it is read."""
        if self.dataset == "table":
            raise ConfigError(
                "dataset: table: the number of classes comes from the data (tasks.data.data_facts)"
            )
        return 2 if self.dataset == "two_moons" else len(self.digits.known_classes)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, for MLflow params."""
        return flatten(self.model_dump(mode="json"))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = ",".join(str(v) for v in value)
        else:
            out[name] = value
    return out


class ConfigError(ValueError):
    """A config the user must fix; the message names the key, the value and what is allowed."""


def read_yaml_file(path: Path, what: str, error: type[ConfigError] = ConfigError) -> Any:
    """The YAML document in `path` (None if empty); `error` naming the file (as `what`) if it is missing,
    a directory, unreadable or not valid YAML (with the line and column)."""
    if not path.is_file():
        problem = "is a directory, not a YAML file" if path.is_dir() else "does not exist"
        raise error(f"{what} {str(path)!r} {problem}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error(f"{what} {str(path)!r} is not valid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{what} {str(path)!r} cannot be read: {exc}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read YAML (None: the study's defaults), apply `key.sub=value` overrides, validate; with
    `dataset: table`, check the table itself too (check_table_data)."""
    config = read_config(path, overrides)
    check_table_data(config)
    return config


def read_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read YAML (None: the study's defaults), apply `key.sub=value` overrides, validate the settings."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        loaded = read_yaml_file(path, "config file")
        if loaded is None:
            raise ConfigError(
                f"config file {str(path)!r} is empty; give at least one setting, e.g. 'seed: 0'"
            )
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {str(path)!r} must hold a mapping of settings, got a {type(loaded).__name__}"
            )
        raw = loaded
    for item in overrides or []:
        apply_override(raw, item)
    return validate_config(raw)


def check_table_data(config: PipelineConfig) -> None:
    """With `dataset: table`, read the table once now, so that a bad file, column or value is a
    ConfigError (one line, `sngp` exit 2) before anything starts. Relative paths are relative to the
    working directory."""
    if config.dataset != "table":
        return
    from sngp_models.table import TableError, load_table  # pandas: only for tables

    try:
        load_table(**config.table.loader_arguments(config.data.grid_size))
    except TableError as exc:
        raise ConfigError(f"table.{exc}") from None


def config_from_flow_parameters(parameters: dict[str, Any]) -> PipelineConfig:
    """A flow's parameters (one per config section, as in `locals()` at the flow's start) -> validated
    config. `methods=None` means the default list.

    With a `config_path` parameter (the retrain flow's: a deployment schedules retraining on a team's
    own config, e.g. conf/table_example.yaml), that file is the base: a section parameter overrides
    the keys it sets, a top-level value (seed, dataset, methods) overrides when it is not the flow's
    default. A relative path is relative to the working directory (a worker's: the project folder)."""
    path = parameters.get("config_path")
    raw = {k: v for k, v in parameters.items() if k != "config_path" and not (k == "methods" and v is None)}
    if path is None:
        return validate_config(raw)
    merged = read_config(path).model_dump(mode="json")
    for key, value in raw.items():
        if isinstance(value, BaseModel):  # a section: the keys its caller set
            merged[key].update(value.model_dump(mode="json", include=value.model_fields_set))
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key].update(value)
        elif key in PipelineConfig.model_fields and value != PipelineConfig.model_fields[key].default:
            merged[key] = value
    config = validate_config(merged)
    check_table_data(config)
    return config


def validate_config(raw: dict[str, Any]) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, raw)) from None


def apply_override(raw: dict[str, Any], item: str) -> None:
    """`training.epochs=5`, `methods=[sngp]`: the value is parsed as YAML (so 5 is an int)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set training.epochs=5")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = PipelineConfig
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return model


def describe_validation_error(exc: ValidationError, raw: dict[str, Any]) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc)
        if err["type"] == "extra_forbidden":
            parent = _model_at(loc[:-1])
            allowed = ", ".join(parent.model_fields) if parent else "see conf/default.yaml"
            lines.append(f"{key}: unknown key; allowed keys here: {allowed}")
            continue
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "literal_error":
            msg = f"unknown value; allowed: {', '.join(ALL_METHODS)}" if loc[:1] == ("methods",) else msg
        given = err.get("input")
        shown = "" if isinstance(given, (dict, BaseModel)) else f" (got {given!r})"
        lines.append(f"{key}: {msg}{shown}" if key else msg)  # a whole-config check names its keys
    return "invalid config: " + "; ".join(lines)
