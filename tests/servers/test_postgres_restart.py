"""The PostgreSQL server behind `sngp serve --db ... --prefect-db ...` restarts (issue 16, item 4): both
servers reconnect on their own, without a restart of theirs or of serve, and the next `sngp run` completes
with a complete record. Real PostgreSQL (a throwaway cluster, tests/support/pgcluster.py), real servers;
nothing is mocked. `pytest -s` prints the figures: how long the database was away, how long until each
server answered a request again, the run's duration against one before the restart.
"""

from __future__ import annotations

import time
import urllib.error

import pytest
from support.cli import SMOKE, SngpProcess
from support.net import http_json
from support.pgcluster import pg_cluster_or_skip
from support.records import client, prefect_completed
from support.stack import ServeProcess

SMOKE_ONE = ["run", "--config", str(SMOKE), "--set", "methods=[deterministic]"]


@pytest.fixture
def cluster():
    with pg_cluster_or_skip() as pg:
        yield pg


def _run(serve: ServeProcess, tag: str) -> tuple[SngpProcess, str]:
    """`sngp run` (smoke, deterministic only) against the stack to a complete record -> (it, its flow run)."""
    proc = serve.start_sngp(SMOKE_ONE, tag)
    parent = serve.completed(proc, ["deterministic"])
    return proc, client(serve.mlflow_url).get_run(parent).data.tags["prefect.flow_run_id"]


def _first_answer(url: str, body: dict, timeout: float = 120) -> tuple[float, list[str]]:
    """Seconds until POST `url` answers 200, and every error answer before that (a client without
    retries: what the first request after the restart gets)."""
    started, errors = time.monotonic(), []
    while True:
        try:
            http_json(url, body, timeout=30)
            return time.monotonic() - started, errors
        except urllib.error.HTTPError as exc:
            errors.append(f"HTTP {exc.code}: {exc.read()[:300]!r}")
        except OSError as exc:
            errors.append(str(exc))
        if time.monotonic() - started > timeout:
            pytest.fail(f"{url} did not answer within {timeout:.0f} s: {errors[-3:]}")
        time.sleep(0.5)


def test_postgres_restart_under_serve_then_a_run_completes(tmp_path, cluster):
    mlflow_db, prefect_db = cluster.create_database("mlflow"), cluster.create_database("prefect")
    serve = ServeProcess(
        tmp_path / "stack", "--db", mlflow_db, "--prefect-db", prefect_db, "--no-worker", cwd=tmp_path / "cwd"
    )
    serve.start()
    try:
        before, _ = _run(serve, "run-before")  # both servers now hold pooled connections to the database
        after = len(serve.lines)
        away = cluster.restart(down=2)  # fast shutdown: every server connection is cut
        mlflow_seconds, mlflow_errors = _first_answer(
            f"{serve.mlflow_url}/api/2.0/mlflow/experiments/search", {"max_results": 10}
        )
        prefect_seconds, prefect_errors = _first_answer(f"{serve.prefect_api}/flow_runs/filter", {"limit": 5})
        # The servers reconnect on their own: their first requests after the restart are answered.
        assert not mlflow_errors and not prefect_errors, (mlflow_errors, prefect_errors)
        run, flow_run_id = _run(serve, "run-after")
        # Prefect recorded it whole: the flow run and every task run COMPLETED (its event and task-run
        # services write through the same reconnected database).
        prefect_completed(serve.prefect_api, flow_run_id)
        assert serve.running, serve.output
        restarts = [
            line for line in serve.lines[after:] if "exited with code" in line or "restarting" in line
        ]
        assert not restarts, serve.output
    finally:
        serve.cleanup()
    print(
        f"\nPostgreSQL restarted under sngp serve (away {away:.1f} s): MLflow answered {mlflow_seconds:.1f} "
        f"s and Prefect {prefect_seconds:.1f} s later without an error; no server restarted; the next run "
        f"took {run.seconds:.1f} s (before the restart: {before.seconds:.1f} s), record complete"
    )
