"""A flow that only sleeps, for tests/servers/test_crash_retry.py: deployed on the
served work pool, its worker and flow-run process are killed while it runs.

Its parameters are those of the sweep-point flow (flows/sweep_point_flow.py), so the sweep's
`dispatch_point` can submit it like a point; `seconds` is how long it sleeps.
"""

from __future__ import annotations

import time

from prefect import flow


@flow(name="sngp-test-sleeper", persist_result=False)
def sleeper(
    label: str = "",
    method: str = "",
    model_settings: dict | None = None,
    data_path: str = "",
    code_version: str | None = None,
    seconds: float = 900.0,
) -> None:
    time.sleep(seconds)


# The same flow under the retrain flow's name, deployed as retrain/nightly and retrain/nightly-retry: the
# deployments the crash-retry automation (flows.ops.retry_automation) looks up by name.
retrain_stand_in = sleeper.with_options(name="retrain")
