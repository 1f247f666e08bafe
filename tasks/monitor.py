"""Monitoring production traffic: score each new batch file of an inbox once, test it for drift, record it in
MLflow and raise the Prefect event `sngp.drift.detected` (DESIGN.md's monitoring contract).

Every CSV or Parquet file dropped into the inbox (tasks/inbox.py) is one batch. Each is

    read and checked  unreadable, no rows, a feature column missing, non-numeric or not finite:
                      moved to DIR/rejected/ with <file name>.reason.txt; the others go on
    claimed           its batch number (the next step of the model's monitoring run) recorded in
                      DIR/.sngp-monitor/batches/<file name>.json before any other side effect
    scored            -> DIR/scored/<file name>: its columns plus the model's outputs, written atomically
    tested            sngp_models.drift.abstain_drift against the reference split saved in the model
    recorded          the metrics at step = batch number in MLflow (experiment `sngp-monitor`, one run
                      per model: registered name and version, else logged model id)
    alarmed           on drift: the event, with an id fixed by the batch
    done              the claim marked done, then the file removed from the inbox

Exactly once: a run that dies anywhere in between leaves the file in the inbox with its claim; the next
run takes the same batch number and redoes only what is missing (the scored file is rewritten whole,
metrics are logged only if that step has none, an event already sent is not sent again). A file whose
claim is done but that is still there (the run died just before removing it) is removed without being
counted again; a different file under a name already scored is rejected (rename it). One monitor run
at a time per inbox (a lock file): a scheduled run and a manual one never share a file.
"""

from __future__ import annotations

import math
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from sngp_models.drift import abstain_drift, check_alpha
from sngp_models.interface import file_sha256

from . import inbox as inboxes
from . import tracking
from .inbox import check_inbox, inbox_lock  # noqa: F401 - the flow's helpers, re-exported
from .model_ref import DRIFT_EVENT, ModelRef, resolve_model
from .redaction import redact

EXPERIMENT = "sngp-monitor"
MODEL_TAG = "sngp.monitor.model"  # the monitoring run of a model: tagged with ModelRef.key
# Per batch, at step = batch number (DESIGN.md).
METRICS = ("batch_rows", "abstain_rate", "mean_uncertainty", "drift_statistic", "drift_p_value", "drift")


def check_settings(inbox: str, alpha: float) -> Path:
    """The flow's parameters checked (ValueError naming the bad one) -> the inbox's absolute path."""
    check_alpha(alpha)
    return check_inbox(inbox)


# --------------------------------------------------------------------------------------------------
# The model and its monitoring run

_LOADED: dict[str, Any] = {}  # resolved URI -> pyfunc, loaded once per process


class NoAbstention(RuntimeError):
    """The model carries no abstention rule (logged before abstention existed): it cannot be monitored."""


def load_pyfunc(ref: ModelRef):
    """The model as a pyfunc, loaded once per process (TensorFlow and the weights: seconds), with its
    abstention rule (threshold, target coverage, reference uncertainties) checked."""
    import mlflow.pyfunc

    if ref.resolved_uri not in _LOADED:
        model = mlflow.pyfunc.load_model(ref.resolved_uri)
        if getattr(model.unwrap_python_model(), "abstention", None) is None:
            raise NoAbstention(f"{ref.label} has no abstention threshold: log it again with this version")
        _LOADED[ref.resolved_uri] = model
    return _LOADED[ref.resolved_uri]


@task(name="resolve-model", cache_policy=NO_CACHE)
def resolve_monitored_model(model: str, tracking_uri: str | None = None) -> ModelRef:
    """The model to monitor, an alias resolved to its version now (it is loaded with the first batch)."""
    import mlflow

    from .tracking import resolve_tracking_uri

    mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
    ref = resolve_model(model)
    get_run_logger().info("monitoring %s (%s)", ref.label, ref.resolved_uri)
    return ref


@task(name="monitor-run", cache_policy=NO_CACHE)
def monitor_run(ref: ModelRef, inbox: Path) -> str:
    """The model's run in experiment `sngp-monitor` (created on first use, tagged with ModelRef.key);
    it stays FINISHED, metrics are added to it batch by batch."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from .tracking import setup

    experiment_id = setup(mlflow.get_tracking_uri(), EXPERIMENT)
    client = MlflowClient()
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{MODEL_TAG}` = '{ref.key}'", max_results=1,
        order_by=["attributes.start_time ASC"],
    )  # fmt: skip
    tags = {
        "sngp.monitor.model_uri": ref.uri,
        "sngp.monitor.resolved_uri": ref.resolved_uri,
        "sngp.monitor.resource_id": ref.resource_id,
        "sngp.monitor.inbox": str(inbox),
        "sngp.monitor.last_run": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if ref.registered:
        tags.update({"sngp.monitor.model_name": ref.name, "sngp.monitor.model_version": ref.version})
    if ref.model_id:
        tags["sngp.monitor.model_id"] = ref.model_id
    if found:
        run_id = found[0].info.run_id
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        return run_id
    name = f"monitor-{ref.name}-v{ref.version}" if ref.registered else f"monitor-{ref.key}"
    run = tracking.create_run(client, experiment_id, name, {MODEL_TAG: ref.key, **tags})
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


@task(name="pending-batches", cache_policy=NO_CACHE)
def pending_batches(inbox: Path) -> list[str]:
    """The batch files waiting in the inbox, oldest first."""
    return inboxes.batch_files(inbox)


# --------------------------------------------------------------------------------------------------
# One batch


@task(name="monitor-batch", task_run_name="batch-{name}", cache_policy=NO_CACHE)
def score_batch(ref: ModelRef, run_id: str, inbox: Path, name: str, alpha: float) -> dict[str, Any]:
    """Score, test, record and (on drift) announce one batch file, exactly once (the module's text) ->
    its summary: status 'scored' (with the statistics), 'rejected' (with the reason) or 'skipped'."""
    logger = get_run_logger()
    path = inbox / name
    if not path.is_file():  # taken meanwhile, by hand (monitor runs on one inbox hold its lock)
        return {"file": name, "status": "skipped", "line": f"skipped {name}: no longer in the inbox"}
    content = file_sha256(path)
    claim = inboxes.read_claim(inbox, name)
    if claim is not None and claim["sha256"] != content:
        if claim["state"] == "done":
            reason = f"a different file of this name was scored as batch {claim['batch']}; rename it"
        else:
            reason = f"the file changed while it was being scored as batch {claim['batch']}"
        return _rejected(inbox, name, reason)
    if claim is not None and claim["state"] == "done":  # the last run stopped just before removing it
        path.unlink()
        line = f"batch {claim['batch']} {name}: already scored, removed from the inbox"
        logger.info(line)
        return {"file": name, "status": "skipped", "batch": claim["batch"], "line": line}

    model = load_pyfunc(ref)
    features = model.metadata.get_input_schema().input_names()
    try:
        frame = inboxes.read_batch(path, features)
        outputs = model.predict(frame[features].astype(np.float64))
    except (ValueError, MlflowException) as exc:  # the batch's fault (the model's ModelInputError is both)
        return _rejected(inbox, name, inboxes.one_line(getattr(exc, "message", None) or exc))

    if claim is None or claim.get("model") != ref.key:  # new, or claimed for the model watched before
        claim = {
            "file": name, "sha256": content, "model": ref.key, "run_id": run_id,
            "batch": next_batch(inbox, ref, run_id), "state": "claimed",
            "claimed_at": datetime.now(UTC).isoformat(), "event_sent": False,
        }  # fmt: skip
        inboxes.write_claim(inbox, claim)
    batch = int(claim["batch"])
    inboxes.write_scored(inbox, name, inboxes.scored_frame(frame, outputs))
    stats = batch_statistics(outputs, model.unwrap_python_model().abstention, alpha)
    record_batch(run_id, batch, stats)
    if stats["drift"] and not claim.get("event_sent"):
        emit_drift_event(ref, batch, name, inbox, content, stats, run_id)
        claim["event_sent"] = True
        inboxes.write_claim(inbox, claim)
    claim.update(state="done", done_at=datetime.now(UTC).isoformat(), **{k: stats[k] for k in METRICS})
    inboxes.write_claim(inbox, claim)
    path.unlink()
    line = batch_line(batch, name, stats)
    logger.info(line)
    return {"file": name, "status": "scored", "batch": batch, **stats, "line": line}


def _rejected(inbox: Path, name: str, reason: str) -> dict[str, Any]:
    target = inboxes.reject(inbox, name, reason)
    line = f"rejected {name}: {reason} -> {target.relative_to(inbox)}"
    get_run_logger().warning(line)
    return {"file": name, "status": "rejected", "reason": reason, "line": line}


def next_batch(inbox: Path, ref: ModelRef, run_id: str) -> int:
    """One more than the highest batch number of this model, in the inbox's claims or already in MLflow
    (another inbox watching the same model, claims deleted by hand)."""
    from mlflow.tracking import MlflowClient

    claimed = [c["batch"] for c in inboxes.claims(inbox) if c.get("model") == ref.key]
    logged = [m.step for m in MlflowClient().get_metric_history(run_id, "batch_rows")]
    return max([0, *claimed, *logged]) + 1


def batch_statistics(outputs: pd.DataFrame, abstention, alpha: float) -> dict[str, Any]:
    """The per-batch metrics (METRICS) and the test's details, from the model's outputs."""
    abstained = int(np.count_nonzero(outputs["abstain"].to_numpy(dtype=bool)))
    test = abstain_drift(
        abstained,
        len(outputs),
        threshold=abstention.threshold,
        target_coverage=abstention.target_coverage,
        reference_uncertainty=abstention.reference_uncertainty,
        alpha=alpha,
    )
    return {
        "batch_rows": test.rows,
        "abstain_rate": test.abstain_rate,
        "mean_uncertainty": float(np.mean(outputs["uncertainty"].to_numpy(dtype=np.float64))),
        "drift_statistic": test.statistic,
        "drift_p_value": test.p_value,
        "drift": int(test.drift),
        "abstained": test.abstained,
        "expected_rate": test.expected_rate,
        "alpha": test.alpha,
        "test": test.method,
        "threshold": float(abstention.threshold),
        "target_coverage": float(abstention.target_coverage),
        "reference_rows": test.reference_rows,
    }


def batch_line(batch: int, name: str, stats: dict[str, Any]) -> str:
    verdict = f"DRIFT (event {DRIFT_EVENT})" if stats["drift"] else "no drift"
    return (
        f"batch {batch} {name}: {stats['batch_rows']} rows, abstained {stats['abstain_rate']:.1%} "
        f"(in-distribution {stats['expected_rate']:.1%}), mean uncertainty {stats['mean_uncertainty']:.4f}, "
        f"p = {stats['drift_p_value']:.3g} -> {verdict}"
    )


def record_batch(run_id: str, batch: int, stats: dict[str, Any]) -> None:
    """The batch's metrics at step = batch, unless that step is already recorded (a rerun after a crash).
    One log_batch call: one transaction in the tracking store, all six metrics of the step or none."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    if any(m.step == batch for m in client.get_metric_history(run_id, "batch_rows")):
        return
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(key, float(stats[key]), now, batch) for key in METRICS])


def drift_event_id(inbox: Path, name: str, content: str, ref: ModelRef) -> uuid.UUID:
    """Fixed by the batch (inbox, file name, content hash, model): a rerun cannot raise a second event."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"sngp-drift:{inbox}/{name}:{content}:{ref.key}")


def emit_drift_event(
    ref: ModelRef, batch: int, name: str, inbox: Path, content: str, stats: dict[str, Any], run_id: str
) -> None:
    """`sngp.drift.detected` about resource `sngp.model.<name>.<version>` (else `sngp.model.<model id>`),
    the batch's statistics in the payload."""
    from prefect.events import emit_event

    resource = {
        "prefect.resource.id": ref.resource_id,
        "prefect.resource.name": ref.label,
        "sngp.model.uri": ref.resolved_uri,
    }
    if ref.registered:
        resource.update({"sngp.model.name": ref.name, "sngp.model.version": ref.version})
    payload = {
        "batch": batch,
        "file": name,
        "inbox": str(inbox),
        "model_uri": ref.resolved_uri,
        "mlflow_run_id": run_id,
        **{k: v for k, v in stats.items() if not (isinstance(v, float) and not math.isfinite(v))},
    }
    emit_event(
        event=DRIFT_EVENT, resource=resource, payload=payload, id=drift_event_id(inbox, name, content, ref)
    )


def idle_summary(model: str, inbox: Path) -> dict[str, Any]:
    """The result of a monitor run that found no batch file in `inbox`."""
    get_run_logger().info("no new batch in %s", inbox)
    return {
        "model": model,
        "model_uri": model,
        "mlflow_run_id": None,
        "inbox": str(inbox),
        "batches": [],
        "drift": False,
    }


def summary(ref: ModelRef, run_id: str, results: list[dict]) -> dict[str, Any]:
    """The monitor run's result: the model, its MLflow run and one entry per batch file."""
    import mlflow

    return {
        "model": ref.label,
        "model_uri": ref.resolved_uri,
        "resource_id": ref.resource_id,
        "mlflow_run_id": run_id,
        "tracking_uri": redact(mlflow.get_tracking_uri()),
        "batches": results,
        "drift": any(r.get("drift") for r in results),
    }
