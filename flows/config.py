"""Typed pipeline configuration: YAML file + `--set key=value` overrides, validated before anything runs.

The YAML sections mirror the flow's parameters (seed, dataset, methods and one section each: data, digits,
table, model, training, sngp, mc_dropout, deep_ensemble, exact_gp, serving, mlflow, retrain), so a
deployment's `--param training='{"epochs": 5}'` and the CLI's `--set training.epochs=5` mean the same
thing. Unknown keys are errors, not silently ignored. The sections are in flows.config_sections, the
reading of YAML and overrides in flows.config_input; this module puts them together and validates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from flows.config_input import ConfigError, apply_override, read_yaml_file
from flows.config_sections import (
    DataConfig,
    DeepEnsembleConfig,
    DigitsConfig,
    ExactGPConfig,
    MCDropoutConfig,
    MlflowConfig,
    ModelSection,
    RetrainConfig,
    Section,
    ServingConfig,
    SNGPConfig,
    TableConfig,
    TrainingConfig,
)
from sngp_models.config import ALL_METHODS, METHODS, ModelConfig

Method = Literal["deterministic", "sngp", "mc_dropout", "deep_ensemble", "exact_gp"]
Dataset = Literal["two_moons", "digits", "table"]
# Each data set's config section: a run's MLflow params hold only the chosen one's.
DATASET_SECTIONS: dict[str, str] = {"two_moons": "data", "digits": "digits", "table": "table"}


class PipelineConfig(Section):
    # Each choice comes first, then the sections it chooses among: the data set, then the methods.
    seed: int = Field(0, ge=0, lt=2**31)
    dataset: Dataset = "two_moons"
    data: DataConfig = DataConfig()
    digits: DigitsConfig = DigitsConfig()
    table: TableConfig = TableConfig()
    methods: list[Method] = Field(default_factory=lambda: list(METHODS), min_length=1)
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
        """Dotted keys -> values, for MLflow params; of the data sets' sections, only the chosen one."""
        unused = set(DATASET_SECTIONS.values()) - {DATASET_SECTIONS[self.dataset]}
        return flatten(self.model_dump(mode="json", exclude=unused))


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
