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
import socket
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.locking.filesystem import FileSystemLockManager

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


# --------------------------------------------------------------------------------------------------
# Locks: identical tasks running at the same time (several `sngp run`s or workers sharing the cache
# folder) run once; the others wait and read the cached result.

LOCK_HOLD_SECONDS = 6 * 3600  # last resort for a holder on another host that died without releasing
HOST = socket.gethostname()


def process_start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, Linux), to tell a live holder from pid reuse."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return started is None or process_start_time(pid) in (None, started)


class ProcessLockManager(FileSystemLockManager):
    """Prefect's file-system lock manager, except that a lock dies with the process that holds it.

    Prefect's lock files carry no expiry, so a run killed with SIGKILL while it held a task's lock
    (it was training) would make every later run of that task wait forever. Here each lock file also
    records the holder's host, pid and process start time, is created complete (written aside, then
    hard-linked into place, so nobody reads a half-written lock), and a lock whose process on this host
    is gone counts as released. Locks from other hosts expire after LOCK_HOLD_SECONDS as a last resort.
    """

    def __init__(self, lock_files_directory: str | os.PathLike, hold_seconds: float = LOCK_HOLD_SECONDS):
        super().__init__(Path(lock_files_directory))
        self.hold_seconds = hold_seconds

    def acquire_lock(self, key, holder, acquire_timeout=None, hold_timeout=None) -> bool:
        self._ensure_lock_files_directory_exists()
        path = self.lock_files_directory / f"{key}.lock"
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        while True:
            if self.is_locked(key) and not self.is_lock_holder(key, holder):
                left = None if deadline is None else max(deadline - time.monotonic(), 1e-3)
                if not self.wait_for_lock(key, left):
                    return False
            expiration = datetime.now(UTC) + timedelta(seconds=hold_timeout or self.hold_seconds)
            info = {"holder": holder, "expiration": expiration.isoformat(), "host": HOST,
                    "pid": os.getpid(), "started": process_start_time(os.getpid())}  # fmt: skip
            tmp = path.with_name(f".{path.name}.{os.getpid()}-{os.urandom(4).hex()}")
            tmp.write_text(json.dumps(info))
            try:
                os.link(tmp, path)  # atomic: fails if someone holds the lock
            except FileExistsError:
                if self.is_lock_holder(key, holder):
                    return True
                continue  # taken meanwhile: wait again
            finally:
                tmp.unlink(missing_ok=True)
            self._locks[key] = {"holder": holder, "expiration": expiration, "path": path}
            return True

    async def aacquire_lock(self, key, holder, acquire_timeout=None, hold_timeout=None) -> bool:
        return self.acquire_lock(key, holder, acquire_timeout, hold_timeout)

    def _get_lock_info(self, key: str, use_cache: bool = True):
        if use_cache and (cached := self._locks.get(key)) is not None:
            return cached
        path = self.lock_files_directory / f"{key}.lock"
        try:
            raw = json.loads(path.read_bytes() or b"{}")
        except FileNotFoundError:
            self._locks.pop(key, None)
            return None
        except ValueError:  # a lock file written by another tool, still being written: held
            raw = {}
        if raw.get("host") == HOST and isinstance(raw.get("pid"), int):
            if not process_alive(raw["pid"], raw.get("started")):
                path.unlink(missing_ok=True)  # its holder was killed: the lock died with it
                self._locks.pop(key, None)
                return None
        expiration = raw.get("expiration")
        info = {
            "holder": raw.get("holder", ""),
            "expiration": datetime.fromisoformat(expiration) if expiration else None,
            "path": path,
        }
        self._locks[key] = info
        return info

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        info = self._get_lock_info(key, use_cache=use_cache)
        if info is None:
            return False
        if info["expiration"] is not None and info["expiration"] < datetime.now(UTC):
            Path(info["path"]).unlink(missing_ok=True)
            self._locks.pop(key, None)
            return False
        return True


def task_lock_manager() -> ProcessLockManager:
    """Locks for the tasks caching under cache_root() (resolved when called)."""
    return ProcessLockManager(cache_root() / "prefect-locks")


def configured(task):
    """The task with its cache records stored beside the artefacts (cache_root(), resolved at run time),
    so deleting the cache folder invalidates both together.

    Each record (key, metadata and result together, under a relative key) lives in the cache folder,
    never in PREFECT_HOME: `sngp run` and a served worker have different PREFECT_HOMEs but share the
    cache folder, and a record pointing into another PREFECT_HOME's storage fails the task
    ("Provided path ... is outside of the base path ...") instead of being a cache hit.

    SERIALIZABLE: identical tasks of concurrent runs sharing the cache folder run once (the others wait
    for the lock, then read the cached result); the lock dies with its process (tasks.cache)."""
    policy = CACHE_POLICY.configure(isolation_level="SERIALIZABLE", lock_manager=task_lock_manager())
    return task.with_options(cache_policy=policy, result_storage=cache_root() / "prefect-results")
