"""The automation `sngp: retrain on drift` on a real (temporary) Prefect server: what it does, and that
`sngp deploy-automations` creates it once, updates it in place and removes copies (tests/servers/
test_monitor.py sees it start a retrain run end to end)."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from flows.ops import automation
from flows.ops.drift_automation import (
    DRIFT_AUTOMATION_NAME,
    RETRAIN_DEPLOYMENT,
    drift_automation,
    sync_drift_automation,
)
from flows.ops.errors import ServiceError
from tasks.model_ref import DRIFT_EVENT, ModelRef


@pytest.fixture(scope="module")
def prefect_api() -> str:
    """A real temporary Prefect server on a database of its own (Prefect's test harness) -> its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


def _deploy_retrain_nightly():
    """The retrain/nightly deployment as `prefect deploy` registers it (flow `retrain`, deployment
    `nightly`) -> its id."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("retrain")
        return client.create_deployment(
            flow_id=flow_id, name="nightly", entrypoint="flows/retrain.py:retrain"
        )


def _ours() -> list:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return [
            a
            for a in client.read_automations_by_name(DRIFT_AUTOMATION_NAME)
            if a.name == DRIFT_AUTOMATION_NAME
        ]


def test_the_trigger_matches_the_monitors_event_about_any_model():
    from prefect.automations import Posture, RunDeployment
    from prefect.server.events.schemas.automations import AutomationCreate

    deployment_id = uuid.uuid4()
    ours = drift_automation(deployment_id, cooldown_minutes=90)
    AutomationCreate.model_validate(ours.model_dump(mode="json", exclude={"id"}))  # the server accepts it
    trigger = ours.trigger
    assert trigger.expect == {DRIFT_EVENT} and trigger.posture == Posture.Reactive
    assert trigger.threshold == 1 and trigger.within == timedelta(minutes=90)  # the cooldown
    assert not trigger.for_each  # one window for every model: one retrain retrains them all
    (action,) = ours.actions
    assert isinstance(action, RunDeployment) and action.deployment_id == deployment_id
    # The monitor's resource ids match the trigger's pattern.
    pattern = trigger.match.root["prefect.resource.id"]
    assert pattern == "sngp.model.*"
    for ref in (
        ModelRef(
            "models:/sngp-uncertainty-sngp@champion",
            "models:/sngp-uncertainty-sngp/3",
            "sngp-uncertainty-sngp",
            "3",
        ),
        ModelRef("models:/m-" + "0" * 32, "models:/m-" + "0" * 32, model_id="m-" + "0" * 32),
    ):
        assert ref.resource_id.startswith(pattern.removesuffix("*"))


def test_sync_needs_the_retrain_deployment(prefect_api):
    with pytest.raises(ServiceError, match=f"no deployment {RETRAIN_DEPLOYMENT}"):
        sync_drift_automation(prefect_api)
    assert _ours() == []


def test_sync_creates_once_updates_in_place_and_removes_copies(prefect_api):
    deployment_id = _deploy_retrain_nightly()
    assert sync_drift_automation(prefect_api, 360) == "created"
    (first,) = _ours()
    assert first.actions[0].deployment_id == deployment_id
    assert sync_drift_automation(prefect_api, 360) == "unchanged"  # make deploy again: nothing new
    assert sync_drift_automation(prefect_api, 30) == "updated"
    (updated,) = _ours()
    assert updated.id == first.id and updated.trigger.within == timedelta(minutes=30)
    drift_automation(deployment_id, 30).create()  # a copy made by hand
    assert len(_ours()) == 2
    assert sync_drift_automation(prefect_api, 30) == "updated"
    assert [a.id for a in _ours()] == [first.id]
    # The crash automation of `sngp serve` shares the same create-or-update code and is left alone.
    assert automation.sync_crash_automation(prefect_api, 30) == "created"
    assert automation.sync_crash_automation(prefect_api, 30) == "unchanged"
    assert automation.sync_crash_automation(prefect_api, None) == "disabled"
    assert [a.id for a in _ours()] == [first.id]


def test_a_cooldown_below_one_minute_is_refused(prefect_api):
    with pytest.raises(ServiceError, match="--cooldown-minutes"):
        sync_drift_automation(prefect_api, 0)
