"""The Prefect automation `sngp: retrain on drift`: the event `sngp.drift.detected` (sent by the monitor
flow about a model, resource id `sngp.model.<name>.<version>`) runs the `retrain/nightly` deployment,
at most once per cooldown. `make deploy` creates or updates it (`sngp deploy-automations`), after
`prefect deploy` has registered retrain/nightly: never a second copy.

The cooldown is the trigger's own: a reactive EventTrigger with threshold 1 fires on the first drift
event, then Prefect opens its next window only where this one ends (`within` after the first event);
drift events before then are counted in no window, so they start nothing. One bad hour, or ten
drifting batches from three inboxes, starts one retrain; drift that persists past the cooldown starts
another. The window is global (no for_each): every model's drift feeds the one nightly retrain, which
retrains every method anyway.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from flows.ops.automation import read_deployment_id, sync_automation
from flows.ops.errors import ServiceError
from tasks.model_ref import DRIFT_EVENT, RESOURCE_PREFIX

if TYPE_CHECKING:
    from uuid import UUID

    from prefect.automations import Automation

DRIFT_AUTOMATION_NAME = "sngp: retrain on drift"
RETRAIN_DEPLOYMENT = "retrain/nightly"
DEFAULT_COOLDOWN_MINUTES = 360  # at most one drift-triggered retrain per 6 hours


def drift_automation(deployment_id: UUID, cooldown_minutes: int = DEFAULT_COOLDOWN_MINUTES) -> Automation:
    """The automation: on `sngp.drift.detected` about any `sngp.model.*`, run deployment
    `deployment_id` with its own parameters; then nothing more for `cooldown_minutes`."""
    from prefect import automations  # lazy: keeps `sngp --help` fast

    return automations.Automation(
        name=DRIFT_AUTOMATION_NAME,
        description=(
            f"Created by `make deploy` (sngp deploy-automations): the monitor flow's {DRIFT_EVENT} event "
            f"runs {RETRAIN_DEPLOYMENT}, at most once per {cooldown_minutes} min (later events in that "
            "window start nothing)."
        ),
        enabled=True,
        trigger=automations.EventTrigger(
            match={"prefect.resource.id": f"{RESOURCE_PREFIX}*"},
            expect={DRIFT_EVENT},
            posture=automations.Posture.Reactive,
            threshold=1,
            within=timedelta(minutes=cooldown_minutes),
        ),
        actions=[automations.RunDeployment(source="selected", deployment_id=deployment_id)],
    )


def sync_drift_automation(api_url: str, cooldown_minutes: int = DEFAULT_COOLDOWN_MINUTES) -> str:
    """Create or update (never duplicate) the automation on the Prefect server at `api_url` -> 'created',
    'updated' or 'unchanged'. ServiceError if retrain/nightly is not deployed there or the server
    refuses."""
    if cooldown_minutes < 1:
        raise ServiceError(f"--cooldown-minutes must be at least 1, got {cooldown_minutes}")

    def desired() -> Automation:
        return drift_automation(read_deployment_id(RETRAIN_DEPLOYMENT, api_url), cooldown_minutes)

    return sync_automation(api_url, desired)
