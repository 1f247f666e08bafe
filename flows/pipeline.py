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

from flows.config import PipelineConfig, config_from_flow_parameters
from flows.flow_parameters import config_parameters
from tasks.data import data_classes, data_file
from tasks.evaluate import submit_evaluation
from tasks.recording import ParentRun, finish_parent, parent_run, record_methods
from tasks.train import submit_training


@flow(name="uncertainty-pipeline", log_prints=True)
@config_parameters(without=["retrain"])
def uncertainty_pipeline(**sections: Any) -> dict[str, Any]:
    """SNGP vs. deterministic ResNet, MC Dropout and Deep Ensemble (parameters: conf/default.yaml)."""
    # Every parameter is a config section: ConfigError (a ValueError) names the field and what is allowed.
    config = config_from_flow_parameters(sections)
    with parent_run(kind="pipeline", **config.record_settings()) as parent:
        data_path = data_file(seed=config.seed, **config.data_settings())
        results = train_evaluate_record(config, data_path, parent)
        return finish_parent(results, data_path, parent)


def train_evaluate_record(
    config: PipelineConfig, data_path: str, parent: ParentRun, eval_path: str | None = None
) -> dict[str, dict[str, Any] | BaseException]:
    """Train every method of `config` on `data_path`, evaluate and plot each on `eval_path` (default: the
    test split of `data_path`), record one nested MLflow run per method under `parent` -> method -> its
    result dict, or the error it failed with (tasks.recording.record_methods)."""
    classes = data_classes(data_path)  # a table's classes are known once it is read
    trained = submit_training(config.methods, config.training_settings(classes), data_path)
    evaluated, plotted = submit_evaluation(
        config.methods, trained, eval_path or data_path, config.serving.target_coverage
    )
    settings = config.method_settings(classes)
    return record_methods(settings, trained, evaluated, plotted, parent, data_path, eval_path)
