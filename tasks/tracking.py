"""Recording to MLflow: one parent run per flow run, one nested run per method.

Everything is logged from the flow's own thread (MLflow's fluent API is not thread-safe), after the
cached tasks have produced their files, so a run whose tasks all hit the cache still gets a complete
record: params, per-epoch curves, metrics, the pyfunc model and the PNGs.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import subprocess
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import mlflow
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import LoggedModelStatus
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient
from mlflow.types.schema import ColSpec, Schema

from sngp_models.abstention import Abstention

from . import faults, pyfunc_model
from .cache import HOST, process_alive, process_start_time
from .pyfunc_model import signature
from .redaction import redact

# Logging from our own signature: no input example (it would load TensorFlow to validate it).
warnings.filterwarnings("ignore", message=".*input example was not provided.*")

logger = logging.getLogger(__name__)
_PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The library code a logged model runs (its `code_paths`): the pyfunc file itself is the model's code.
MODEL_CODE_PATHS = [str(_PROJECT_ROOT / "sngp_models")]
# What the model's code imports (sngp_models' models + the pyfunc), pinned to the versions installed
# here, so the model loads the same in a fresh environment. Explicit: letting MLflow infer them
# re-imports the model in a subprocess on every log. joblib and threadpoolctl: the exact GP's imports.
MODEL_PACKAGES = (
    "tensorflow",
    "tf-keras",
    "tf-models-official",
    "numpy",
    "pandas",
    "scipy",
    "scikit-learn",
    "joblib",
    "threadpoolctl",
    "mlflow",
)


def model_requirements() -> list[str]:
    """MODEL_PACKAGES pinned to their installed versions (`name==version`)."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in MODEL_PACKAGES]


def resolve_tracking_uri(configured: str | None = None) -> str:
    """Config value, else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri and uri.startswith("postgresql://"):
        # SQLAlchemy's default PostgreSQL driver (psycopg 3) is not installed; psycopg2 is.
        return "postgresql+psycopg2://" + uri.removeprefix("postgresql://")
    if uri:
        return uri
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def setup(tracking_uri: str, experiment: str) -> str:
    """Point MLflow at the store and return the experiment id (created on first use)."""
    if redact(tracking_uri) != tracking_uri:
        # MLflow prints "View run ... at: <tracking URI>/#/..." when a run ends: with the password in it.
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:"):
        # Embedded default: artefacts beside the database, not in whatever the cwd happens to be later.
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        location = (db.parent / "mlartifacts" / experiment).resolve().as_uri()
    try:
        return client.create_experiment(experiment, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # created concurrently by another run
        return client.get_experiment_by_name(experiment).experiment_id


def warm_up(tracking_uri: str) -> None:
    """Do MLflow's one-off work of a process now, e.g. while Prefect's server starts: open the tracking
    store (imports its SQL layer; creates a new SQLite database's schema). Failures are left for the
    flow to report where they happen."""
    try:
        MlflowClient(tracking_uri).search_experiments(max_results=1)
    except Exception:  # noqa: BLE001 - an unusable store is reported by the flow, with context
        pass


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=_PROJECT_ROOT, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def log_params(params: dict[str, Any]) -> None:
    mlflow.log_params({k: redact(str(v))[:6000] for k, v in params.items()})


def log_curves(history: dict[str, list[float]]) -> None:
    client = MlflowClient()
    run_id = mlflow.active_run().info.run_id
    from mlflow.entities import Metric

    ts = 0
    batch = [
        Metric(name, float(v), ts, step) for name, values in history.items() for step, v in enumerate(values)
    ]
    for start in range(0, len(batch), 1000):  # log_batch accepts at most 1000 metrics per call
        client.log_batch(run_id, metrics=batch[start : start + 1000])


# A fresh id on everything the pipeline creates in MLflow: MLflow's HTTP client retries a request
# whose answer was lost (a server killed between its commit and its answer), and the server then
# creates the run or model again; the copies share this tag, so the one the client got is kept.
KEY_TAG = "sngp.key"


def log_model(model_dir: str, abstention_path: str) -> mlflow.models.model.ModelInfo:
    """Log the library model as a pyfunc (ModelInfo: model_uri, model_id): its signature (inputs,
    outputs, the `abstain_threshold` param), artefacts `model_dir` and `abstention` (the rule the
    evaluation calibrated, tasks.evaluate), the library code and pinned requirements: it loads without
    this project. Logged once even when MLflow's client retries a request whose answer was lost (see
    KEY_TAG); a model cut short (a full artefact store) leaves no files, only its FAILED entry."""
    meta = json.loads((Path(model_dir) / "model.json").read_text())
    features = meta.get("feature_names") or pyfunc_model.feature_columns(int(meta["input_dim"]))
    classes = meta.get("class_names") or [str(c) for c in range(int(meta["config"]["num_classes"]))]
    threshold = Abstention.load(abstention_path).threshold
    spec = {
        "python_model": pyfunc_model.__file__,
        "artifacts": {"model_dir": model_dir, "abstention": abstention_path},
        "signature": signature(features, classes, threshold),
        "code_paths": MODEL_CODE_PATHS,
        "pip_requirements": model_requirements(),
    }
    key = uuid.uuid4().hex
    try:
        try:
            info = mlflow.pyfunc.log_model(name="model", tags={KEY_TAG: key}, **spec)
        except mlflow.exceptions.MlflowException as exc:
            linked = None if faults.unreachable(exc) else linked_model(key)
            if linked is None:
                raise
            info = finish_linked_model(linked, spec)
    except Exception as exc:
        if not faults.unreachable(exc):  # a server gone: every request would wait out the grace again
            remove_model_files(key)
        raise
    for copy in logged_models_with(key):
        if copy.model_id != info.model_id:
            MlflowClient().delete_logged_model(copy.model_id)
    return info


def linked_model(key: str):
    """The model of this log_model call (tagged `key`) if the run already links to it as an output:
    log_model's request linking it was carried out, its answer lost, and the retry refused as a
    duplicate, which stopped log_model before it saved the files. Else None."""
    run = MlflowClient().get_run(mlflow.active_run().info.run_id)
    outputs = {output.model_id for output in (run.outputs.model_outputs if run.outputs else [])}
    return next((m for m in logged_models_with(key) if m.model_id in outputs), None)


def finish_linked_model(model, spec: dict[str, Any]) -> mlflow.models.model.ModelInfo:
    """What log_model does once the model is linked to its run: save it, upload its files, mark it
    READY -> its ModelInfo."""
    client = MlflowClient()
    description = mlflow.models.Model(
        artifact_path=model.artifact_location,
        model_uuid=model.model_id,
        run_id=model.source_run_id,
        model_id=model.model_id,
    )
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "model"
        mlflow.pyfunc.save_model(str(local), mlflow_model=description, **spec)
        client.log_model_artifacts(model.model_id, str(local))
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    return description.get_model_info(client.get_logged_model(model.model_id))


def logged_models_with(key: str) -> list:
    """The active run's logged models tagged with `key` (deleted ones are not searched)."""
    run = mlflow.active_run()
    return mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"tags.`{KEY_TAG}` = '{key}'",
        output_format="list",
    )


def remove_model_files(key: str) -> None:
    """Delete the files of the models tagged `key` that failed to log: a model whose copy stopped
    half-way (a full disk, a server error) would otherwise leave cut-off files in the artefact store,
    which only look like a model. Their entries stay, FAILED (MLflow marks them so)."""
    try:
        models = logged_models_with(key)
    except Exception as exc:  # noqa: BLE001 - the error that stopped the model is the one to report
        models = []
        logger.warning("could not look up a model that failed to log: %s", exc)
    for model in models:
        try:
            get_artifact_repository(model.artifact_location).delete_artifacts()
        except Exception as exc:  # noqa: BLE001 - as above
            logger.warning("could not delete the files of %s: %s", model.model_id, exc)


class SplitDataset(MetaDataset):
    """One split of the run's data as MLflow records it (name, source, digest, schema, row count),
    without the arrays. MetaDataset records no profile; this subclass of the public Dataset interface
    adds one (`{"num_rows": N}`), shown on the run page next to the digest."""

    def __init__(self, source, name: str, digest: str, schema: Schema | None, rows: int):
        self.rows = int(rows)
        super().__init__(source, name=name, digest=digest, schema=schema)

    @property
    def profile(self) -> dict[str, int]:
        return {"num_rows": self.rows}

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self.profile)}


def dataset_source(source: str | dict):
    """A table's files (a path or glob: MLflow's local source) or the generator that made the data."""
    if isinstance(source, dict):
        return CodeDatasetSource({k: str(v) for k, v in source.items()})
    with warnings.catch_warnings():  # MLflow registers its local source twice and says so
        warnings.simplefilter("ignore", UserWarning)
        return resolve_dataset_source(source)


def data_name(facts: dict[str, Any]) -> str:
    """The data's name in MLflow: the data set (two_moons, digits), or the table's file name without
    its suffix (a glob's pattern: `part-*`; its folder's name for a pattern of wildcards only, `*.csv`)."""
    if facts["dataset"] != "table":
        return facts["dataset"]
    path = Path(str(facts["source"]).split(" + ")[0])
    stem = path.name.rsplit(".", 1)[0]
    return stem if any(c.isalnum() for c in stem) or not path.parent.name else path.parent.name


def data_params(train: dict[str, Any], evaluation: dict[str, Any]) -> dict[str, Any]:
    """DESIGN.md's data params: rows per split, the class names, the data digest."""
    return {
        "data.rows_train": train["rows"]["train"],
        "data.rows_test": evaluation["rows"]["test"],
        "data.rows_ood": evaluation["rows"]["ood"],
        "data.classes": ",".join(train["class_names"]),
        "data.digest": train["digest"],
    }


def log_data(train: dict[str, Any], evaluation: dict[str, Any]) -> None:
    """On the active run: `mlflow.log_inputs` for the train split of `train` and the test and OOD
    splits of `evaluation` (data_facts of the data files; the same one but in retraining on generated
    data), and the data params."""
    datasets, contexts = [], []
    for split, facts in (("train", train), ("test", evaluation), ("ood", evaluation)):
        if not facts["rows"][split]:
            continue  # no OOD source: nothing to show (data.rows_ood says 0)
        schema = Schema(
            [ColSpec("double", name) for name in facts["feature_names"]]
            + ([ColSpec("string", "label")] if split != "ood" else [])
        )
        datasets.append(
            SplitDataset(
                dataset_source(facts["source"]),
                name=f"{data_name(facts)}-{split}",
                digest=facts["split_digests"][split],
                schema=schema,
                rows=facts["rows"][split],
            )
        )
        contexts.append(split)
    for attempt in range(3):
        try:
            mlflow.log_inputs(datasets, contexts=contexts, tags_list=[None] * len(datasets))
            break
        except mlflow.exceptions.MlflowException as exc:
            # Two runs logging the same new dataset at once: the store's insert races and the loser gets
            # a UNIQUE-constraint error; the dataset exists now, so logging again links it.
            if "UNIQUE constraint" not in str(exc) and "duplicate key" not in str(exc) or attempt == 2:
                raise
            time.sleep(0.2 * (attempt + 1))
    log_params(data_params(train, evaluation))


def log_text_artifact(text: str, file_name: str, artifact_path: str | None = None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / file_name
        path.write_text(text)
        mlflow.log_artifact(str(path), artifact_path)


def start_run(experiment_id: str, run_name: str, tags: dict[str, str], nested: bool = False):
    """mlflow.start_run, creating one run even when its request is retried: the server may have
    created it once before the retry (its answer lost), so any other run with this call's key is
    deleted (one search per run)."""
    key = uuid.uuid4().hex
    run = mlflow.start_run(
        experiment_id=experiment_id, run_name=run_name, nested=nested, tags={**tags, KEY_TAG: key}
    )
    delete_copies(MlflowClient(), experiment_id, key, run.info.run_id)
    return run


def create_run(client: MlflowClient, experiment_id: str, run_name: str, tags: dict[str, str]):
    """MlflowClient.create_run, creating one run even when its request is retried (as start_run)."""
    key = uuid.uuid4().hex
    run = client.create_run(experiment_id, run_name=run_name, tags={**tags, KEY_TAG: key})
    delete_copies(client, experiment_id, key, run.info.run_id)
    return run


def delete_copies(client: MlflowClient, experiment_id: str, key: str, kept_run_id: str) -> None:
    """Delete the runs with this creation key but the one the client got back."""
    for copy in client.search_runs([experiment_id], filter_string=f"tags.`{KEY_TAG}` = '{key}'"):
        if copy.info.run_id != kept_run_id:
            client.delete_run(copy.info.run_id)


def run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"mlflow ui --backend-store-uri {tracking_uri}  ->  #/experiments/{experiment_id}/runs/{run_id}"


def fail_unfinished_runs(tracking_uri: str, run_ids: list[str], status: str = "FAILED") -> None:
    """Mark any of these runs still RUNNING as FAILED/KILLED, so nothing is left RUNNING."""
    client = MlflowClient(tracking_uri)
    for run_id in run_ids:
        try:
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, status)
        except mlflow.exceptions.MlflowException:
            pass


# Who writes a run: lets a later pipeline start tell a run whose process was killed from a live one.
HOST_TAG, PID_TAG, PROCESS_START_TAG = "sngp.host", "sngp.pid", "sngp.process_start"
ORPHAN_TAG = "sngp.failure"


def process_tags() -> dict[str, str]:
    """Tags naming this process (host, pid, start time), recorded on every run the pipeline opens."""
    return {
        HOST_TAG: HOST,
        PID_TAG: str(os.getpid()),
        PROCESS_START_TAG: process_start_time(os.getpid()) or "",
    }


def fail_orphaned_runs(tracking_uri: str, experiment_id: str) -> list[str]:
    """Mark FAILED the experiment's RUNNING runs whose process (on this host) is gone: it was killed
    (SIGKILL, out of memory, power loss) before it could end them. Tags `sngp.failure` with the reason;
    returns their ids. Runs of live processes, of other hosts, or without process tags are left alone."""
    client = MlflowClient(tracking_uri)
    orphaned = []
    runs = client.search_runs(
        [experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000
    )
    for run in runs:
        tags = run.data.tags
        if tags.get(HOST_TAG) != HOST or not tags.get(PID_TAG, "").isdigit():
            continue
        pid = int(tags[PID_TAG])
        if pid == os.getpid() or process_alive(pid, tags.get(PROCESS_START_TAG) or None):
            continue
        try:
            client.set_tag(
                run.info.run_id,
                ORPHAN_TAG,
                f"process {pid} on {HOST} ended without finishing this run (killed or crashed); "
                "marked FAILED by a later pipeline start",
            )
            client.set_terminated(run.info.run_id, "FAILED")
            orphaned.append(run.info.run_id)
        except mlflow.exceptions.MlflowException:  # ended meanwhile, or deleted
            continue
    return orphaned
