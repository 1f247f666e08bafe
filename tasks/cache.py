"""Where cached artefacts live and how task caches are keyed.

Prefect's default cache policy includes the flow run id, so nothing would be reused across runs.
Our tasks are keyed by their inputs (configs, seeds, file paths: never big arrays) plus the task's source
plus `CODE_VERSION`, a hash of the library and task code, so editing the model code invalidates caches.
Artefacts (datasets, models, predictions, plots) are files under `cache_root()`, written atomically;
tasks return their paths.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from prefect.cache_policies import INPUTS, TASK_SOURCE

_PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _code_version() -> str:
    digest = hashlib.sha256()
    for package in ("sngp_models", "tasks"):
        for path in sorted((_PROJECT_ROOT / package).glob("*.py")):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


CODE_VERSION = _code_version()
CACHE_POLICY = INPUTS + TASK_SOURCE


def cache_root() -> Path:
    """`SNGP_CACHE_DIR`, else `.sngp_cache` in the working directory."""
    return Path(os.environ.get("SNGP_CACHE_DIR") or Path.cwd() / ".sngp_cache").resolve()


def stable_key(*parts: Any) -> str:
    """A short, stable hash of JSON-able parts (for artefact file names)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def artifact_path(kind: str, name: str) -> Path:
    path = cache_root() / kind / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_atomic(path: Path, write) -> Path:
    """Call `write(tmp_path)` then rename into place, so readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
