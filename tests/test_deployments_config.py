"""prefect.yaml agrees with the code and the configs (fast, no servers).

`make deploy` registers these deployments; a typo here would only show up on the server, when a run
starts. tests/servers/test_deployments.py runs them for real.
"""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path

import pytest
import yaml
from prefect import Flow
from prefect.client.schemas.schedules import CronSchedule
from prefect.utilities.templating import apply_values

from flows.config import PipelineConfig, validate_config
from flows.ops.commands import DEFAULT_WORK_POOL

ROOT = Path(__file__).resolve().parent.parent
FLOW_NAMES = {
    "flows/pipeline.py": "uncertainty-pipeline",
    "flows/retrain.py": "retrain",
    "flows/sweep_point_flow.py": "sweep-point",
    "flows/monitor.py": "monitor",
}


@pytest.fixture(scope="module")
def project() -> dict:
    loaded = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


@pytest.fixture(scope="module")
def deployments(project) -> dict[str, dict]:
    found = {d["name"]: d for d in project["deployments"]}
    assert len(found) == len(project["deployments"]), "deployment names must be unique"
    return found


def _makefile_default(name: str) -> str:
    match = re.search(rf"^{name} \?= (.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert match, f"Makefile has no default for {name}"
    return match.group(1).strip()


def test_prefect_yaml_parses_and_lists_the_deployments(project, deployments):
    assert set(deployments) == {"default", "smoke", "nightly", "nightly-retry", "pool", "every-15-minutes"}
    assert project["pull"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $SNGP_PROJECT_DIR }}"}}
    ]  # filled in by `make deploy`, never a path of one machine
    assert project["prefect-version"] == __import__("prefect").__version__


def test_smoke_deployment_has_exactly_the_smoke_config(deployments):
    params = deployments["smoke"]["parameters"]
    smoke = yaml.safe_load((ROOT / "conf" / "smoke.yaml").read_text())
    assert validate_config(params) == validate_config(smoke)
    assert set(params) == set(smoke)  # the same sections given, so nothing falls back to study defaults


def test_default_deployment_runs_the_study_defaults(deployments):
    assert deployments["default"]["parameters"] == {}
    assert validate_config(deployments["default"]["parameters"]) == PipelineConfig()


def test_nightly_deployment_has_a_cron_schedule(deployments, monkeypatch):
    schedules = deployments["nightly"]["schedules"]
    assert len(schedules) == 1 and set(schedules[0]) == {"cron", "timezone"}
    assert schedules[0]["timezone"] == "UTC"
    # The cron comes from $SNGP_RETRAIN_CRON (Makefile default), resolved the way `prefect deploy` does.
    default = _makefile_default("SNGP_RETRAIN_CRON")
    monkeypatch.setenv("SNGP_RETRAIN_CRON", default)
    resolved = apply_values(schedules[0], os.environ, remove_notset=False)
    assert resolved == {"cron": default, "timezone": "UTC"}
    CronSchedule(**resolved)  # a valid cron expression
    assert deployments["nightly"]["parameters"] == {}


def test_nightly_retry_runs_what_nightly_runs_unscheduled(deployments):
    """The crash-retry automation runs retrain/nightly-retry with a crashed nightly run's parameters:
    it must be the same flow on the same pool, with the same defaults, and never run on its own."""
    from flows.ops.retry_automation import RETRY_DEPLOYMENT

    nightly, retry = deployments["nightly"], deployments["nightly-retry"]
    path = retry["entrypoint"].partition(":")[0]
    assert f"{FLOW_NAMES[path]}/{retry['name']}" == RETRY_DEPLOYMENT
    assert {key: retry[key] for key in ("entrypoint", "parameters", "work_pool")} == {
        key: nightly[key] for key in ("entrypoint", "parameters", "work_pool")
    }
    assert "schedules" not in retry
    # make deploy gives both the same config_path.
    assert "for name in nightly nightly-retry; do" in (ROOT / "Makefile").read_text()


@pytest.mark.parametrize("name", ["default", "smoke", "nightly", "nightly-retry", "pool", "every-15-minutes"])
def test_entrypoint_resolves_to_the_flow(deployments, name):
    path, _, attribute = deployments[name]["entrypoint"].partition(":")
    assert (ROOT / path).is_file(), path
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    flow = getattr(module, attribute)
    assert isinstance(flow, Flow)
    assert flow.name == FLOW_NAMES[path]
    # Every parameter the deployment passes is one the flow accepts.
    assert set(deployments[name]["parameters"]) <= set(flow.parameters.properties)


def test_every_deployment_uses_the_served_work_pool(deployments):
    pool = _makefile_default("SNGP_WORK_POOL")
    assert pool == DEFAULT_WORK_POOL
    assert {d["work_pool"]["name"] for d in deployments.values()} == {pool}


def test_sweep_point_deployment_is_the_one_sngp_sweep_dispatches_to(deployments):
    from flows.cli.sweep import DEFAULT_DEPLOYMENT

    pool = deployments["pool"]
    assert f"{FLOW_NAMES[pool['entrypoint'].partition(':')[0]]}/pool" == DEFAULT_DEPLOYMENT
    assert pool["parameters"] == {} and "schedules" not in pool
    # Every parameter a dispatched flow run gets is one the flow accepts.
    from flows.sweep_point_flow import sweep_point_flow

    accepted = set(sweep_point_flow.parameters.properties)
    assert {"label", "method", "model_settings", "data_path", "code_version"} <= accepted
    assert set(sweep_point_flow.parameters.required) == {"label", "method", "model_settings", "data_path"}


def test_monitor_deployment_runs_every_15_minutes_on_the_makefile_model_and_inbox(deployments, monkeypatch):
    monitor = deployments["every-15-minutes"]
    assert monitor["schedules"] == [{"interval": 900}]
    # model and inbox come from $SNGP_MONITOR_MODEL / $SNGP_MONITOR_INBOX, which `make deploy` sets.
    model, inbox = _makefile_default("MONITOR_MODEL"), _makefile_default("MONITOR_INBOX")
    monkeypatch.setenv("SNGP_MONITOR_MODEL", model)
    monkeypatch.setenv("SNGP_MONITOR_INBOX", f"/srv/sngp/{inbox}")
    resolved = apply_values(monitor["parameters"], os.environ, remove_notset=False)
    assert resolved == {"model": "models:/sngp-uncertainty-sngp@champion", "inbox": f"/srv/sngp/{inbox}"}
    from flows.monitor import monitor as monitor_flow

    assert set(monitor_flow.parameters.required) == {"model", "inbox"}
    assert "sngp deploy-automations" in (ROOT / "Makefile").read_text()  # the drift automation, same target
