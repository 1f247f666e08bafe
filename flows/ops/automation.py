"""The Prefect automation that marks unresponsive flow runs Crashed, kept by `sngp serve` on its server.

The workers' flow runs send a heartbeat event every `heartbeat_seconds` (PREFECT_FLOWS_HEARTBEAT_FREQUENCY
in the workers' environment; Prefect's minimum is 30 s, its default 180 s). A flow run of a deployment
that has sent no heartbeat nor reached a final state for crash_after_seconds() is set Crashed, with a
message saying it "stopped responding", so a run whose worker or machine died does not stay Running
forever. That phrase and the Crashed state are how a client (the sweep's dispatch) recognises such a run.

Read, created, updated and disabled through Prefect's public `prefect.automations.Automation` API and
its client; Prefect is imported only inside the functions (the `sngp` CLI imports this module to build
its parser, and `sngp --help` should stay fast).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING

from flows.ops.errors import ServiceError
from tasks.sweep_points import UNRESPONSIVE

if TYPE_CHECKING:
    from uuid import UUID

    from prefect.automations import Automation

CRASH_AUTOMATION_NAME = "sngp: crash unresponsive flow runs"
MIN_HEARTBEAT_SECONDS = 30  # Prefect rejects shorter heartbeat intervals
CRASH_MARGIN_SECONDS = 30  # beyond 3 intervals, so one late or lost heartbeat never counts

# A window ends with another heartbeat or any state after which a run sends none for a while: a final
# state, or Suspended / AwaitingRetry (the run starts a new window when it resumes).
_EXPECTED_EVENTS = {
    "prefect.flow-run.heartbeat",
    "prefect.flow-run.Completed",
    "prefect.flow-run.Failed",
    "prefect.flow-run.Cancelled",
    "prefect.flow-run.Crashed",
    "prefect.flow-run.Suspended",
    "prefect.flow-run.AwaitingRetry",
}


def crash_after_seconds(heartbeat_seconds: int) -> int:
    """How long a flow run may send no heartbeat before the automation sets it Crashed: 3 intervals and
    a margin. Prefect's proactive trigger restarts the window at each heartbeat and checks every ~5 s,
    so a dead run is marked between this minus one interval and this plus a few seconds after it died."""
    return 3 * heartbeat_seconds + CRASH_MARGIN_SECONDS


def crash_message(heartbeat_seconds: int) -> str:
    """The Crashed state's message (shown in the Prefect UI; says the run stopped responding)."""
    return (
        f"No heartbeat for {crash_after_seconds(heartbeat_seconds)} s: the flow run {UNRESPONSIVE}, "
        f"its worker or machine died? (automation {CRASH_AUTOMATION_NAME!r} of sngp serve)"
    )


def crash_automation(heartbeat_seconds: int) -> Automation:
    """The automation that marks unresponsive flow runs of deployments Crashed.

    Prefect's documented zombie-flow automation (docs: v3/advanced/detect-zombie-flows): a proactive
    trigger per flow run (for_each prefect.resource.id) that, after each `prefect.flow-run.heartbeat`,
    expects another heartbeat or a final state within crash_after_seconds, else sets the run CRASHED.
    Only flow runs of deployments (match_related role deployment): those are what the workers run with
    our interval, while `sngp run` / `sngp sweep` in a terminal keep Prefect's default of 180 s and must
    not be crashed between two heartbeats."""
    from prefect import automations  # lazy: keeps `sngp --help` fast
    from prefect.client.schemas.objects import StateType  # lazy: keeps `sngp --help` fast

    within = crash_after_seconds(heartbeat_seconds)
    return automations.Automation(
        name=CRASH_AUTOMATION_NAME,
        description=(
            f"Created by `sngp serve`: a flow run of a deployment that has sent no heartbeat for {within} s "
            f"(its flow runs send one every {heartbeat_seconds} s) is set Crashed, so a run whose worker "
            "or machine died does not stay Running forever. Updated by `sngp serve --heartbeat-seconds`."
        ),
        enabled=True,
        trigger=automations.EventTrigger(
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "deployment"},
            after={"prefect.flow-run.heartbeat"},
            expect=_EXPECTED_EVENTS,
            for_each={"prefect.resource.id"},
            posture=automations.Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within),
        ),
        actions=[
            automations.ChangeFlowRunState(
                state=StateType.CRASHED,
                message=crash_message(heartbeat_seconds),
                force=False,  # never overwrite a final state reported meanwhile
            )
        ],
    )


def sync_crash_automation(api_url: str, heartbeat_seconds: int | None) -> str:
    """Make the Prefect server at `api_url` hold exactly one automation CRASH_AUTOMATION_NAME with
    crash_automation(heartbeat_seconds)'s settings (sync_automation); with heartbeat_seconds None or 0
    an existing one is disabled. Returns what it did: 'created', 'updated', 'unchanged', 'disabled' or
    'absent'. Raises ServiceError if the server refuses or cannot be reached."""
    if heartbeat_seconds:
        return sync_automation(api_url, lambda: crash_automation(heartbeat_seconds))
    return _on_server(api_url, _disable_all, CRASH_AUTOMATION_NAME)


def sync_automation(api_url: str, desired: Callable[[], Automation]) -> str:
    """Make the Prefect server at `api_url` hold exactly one automation named like `desired()` (called
    with the server set, so it may look things up there), with its settings: created if missing, updated
    (same id) if it differs, extra copies deleted. Returns 'created', 'updated' or 'unchanged'.

    A server that has just started may answer 503 while its services come up: Prefect's client retries
    that (and 429/502) with backoff, PREFECT_CLIENT_MAX_RETRIES times (5: about a minute).
    Raises ServiceError if the server refuses or cannot be reached."""
    return _on_server(api_url, _sync, desired)


def read_deployment_id(name: str, api_url: str) -> UUID:
    """The id of deployment `name` ('flow/deployment') on the Prefect server in PREFECT_API_URL (call it
    where that is set, as in sync_automation's `desired`); ServiceError naming `api_url` if it is not
    deployed there."""
    from prefect.client.orchestration import get_client  # lazy: keeps `sngp --help` fast
    from prefect.exceptions import ObjectNotFound  # lazy: keeps `sngp --help` fast

    with get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(name).id
        except ObjectNotFound:
            raise ServiceError(
                f"no deployment {name} on {api_url}: register it first "
                "(make deploy runs prefect deploy --all before this)"
            ) from None


def _on_server(api_url: str, action: Callable, argument) -> str:
    import httpx  # lazy, as Prefect: keeps `sngp --help` fast
    from prefect.exceptions import PrefectException  # lazy: keeps `sngp --help` fast
    from prefect.settings import PREFECT_API_URL, temporary_settings  # lazy: keeps `sngp --help` fast

    try:
        with temporary_settings({PREFECT_API_URL: api_url}):
            return action(argument)
    except (httpx.HTTPError, PrefectException) as exc:
        raise ServiceError(f"the Prefect server at {api_url} refused the automation: {exc}") from None


def _disable_all(name: str) -> str:
    enabled = [automation for automation in _read_all(name) if automation.enabled]
    for automation in enabled:
        automation.disable()
    return "disabled" if enabled else "absent"


def _sync(make_desired: Callable[[], Automation]) -> str:
    desired = make_desired()
    found = _read_all(desired.name)
    if not found:
        desired.create()
        return "created"
    # Listed most recently updated first: keep the longest-standing one (a copy made by hand is newer).
    *extra, keep = found
    for automation in extra:  # one automation, one action per trigger
        automation.delete()
    if _settings(keep) != _settings(desired):
        desired.id = keep.id
        desired.update()
        return "updated"
    return "updated" if extra else "unchanged"


def _read_all(name: str) -> list[Automation]:
    """Every automation named `name` (Automation.read returns only one)."""
    from prefect.automations import Automation  # lazy: keeps `sngp --help` fast
    from prefect.client.orchestration import get_client  # lazy: keeps `sngp --help` fast

    with get_client(sync_client=True) as client:
        found = client.read_automations_by_name(name)
    return [Automation(**automation.model_dump()) for automation in found if automation.name == name]


def _settings(automation: Automation) -> dict:
    """What the automation does, comparable between the server's copy and ours (sets stay sets)."""
    return automation.model_dump(exclude={"id", "owner_resource"})
