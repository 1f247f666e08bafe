"""The `uncertainty-pipeline` flow: data -> train x methods -> evaluate -> plot -> MLflow record.

Reads top to bottom like the study: generate the data once (or read your table, `dataset: table`),
train every method (independent methods run concurrently on Prefect's thread pool; MC Dropout reuses
the deterministic net, as in the study), evaluate and plot each, then record a parent MLflow run with
one nested run per method. Training, evaluation and plotting are cached across flow runs (keyed by
config values, seeds, the table's digest and code), and the MLflow record is written from the task
results every time, so a fully cached run is still recorded completely.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.config import (
    DataConfig,
    Dataset,
    DeepEnsembleConfig,
    DigitsConfig,
    ExactGPConfig,
    MCDropoutConfig,
    Method,
    MlflowConfig,
    ModelSection,
    ServingConfig,
    SNGPConfig,
    TableConfig,
    TrainingConfig,
    config_from_flow_parameters,
)
from tasks.data import data_classes, data_file
from tasks.evaluate import submit_evaluation
from tasks.recording import finish_parent, parent_run, record_methods
from tasks.train import submit_training


@flow(name="uncertainty-pipeline", log_prints=True)
def uncertainty_pipeline(
    seed: int = 0,
    methods: list[Method] | None = None,
    dataset: Dataset = "two_moons",
    data: DataConfig = DataConfig(),
    digits: DigitsConfig = DigitsConfig(),
    table: TableConfig = TableConfig(),
    model: ModelSection = ModelSection(),
    training: TrainingConfig = TrainingConfig(),
    sngp: SNGPConfig = SNGPConfig(),
    mc_dropout: MCDropoutConfig = MCDropoutConfig(),
    deep_ensemble: DeepEnsembleConfig = DeepEnsembleConfig(),
    exact_gp: ExactGPConfig = ExactGPConfig(),
    serving: ServingConfig = ServingConfig(),
    mlflow: MlflowConfig = MlflowConfig(),
) -> dict[str, Any]:
    """SNGP vs. deterministic ResNet, MC Dropout and Deep Ensemble (parameters: conf/default.yaml)."""
    # Every parameter is a config section: ConfigError (a ValueError) names the field and what is allowed.
    config = config_from_flow_parameters(locals())
    with parent_run(kind="pipeline", **config.record_settings()) as parent:
        data_path = data_file(seed=config.seed, **config.data_settings())
        classes = data_classes(data_path)  # a table's classes are known once it is read
        trained = submit_training(config.methods, config.training_settings(classes), data_path)
        evaluated, plotted = submit_evaluation(
            config.methods, trained, data_path, config.serving.target_coverage
        )
        settings = config.method_settings(classes)
        results = record_methods(settings, trained, evaluated, plotted, parent, data_path)
        return finish_parent(results, data_path, parent)
