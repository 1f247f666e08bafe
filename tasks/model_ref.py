"""Which model a URI names: `resolve_model(uri) -> ModelRef` (read-only MLflow calls, no Prefect).

Accepted (DESIGN.md's monitoring contract):

    models:/NAME@ALIAS      the alias resolved to its version now (models:/NAME/VERSION from then on)
    models:/NAME/VERSION    a registered version
    models:/MODEL_ID        a logged model (m-...)
    runs:/RUN_ID/PATH       the model a run logged under PATH

A registered model is known by its name and version, anything else by its logged model id: that is the
model's `key` (one monitoring run per key), its Prefect resource id `sngp.model.<name>.<version>`
(else `sngp.model.<model id>`) and its label in messages. A URI that names no model, or a model that is
not a pyfunc, raises ModelNotFound with one line saying which and why.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

from .redaction import redact

_REGISTERED = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))$")
_LOGGED = re.compile(r"^models:/(?P<model_id>m-[0-9a-f]{32})$")
_RUN = re.compile(r"^runs:/(?P<run_id>[^/]+)/(?P<path>.+)$")
DRIFT_EVENT = "sngp.drift.detected"  # the Prefect event `sngp monitor` sends about a drifting model
RESOURCE_PREFIX = "sngp.model."  # + <name>.<version> or <model id>: the resource id of a model's events
USAGE = "use models:/NAME@ALIAS, models:/NAME/VERSION, models:/MODEL_ID or runs:/RUN_ID/PATH"


class ModelNotFound(ValueError):
    """The URI names no usable model; the message is one line naming the URI and the reason."""


@dataclass(frozen=True)
class ModelRef:
    """A model, pinned: `uri` is what was asked for, `resolved_uri` what is loaded (an alias replaced
    by its version)."""

    uri: str
    resolved_uri: str
    name: str | None = None
    version: str | None = None
    alias: str | None = None
    model_id: str | None = None
    run_id: str | None = None

    @property
    def registered(self) -> bool:
        return self.name is not None and self.version is not None

    @property
    def key(self) -> str:
        """`name/version` for a registered version, else the logged model id (else the URI)."""
        if self.registered:
            return f"{self.name}/{self.version}"
        return self.model_id or self.resolved_uri

    @property
    def label(self) -> str:
        if self.registered:
            return f"{self.name} v{self.version}" + (f" (@{self.alias})" if self.alias else "")
        return self.model_id or self.resolved_uri

    @property
    def resource_id(self) -> str:
        """The Prefect resource id of events about this model."""
        if self.registered:
            return f"{RESOURCE_PREFIX}{self.name}.{self.version}"
        return f"{RESOURCE_PREFIX}{self.model_id or self.resolved_uri}"


def _first_line(exc: BaseException) -> str:
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return redact(message.strip().splitlines()[0] if message.strip() else type(exc).__name__)


def resolve_model(uri: str, tracking_uri: str | None = None) -> ModelRef:
    """The model `uri` names, its alias resolved to a version and its MLmodel read (it must be a pyfunc).
    ModelNotFound otherwise."""
    import mlflow  # lazy: the CLI checks URIs before anything heavy is needed
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = (uri or "").strip()
    if not uri:
        raise ModelNotFound(f"no model URI given; {USAGE}")
    client = MlflowClient(tracking_uri)
    try:
        ref = _pin(client, uri)
        with _tracking(tracking_uri):  # get_model_info reads the MLmodel through the global store
            info = mlflow.models.get_model_info(ref.resolved_uri)
    except ModelNotFound:
        raise
    except (MlflowException, OSError, ValueError) as exc:
        raise ModelNotFound(f"no model at {uri}: {_first_line(exc)}") from None
    if "python_function" not in (info.flavors or {}):
        raise ModelNotFound(f"{uri} is not a pyfunc model (flavors: {', '.join(info.flavors or {})})")
    return ModelRef(
        uri=ref.uri,
        resolved_uri=ref.resolved_uri,
        name=ref.name,
        version=ref.version,
        alias=ref.alias,
        model_id=ref.model_id or getattr(info, "model_id", None),
        run_id=ref.run_id or info.run_id,
    )


@contextlib.contextmanager
def _tracking(tracking_uri: str | None) -> Iterator[None]:
    """MLflow's global tracking URI set to `tracking_uri` (if given) for the block, then put back as it was
    (unset stays unset): `mlflow.models.get_model_info` takes no tracking URI of its own."""
    import mlflow

    if not tracking_uri:
        yield
        return
    previous = mlflow.get_tracking_uri() if mlflow.tracking.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def _pin(client, uri: str) -> ModelRef:
    if found := _LOGGED.match(uri):
        model = client.get_logged_model(found["model_id"])
        return ModelRef(uri, uri, model_id=model.model_id, run_id=model.source_run_id)
    if found := _REGISTERED.match(uri):
        name = found["name"]
        if found["alias"]:
            version = client.get_model_version_by_alias(name, found["alias"])
        elif found["version"].isdigit():
            version = client.get_model_version(name, found["version"])
        else:
            raise ModelNotFound(f"{uri}: {found['version']!r} is not a version number; {USAGE}")
        return ModelRef(
            uri,
            f"models:/{name}/{version.version}",
            name=name,
            version=str(version.version),
            alias=found["alias"],
            model_id=getattr(version, "model_id", None),
            run_id=version.run_id,
        )
    if found := _RUN.match(uri):
        client.get_run(found["run_id"])  # a clear "run not found" before the artefact lookup
        return ModelRef(uri, uri, run_id=found["run_id"])
    if uri.startswith(("models:/", "runs:/")):
        raise ModelNotFound(f"{uri} is not a model URI this command understands; {USAGE}")
    return ModelRef(uri, uri)  # a path or another store's URI: MLflow reads its MLmodel
