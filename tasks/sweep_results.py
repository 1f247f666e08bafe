"""The MLflow record and the summary of a sweep: one nested run per point, the results table, the
aggregates over seeds, the summary plots and the Prefect table.

Everything is written from the flow's own thread (MLflow's fluent API is not thread-safe) under the
sweep's parent run (tasks.recording.parent_run): the sweep spec as `sweep.*` params and `sweep.yaml`,
`sweep_results.csv`, `plots/sweep_<metric>.png` and `plots/sweep_summary.png`; per point its settings,
seed, model settings, metrics and training curves (no model and no surface plots, to keep sweeps
light). A point that fails, whether its settings are invalid or its task raises on a worker, is
recorded FAILED with an `error` tag and the others carry on; the parent run still ends FINISHED and
is tagged `sweep.failed_points`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import yaml
from prefect import get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.futures import PrefectFuture

from sngp_models.evaluation import METRIC_NAMES

from . import faults, tracking
from .cache import cache_root, write_atomic
from .recording import ParentRun
from .sweep_points import Outcome, Point, SweepShape, encode_value, format_value


class PointFailed(Exception):
    """Why a point failed (already a readable message)."""


def record_spec(spec: dict[str, Any], points: int) -> None:
    """The sweep file (`spec`: SweepSpec as JSON) on the parent run: `sweep.*` params and sweep.yaml."""
    get_run_logger().info(
        "sweep: %d points (%d settings x %d seeds) of %s",
        points,
        points // len(spec["seeds"]),
        len(spec["seeds"]),
        ", ".join(spec["methods"]),
    )
    params = {
        "sweep.methods": ",".join(spec["methods"]),
        "sweep.seeds": ",".join(str(s) for s in spec["seeds"]),
        "sweep.metrics": ",".join(spec["metrics"]),
        "sweep.base_config": spec["base"]["base_config"] or "conf/default.yaml",
        **{
            f"sweep.grid.{k}": ",".join(format_value(v) for v in values) for k, values in spec["grid"].items()
        },
        **{f"sweep.base.{k}": v for k, v in spec["base"]["overrides"].items()},
    }
    if spec["random"] is not None:
        params.update({"sweep.random.n": spec["random"]["n"], "sweep.random.seed": spec["random"]["seed"]})
    tracking.log_params(params)
    tracking.log_text_artifact(yaml.safe_dump(spec, sort_keys=False), "sweep.yaml")


def record_point(
    point: Point,
    model_settings: dict[str, Any] | None,
    future: PrefectFuture | None,
    error: str | None,
    parent: ParentRun,
) -> Outcome:
    """One nested MLflow run for the point, from its task's final state (waits for it); `error`: why
    the point could not run (then there is no future)."""
    logger = get_run_logger()
    outcome = Outcome(point)
    tags = {"method": point.method, "sweep.point": point.id, "sweep.label": point.label}
    child = tracking.start_run(parent.experiment_id, point.label, tags, nested=True)
    parent.started_runs.append(child.info.run_id)
    outcome.run_id = child.info.run_id
    try:
        params = {"method": point.method, "seed": point.seed}
        params.update({f"sweep.{k}": format_value(v) for k, v in point.settings.items()})
        params.update(model_settings or {})
        tracking.log_params(params)
        if error is not None or future is None:
            raise PointFailed(error or "the point did not run")
        future.wait()
        state = future.state
        if not state.is_completed():
            failure = future.result(raise_on_failure=False)
            text = (
                f"{type(failure).__name__}: {failure}"
                if isinstance(failure, BaseException)
                else str(state.message)
            )
            raise PointFailed(f"task ended {state.name}: {text}")
        result = future.result()
        # A point run on the work pool reports whether its own sweep-point task was a cache hit.
        outcome.cached = bool(result["cached"]) if "cached" in result else state.name == "Cached"
        outcome.metrics = result["metrics"]
        outcome.worker = f"{result['host']}:{result['pid']}"
        tags = {"cached": str(outcome.cached).lower(), "sweep.worker": outcome.worker}
        if result.get("flow_run_id"):
            outcome.prefect_worker = result.get("prefect_worker") or ""
            tags["sweep.flow_run_id"] = result["flow_run_id"]
            tags["sweep.prefect_worker"] = outcome.prefect_worker
        mlflow.set_tags(tags)
        tracking.log_curves(result["history"])
        mlflow.log_metrics(result["metrics"])
        mlflow.end_run("FINISHED")
        outcome.status = "FINISHED"
    except Exception as exc:  # noqa: BLE001 - the point is FAILED, the sweep goes on
        if faults.unreachable(exc):
            raise  # a server is gone: recording the other points would only wait for it again
        outcome.error = str(exc) if isinstance(exc, PointFailed) else f"{type(exc).__name__}: {exc}"
        mlflow.set_tag("error", outcome.error[:5000])
        mlflow.end_run("FAILED")
        logger.error("%s (%s) FAILED: %s", point.id, point.label, outcome.error)
    return outcome


def finish_sweep(spec: SweepShape, outcomes: list[Outcome], parent: ParentRun) -> dict[str, Any]:
    """Tags, table and plots on the parent run, the Prefect table -> the sweep's summary."""
    failed = [o for o in outcomes if o.status != "FINISHED"]
    mlflow.set_tags(
        {"sweep.failed_points": str(len(failed)), "sweep.finished_points": str(len(outcomes) - len(failed))}
    )
    if failed:
        mlflow.set_tag("sweep.failed_ids", ",".join(o.point.id for o in failed)[:5000])
    files = write_outputs(spec, outcomes, cache_root() / "sweeps" / parent.run_id)
    mlflow.log_artifact(files["csv"])
    for png in files["plots"]:
        mlflow.log_artifact(png, "plots")
    publish_table(spec, outcomes)
    return {
        "parent_run_id": parent.run_id,
        "experiment_id": parent.experiment_id,
        "tracking_uri": parent.tracking_uri,
        "points": [o.as_dict() for o in outcomes],
        "failed": len(failed),
        "aggregates": aggregate(spec, outcomes),
        "csv": files["csv"],
        "plots": files["plots"],
        "summary_png": files["summary"],
    }


# ----------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------


def results_table(spec: SweepShape, outcomes: list[Outcome]) -> pd.DataFrame:
    """sweep_results.csv: one row per point (settings, seed, status, every metric, run id, error)."""
    metric_names = [m for m in METRIC_NAMES if any(m in o.metrics for o in outcomes)]
    rows = [
        {
            "point": o.point.id,
            "method": o.point.method,
            **{k: format_value(o.point.settings[k]) if k in o.point.settings else "" for k in spec.grid},
            "seed": o.point.seed,
            "status": o.status,
            "cached": str(o.cached).lower(),
            **{m: o.metrics.get(m, np.nan) for m in metric_names},
            "mlflow_run_id": o.run_id,
            "error": o.error,
        }
        for o in outcomes
    ]
    columns = ["point", "method", *spec.grid, "seed", "status", "cached", *metric_names, "mlflow_run_id"]
    return pd.DataFrame(rows, columns=[*columns, "error"])


def finished_metrics(spec: SweepShape, outcomes: list[Outcome]) -> pd.DataFrame:
    """The metrics of the finished points (NaN where a point has no such metric) with each point's
    method and settings (`group`: method and settings as one key; each grid key's value encoded)."""
    done = [o for o in outcomes if o.status == "FINISHED"]
    frame = pd.DataFrame([o.metrics for o in done], columns=list(spec.metrics), dtype=float)
    frame["method"] = [o.point.method for o in done]
    frame["group"] = [encode_value([o.point.method, o.point.settings]) for o in done]
    for key in spec.grid:
        frame[key] = [encode_value(o.point.settings[key]) if key in o.point.settings else None for o in done]
    return frame


def spread(grouped) -> pd.DataFrame:
    """Mean, std (population: ddof=0), min and max of each group of a grouped metric column."""
    return pd.DataFrame(
        {"mean": grouped.mean(), "std": grouped.std(ddof=0), "min": grouped.min(), "max": grouped.max()}
    )


def aggregate(spec: SweepShape, outcomes: list[Outcome]) -> list[dict[str, Any]]:
    """Mean, std, min, max over seeds for each (method, settings), in the sweep's order; `stats` only
    for metrics with at least one finished point."""
    finished = finished_metrics(spec, outcomes)
    stats = {m: spread(finished.groupby("group")[m]).dropna(subset=["mean"]) for m in spec.metrics}
    groups: dict[str, list[Outcome]] = {}
    for o in outcomes:
        groups.setdefault(encode_value([o.point.method, o.point.settings]), []).append(o)
    rows = []
    for group, members in groups.items():
        done = sum(o.status == "FINISHED" for o in members)
        rows.append(
            {
                "method": members[0].point.method,
                "settings": members[0].point.settings,
                "seeds": done,
                "failed": len(members) - done,
                "stats": {
                    m: {k: float(v) for k, v in stats[m].loc[group].items()}
                    for m in spec.metrics
                    if group in stats[m].index
                },
            }
        )
    return rows


def publish_table(spec: SweepShape, outcomes: list[Outcome]) -> None:
    rows = [
        {
            "point": o.point.id,
            "method": o.point.method,
            "setting": o.point.label,
            "seed": o.point.seed,
            "status": o.status,
            "cached": o.cached,
            **{m: round(o.metrics[m], 4) if m in o.metrics else None for m in spec.metrics},
            "mlflow_run": o.run_id,
            "error": o.error[:200],
        }
        for o in outcomes
    ]
    create_table_artifact(rows, key="sweep-results", description="Sweep points: settings, status, metrics")


# ----------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------


def draw(ax, spec: SweepShape, outcomes: list[Outcome], finished: pd.DataFrame, key: str, metric: str):
    """`metric` against the values of `key`: per method it applies to, mean ± std over the finished
    points with that value (bars) and their min-max (band)."""
    values = spec.grid[key]
    x = list(range(len(values)))
    methods = {o.point.method for o in outcomes if key in o.point.settings}
    by_value = spread(finished.groupby(["method", key])[metric])
    for method in (m for m in spec.methods if m in methods):
        stats = pd.DataFrame(columns=by_value.columns, dtype=float)
        if method in by_value.index.get_level_values("method"):
            stats = by_value.xs(method, level="method")
        stats = stats.reindex([encode_value(v) for v in values])
        line = ax.errorbar(
            x,
            stats["mean"],
            yerr=stats["std"].fillna(0.0),
            marker="o",
            capsize=4,
            label=f"{method} (mean ± std)",
        )
        ax.fill_between(
            x, stats["min"], stats["max"], alpha=0.2, color=line[0].get_color(), label=f"{method} (min–max)"
        )
    ax.set_xticks(x, [format_value(v) for v in values])
    ax.set_xlabel(key)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)


def spread_note(spec: SweepShape) -> str:
    seeds = f"{len(spec.seeds)} seed{'s' if len(spec.seeds) > 1 else ''}"
    return f"over {seeds}" if len(spec.grid) == 1 else f"over {seeds} and the other settings"


def write_outputs(spec: SweepShape, outcomes: list[Outcome], folder: Path) -> dict[str, Any]:
    """sweep_results.csv, plots/sweep_<metric>.png (one panel per swept key) and sweep_summary.png."""
    from matplotlib.figure import Figure  # no pyplot: no global state, safe beside other threads

    folder.mkdir(parents=True, exist_ok=True)
    table = results_table(spec, outcomes)
    csv_path = write_atomic(
        folder / "sweep_results.csv", lambda tmp: table.to_csv(tmp, index=False, lineterminator="\n")
    )
    finished = finished_metrics(spec, outcomes)
    keys = list(spec.grid)
    note = spread_note(spec)
    plots = []
    for metric in spec.metrics:
        fig = Figure(figsize=(4.8 * len(keys), 3.8), layout="constrained")
        axes = fig.subplots(1, len(keys), squeeze=False)[0]
        for ax, key in zip(axes, keys):
            draw(ax, spec, outcomes, finished, key, metric)
        axes[0].legend(fontsize="small")
        fig.suptitle(f"{metric} against each swept setting ({note})")
        plots.append(save(fig, folder / f"sweep_{metric}.png"))
    panels = [(metric, key) for metric in spec.metrics for key in keys]
    ncols = len(keys) if len(keys) > 1 else min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.4 * ncols, 3.3 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (metric, key) in zip(axes, panels):
        draw(ax, spec, outcomes, finished, key, metric)
        ax.set_title(metric)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    axes[0].legend(fontsize="small")
    fig.suptitle(f"Sweep of {', '.join(spec.methods)}\nmean ± std (bars) and min–max (band) {note}")
    summary = save(fig, folder / "sweep_summary.png")
    plots.append(summary)
    return {"csv": str(csv_path), "plots": plots, "summary": summary}


def save(fig, path: Path) -> str:
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return str(path)
