"""The `sweep` flow: settings x seeds as mapped, cached train + evaluate tasks under one MLflow parent run.

A sweep file (conf/sweep_*.yaml) names a base pipeline config, the methods, a grid of dotted settings
(their cartesian product, or a random sample of it) and the seeds. Every (method, setting, seed) is a
*point*; each point is one mapped `sweep-point` task that trains and evaluates through the pipeline's
own tasks (tasks/train.py, tasks/evaluate.py), cached by the point's model settings, its data file and
the code, exactly like the pipeline's tasks. The flow runs on whatever task runner it is given:
Prefect's thread pool on one machine, or Dask (`prefect-dask`'s DaskTaskRunner) on a local cluster of
worker processes or an existing cluster (see flows/sweep_command.py and the README).

With a `deployment` (`sngp sweep --runner workpool`) each point is instead its own flow run of the
`sweep-point` flow (flows/sweep_point_flow.py, deployment `sweep-point/pool` in prefect.yaml) on a
Prefect work pool: a mapped `dispatch-point` task per point creates the flow run, waits for it and
reads its result (a JSON file in the shared cache folder), so the pool's workers share the points
while this flow still records everything. The point flow calls the same cached `sweep-point` task,
so a point computed by any runner is a cache hit for the others.

MLflow is written from the flow's own thread only (its fluent API is not thread-safe): one parent run
per sweep (the base config and the sweep spec as params, `sweep.yaml`, `sweep_results.csv`, summary
plots `plots/sweep_<metric>.png`) and one nested run per point (its settings, seed, model settings,
metrics and training curves; no model and no surface plots, to keep sweeps light). A point that
fails, whether its settings are invalid or its task raises on a worker, is recorded FAILED with an
`error` tag and the others carry on; the parent run still ends FINISHED and is tagged
`sweep.failed_points`.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import itertools
import json
import math
import os
import random
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE, CompoundCachePolicy, Inputs
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from flows.config import ConfigError, Method, PipelineConfig, load_config, read_yaml_file, validate_config
from sngp_models.config import RELEVANT_FIELDS, ModelConfig
from tasks.cache import CACHE_POLICY, CODE_VERSION, cache_root, write_atomic
from tasks.evaluate import evaluate_model
from tasks.train import train_model

# Every metric evaluate_model reports (grid_* and distance_* only on two moons).
KNOWN_METRICS = (
    "train_accuracy",
    "test_accuracy",
    "nll",
    "brier",
    "ece",
    "ood_mean_max_prob",
    "ood_auroc",
    "ood_aupr",
    "ood_fpr95",
    "grid_mean_uncertainty",
    "distance_uncertainty_spearman",
    "train_seconds",
    "inference_seconds",
)
DEFAULT_METRICS = ("test_accuracy", "ood_auroc", "ood_mean_max_prob", "grid_mean_uncertainty", "ece")
# Pipeline settings that are not swept through `grid:` (seeds and methods have their own keys).
NOT_SWEEPABLE = {
    "seed": "use 'seeds:' for seeds",
    "methods": "use 'methods:' for methods",
    "mlflow": "MLflow settings are not swept; set them in the base config",
    "retrain": "retraining settings do not change what a sweep point trains",
}
# Pipeline keys whose library field has another name.
_MODEL_FIELD_ALIASES = {"mc_dropout.num_samples": "num_mc_samples"}
_DATA_SECTIONS = ("dataset", "data", "digits")


class SweepError(ConfigError):
    """A sweep file the user must fix (exit code 2); the message names the key."""


# ----------------------------------------------------------------------------------------------------
# The sweep file
# ----------------------------------------------------------------------------------------------------


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseSpec(_Spec):
    """The pipeline config every point starts from: a YAML file plus dotted-key overrides."""

    # Relative paths are looked up beside the sweep file first, then in the working directory.
    # None: the study's settings (conf/default.yaml).
    base_config: str | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)


class RandomSpec(_Spec):
    """Sample `n` distinct settings from the grid (seeded) instead of running all of them."""

    n: int = Field(ge=1, le=100_000)
    seed: int = Field(0, ge=0, lt=2**31)


class SweepSpec(_Spec):
    base: BaseSpec = BaseSpec()
    methods: list[Method] = Field(min_length=1)
    grid: dict[str, list[Any]] = Field(min_length=1)
    random: RandomSpec | None = None
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    metrics: list[str] = Field(default_factory=lambda: list(DEFAULT_METRICS), min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _method_shorthand(cls, raw: Any) -> Any:
        """`method: sngp` is shorthand for `methods: [sngp]`."""
        if isinstance(raw, dict) and "method" in raw:
            raw = dict(raw)
            if "methods" in raw:
                raise ValueError("give either 'method' or 'methods', not both")
            method = raw.pop("method")
            raw["methods"] = method if isinstance(method, list) else [method]
        return raw

    @field_validator("methods")
    @classmethod
    def _unique_methods(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"each method may appear once, got {v}")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        bad = [s for s in v if isinstance(s, bool) or not 0 <= s < 2**31]
        if bad:
            raise ValueError(f"seeds must be integers in [0, 2**31), got {bad}")
        if len(set(v)) != len(v):
            raise ValueError(f"each seed may appear once, got {v}")
        return v

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, v: list[str]) -> list[str]:
        unknown = [m for m in v if m not in KNOWN_METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; allowed: {', '.join(KNOWN_METRICS)}")
        return v

    @field_validator("grid")
    @classmethod
    def _grid(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            check_setting_key(key)
            if not values:
                raise ValueError(f"{key}: give at least one value")
            if any(isinstance(v, dict) for v in values):
                raise ValueError(f"{key}: values must be numbers, strings or lists, not mappings")
            encoded = [json.dumps(v, sort_keys=True) for v in values]
            if len(set(encoded)) != len(encoded):
                raise ValueError(f"{key}: each value may appear once, got {values}")
        return grid

    @model_validator(mode="after")
    def _every_key_matters(self) -> SweepSpec:
        for key in self.grid:
            if not any(affects(key, m) for m in self.methods):
                raise ValueError(
                    f"grid.{key}: does not change what {', '.join(self.methods)} trains or predicts; "
                    f"add a method it applies to (e.g. deep_ensemble for deep_ensemble.ensemble_size)"
                )
        if self.random is not None and self.random.n > len(grid_combinations(self)):
            raise ValueError(
                f"random.n: {self.random.n} is more than the {len(grid_combinations(self))} "
                "settings of the grid; lower it or drop 'random' to run the whole grid"
            )
        return self


def check_setting_key(key: str) -> None:
    """`sngp.spec_norm_bound`, `training.epochs`, `dataset`, ...: a leaf of PipelineConfig, not seeds etc."""
    parts = key.split(".")
    top = parts[0]
    if top in NOT_SWEEPABLE:
        raise ValueError(f"{key}: not sweepable here ({NOT_SWEEPABLE[top]})")
    sections = {
        name: f.annotation for name, f in PipelineConfig.model_fields.items() if name not in NOT_SWEEPABLE
    }
    if top not in sections:
        raise ValueError(f"{key}: unknown setting; allowed sections: {', '.join(sections)}")
    model = sections[top]
    is_section = isinstance(model, type) and issubclass(model, BaseModel)
    if not is_section:
        if len(parts) != 1:
            raise ValueError(f"{key}: {top!r} is a single setting, not a section")
        return
    if len(parts) != 2:
        raise ValueError(f"{key}: expected SECTION.SETTING, e.g. {top}.{next(iter(model.model_fields))}")
    if parts[1] not in model.model_fields:
        raise ValueError(f"{key}: unknown setting; allowed in {top}: {', '.join(model.model_fields)}")


def model_field(key: str) -> str | None:
    """The library (ModelConfig) field a pipeline key sets, or None for data settings."""
    if key.split(".")[0] in _DATA_SECTIONS:
        return None
    name = _MODEL_FIELD_ALIASES.get(key, key.split(".")[-1])
    if name not in {f.name for f in dataclasses.fields(ModelConfig)}:
        raise ValueError(f"{key}: no model setting of that name")
    return name


def affects(key: str, method: str) -> bool:
    """Does this setting change what `method` trains or predicts? (Data settings change every method.)"""
    name = model_field(key)
    return name is None or name in RELEVANT_FIELDS[method]


def grid_combinations(spec: SweepSpec) -> list[tuple[str, dict[str, Any]]]:
    """(method, settings) for every method: the product over the grid keys that affect that method."""
    combos = []
    for method in spec.methods:
        keys = [k for k in spec.grid if affects(k, method)]
        for values in itertools.product(*(spec.grid[k] for k in keys)):
            combos.append((method, dict(zip(keys, values))))
    return combos


def setting_combinations(spec: SweepSpec) -> list[tuple[str, dict[str, Any]]]:
    """The grid's combinations, or the `random` sample of them (in grid order)."""
    combos = grid_combinations(spec)
    if spec.random is not None:
        chosen = sorted(random.Random(spec.random.seed).sample(range(len(combos)), spec.random.n))
        combos = [combos[i] for i in chosen]
    return combos


@dataclass(frozen=True)
class Point:
    id: str
    method: str
    settings: dict[str, Any]
    seed: int
    label: str


def expand(spec: SweepSpec) -> list[Point]:
    """Every point of the sweep: each (method, settings) with each seed."""
    leaves = [k.split(".")[-1] for k in spec.grid]

    def short(key: str) -> str:
        leaf = key.split(".")[-1]
        return leaf if leaves.count(leaf) == 1 else key

    points = []
    for method, settings in setting_combinations(spec):
        for seed in spec.seeds:
            shown = " ".join(f"{short(k)}={_fmt(v)}" for k, v in settings.items())
            label = f"{method} {shown} seed={seed}".replace("  ", " ")
            points.append(Point(f"p{len(points):03d}", method, settings, seed, label))
    return points


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ",".join(_fmt(v) for v in value)
    return str(value)


def load_sweep(
    path: str | Path, extra_overrides: list[str] | None = None
) -> tuple[SweepSpec, PipelineConfig]:
    """Read and validate a sweep file and its base config; SweepError/ConfigError name the bad key."""
    path = Path(path)
    raw = read_yaml_file(path, "sweep file", SweepError)
    if not isinstance(raw, dict):
        raise SweepError(f"sweep file {str(path)!r} must hold a mapping with at least 'methods' and 'grid'")
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as exc:
        raise SweepError(f"sweep file {str(path)!r}: {describe(exc)}") from None
    base_path = resolve_base_path(spec.base.base_config, path)
    overrides = [f"{k}={json.dumps(v)}" for k, v in spec.base.overrides.items()]
    try:
        base = load_config(base_path, overrides + list(extra_overrides or []))
    except ConfigError as exc:
        raise SweepError(f"sweep file {str(path)!r}, base config: {exc}") from None
    return spec, base


def resolve_base_path(base_config: str | None, sweep_path: Path) -> Path:
    if base_config is None:
        return Path(__file__).resolve().parent.parent / "conf" / "default.yaml"
    candidate = Path(base_config)
    if candidate.is_absolute():
        return candidate
    for folder in (sweep_path.resolve().parent, Path.cwd()):
        if (folder / candidate).is_file():
            return folder / candidate
    raise SweepError(
        f"base.base_config: {base_config!r} not found beside the sweep file ({sweep_path.parent}) "
        "or in the working directory"
    )


def describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-")) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key; allowed keys here: {_allowed_at(err['loc'][:-1])}")
            continue
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "required" + (" (e.g. 'method: sngp')" if key == "methods" else "")
        given = err.get("input")
        shown = (
            ""
            if err["type"] in ("missing", "value_error") or isinstance(given, dict)
            else f" (got {given!r})"
        )
        if key == "(top level)" and err["type"] == "value_error":
            lines.append(msg)  # whole-file checks name their keys themselves
        elif key == "grid" and err["type"] == "value_error":
            lines.append(f"grid.{msg}")  # the message starts with the setting's key
        else:
            lines.append(f"{key}: {msg}{shown}")
    return "; ".join(lines)


def _allowed_at(loc: tuple) -> str:
    model: Any = SweepSpec
    for part in loc:
        annotation = model.model_fields[part].annotation if part in model.model_fields else None
        model = next(
            (
                a
                for a in (annotation, *getattr(annotation, "__args__", ()))
                if isinstance(a, type) and issubclass(a, BaseModel)
            ),
            None,
        )
        if model is None:
            return "?"
    names = list(model.model_fields)
    return ", ".join(names + (["method"] if model is SweepSpec else []))


# ----------------------------------------------------------------------------------------------------
# One point: the pipeline's training and evaluation, as one mapped and cached task
# ----------------------------------------------------------------------------------------------------


@task(name="sweep-point", task_run_name="sweep-{label}", cache_policy=CACHE_POLICY, persist_result=True)
def sweep_point(
    label: str, method: str, model_config: dict, data_path: str, code_version: str = CODE_VERSION
) -> dict:
    """Train and evaluate one point (tasks/train.py + tasks/evaluate.py) -> model dir, metrics, curves."""
    check_shared_cache(data_path)
    trained = train_model.fn(method, model_config, data_path, code_version)
    evaluation = evaluate_model.fn(method, trained, data_path, code_version)
    return {
        "model_dir": trained["model_dir"],
        "history": trained["history"],
        "metrics": evaluation["metrics"],
        "predictions_path": evaluation["predictions_path"],
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }


def check_shared_cache(data_path: str) -> None:
    """A worker must see the sweep's cache folder (the data file lives there, models go there)."""
    expected = Path(data_path).parent.parent
    if not Path(data_path).is_file():
        raise RuntimeError(
            f"worker {socket.gethostname()} cannot see the sweep's data file {data_path}: every Dask "
            f"worker or work-pool worker must share the sweep's cache folder {expected} (start workers "
            f"with SNGP_CACHE_DIR={expected} on a shared file system)"
        )
    if cache_root() != expected.resolve():
        raise RuntimeError(
            f"worker {socket.gethostname()} caches into {cache_root()}, the sweep into {expected}: start "
            f"the Dask workers with SNGP_CACHE_DIR={expected}"
        )


def point_task():
    """sweep_point configured like the pipeline's tasks (flows.pipeline.configured: cache records and
    locks under cache_root(), so every worker sharing the cache folder shares the cache), except that
    the display label is not part of the cache key: the same model settings, data file and code are
    the same point in any sweep."""
    from flows.pipeline import configured

    task_ = configured(sweep_point)
    policy = task_.cache_policy
    if isinstance(policy, CompoundCachePolicy):
        policies = [
            Inputs(exclude=[*p.exclude, "label"]) if isinstance(p, Inputs) else p for p in policy.policies
        ]
        policy = dataclasses.replace(policy, policies=policies)
    return task_.with_options(cache_policy=policy)


# ----------------------------------------------------------------------------------------------------
# One point as a flow run on a work pool (`sngp sweep --runner workpool`)
# ----------------------------------------------------------------------------------------------------

# Points dispatched at once (threads waiting for their flow runs); the pool's workers decide how many run.
MAX_DISPATCHED = 64


def point_result_path(flow_run_id: Any) -> Path:
    """Where the sweep-point flow run `flow_run_id` leaves its result for the sweep (shared cache folder)."""
    return cache_root() / "sweeps" / "points" / f"{flow_run_id}.json"


def dispatch_poll_seconds(points: int) -> float:
    """How often each waiting dispatch task polls its flow run: ~8 requests/s to the server in all."""
    return max(1.0, min(min(points, MAX_DISPATCHED) / 8, 10.0))


class FlowRunFailed(RuntimeError):
    """A point's flow run on the work pool did not complete (the message says where and why)."""


@task(
    name="dispatch-point",
    task_run_name="dispatch-{label}",
    cache_policy=NO_CACHE,  # the point flow's own task is cached; a dispatch always asks the pool
    persist_result=False,
)
def dispatch_point(
    label: str,
    method: str,
    model_config: dict,
    data_path: str,
    deployment: str,
    code_version: str = CODE_VERSION,
    poll_seconds: float = 2.0,
) -> dict:
    """Run one point as a flow run of `deployment` (the sweep-point flow) on its work pool, wait for it
    and return its result: sweep_point's dict plus `cached`, `prefect_worker`, `flow_run_id`.

    A flow run that does not complete raises FlowRunFailed (the point is FAILED, the sweep goes on);
    one whose worker or machine died is set Crashed by `sngp serve`'s automation once its heartbeats
    stop (flows.serve.crash_automation), and its message says it stopped responding.

    The flow run gets this sweep's cache folder (SNGP_CACHE_DIR, through the job's environment), so its
    worker reads the sweep's data file and shares the cache; it fails if it sees another folder."""
    from prefect.deployments import run_deployment

    from flows.serve import CRASH_AUTOMATION_NAME, UNRESPONSIVE

    flow_run = run_deployment(
        name=deployment,
        parameters={
            "label": label,
            "method": method,
            "model_settings": model_config,
            "data_path": data_path,
            "code_version": code_version,
        },
        job_variables={"env": {"SNGP_CACHE_DIR": str(cache_root())}},
        flow_run_name=label,
        timeout=None,  # wait for as long as the point takes (or waits for a free worker)
        poll_interval=poll_seconds,
    )
    state = flow_run.state
    worker = (flow_run.labels or {}).get("prefect.worker.name")
    where = f"flow run {flow_run.name!r} ({flow_run.id})" + (f" on worker {worker}" if worker else "")
    if state is not None and state.is_crashed() and CRASH_AUTOMATION_NAME in (state.message or ""):
        # Set Crashed by `sngp serve`'s automation: no heartbeat from its process for minutes.
        raise FlowRunFailed(
            f"{where} {UNRESPONSIVE} (its worker or machine died) and was marked Crashed: {state.message}"
        )
    if state is None or not state.is_completed():
        name = state.name if state is not None else "without a state"
        raise FlowRunFailed(f"{where} ended {name}: {state.message if state is not None else ''}".rstrip())
    path = point_result_path(flow_run.id)
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FlowRunFailed(
            f"{where} completed but its result {path} cannot be read ({exc}): the workers must share "
            f"the sweep's cache folder {cache_root()}"
        ) from None
    result["prefect_worker"] = result.get("prefect_worker") or worker or ""
    return {**result, "flow_run_id": str(flow_run.id)}


# ----------------------------------------------------------------------------------------------------
# The flow
# ----------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    point: Point
    status: str = "FAILED"  # FINISHED or FAILED
    metrics: dict[str, float] = field(default_factory=dict)
    cached: bool = False
    run_id: str = ""
    error: str = ""
    worker: str = ""  # host:pid of the process that ran the point
    prefect_worker: str = ""  # the work-pool worker whose flow run it was (runner workpool)


@flow(name="sweep", log_prints=True)
def sweep(spec: SweepSpec, base: PipelineConfig, deployment: str | None = None) -> dict[str, Any]:
    """A hyperparameter sweep: every point a mapped, cached train + evaluate task, recorded in MLflow.

    `deployment` (a sweep-point deployment, e.g. 'sweep-point/pool'): run each point as a flow run of
    it on its work pool instead of as a task of this flow."""
    # MLflow and the pipeline are imported here, not at module level: Dask workers import this module
    # to run sweep_point and need neither.
    import mlflow as mlf

    from flows.pipeline import generate, parent_run, relevant
    from tasks import tracking

    logger = get_run_logger()
    points = expand(spec)
    logger.info(
        "sweep: %d points (%d settings x %d seeds) of %s",
        len(points),
        len(points) // len(spec.seeds),
        len(spec.seeds),
        ", ".join(spec.methods),
    )
    tags = {"sweep.points": str(len(points)), "sweep.methods": ",".join(spec.methods)}
    with parent_run(base, "sweep", tags) as (uri, experiment_id, parent_id, started_runs):
        tracking_params(spec)
        tracking.log_text_artifact(
            yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False), "sweep.yaml"
        )

        # Build and validate every point's config first; an invalid one fails alone.
        prepared: dict[str, tuple[dict, str]] = {}
        build_errors: dict[str, str] = {}
        data_paths: dict[str, str] = {}
        for point in points:
            try:
                config = point_config(base, point)
                data_key = json.dumps(
                    [
                        config.dataset,
                        config.data.model_dump(mode="json"),
                        config.digits.model_dump(mode="json"),
                        point.seed,
                    ],
                    sort_keys=True,
                )
                if data_key not in data_paths:
                    data_paths[data_key] = generate(config, point.seed)
                prepared[point.id] = (relevant(config, point.method), data_paths[data_key])
            except Exception as exc:  # noqa: BLE001 - recorded as this point's failure
                build_errors[point.id] = f"{type(exc).__name__}: {exc}"
                logger.error("%s (%s) is invalid: %s", point.id, point.label, build_errors[point.id])

        runnable = [p for p in points if p.id in prepared]
        futures = {}
        if runnable:
            inputs = {
                "label": [f"{p.id} {p.label}" for p in runnable],
                "method": [p.method for p in runnable],
                "model_config": [prepared[p.id][0] for p in runnable],
                "data_path": [prepared[p.id][1] for p in runnable],
            }
            if deployment:
                mapped = dispatch_point.map(
                    **inputs,
                    deployment=unmapped(deployment),
                    poll_seconds=unmapped(dispatch_poll_seconds(len(runnable))),
                )
            else:
                mapped = point_task().map(**inputs)
            futures = dict(zip((p.id for p in runnable), mapped))

        outcomes = []
        for point in points:
            outcome = record_point(
                point,
                prepared.get(point.id),
                futures.get(point.id),
                build_errors.get(point.id),
                experiment_id,
                started_runs,
            )
            outcomes.append(outcome)
        failed = [o for o in outcomes if o.status != "FINISHED"]
        mlf.set_tags(
            {
                "sweep.failed_points": str(len(failed)),
                "sweep.finished_points": str(len(outcomes) - len(failed)),
            }
        )
        if failed:
            mlf.set_tag("sweep.failed_ids", ",".join(o.point.id for o in failed)[:5000])
        files = write_outputs(spec, outcomes, cache_root() / "sweeps" / parent_id)
        mlf.log_artifact(files["csv"])
        for png in files["plots"]:
            mlf.log_artifact(png, "plots")
        publish_table(spec, outcomes)
        return {
            "parent_run_id": parent_id,
            "experiment_id": experiment_id,
            "tracking_uri": uri,
            "points": [outcome_dict(o) for o in outcomes],
            "failed": len(failed),
            "csv": files["csv"],
            "plots": files["plots"],
            "summary_png": files["summary"],
        }


def tracking_params(spec: SweepSpec) -> None:
    from tasks import tracking

    params = {
        "sweep.methods": ",".join(spec.methods),
        "sweep.seeds": ",".join(str(s) for s in spec.seeds),
        "sweep.metrics": ",".join(spec.metrics),
        "sweep.base_config": spec.base.base_config or "conf/default.yaml",
        **{f"sweep.grid.{k}": ",".join(_fmt(v) for v in values) for k, values in spec.grid.items()},
        **{f"sweep.base.{k}": v for k, v in spec.base.overrides.items()},
    }
    if spec.random is not None:
        params.update({"sweep.random.n": spec.random.n, "sweep.random.seed": spec.random.seed})
    tracking.log_params(params)


def point_config(base: PipelineConfig, point: Point) -> PipelineConfig:
    """The base config with the point's settings, seed and method, validated like any pipeline config."""
    raw = copy.deepcopy(base.model_dump(mode="json"))
    raw["seed"] = point.seed
    raw["methods"] = [point.method]
    for key, value in point.settings.items():
        node = raw
        *sections, leaf = key.split(".")
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    return validate_config(raw)


def record_point(point, prepared, future, build_error, experiment_id, started_runs) -> Outcome:
    """One nested MLflow run for the point, from its task's final state (waits for it)."""
    import mlflow as mlf

    from tasks import tracking

    logger = get_run_logger()
    outcome = Outcome(point)
    child = mlf.start_run(
        experiment_id=experiment_id,
        run_name=point.label,
        nested=True,
        tags={"method": point.method, "sweep.point": point.id, "sweep.label": point.label},
    )
    started_runs.append(child.info.run_id)
    outcome.run_id = child.info.run_id
    try:
        params = {"method": point.method, "seed": point.seed}
        params.update({f"sweep.{k}": _fmt(v) for k, v in point.settings.items()})
        if prepared is not None:
            params.update(prepared[0])
        tracking.log_params(params)
        if build_error is not None:
            raise PointFailed(build_error)
        future.wait()
        state = future.state
        if not state.is_completed():
            error = future.result(raise_on_failure=False)
            text = (
                f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(state.message)
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
        mlf.set_tags(tags)
        tracking.log_curves(result["history"])
        mlf.log_metrics(result["metrics"])
        mlf.end_run("FINISHED")
        outcome.status = "FINISHED"
    except Exception as exc:  # noqa: BLE001 - the point is FAILED, the sweep goes on
        outcome.error = str(exc) if isinstance(exc, PointFailed) else f"{type(exc).__name__}: {exc}"
        mlf.set_tag("error", outcome.error[:5000])
        mlf.end_run("FAILED")
        logger.error("%s (%s) FAILED: %s", point.id, point.label, outcome.error)
    return outcome


class PointFailed(Exception):
    """Why a point failed (already a readable message)."""


def outcome_dict(o: Outcome) -> dict[str, Any]:
    return {
        "id": o.point.id,
        "method": o.point.method,
        "settings": o.point.settings,
        "seed": o.point.seed,
        "label": o.point.label,
        "status": o.status,
        "cached": o.cached,
        "metrics": o.metrics,
        "run_id": o.run_id,
        "error": o.error,
        "worker": o.worker,
        "prefect_worker": o.prefect_worker,
    }


# ----------------------------------------------------------------------------------------------------
# Summary: table, plots, Prefect artifact
# ----------------------------------------------------------------------------------------------------


def results_csv(spec: SweepSpec, outcomes: list[Outcome]) -> str:
    metric_names = [m for m in KNOWN_METRICS if any(m in o.metrics for o in outcomes)]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        ["point", "method", *spec.grid, "seed", "status", "cached", *metric_names, "mlflow_run_id", "error"]
    )
    for o in outcomes:
        settings = [_fmt(o.point.settings[k]) if k in o.point.settings else "" for k in spec.grid]
        values = [repr(o.metrics[m]) if m in o.metrics else "" for m in metric_names]
        writer.writerow(
            [
                o.point.id,
                o.point.method,
                *settings,
                o.point.seed,
                o.status,
                str(o.cached).lower(),
                *values,
                o.run_id,
                o.error,
            ]
        )
    return out.getvalue()


def aggregate(spec: SweepSpec, outcomes: list[Outcome]) -> list[dict[str, Any]]:
    """Mean, std, min, max over seeds for each (method, settings) with at least one finished point."""
    groups: dict[str, list[Outcome]] = {}
    for o in outcomes:
        key = json.dumps([o.point.method, o.point.settings], sort_keys=True, default=str)
        groups.setdefault(key, []).append(o)
    rows = []
    for members in groups.values():
        done = [o for o in members if o.status == "FINISHED"]
        stats = {}
        for metric in spec.metrics:
            values = [o.metrics[metric] for o in done if metric in o.metrics]
            if values:
                mean = sum(values) / len(values)
                std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
                stats[metric] = {"mean": mean, "std": std, "min": min(values), "max": max(values)}
        rows.append(
            {
                "method": members[0].point.method,
                "settings": members[0].point.settings,
                "seeds": len(done),
                "failed": len(members) - len(done),
                "stats": stats,
            }
        )
    return rows


def _draw(ax, spec: SweepSpec, outcomes: list[Outcome], key: str, metric: str) -> None:
    values = spec.grid[key]
    x = list(range(len(values)))
    for method in spec.methods:
        if not affects(key, method):
            continue
        means, stds, lows, highs = [], [], [], []
        for value in values:
            got = [
                o.metrics[metric]
                for o in outcomes
                if o.status == "FINISHED"
                and o.point.method == method
                and metric in o.metrics
                and json.dumps(o.point.settings.get(key)) == json.dumps(value)
            ]
            if got:
                mean = sum(got) / len(got)
                means.append(mean)
                stds.append(math.sqrt(sum((g - mean) ** 2 for g in got) / len(got)))
                lows.append(min(got))
                highs.append(max(got))
            else:
                means.append(math.nan)
                stds.append(0.0)
                lows.append(math.nan)
                highs.append(math.nan)
        line = ax.errorbar(x, means, yerr=stds, marker="o", capsize=4, label=f"{method} (mean ± std)")
        ax.fill_between(x, lows, highs, alpha=0.2, color=line[0].get_color(), label=f"{method} (min–max)")
    ax.set_xticks(x, [_fmt(v) for v in values])
    ax.set_xlabel(key)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)


def _spread_note(spec: SweepSpec) -> str:
    seeds = f"{len(spec.seeds)} seed{'s' if len(spec.seeds) > 1 else ''}"
    return f"over {seeds}" if len(spec.grid) == 1 else f"over {seeds} and the other settings"


def write_outputs(spec: SweepSpec, outcomes: list[Outcome], folder: Path) -> dict[str, Any]:
    """sweep_results.csv, plots/sweep_<metric>.png (one panel per swept key) and sweep_summary.png."""
    from matplotlib.figure import Figure  # no pyplot: no global state, safe beside other threads

    folder.mkdir(parents=True, exist_ok=True)
    csv_path = write_atomic(
        folder / "sweep_results.csv", lambda tmp: tmp.write_text(results_csv(spec, outcomes))
    )
    keys = list(spec.grid)
    note = _spread_note(spec)
    plots = []
    for metric in spec.metrics:
        fig = Figure(figsize=(4.8 * len(keys), 3.8), layout="constrained")
        axes = fig.subplots(1, len(keys), squeeze=False)[0]
        for ax, key in zip(axes, keys):
            _draw(ax, spec, outcomes, key, metric)
        axes[0].legend(fontsize="small")
        fig.suptitle(f"{metric} against each swept setting ({note})")
        plots.append(_save(fig, folder / f"sweep_{metric}.png"))
    panels = [(metric, key) for metric in spec.metrics for key in keys]
    ncols = len(keys) if len(keys) > 1 else min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.4 * ncols, 3.3 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (metric, key) in zip(axes, panels):
        _draw(ax, spec, outcomes, key, metric)
        ax.set_title(metric)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    axes[0].legend(fontsize="small")
    fig.suptitle(f"Sweep of {', '.join(spec.methods)}\nmean ± std (bars) and min–max (band) {note}")
    summary = _save(fig, folder / "sweep_summary.png")
    plots.append(summary)
    return {"csv": str(csv_path), "plots": plots, "summary": summary}


def _save(fig, path: Path) -> str:
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return str(path)


def publish_table(spec: SweepSpec, outcomes: list[Outcome]) -> None:
    rows = []
    for o in outcomes:
        row = {
            "point": o.point.id,
            "method": o.point.method,
            "setting": o.point.label,
            "seed": o.point.seed,
            "status": o.status,
            "cached": o.cached,
        }
        row.update({m: round(o.metrics[m], 4) if m in o.metrics else None for m in spec.metrics})
        row.update({"mlflow_run": o.run_id, "error": o.error[:200]})
        rows.append(row)
    create_table_artifact(rows, key="sweep-results", description="Sweep points: settings, status, metrics")


# ----------------------------------------------------------------------------------------------------
# Running the flow on a task runner
# ----------------------------------------------------------------------------------------------------


@contextmanager
def prefect_api():
    """One Prefect API for the flow and every task run, also those in other processes.

    In Prefect's local mode every process starts its own temporary server on first use, and a Dask
    worker process that does so leaves it orphaned when the cluster stops. So when no PREFECT_API_URL
    is set, start the one temporary server here (with a start-up timeout that survives a busy
    machine) and point this process's settings at it; the task runner passes those settings to every
    task run on every worker.
    """
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    if PREFECT_API_URL.value():
        yield PREFECT_API_URL.value()
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    # A fresh database migrates on first start; on a busy machine that can exceed Prefect's 20 s default.
    try:
        server.start(timeout=max(180, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()))
    except Exception:
        if server.server_process is not None and server.server_process.poll() is None:
            server.server_process.kill()  # never leave a half-started server behind
        raise
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            try:
                yield server.api_url
            finally:  # deliver the last logs and events while the server is still up
                from prefect.events.worker import EventsWorker
                from prefect.logging.handlers import APILogWorker

                APILogWorker.drain_all(timeout=10)
                EventsWorker.drain_all(timeout=10)
    finally:
        server.stop()


def run_sweep(spec: SweepSpec, base: PipelineConfig, task_runner=None, deployment: str | None = None):
    """Run the sweep flow on `task_runner` (default: the flow's own), its points as flow runs of
    `deployment` if given -> (final state, wall seconds)."""
    os.environ["SNGP_CACHE_DIR"] = str(cache_root())  # absolute, inherited by local worker processes
    flow_ = sweep.with_options(task_runner=task_runner) if task_runner is not None else sweep
    started = time.perf_counter()
    with prefect_api():
        state = flow_(spec=spec, base=base, deployment=deployment, return_state=True)
    return state, time.perf_counter() - started
