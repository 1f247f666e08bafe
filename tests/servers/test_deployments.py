"""Deployments on real servers: `sngp serve` + `make deploy` + `prefect deployment run`, and retraining.

Everything a user would do after `make serve`, on free loopback ports and temporary directories:
register the deployments of prefect.yaml (the work pool already exists: `sngp serve` created it), run
the smoke deployment and let the served process worker execute it, then read the record back from the
MLflow server over its REST API. `sngp retrain` promotes or rejects registry versions against the
served stack, a restart on the same data directory keeps everything, and the same end-to-end run works
with both servers on PostgreSQL. Nothing is mocked.

Tests 1-3 share one served stack (module fixture) to stay within a few minutes on a small machine.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import sys
import time
import urllib.parse
from datetime import UTC, datetime
from pathlib import Path

import pytest
from support.cli import PNG_MAGIC, SMOKE, SNGP, clean_server_env, describe
from support.net import http_bytes, http_json, port_free
from support.pgcluster import pg_cluster_or_skip
from support.stack import ServeProcess

ROOT = Path(__file__).resolve().parents[2]
PREFECT = SNGP.parent / "prefect"
METHODS = ("deterministic", "sngp", "mc_dropout", "deep_ensemble")
METRICS = (
    "train_accuracy", "test_accuracy", "nll", "brier", "ece", "ood_mean_max_prob", "ood_auroc", "ood_aupr",
    "ood_fpr95", "grid_mean_uncertainty", "train_seconds", "inference_seconds",
)  # fmt: skip
POOL = "sngp-pool"
DEPLOYMENTS = (
    "uncertainty-pipeline/default",
    "uncertainty-pipeline/smoke",
    "retrain/nightly",
    "retrain/nightly-retry",
    "sweep-point/pool",
    "monitor/every-15-minutes",
)
REGISTERED = "sngp-uncertainty-sngp"  # <retrain.registry_prefix>-<method>
START_TIMEOUT = 300.0


# --------------------------------------------------------------------------------------------------
# The served stack


def served(root: Path, cache_dir: Path, *args: str) -> ServeProcess:
    """`sngp serve --data-dir ROOT/data ... ARGS` (not started yet), run from ROOT/worker-cwd, the test's
    client commands from ROOT/client. The worker gets SNGP_CACHE_DIR and 2 s polling through serve's
    environment (serve passes its environment on to the worker)."""
    return ServeProcess(
        root / "data",
        *args,
        env=clean_server_env(SNGP_CACHE_DIR=str(cache_dir), PREFECT_WORKER_QUERY_SECONDS="2"),
        cwd=root / "worker-cwd",
        timeout=START_TIMEOUT,
        client_dir=root / "client",
        cache_dir=cache_dir,
    )


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """The worker's task cache (SNGP_CACHE_DIR), shared by every stack in this module."""
    return tmp_path_factory.mktemp("sngp-cache")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, cache_dir):
    """One `sngp serve` on SQLite for tests 1-3 (test 3 restarts it)."""
    serve = served(tmp_path_factory.mktemp("served"), cache_dir)
    seconds = serve.start()
    print(f"\n[deployments] sngp serve up in {seconds:.1f} s")
    yield serve
    serve.cleanup()


# --------------------------------------------------------------------------------------------------
# REST


def _mlflow(base: str, endpoint: str, body: dict | None = None, **query: str):
    """MLflow's REST API: GET with `query` or POST `body` to /api/2.0/mlflow/<endpoint>."""
    url = f"{base}/api/2.0/mlflow/{endpoint}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    return http_json(url, body)


def _kv(items: list[dict] | None) -> dict[str, str]:
    return {item["key"]: item["value"] for item in items or []}


def _search_runs(base: str, experiment_ids: list[str], filter_string: str = "") -> list[dict]:
    runs, token = [], None
    while True:
        body = {"experiment_ids": experiment_ids, "filter": filter_string, "max_results": 1000}
        if token:
            body["page_token"] = token
        page = _mlflow(base, "runs/search", body)
        runs += page.get("runs", [])
        token = page.get("next_page_token")
        if not token:
            return runs


def _artifact_files(base: str, run_id: str, path: str) -> dict[str, int]:
    listing = _mlflow(base, "artifacts/list", run_id=run_id, path=path)
    return {f["path"]: f.get("file_size", 0) for f in listing.get("files", []) if not f["is_dir"]}


def _proxied_location(artifact_uri: str) -> str:
    """The path of an `mlflow-artifacts:/...` URI: stored by the server (proxied), not in a local folder."""
    assert artifact_uri.startswith("mlflow-artifacts:/"), artifact_uri
    return artifact_uri.removeprefix("mlflow-artifacts:/").strip("/")


def _proxied(base: str, artifact_uri: str, path: str) -> str:
    """URL to download one file from the server's artifact store."""
    return f"{base}/api/2.0/mlflow-artifacts/artifacts/{_proxied_location(artifact_uri)}/{path}"


def _proxied_listing(base: str, artifact_uri: str) -> set[str]:
    query = urllib.parse.urlencode({"path": _proxied_location(artifact_uri)})
    return {
        f["path"] for f in http_json(f"{base}/api/2.0/mlflow-artifacts/artifacts?{query}").get("files", [])
    }


def _download_png(base: str, run: dict, path: str) -> bytes:
    content = http_bytes(_proxied(base, run["info"]["artifact_uri"], path))
    name = run["info"]["run_name"]
    assert content.startswith(PNG_MAGIC) and len(content) > 1000, (name, path, len(content))
    return content


def check_pipeline_record(base: str, flow_run_id: str, experiment: str = "sngp-smoke") -> dict[str, dict]:
    """The complete MLflow record of one pipeline flow run, read over REST: {'parent': run, method: run}."""
    experiment_id = _mlflow(base, "experiments/get-by-name", experiment_name=experiment)["experiment"][
        "experiment_id"
    ]
    parents = _search_runs(base, [experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    assert len(parents) == 1, f"runs tagged with flow run {flow_run_id}: {parents}"
    parent = parents[0]
    parent_id = parent["info"]["run_id"]
    assert parent["info"]["status"] == "FINISHED", parent["info"]
    assert "mlflow.parentRunId" not in _kv(parent["data"].get("tags"))
    params = _kv(parent["data"].get("params"))
    assert params["training.epochs"] == "10" and params["mlflow.experiment"] == experiment, params
    parent_files = _artifact_files(base, parent_id, "")
    assert "config.yaml" in parent_files, parent_files
    assert "plots/comparison.png" in _artifact_files(base, parent_id, "plots")
    _download_png(base, parent, "plots/comparison.png")

    children = _search_runs(base, [experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    by_method = {run["info"]["run_name"]: run for run in children}
    assert sorted(by_method) == sorted(METHODS), f"child runs: {sorted(by_method)}"
    for method, run in by_method.items():
        run_id = run["info"]["run_id"]
        assert run["info"]["status"] == "FINISHED", (method, run["info"])
        metrics = {m["key"]: m["value"] for m in run["data"].get("metrics", [])}
        missing = set(METRICS) - set(metrics)
        assert not missing, f"{method}: missing metrics {sorted(missing)}"
        assert all(math.isfinite(float(metrics[name])) for name in METRICS), (method, metrics)
        assert 0.5 < float(metrics["test_accuracy"]) <= 1.0, (method, metrics["test_accuracy"])
        history = _mlflow(base, "metrics/get-history", run_id=run_id, metric_key="loss")["metrics"]
        assert sorted(m["step"] for m in history) == list(range(10)), (method, history)
        plots = _artifact_files(base, run_id, "plots")
        for png in ("plots/class_probability.png", "plots/uncertainty.png"):
            assert png in plots, (method, plots)
            _download_png(base, run, png)
        # The pyfunc model: a logged model of this run, stored on the server, with its MLmodel file.
        outputs = [o["model_id"] for o in run.get("outputs", {}).get("model_outputs", [])]
        models = _mlflow(
            base,
            "logged-models/search",
            {"experiment_ids": [experiment_id], "filter": f"source_run_id = '{run_id}'"},
        ).get("models", [])
        assert len(models) == 1 and [m["info"]["model_id"] for m in models] == outputs, (method, models)
        info = models[0]["info"]
        assert info["name"] == "model" and info["status"] == "LOGGED_MODEL_READY", (method, info)
        listing = _proxied_listing(base, info["artifact_uri"])
        assert "MLmodel" in listing, (method, listing)
    return {"parent": parent, **by_method}


def _stray_runs(db: Path, flow_run_id: str) -> list[str]:
    """Runs of this flow run recorded in a local MLflow SQLite store (there must be none)."""
    if not db.exists():
        return []
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute(
            "SELECT run_uuid FROM tags WHERE key = 'prefect.flow_run_id' AND value = ?", (flow_run_id,)
        ).fetchall()
    return [row[0] for row in rows]


# --------------------------------------------------------------------------------------------------
# Deploy and run


def _far_cron() -> str:
    """A daily cron 12 hours away, so the nightly retrain never fires while the tests run."""
    return f"17 {(datetime.now(UTC).hour + 12) % 24} * * *"


def deploy(stack: ServeProcess, cron: str):
    proc = stack.run(
        ["make", "-C", ROOT, "deploy"], stack.client_env(mlflow=False, SNGP_RETRAIN_CRON=cron), timeout=600
    )
    assert proc.returncode == 0, describe(proc)
    for name in DEPLOYMENTS:
        assert f"Deployment '{name}' successfully" in proc.stdout, describe(proc)
    return proc


def run_smoke_deployment(stack: ServeProcess):
    """`prefect deployment run 'uncertainty-pipeline/smoke' --watch`; the served worker executes it.
    The client has no MLFLOW_TRACKING_URI: the worker's environment decides where the record goes."""
    repo_store = ROOT / "mlflow.db"
    existed = repo_store.exists()
    proc = stack.run(
        [PREFECT, "deployment", "run", "uncertainty-pipeline/smoke", "--watch"],
        stack.client_env(mlflow=False),
    )
    assert proc.returncode == 0, describe(proc) + "\n--- worker log ---\n" + _worker_log(stack)
    match = re.search(r"UUID: ([0-9a-f-]{36})", proc.stdout)
    assert match, describe(proc)
    proc.flow_run_id = match.group(1)
    proc.repo_store_existed = existed
    return proc


def _worker_log(stack: ServeProcess) -> str:
    try:
        return (stack.data_dir / "logs" / "worker.log").read_text(errors="replace")[-6000:]
    except OSError:
        return "(no worker log)"


def _assert_recorded_on_server_only(stack: ServeProcess, smoke) -> None:
    """The flow run wrote to the MLflow server: no mlflow.db in the worker's cwd, none of its runs in
    the repo's (a developer's own `sngp run` may have created one there meanwhile)."""
    assert not (stack.cwd / "mlflow.db").exists()
    assert not (stack.client_dir / "mlflow.db").exists()
    repo_store = ROOT / "mlflow.db"
    if repo_store.exists() and not smoke.repo_store_existed:
        print(f"[deployments] note: {repo_store} appeared during the run (checking it holds none of ours)")
    assert _stray_runs(repo_store, smoke.flow_run_id) == [], f"the flow run wrote to {repo_store}"


def _flow_run(stack: ServeProcess, flow_run_id: str) -> dict:
    return http_json(f"{stack.prefect_api}/flow_runs/{flow_run_id}")


def _deployment(stack: ServeProcess, name: str) -> dict:
    return http_json(f"{stack.prefect_api}/deployments/name/{name}")


@pytest.fixture(scope="module")
def deployed(stack):
    cron = _far_cron()
    assert http_json(f"{stack.prefect_api}/work_pools/{POOL}")["type"] == "process"  # serve already made it
    proc = deploy(stack, cron)
    print(f"[deployments] make deploy (work pool already there): {proc.seconds:.1f} s")
    return cron


@pytest.fixture(scope="module")
def smoke_run(stack, deployed):
    proc = run_smoke_deployment(stack)
    print(f"[deployments] smoke deployment run --watch: {proc.seconds:.1f} s (flow run {proc.flow_run_id})")
    return proc


RETRAINS = (("first", None), ("worse", 1), ("better", 30))  # training.epochs (None: smoke's 10)


@pytest.fixture(scope="module")
def retrained(stack):
    """`sngp retrain` three times against the served stack; the registry state after each."""
    results = []
    for label, epochs in RETRAINS:
        argv = [
            SNGP, "retrain", "--config", SMOKE, "--set", "methods=[sngp]", "--set", "retrain.data_seed=1",
            "--tracking-uri", stack.mlflow_url,
        ]  # fmt: skip
        if epochs is not None:
            argv += ["--set", f"training.epochs={epochs}"]
        proc = stack.run(argv, stack.client_env(mlflow=False))
        assert proc.returncode == 0, describe(proc)
        champion = _mlflow(stack.mlflow_url, "registered-models/alias", name=REGISTERED, alias="champion")
        versions = _mlflow(
            stack.mlflow_url, "model-versions/search", filter=f"name = '{REGISTERED}'", max_results="100"
        )["model_versions"]
        latest = max(versions, key=lambda v: int(v["version"]))
        results.append(
            {
                "label": label,
                "proc": proc,
                "champion": champion["model_version"]["version"],
                "version": latest["version"],
                "tags": _kv(latest.get("tags")),
                "source": latest["source"],
            }
        )
        print(f"[deployments] sngp retrain ({label}): {proc.seconds:.1f} s -> {proc.stdout.strip()[-160:]}")
    return results


# --------------------------------------------------------------------------------------------------
# 1. End to end: serve, deploy, run the smoke deployment, read the record over REST


def test_smoke_deployment_runs_on_the_worker_and_records_to_the_mlflow_server(stack, deployed, smoke_run):
    flow_run = _flow_run(stack, smoke_run.flow_run_id)
    assert flow_run["state"]["type"] == "COMPLETED", flow_run["state"]
    assert flow_run["work_pool_name"] == POOL
    assert flow_run["deployment_id"] == _deployment(stack, "uncertainty-pipeline/smoke")["id"]
    assert flow_run["parameters"]["training"]["epochs"] == 10

    started = time.monotonic()
    record = check_pipeline_record(stack.mlflow_url, smoke_run.flow_run_id)
    assert record["parent"]["info"]["run_name"].startswith("pipeline-")
    # The artefacts live in the server's artifact store, not in any client's folder.
    stored = {p.name for p in (stack.data_dir / "mlflow" / "artifacts").rglob("*.png")}
    assert {"comparison.png", "class_probability.png", "uncertainty.png"} <= stored
    _assert_recorded_on_server_only(stack, smoke_run)
    # SNGP_CACHE_DIR reached the flow run through serve and the worker (its cwd is the repo).
    assert any((stack.cache_dir / "models").iterdir())
    print(f"[deployments] MLflow record checked over REST in {time.monotonic() - started:.1f} s")


def test_nightly_deployment_has_the_cron_schedule(stack, deployed):
    proc = stack.run([PREFECT, "deployment", "inspect", "retrain/nightly"])
    assert proc.returncode == 0, describe(proc)
    assert f"'cron': '{deployed}'" in proc.stdout and "'timezone': 'UTC'" in proc.stdout, proc.stdout
    nightly = _deployment(stack, "retrain/nightly")
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == [deployed]
    assert all(s["active"] for s in nightly["schedules"]) and not nightly["paused"]
    assert nightly["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}
    ]
    for name in DEPLOYMENTS:
        assert _deployment(stack, name)["work_pool_name"] == POOL
    assert _deployment(stack, "uncertainty-pipeline/default")["parameters"] == {}


# --------------------------------------------------------------------------------------------------
# 2. Retraining: first champion, a worse candidate rejected, a better one promoted


def test_retrain_promotes_only_candidates_that_are_not_worse(stack, retrained, tmp_path):
    first, worse, better = retrained
    assert f"{REGISTERED} v1: PROMOTED to champion" in first["proc"].stdout, describe(first["proc"])
    assert (first["version"], first["champion"]) == ("1", "1")
    assert "promoted" in first["tags"] and "rejected" not in first["tags"]

    assert (worse["version"], worse["champion"]) == ("2", "1"), "a worse candidate must not be promoted"
    reason = worse["tags"].get("rejected", "")
    assert "accuracy" in reason or "ood_auroc" in reason, worse["tags"]
    assert "promoted" not in worse["tags"]
    assert f"{REGISTERED} v2: rejected" in worse["proc"].stdout

    assert (better["version"], better["champion"]) == ("3", "3"), better["tags"]
    assert "promoted" in better["tags"] and "rejected" not in better["tags"]
    assert f"{REGISTERED} v3: PROMOTED to champion" in better["proc"].stdout

    # The three flow runs are on the Prefect server (the nightly deployment's own runs are SCHEDULED).
    adhoc = {"flows": {"name": {"any_": ["retrain"]}}, "flow_runs": {"deployment_id": {"is_null_": True}}}
    runs = http_json(f"{stack.prefect_api}/flow_runs/filter", adhoc)
    assert sorted(r["state"]["type"] for r in runs) == ["COMPLETED"] * 3
    assert not (stack.client_dir / "mlflow.db").exists()  # --tracking-uri was used, not a local store

    # The champion loads as a pyfunc in a fresh process, and it is version 3.
    script = (
        "import json, mlflow.pyfunc, pandas as pd\n"
        f"model = mlflow.pyfunc.load_model('models:/{REGISTERED}@champion')\n"
        "out = model.predict(pd.DataFrame({'x0': [0.0, 2.5], 'x1': [0.5, -1.75]}))\n"
        "print('RESULT', json.dumps({'model_id': model.metadata.model_id, 'columns': list(out.columns),"
        " 'rows': out.to_numpy().tolist()}))\n"
    )
    proc = stack.run([sys.executable, "-c", script], cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, describe(proc)
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result["columns"] == ["predicted", "prob_0", "prob_1", "uncertainty", "abstain"]
    assert better["source"] == f"models:/{result['model_id']}"
    for predicted, p0, p1, uncertainty, abstain in result["rows"]:
        assert abs(p0 + p1 - 1) < 1e-5 and 0 <= uncertainty <= 0.5 and isinstance(abstain, bool)
        assert predicted == ("0" if p0 >= p1 else "1")  # the class name of the larger probability
    print(f"[deployments] champion loaded and predicted in a fresh process: {proc.seconds:.1f} s")


# --------------------------------------------------------------------------------------------------
# 3. Restart on the same data directory keeps everything


def _snapshot(stack: ServeProcess) -> dict:
    base = stack.mlflow_url
    experiments = _mlflow(base, "experiments/search", {"max_results": 1000})["experiments"]
    runs = _search_runs(base, [e["experiment_id"] for e in experiments])
    models = {}
    for model in _mlflow(base, "registered-models/search", max_results="1000").get("registered_models", []):
        versions = _mlflow(
            base, "model-versions/search", filter=f"name = '{model['name']}'", max_results="1000"
        )["model_versions"]
        models[model["name"]] = {
            "aliases": {a["alias"]: a["version"] for a in model.get("aliases", [])},
            "versions": sorted((v["version"], v["status"], json.dumps(_kv(v.get("tags")))) for v in versions),
        }
    deployments = []
    for d in http_json(f"{stack.prefect_api}/deployments/filter", {}):
        flow = http_json(f"{stack.prefect_api}/flows/{d['flow_id']}")["name"]
        crons = [s["schedule"].get("cron") for s in d["schedules"]]
        deployments.append((f"{flow}/{d['name']}", d["id"], d["work_pool_name"], json.dumps(crons)))
    pool = http_json(f"{stack.prefect_api}/work_pools/{POOL}")
    return {
        "experiments": sorted(e["name"] for e in experiments),
        "runs": sorted((r["info"]["run_id"], r["info"]["status"]) for r in runs),
        "models": models,
        "deployments": sorted(deployments),
        "pool": (pool["id"], pool["type"]),
    }


def test_restart_on_the_same_data_dir_keeps_runs_models_deployments_and_pool(
    stack, deployed, smoke_run, retrained
):
    before = _snapshot(stack)
    assert {"sngp-smoke"} <= set(before["experiments"])
    assert before["models"][REGISTERED]["aliases"] == {"champion": "3"}
    assert [name for name, *_ in before["deployments"]] == sorted(DEPLOYMENTS)
    assert len(before["runs"]) >= 5 + 3 * 2  # smoke parent + 4 children, 3 retrains x (parent + sngp)

    code, stop_seconds = stack.stop()
    assert code == 0, stack.output
    assert port_free(stack.prefect_port) and port_free(stack.mlflow_port)
    start_seconds = stack.start()

    after = _snapshot(stack)
    assert after == before
    workers = http_json(f"{stack.prefect_api}/work_pools/{POOL}/workers/filter", {})
    assert [w["status"] for w in workers if w["name"] == "sngp-serve-worker"] == ["ONLINE"]
    check_pipeline_record(stack.mlflow_url, smoke_run.flow_run_id)  # artefacts still served
    print(f"[deployments] stop {stop_seconds:.1f} s, restart {start_seconds:.1f} s: everything still there")
    code, _ = stack.stop()  # free the machine for the PostgreSQL test
    assert code == 0, stack.output


# --------------------------------------------------------------------------------------------------
# 4. The same end to end run with both servers on PostgreSQL


def test_smoke_deployment_end_to_end_on_postgresql(tmp_path, cache_dir):
    with pg_cluster_or_skip() as pg:
        mlflow_db, prefect_db = pg.create_database("mlflow"), pg.create_database("prefect")
        stack = served(tmp_path, cache_dir, "--db", mlflow_db, "--prefect-db", prefect_db)
        try:
            seconds = stack.start()
            assert f"MLflow store: postgresql://sngp:***@127.0.0.1:{pg.port}/mlflow" in stack.output
            assert f"Prefect DB:   postgresql://sngp:***@127.0.0.1:{pg.port}/prefect" in stack.output
            proc = deploy(stack, _far_cron())
            smoke = run_smoke_deployment(stack)
            record = check_pipeline_record(stack.mlflow_url, smoke.flow_run_id)
            _assert_recorded_on_server_only(stack, smoke)
            assert _flow_run(stack, smoke.flow_run_id)["state"]["type"] == "COMPLETED"

            import psycopg2

            parent_id = record["parent"]["info"]["run_id"]
            with psycopg2.connect(mlflow_db) as conn, conn.cursor() as cur:
                cur.execute("SELECT status FROM runs WHERE run_uuid = %s", (parent_id,))
                assert cur.fetchall() == [("FINISHED",)]
            with psycopg2.connect(prefect_db) as conn, conn.cursor() as cur:
                cur.execute("SELECT state_type FROM flow_run WHERE id = %s", (smoke.flow_run_id,))
                assert [str(row[0]).split(".")[-1] for row in cur.fetchall()] == ["COMPLETED"]
            assert not list(stack.data_dir.rglob("*.db"))  # no SQLite anywhere
            logs = "".join(p.read_text(errors="replace") for p in (stack.data_dir / "logs").glob("*.log"))
            assert pg.password not in logs and pg.password not in stack.output
            print(
                f"[deployments] PostgreSQL stack up {seconds:.1f} s, deploy {proc.seconds:.1f} s, "
                f"smoke run {smoke.seconds:.1f} s"
            )
        finally:
            code, _ = stack.stop()
        assert code == 0, stack.output
