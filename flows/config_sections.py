"""The sections of the pipeline config (PipelineConfig in flows.config): one pydantic model per YAML
section (data, digits, table, model, training, sngp, mc_dropout, deep_ensemble, exact_gp, serving, mlflow,
retrain), each frozen, with unknown keys and non-finite numbers refused and errors that name the key."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from sngp_models.digits import check_known_classes


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
