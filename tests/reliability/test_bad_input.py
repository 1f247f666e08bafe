"""Bad input, everywhere a user can give it: the CLI (flags, --set overrides, YAML files, URIs, `serve`),
the flows' parameters (what a deployment run passes), the logged pyfunc model, the library.

Each case must give one clear message naming the problem (no traceback unless --debug), exit code 2 from
the CLI, a typed error for Python callers (ValueError subclasses: ConfigError, ModelInputError; Prefect's
ParameterTypeError; MlflowException), and leave no MLflow run RUNNING (the CLI cases create no store at
all). Each case is one test id, so pytest's counts are the battery's counts.
"""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
from support.cli import SMOKE, sngp_env
from support.net import two_ports
from support.pgcluster import free_port
from support.records import client, running

from flows import cli

from .probe_pyfunc import BAD_INPUTS

SECRET = "hunter2-Xq9"  # a password that must never be printed
DEAD = free_port()  # a loopback port nobody listens on (bound and released)


def _serve(*args: str, data_dir: str = "stack") -> list[str]:
    """`serve` on two free ports (the test fills in {P1} and {P2}) with ARGS."""
    return ["serve", "--data-dir", data_dir, "--prefect-port", "{P1}", "--mlflow-port", "{P2}", *args]


# `sngp run --set ITEM`: name -> (ITEM, words the one error line must contain).
SET_CASES = {
    "set-wrong-type": ("training.epochs=abc", ["training.epochs", "abc"]),
    "set-unknown-key": ("training.epoch=3", ["training.epoch", "unknown key", "epochs"]),
    "set-zero-epochs": ("training.epochs=0", ["training.epochs", "got 0"]),
    "set-negative-seed": ("seed=-1", ["seed", "-1"]),
    "set-seed-too-big": ("seed=2147483648", ["seed", "2147483648"]),
    "set-float-for-int": ("training.batch_size=1.5", ["training.batch_size", "1.5"]),
    "set-bool-for-int": ("training.epochs=true", ["training.epochs", "boolean"]),
    "set-nan": ("training.learning_rate=.nan", ["training.learning_rate", "finite"]),
    "set-inf": ("data.noise=.inf", ["data.noise", "finite"]),
    "set-dropout-range": ("model.dropout_rate=1.5", ["model.dropout_rate", "1.5"]),
    "set-unknown-method": ("methods=[foo]", ["methods", "foo", "deterministic, sngp"]),
    "set-duplicate-method": ("methods=[sngp,sngp]", ["methods", "once"]),
    "set-no-methods": ("methods=[]", ["methods", "at least 1"]),
    "set-methods-not-list": ("methods=sngp", ["methods", "list"]),
    "set-malformed": ("foo", ["--set 'foo'", "KEY=VALUE"]),
    "set-empty-key": ("=5", ["KEY=VALUE"]),
    "set-section-scalar": ("training=5", ["training", "TrainingConfig"]),
    "set-not-a-section": ("training.epochs.x=1", ["'epochs' is not a section"]),
    "set-unknown-section": ("foo.bar=1", ["foo", "unknown key", "training"]),
    "set-range-order": ("data.x_range=[1,0]", ["data.x_range", "low < high"]),
    "set-momentum": ("sngp.gp_cov_momentum=2", ["sngp.gp_cov_momentum", "(0, 1)"]),
    "set-unknown-dataset": ("dataset=mnist", ["dataset", "mnist"]),
    "set-digits-classes": ("digits.known_classes=[1]", ["digits.known_classes"]),
    "set-empty-experiment": ("mlflow.experiment=", ["mlflow.experiment", "at least 1"]),
    "set-ood-variance": ("data.ood_var=[0,1]", ["data.ood_var", "> 0"]),
}

# name -> (argv, words the one error line must contain). The case's tmp dir holds files named here.
CLI_CASES = {
    **{name: (["run", "--set", item], words) for name, (item, words) in SET_CASES.items()},
    # config files
    "config-missing": (["run", "--config", "nope.yaml"], ["nope.yaml", "does not exist"]),
    "config-directory": (["run", "--config", "."], ["is a directory"]),
    "config-malformed": (["run", "--config", "malformed.yaml"], ["malformed.yaml", "not valid YAML", "line"]),
    "config-empty": (["run", "--config", "empty.yaml"], ["empty.yaml", "empty"]),
    "config-list": (["run", "--config", "list.yaml"], ["list.yaml", "mapping"]),
    "config-unknown-top-key": (["run", "--config", "toplevel.yaml"], ["epochs", "unknown key", "training"]),
    "config-python-tag": (["run", "--config", "tag.yaml"], ["tag.yaml", "not valid YAML"]),
    "config-binary": (["run", "--config", "binary.yaml"], ["binary.yaml", "cannot be read"]),
    # environment: cache folder, tracking URI
    "cache-dir-unusable": (["run", "--cache-dir", "/dev/null/cache"], ["cache folder", "not usable"]),
    "tracking-unknown-scheme": (["run", "--tracking-uri", "foo://bar"], ["foo://bar", "unknown scheme"]),
    "tracking-folder-store": (["run", "--tracking-uri", "./mlruns"], ["folder stores", "sqlite:///"]),
    "tracking-dead-server": (
        ["run", "--tracking-uri", f"http://127.0.0.1:{DEAD}"],
        ["no MLflow tracking server answers", str(DEAD)],
    ),
    "tracking-dead-server-password": (
        ["run", "--tracking-uri", f"http://bob:{SECRET}@127.0.0.1:{DEAD}"],
        ["no MLflow tracking server answers", "bob:***@"],
    ),
    # argparse
    "unknown-option": (["run", "--bogus"], ["unrecognized arguments: --bogus"]),
    "unknown-command": (["nosuchcommand"], ["invalid choice", "nosuchcommand"]),
    "option-without-value": (["run", "--config"], ["--config", "expected one argument"]),
    # retrain
    "retrain-bad-prefix": (
        ["retrain", "--set", "retrain.registry_prefix=bad name"],
        ["retrain.registry_prefix"],
    ),
    "retrain-tolerance": (
        ["retrain", "--set", "retrain.accuracy_tolerance=2"],
        ["retrain.accuracy_tolerance"],
    ),
    "retrain-dead-server": (
        ["retrain", "--tracking-uri", f"http://127.0.0.1:{DEAD}"],
        ["no MLflow tracking server"],
    ),
    # serve (free ports, so only the bad value can fail)
    "serve-port-range": (
        ["serve", "--data-dir", "stack", "--prefect-port", "70000", "--mlflow-port", "{P1}"],
        ["--prefect-port", "65535"],
    ),
    "serve-same-ports": (
        ["serve", "--data-dir", "stack", "--prefect-port", "{P1}", "--mlflow-port", "{P1}"],
        ["both", "two ports"],
    ),
    "serve-port-not-int": (
        ["serve", "--data-dir", "stack", "--prefect-port", "abc"],
        ["--prefect-port", "int"],
    ),
    "serve-data-dir-file": (_serve(data_dir="empty.yaml"), ["exists and is not a directory"]),
    "serve-db-not-postgres": (
        _serve("--db", f"mysql://u:{SECRET}@db.example/mlflow"),
        ["PostgreSQL URL", "u:***@"],
    ),
    "serve-db-unreachable": (
        _serve("--db", f"postgresql://u:{SECRET}@127.0.0.1:{DEAD}/mlflow"),
        ["cannot connect", "u:***@127.0.0.1"],
    ),
}

FILES = {
    "malformed.yaml": "seed: [1\n  x: : y\n",
    "empty.yaml": "",
    "list.yaml": "- seed\n- methods\n",
    "toplevel.yaml": "seed: 0\nepochs: 5\n",
    "tag.yaml": "seed: !!python/object/apply:os.system ['touch PWNED']\n",
}


def _write_case_files(folder) -> None:
    for name, text in FILES.items():
        (folder / name).write_text(text)
    (folder / "binary.yaml").write_bytes(b"\xff\xfe\x00seed: 0")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """A clean working directory and environment; a case that wrongly passes validation stops before
    Prefect starts (run_flow is the first step after validation)."""
    from flows.cli import retrain as retrain_command
    from flows.cli import run as run_command

    saved = dict(os.environ)  # run_command sets SNGP_CACHE_DIR / MLFLOW_TRACKING_URI itself
    for name in list(os.environ):
        if name.startswith(("MLFLOW_", "PREFECT_", "SNGP_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.chdir(tmp_path)

    def passed(*_):
        raise AssertionError("the bad input passed validation")

    monkeypatch.setattr(run_command, "run_flow", passed)
    monkeypatch.setattr(retrain_command, "run_flow", passed)
    _write_case_files(tmp_path)
    yield tmp_path
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_bad_input(case, in_tmp, capsys):
    argv, expected = CLI_CASES[case]
    p1, p2 = (str(port) for port in two_ports())
    argv = [a.replace("{P1}", p1).replace("{P2}", p2) for a in argv]
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines, f"no error message: {out!r}"
    message = lines[-1]
    assert message.startswith(("sngp: error: ", f"sngp {argv[0]}: error: ")), err
    if "usage:" not in err:  # argparse's errors come after its usage line; ours are one line
        assert len(lines) == 1, f"more than one line:\n{err}"
    for word in expected:
        assert word in message, (word, message)
    assert "Traceback" not in err + out
    assert SECRET not in err + out
    assert not (in_tmp / "mlflow.db").exists() and not (in_tmp / "mlruns").exists(), (
        "an MLflow store was created"
    )
    assert not (in_tmp / "prefect-home").exists(), "Prefect started"
    assert not (in_tmp / "PWNED").exists(), "a YAML tag executed code"


# A few through the real console script: exit status and stderr as a shell sees them.
SUBPROCESS_CASES = {
    "wrong-type": (["run", "--config", str(SMOKE), "--set", "training.epochs=abc"], 2, "training.epochs"),
    "python-tag": (["run", "--config", "tag.yaml"], 2, "not valid YAML"),
    "dead-server": (
        ["run", "--config", str(SMOKE), "--tracking-uri", f"http://bob:{SECRET}@127.0.0.1:{DEAD}"],
        2,
        "no MLflow tracking server answers",
    ),
    "debug-shows-traceback": (["--debug", "run", "--set", "training.epochs=abc"], 1, "UserError"),
}


@pytest.mark.parametrize("case", list(SUBPROCESS_CASES))
def test_cli_bad_input_subprocess(case, tmp_path):
    from support.cli import SNGP

    args, want_code, word = SUBPROCESS_CASES[case]
    _write_case_files(tmp_path)
    proc = subprocess.run(
        [str(SNGP), *args],
        cwd=tmp_path,
        env=sngp_env(tmp_path, None),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == want_code, (proc.returncode, proc.stderr)
    assert word in proc.stderr, proc.stderr
    if case == "debug-shows-traceback":
        assert "Traceback" in proc.stderr
    else:
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("sngp run: error: "), proc.stderr
    assert SECRET not in proc.stderr + proc.stdout
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "PWNED").exists()


# ---------------------------------------------------------------------------------------------------------
# Flow parameters, as a deployment run passes them (`prefect deployment run --param ...`): the flows are
# called in-process against the served Prefect server.

PARAM_CASES = {
    "epochs-not-a-number": ("pipeline", {"training": {"epochs": "abc"}}, "ParameterTypeError", ["epochs"]),
    "unknown-training-key": ("pipeline", {"training": {"epoch": 5}}, "ParameterTypeError", ["epoch"]),
    "unknown-method": ("pipeline", {"methods": ["foo"]}, "ParameterTypeError", ["methods"]),
    "unknown-dataset": ("pipeline", {"dataset": "mnist"}, "ParameterTypeError", ["dataset"]),
    "seed-not-a-number": ("pipeline", {"seed": "abc"}, "ParameterTypeError", ["seed"]),
    "n-train-zero": (
        "pipeline",
        {"data": {"n_train_per_class": 0}},
        "ParameterTypeError",
        ["n_train_per_class"],
    ),
    "momentum": ("pipeline", {"sngp": {"gp_cov_momentum": 2}}, "ParameterTypeError", ["gp_cov_momentum"]),
    "empty-experiment": ("pipeline", {"mlflow": {"experiment": ""}}, "ParameterTypeError", ["experiment"]),
    "negative-seed": ("pipeline", {"seed": -1}, "ConfigError", ["seed", "-1"]),
    "duplicate-methods": ("pipeline", {"methods": ["sngp", "sngp"]}, "ConfigError", ["methods", "once"]),
    "no-methods": ("pipeline", {"methods": []}, "ConfigError", ["methods"]),
    "retrain-tolerance": (
        "retrain",
        {"retrain": {"accuracy_tolerance": 2}},
        "ParameterTypeError",
        ["accuracy_tolerance"],
    ),
}


@pytest.fixture(scope="module")
def flows_on_server(stack, tmp_path_factory):
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    from flows.pipeline import uncertainty_pipeline
    from flows.retrain import retrain

    home = tmp_path_factory.mktemp("param-cases-home")
    with temporary_settings({PREFECT_API_URL: stack.prefect_api_url, PREFECT_HOME: str(home)}):
        yield {"pipeline": uncertainty_pipeline, "retrain": retrain}


@pytest.mark.parametrize("case", list(PARAM_CASES))
def test_flow_parameter_bad_input(case, flows_on_server, tmp_path):
    which, params, error, words = PARAM_CASES[case]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = {"mlflow": {"tracking_uri": uri, "experiment": "bad-params"}, **params}
    if case == "empty-experiment":
        params["mlflow"] = {"tracking_uri": uri, "experiment": ""}
    with pytest.raises(Exception) as caught:  # noqa: B017 - the type is checked by name below
        flows_on_server[which](**params)
    exc = caught.value
    assert type(exc).__name__ == error, (type(exc), exc)
    if error == "ConfigError":
        assert isinstance(exc, ValueError)
    message = str(exc)
    for word in words:
        assert word in message, (word, message)
    assert len(message) < 1500, message
    if (tmp_path / "mlflow.db").exists():
        assert running(client(uri)) == []


# ---------------------------------------------------------------------------------------------------------
# The logged pyfunc model (fresh process: conftest.pyfunc_report runs probe_pyfunc.py)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_pyfunc_bad_input(case, pyfunc_report):
    _, kind, words = BAD_INPUTS[case]
    answer = pyfunc_report["bad"][case]
    if kind == "ignored":
        assert not answer["raised"], answer
        assert answer["equals_without_extra"], answer
        log = pyfunc_report["stderr"]  # MLflow says it ignored the column
        assert "Found extra inputs" in log and "['x2']" in log, log[-2000:]
        return
    assert answer["raised"], answer
    if kind == "schema":
        assert answer["type"] == "MlflowException", answer
    else:
        assert answer["type"] == "ModelInputError" and "ValueError" in answer["bases"], answer
    for word in words:
        assert word in answer["message"], (word, answer["message"])
    assert "Traceback" not in answer["message"]


def test_pyfunc_predicts_ten_million_rows_in_bounded_memory(pyfunc_report):
    big = pyfunc_report["big"]
    assert big["output_rows"] == big["rows"] == 10_000_000
    assert big["output_columns"] == ["predicted", "prob_0", "prob_1", "uncertainty", "abstain"]
    assert big["finite"] and big["row_sum_error"] < 1e-5
    growth = big["peak"] - big["rss_before"]
    print(
        f"\n[reliability] {big['rows']:,} rows ({big['input_bytes'] / 1e6:.0f} MB of input) in "
        f"{big['seconds']:.1f} s, peak RSS {big['peak'] / 1e9:.2f} GB (+{growth / 1e9:.2f} GB)"
    )
    assert growth < 2.5e9, f"peak RSS grew by {growth / 1e9:.2f} GB"


# ---------------------------------------------------------------------------------------------------------
# The library (sngp_models): ValueError naming the argument


@pytest.fixture(scope="module")
def fitted(smoke_run):
    import sngp_models

    return sngp_models.load_model(smoke_run.cache_file("models", "deterministic"))


def _library_cases():
    import sngp_models

    x = np.zeros((4, 2))
    return {
        "predict-1d": (lambda m: m.predict_proba(np.zeros(2)), ["x", "2-D"]),
        "predict-wrong-width": (lambda m: m.predict_proba(np.zeros((2, 3))), ["3 feature", "fitted on 2"]),
        "predict-nan": (lambda m: m.predict_proba(np.array([[np.nan, 0.0]])), ["NaN or infinite", "1 row"]),
        "predict-strings": (lambda m: m.predict_proba([["a", "b"]]), ["numeric"]),
        "predict-empty": (lambda m: m.predict_proba(np.zeros((0, 2))), ["empty"]),
        "predict-unfitted": (lambda m: sngp_models.make_model("sngp").predict_proba(x), ["not fitted"]),
        "fit-label-range": (
            lambda m: sngp_models.make_model("deterministic").fit(x, [0, 1, 5, 0]),
            ["labels must be in [0, 1]", "5"],
        ),
        "fit-float-labels": (
            lambda m: sngp_models.make_model("deterministic").fit(x, [0.5, 1, 0, 1]),
            ["integer class labels"],
        ),
        "fit-length-mismatch": (
            lambda m: sngp_models.make_model("deterministic").fit(x, [0, 1]),
            ["must match"],
        ),
        "make-unknown-method": (lambda m: sngp_models.make_model("foo"), ["unknown method", "sngp"]),
        "make-epochs-type": (lambda m: sngp_models.make_model("sngp", epochs="abc"), ["epochs", "integer"]),
        "make-dropout-range": (lambda m: sngp_models.make_model("sngp", dropout_rate=1.5), ["dropout_rate"]),
        "make-unknown-field": (
            lambda m: sngp_models.make_model("sngp", bogus=1),
            ["unknown config field", "bogus"],
        ),
        "load-missing-dir": (
            lambda m: sngp_models.load_model("/nonexistent/model"),
            ["not a complete saved model"],
        ),
    }


LIBRARY_CASES = [
    "predict-1d",
    "predict-wrong-width",
    "predict-nan",
    "predict-strings",
    "predict-empty",
    "predict-unfitted",
    "fit-label-range",
    "fit-float-labels",
    "fit-length-mismatch",
    "make-unknown-method",
    "make-epochs-type",
    "make-dropout-range",
    "make-unknown-field",
    "load-missing-dir",
]


@pytest.mark.parametrize("case", LIBRARY_CASES)
def test_library_bad_input(case, fitted):
    call, words = _library_cases()[case]
    with pytest.raises(ValueError) as caught:
        call(fitted)
    for word in words:
        assert word in str(caught.value), (word, str(caught.value))
