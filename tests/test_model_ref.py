"""Which model a URI names (tasks.model_ref.resolve_model), on a real MLflow SQLite store with a tiny pyfunc
model logged, registered and aliased: every accepted URI form, its key and Prefect resource id, and one
clear line for each URI that names nothing (fast, no servers)."""

from __future__ import annotations

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from tasks.model_ref import ModelNotFound, resolve_model


class Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input: list[str], params=None) -> list[str]:
        return model_input


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite store holding run R's model, registered as `demo` v1 (alias champion) and v2."""
    root = tmp_path_factory.mktemp("model-ref")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    # Artefacts beside the store (SQLite's default would be ./mlruns in the working directory).
    mlflow.create_experiment("model-ref", artifact_location=(root / "artifacts").as_uri())
    experiment = mlflow.set_experiment("model-ref")
    assert experiment.artifact_location.startswith(root.as_uri())
    with mlflow.start_run() as run:
        info = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=["mlflow"])
    client = MlflowClient(uri)
    first = mlflow.register_model(info.model_uri, "demo")
    second = mlflow.register_model(info.model_uri, "demo")
    client.set_registered_model_alias("demo", "champion", first.version)
    yield {"uri": uri, "run_id": run.info.run_id, "model_id": info.model_id, "versions": (first, second)}
    mlflow.set_tracking_uri(None)


def test_an_alias_is_pinned_to_its_version(store):
    ref = resolve_model("models:/demo@champion", store["uri"])
    assert (ref.name, ref.version, ref.alias) == ("demo", "1", "champion")
    assert ref.resolved_uri == "models:/demo/1" and ref.registered
    assert ref.key == "demo/1" and ref.resource_id == "sngp.model.demo.1"
    assert ref.label == "demo v1 (@champion)" and ref.run_id == store["run_id"]
    MlflowClient(store["uri"]).set_registered_model_alias("demo", "champion", "2")
    try:
        assert resolve_model("models:/demo@champion", store["uri"]).resolved_uri == "models:/demo/2"
    finally:
        MlflowClient(store["uri"]).set_registered_model_alias("demo", "champion", "1")


def test_a_version_a_model_id_and_a_run_uri(store):
    version = resolve_model("models:/demo/2", store["uri"])
    assert (version.key, version.resource_id, version.alias) == ("demo/2", "sngp.model.demo.2", None)
    logged = resolve_model(f"models:/{store['model_id']}", store["uri"])
    assert not logged.registered and logged.key == store["model_id"]
    assert logged.resource_id == f"sngp.model.{store['model_id']}" and logged.run_id == store["run_id"]
    by_run = resolve_model(f"runs:/{store['run_id']}/model", store["uri"])
    assert by_run.model_id == store["model_id"] and by_run.key == store["model_id"]


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        (
            "models:/nope@champion",
            "no model at models:/nope@champion: Registered Model with name=nope not found",
        ),
        ("models:/demo@nope", "no model at models:/demo@nope: "),
        ("models:/demo/7", "Model Version (name=demo, version=7) not found"),
        ("models:/demo/latest", "'latest' is not a version number; use models:/NAME@ALIAS"),
        ("models:/m-" + "0" * 32, "not found"),
        (
            "runs:/0123456789abcdef0123456789abcdef/model",
            "Run with id=0123456789abcdef0123456789abcdef not found",
        ),
        ("runs:/", "not a model URI this command understands"),
        ("", "no model URI given"),
    ],
)
def test_a_uri_that_names_nothing_is_one_line(store, uri, message):
    with pytest.raises(ModelNotFound) as caught:
        resolve_model(uri, store["uri"])
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_the_given_tracking_uri_is_used_whatever_the_global_one_is(store, tmp_path):
    """`sngp serve-model/monitor --tracking-uri URI` with no MLFLOW_TRACKING_URI: the MLmodel is read from
    URI's store too (not from MLflow's global default, which would be a new ./mlflow.db), and the global
    tracking URI is left as it was."""
    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    mlflow.set_tracking_uri(elsewhere)
    try:
        for uri in (f"runs:/{store['run_id']}/model", "models:/demo@champion", "models:/demo/2"):
            assert resolve_model(uri, store["uri"]).run_id == store["run_id"]
        assert mlflow.get_tracking_uri() == elsewhere
    finally:
        mlflow.set_tracking_uri(store["uri"])
