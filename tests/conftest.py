"""Fixtures shared by every test; the helpers behind them live in tests/support/ (import from there)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from support.cli import PNG_MAGIC, REPO, clean_server_env, describe, run_sngp, sngp_env  # noqa: F401 - see below
from support.records import MlflowReader

from sngp_models.evaluation import METRIC_NAMES

# Until every test file imports from tests/support directly, `from conftest import ...` keeps working.
METRICS = METRIC_NAMES
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # quiet downloads under pytest -s


def pytest_configure(config):
    """A shell starts a background job (`make test &`, `nohup ... &`) with SIGINT ignored, and every
    process it starts inherits that, so `sngp run` would never see the Ctrl-C the interrupt tests send:
    give the session, and so its children, the terminal's default."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="module")
def mlflow_reader(tmp_path_factory):
    """`mlflow_reader(workdir)`: a reader for the default store `sngp` creates there (sqlite:///mlflow.db)."""
    downloads = tmp_path_factory.mktemp("mlflow-downloads")

    def make(workdir: Path) -> MlflowReader:
        db = workdir / "mlflow.db"
        assert db.is_file(), f"no MLflow store at {db}"
        return MlflowReader(f"sqlite:///{db}", downloads)

    return make


# Tests that spend minutes waiting, not computing: Prefect's 120 s heartbeat window (the shortest it
# allows) and a crash loop's restart backoff. Marked `waiting`: `make test` runs them in a second pytest
# beside all the others, so the 2 cores compute while they wait.
WAITING = (
    "servers/test_crash_retry.py::",
    "servers/test_supervision.py::test_crash_loop_stops_serve_with_a_message",
)


def pytest_collection_modifyitems(items):
    """Tests under tests/servers/ and tests/reliability/ start real server stacks and `sngp` processes:
    marked `e2e`, so `make test-fast` (-m "not slow and not e2e") runs only the unit tests. WAITING
    tests are marked `waiting`."""
    for item in items:
        if {"servers", "reliability"} & set(item.path.relative_to(Path(__file__).parent).parts):
            item.add_marker(pytest.mark.e2e)
        if any(f"tests/{name}" in item.nodeid for name in WAITING):
            item.add_marker(pytest.mark.waiting)
