"""`sngp serve-model` on a real model, with a real HTTP client: MLflow's scoring server, started from
`.venv/bin/sngp` with a PATH that does not hold the venv (no activated venv), answering DataFrames as
JSON (`dataframe_split`, `dataframe_records`) and CSV with the model contract's columns; in-distribution
rows mostly accepted, the two moons' OOD cluster abstained by SNGP; the `abstain_threshold` param;
every bad payload a 4xx naming the problem, never a traceback; bad usage one line, exit 2.

The model: `sngp run` on conf/smoke.yaml (SNGP only, seconds) into a SQLite store of the test's own.
"""

from __future__ import annotations

import json
import socket
import subprocess
import urllib.error
import urllib.request

import numpy as np
import pandas as pd
import pytest
from support.cli import SMOKE, SNGP, clean_server_env, describe, run_sngp, sngp_env
from support.net import free_port
from support.records import MlflowReader, sqlite_uri

from sngp_models.data import OOD_MEAN, make_ood, make_two_moons

FEATURES = ["x0", "x1"]
OUTPUTS = ["predicted", "prob_0", "prob_1", "uncertainty", "abstain"]
ONE_ROW = {"dataframe_split": {"columns": FEATURES, "data": [[0.5, 0.2]]}}
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def no_venv_env(workdir, **extra: str) -> dict[str, str]:
    """The test's environment with the venv's bin directory off PATH: `sngp` run by its full path, as
    from a shell where the venv was never activated."""
    env = clean_server_env(MLFLOW_TRACKING_URI=sqlite_uri(workdir), **extra)
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"
    env.pop("VIRTUAL_ENV", None)
    return env


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A working directory whose ./mlflow.db holds one smoke SNGP run -> (workdir, runs:/ URI)."""
    workdir = tmp_path_factory.mktemp("serve-model")
    proc = run_sngp(["run", "--config", str(SMOKE), "--set", "methods=[sngp]"], workdir, sngp_env(workdir))
    assert proc.returncode == 0, describe(proc)
    reader = MlflowReader(sqlite_uri(workdir), workdir / "downloads")
    (run,) = reader.children(proc.parent_id).values()
    return workdir, f"runs:/{run.info.run_id}/model"


@pytest.fixture(scope="module")
def server(trained):
    """`.venv/bin/sngp serve-model --model runs:/.../model --port P` without the venv on PATH -> base URL."""
    workdir, uri = trained
    port = free_port()
    proc = subprocess.Popen(
        [str(SNGP), "serve-model", "--model", uri, "--port", str(port)],
        cwd=workdir, env=no_venv_env(workdir), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "serving" in line and "Ctrl-C" in line:
            break
    else:
        proc.wait()
        pytest.fail(f"sngp serve-model exited with {proc.returncode}:\n{''.join(lines)}")
    assert f"http://127.0.0.1:{port}/invocations" in lines[-1], lines
    yield f"http://127.0.0.1:{port}"
    proc.terminate()  # SIGTERM: serve-model stops the scoring server and its uvicorn worker
    rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, "".join(lines) + rest
    assert "stopping" in rest, rest
    with pytest.raises(OSError):  # nothing answers any more
        _NO_PROXY.open(f"http://127.0.0.1:{port}/ping", timeout=5)


def post(base: str, body: bytes | str, content_type: str = "application/json") -> tuple[int, object]:
    """POST /invocations -> (status, parsed JSON body, or the text if it is not JSON)."""
    data = body.encode() if isinstance(body, str) else body
    request = urllib.request.Request(f"{base}/invocations", data=data, headers={"Content-Type": content_type})
    try:
        with _NO_PROXY.open(request, timeout=120) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def predictions(base: str, payload: dict) -> pd.DataFrame:
    status, answer = post(base, json.dumps(payload))
    assert status == 200, answer
    return pd.DataFrame(answer["predictions"])


@pytest.fixture(scope="module")
def rows() -> dict[str, np.ndarray]:
    x, _ = make_two_moons(100, 0.1, seed=123)  # 200 fresh in-distribution rows
    return {"in": x.astype(np.float64), "ood": make_ood(100, seed=321).astype(np.float64)}


def test_dataframe_split_has_the_contracts_columns_and_abstains_on_the_ood_cluster(server, rows):
    inside = predictions(server, {"dataframe_split": {"columns": FEATURES, "data": rows["in"].tolist()}})
    outside = predictions(server, {"dataframe_split": {"columns": FEATURES, "data": rows["ood"].tolist()}})
    for frame in (inside, outside):
        assert list(frame.columns) == OUTPUTS
        assert set(frame["predicted"]) <= {"0", "1"}
        assert np.allclose(frame["prob_0"] + frame["prob_1"], 1, atol=1e-5)
        expected = (1 - frame["prob_0"] ** 2 - frame["prob_1"] ** 2) / 2
        assert np.allclose(frame["uncertainty"], expected, atol=1e-5)
        assert frame["abstain"].dtype == bool
    print(
        f"\n[serve-model] abstained: in-distribution {inside['abstain'].mean():.1%}, "
        f"OOD {outside['abstain'].mean():.1%}"
    )
    assert inside["abstain"].mean() <= 0.15  # calibrated to accept 95 % of in-distribution data
    assert outside["abstain"].mean() >= 0.95  # the OOD cluster around (2.5, -1.75)
    assert np.allclose(rows["ood"].mean(axis=0), OOD_MEAN, atol=0.1)


def test_dataframe_records_and_csv_answer_the_same(server, rows):
    sample = rows["in"][:20]
    split = predictions(server, {"dataframe_split": {"columns": FEATURES, "data": sample.tolist()}})
    # Records: columns by name in another order, with an extra column the model ignores.
    records = [{"x1": b, "id": i, "x0": a} for i, (a, b) in enumerate(sample.tolist())]
    by_records = predictions(server, {"dataframe_records": records})
    csv = pd.DataFrame(sample, columns=FEATURES).to_csv(index=False)
    status, answer = post(server, csv, "text/csv")
    assert status == 200, answer
    by_csv = pd.DataFrame(answer["predictions"])
    for other in (by_records, by_csv):
        assert list(other.columns) == OUTPUTS
        assert (other["predicted"] == split["predicted"]).all() and (
            other["abstain"] == split["abstain"]
        ).all()
        assert np.allclose(other["uncertainty"], split["uncertainty"], atol=1e-6)


def test_the_abstain_threshold_param_overrides_the_calibrated_one(server, rows):
    data = {"columns": FEATURES, "data": np.r_[rows["in"][:50], rows["ood"][:50]].tolist()}
    default = predictions(server, {"dataframe_split": data})
    assert 0 < default["abstain"].sum() < 100
    never = predictions(server, {"dataframe_split": data, "params": {"abstain_threshold": 0.5}})
    always = predictions(server, {"dataframe_split": data, "params": {"abstain_threshold": 0.0}})
    assert not never["abstain"].any()  # uncertainty (1 - sum p^2) / 2 is at most 0.25 for 2 classes
    assert always["abstain"].all()
    middle = float(np.median(default["uncertainty"]))
    half = predictions(server, {"dataframe_split": data, "params": {"abstain_threshold": middle}})
    assert (half["abstain"] == (half["uncertainty"] > middle)).all()
    assert (never["uncertainty"] == default["uncertainty"]).all()  # the param changes only `abstain`


@pytest.mark.parametrize(
    ("payload", "content_type", "names"),
    [
        ({"dataframe_split": {"columns": ["x0"], "data": [[0.5]]}}, None, ["x1"]),
        ({"dataframe_records": [{"x0": 0.5, "x2": 1.0}]}, None, ["x1"]),
        ({"dataframe_split": {"columns": FEATURES, "data": [["a", 1.0]]}}, None, ["x0", "'a'"]),
        ("x0,x1\n0.5,abc\n", "text/csv", ["'abc'"]),  # MLflow's CSV parser: its traceback is cut off
        ({"dataframe_split": {"columns": FEATURES, "data": [[0.5, None]]}}, None, ["NaN"]),
        ({"dataframe_split": {"columns": FEATURES, "data": [[0.5, "NaN"]]}}, None, ["NaN"]),
        ("x0,x1\n0.5,nan\n", "text/csv", ["NaN"]),
        ({"dataframe_split": {"columns": FEATURES, "data": []}}, None, ["empty"]),
        ("x0,x1\n", "text/csv", ["empty"]),
        ({**ONE_ROW, "params": {"abstain_threshold": "abc"}}, None, ["abstain_threshold", "abc"]),
        ({**ONE_ROW, "params": {"abstain_threshold": [1]}}, None, ["abstain_threshold"]),
        ("{not json", None, ["json"]),
    ],
    ids=[
        "missing-column", "records-missing-column", "string-value", "csv-string-value", "null", "nan-string",
        "csv-nan",
        "empty-frame", "csv-empty", "params-string", "params-list", "not-json",
    ],
)  # fmt: skip
def test_bad_payloads_get_a_4xx_naming_the_problem_without_a_traceback(server, payload, content_type, names):
    body = payload if isinstance(payload, str) else json.dumps(payload)
    status, answer = post(server, body, content_type or "application/json")
    assert 400 <= status < 500, (status, answer)
    text = answer if isinstance(answer, str) else json.dumps(answer)
    assert "Traceback" not in text and "stack_trace" not in text, text
    message = answer["message"] if isinstance(answer, dict) else answer
    for name in names:
        assert name.lower() in message.lower(), message


def test_the_server_answers_after_bad_payloads(server, rows):
    frame = predictions(server, {"dataframe_split": {"columns": FEATURES, "data": rows["in"][:3].tolist()}})
    assert len(frame) == 3


def test_an_unknown_model_is_one_line_and_exit_2(trained):
    workdir, _ = trained
    for uri, expected in [
        ("models:/no-such-model@champion", "Registered Model with name=no-such-model not found"),
        (
            "runs:/0123456789abcdef0123456789abcdef/model",
            "Run with id=0123456789abcdef0123456789abcdef not found",
        ),
        ("models:/no-such-model/latest", "'latest' is not a version number"),
    ]:
        proc = subprocess.run(
            [str(SNGP), "serve-model", "--model", uri, "--port", str(free_port())],
            cwd=workdir, env=no_venv_env(workdir), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 2, describe(proc)
        assert proc.stderr.count("\n") == 1 and expected in proc.stderr, proc.stderr
        assert proc.stderr.startswith("sngp serve-model: error: --model: ")


def test_a_port_in_use_is_one_line_and_exit_2(trained):
    workdir, uri = trained
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [str(SNGP), "serve-model", "--model", uri, "--port", str(port)],
            cwd=workdir, env=no_venv_env(workdir), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert proc.returncode == 2, describe(proc)
    assert (
        proc.stderr
        == f"sngp serve-model: error: port {port} is already in use (choose another with --port)\n"
    )
