"""The Prefect automation `sngp: retry a crashed nightly retrain`: a flow run of `retrain/nightly` that
ends Crashed (its worker or machine died, its process was killed) is run again once, with the same
parameters, as a run of the unscheduled deployment `retrain/nightly-retry` (prefect.yaml: the same flow,
entrypoint and parameters). A crash of that retry triggers nothing, so a second crash stays Crashed,
with its reason as the state's message in the Prefect UI. `make deploy` creates or updates it
(`sngp deploy-automations`), after `prefect deploy` has registered both deployments.

Why a second deployment: a flow's `retries` apply to a run whose process raises, not to one whose
process died, and RunDeployment cannot tag or otherwise mark the run it creates, so an automation
rerunning `retrain/nightly` itself would also rerun its own crashed retries, without end. Runs of
retrain/nightly that end Crashed are seen only as such: a run whose worker and machine died sends
nothing, and `sngp serve`'s crash automation (flows.ops.automation) is what marks it Crashed once its
heartbeats stop.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from flows.ops.automation import read_deployment_id, sync_automation
from flows.ops.drift_automation import RETRAIN_DEPLOYMENT

if TYPE_CHECKING:
    from uuid import UUID

    from prefect.automations import Automation

RETRY_AUTOMATION_NAME = "sngp: retry a crashed nightly retrain"
RETRY_DEPLOYMENT = "retrain/nightly-retry"
CRASHED_EVENT = "prefect.flow-run.Crashed"

# The RunDeployment action's parameters: the whole parameters dict of the crashed flow run (the flow run
# the event is about), as Prefect hydrates deployment parameters: a Jinja template rendered with the
# triggering event's flow run, its output read as JSON, so every value keeps its type and a parameter the
# crashed run did not get is not passed either (the flow's default applies, as it did).
SAME_PARAMETERS = {
    "__prefect_kind": "json",
    "value": {"__prefect_kind": "jinja", "template": "{{ flow_run.parameters | tojson }}"},
}


def retry_automation(nightly_id: UUID, retry_id: UUID) -> Automation:
    """The automation: each `prefect.flow-run.Crashed` of a flow run of deployment `nightly_id` runs
    deployment `retry_id` at once with that run's parameters."""
    from prefect import automations  # lazy: keeps `sngp --help` fast

    return automations.Automation(
        name=RETRY_AUTOMATION_NAME,
        description=(
            f"Created by `make deploy` (sngp deploy-automations): a flow run of {RETRAIN_DEPLOYMENT} that "
            f"ends Crashed is run again once, with the same parameters, as a run of {RETRY_DEPLOYMENT}; "
            "a crash of that retry is left Crashed."
        ),
        enabled=True,
        trigger=automations.EventTrigger(
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={
                "prefect.resource.role": "deployment",
                "prefect.resource.id": f"prefect.deployment.{nightly_id}",
            },
            expect={CRASHED_EVENT},
            posture=automations.Posture.Reactive,
            threshold=1,
            within=timedelta(0),  # every crash on its own
        ),
        actions=[
            automations.RunDeployment(source="selected", deployment_id=retry_id, parameters=SAME_PARAMETERS)
        ],
    )


def sync_retry_automation(api_url: str) -> str:
    """Create or update (never duplicate) the automation on the Prefect server at `api_url` -> 'created',
    'updated' or 'unchanged'. ServiceError if retrain/nightly or retrain/nightly-retry is not deployed
    there or the server refuses."""

    def desired() -> Automation:
        nightly = read_deployment_id(RETRAIN_DEPLOYMENT, api_url)
        return retry_automation(nightly, read_deployment_id(RETRY_DEPLOYMENT, api_url))

    return sync_automation(api_url, desired)
