"""Where cached artefacts live and how task caches are keyed.

Prefect's default cache policy includes the flow run id, so nothing would be reused across runs.
Our tasks are keyed by their inputs (configs, seeds, file paths: never big arrays) plus the task's source
plus `CODE_VERSION`, a hash of the library and task code, so editing the model code invalidates caches.
Artefacts (datasets, models, predictions, plots) are files under `cache_root()`, written atomically;
tasks return their paths.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.locking.protocol import LockManager

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
    """Call `write(tmp_path)` then rename into place, so readers never see a half-written file. The
    temp file goes on any error; a full disk is an OSError(ENOSPC) naming `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno == errno.ENOSPC and not exc.filename:  # writers seldom say which file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from exc
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


# --------------------------------------------------------------------------------------------------
# Locks: identical tasks running at the same time (several `sngp run`s or workers sharing the cache
# folder) run once; the others wait and read the cached result.

LOCK_HOLD_SECONDS = 6 * 3600  # last resort for a holder on another host that died without releasing
LOCK_POLL_SECONDS = 0.1
HOST = socket.gethostname()


def process_start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, Linux), to tell a live holder from pid reuse.

    Read from /proc rather than psutil's create_time(): that one is seconds since the epoch, derived
    from the wall clock, so it moves when NTP or an admin sets the clock and a live holder would look
    like a new process. Ticks since boot never change. None where /proc is missing (then the pid decides).
    """
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_alive(pid: int, started: str | None) -> bool:
    """Whether process `pid` of this host still runs and is the one that started at `started`
    (a zombie, killed but not yet reaped by its parent, counts as gone)."""
    try:
        if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return False
    except psutil.NoSuchProcess:
        return False
    except (psutil.AccessDenied, ValueError):  # not ours to inspect, or not a pid: assume it lives
        return True
    return started is None or process_start_time(pid) in (None, started)


@dataclass(frozen=True)
class LockRecord:
    """What a lock file says: who holds it, from which process, until when."""

    holder: str
    expiration: datetime
    host: str | None = None
    pid: int | None = None
    started: str | None = None

    def alive(self) -> bool:
        """The holder still holds it: not expired and, on this host, its process still runs."""
        if self.expiration <= datetime.now(UTC):
            return False
        if self.host == HOST and self.pid is not None:
            return process_alive(self.pid, self.started)
        return True


class ProcessLockManager(LockManager):
    """Prefect's lock-manager interface on lock files in one folder, where a lock dies with its process.

    Prefect's own FileSystemLockManager writes lock files without an expiry, so a run killed with
    SIGKILL while it held a task's lock (it was training) would make every later run of that task wait
    forever; it also exposes nothing to extend but private methods. So this implements the public
    protocol (prefect.locking.protocol.LockManager) itself: each lock file `<key>.lock` records the
    holder, host, pid, process start time and an expiry, and is created complete (written aside, then
    hard-linked into place: atomic, and fails if the lock exists). A lock whose process on this host is
    gone is free (its file is removed by whoever notices); any lock, and so one held from another host,
    expires after `hold_seconds` (LOCK_HOLD_SECONDS unless Prefect asks for a hold timeout) as a last
    resort. Nothing is cached in memory: every answer reads the file, so processes sharing the folder
    agree, and the manager pickles (sweep points run on Dask workers).
    """

    def __init__(self, lock_files_directory: str | os.PathLike, hold_seconds: float = LOCK_HOLD_SECONDS):
        self.lock_files_directory = Path(lock_files_directory).expanduser().resolve()
        self.hold_seconds = hold_seconds

    def __eq__(self, other: object) -> bool:  # Prefect compares the lock managers of combined policies
        if not isinstance(other, ProcessLockManager):
            return NotImplemented
        return self.identity() == other.identity()

    def __hash__(self) -> int:
        return hash(self.identity())

    def identity(self) -> tuple[Path, float]:
        return self.lock_files_directory, self.hold_seconds

    def __repr__(self) -> str:
        return f"ProcessLockManager({str(self.lock_files_directory)!r})"

    def lock_path(self, key: str) -> Path:
        return self.lock_files_directory / f"{key}.lock"

    def current_lock(self, key: str) -> LockRecord | None:
        """The live lock on `key`, None if it is free. A dead lock's file is removed."""
        path = self.lock_path(key)
        try:
            content = path.read_bytes()
            modified = path.stat().st_mtime
        except FileNotFoundError:
            return None
        record = _parse_lock(content, modified, self.hold_seconds)
        if record.alive():
            return record
        _remove_if_unchanged(path, content)
        return None

    def try_acquire(self, key: str, holder: str, hold_timeout: float | None = None) -> bool:
        """One attempt, never waits: True if `holder` holds the lock now (it may already have)."""
        current = self.current_lock(key)
        if current is not None:
            return current.holder == holder
        self.lock_files_directory.mkdir(parents=True, exist_ok=True)
        path = self.lock_path(key)
        hold = self.hold_seconds if hold_timeout is None else hold_timeout
        expiration = (datetime.now(UTC) + timedelta(seconds=hold)).isoformat()
        pid = os.getpid()
        started = process_start_time(pid)
        record = {"holder": holder, "expiration": expiration, "host": HOST, "pid": pid, "started": started}
        tmp = path.with_name(f".{path.name}.{pid}-{os.urandom(4).hex()}")
        try:
            tmp.write_text(json.dumps(record))  # inside: a full disk leaves no partial temp file
            os.link(tmp, path)  # atomic; fails if someone took the lock since we looked
        except FileExistsError:
            return self.is_lock_holder(key, holder)
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def _waits(self, key: str, holder: str, acquire_timeout: float | None, hold_timeout: float | None):
        """Yield the seconds to wait before each next try, until the lock is taken or time is up."""
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        while not self.try_acquire(key, holder, hold_timeout):
            pause = _pause_before(deadline)
            if pause is None:
                return
            yield pause

    def acquire_lock(
        self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None
    ) -> bool:
        for pause in self._waits(key, holder, acquire_timeout, hold_timeout):
            time.sleep(pause)
        return self.is_lock_holder(key, holder)

    async def aacquire_lock(
        self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None
    ) -> bool:
        for pause in self._waits(key, holder, acquire_timeout, hold_timeout):
            await asyncio.sleep(pause)
        return self.is_lock_holder(key, holder)

    def release_lock(self, key: str, holder: str) -> None:
        """Remove `holder`'s lock. A lock that is already gone (expired, or the cache folder was
        deleted meanwhile) leaves nothing to do; someone else's lock is an error, as in Prefect."""
        path = self.lock_path(key)
        try:
            content = path.read_bytes()
        except FileNotFoundError:
            return
        record = _parse_lock(content, 0.0, self.hold_seconds)
        if record.holder != holder:
            if self.current_lock(key) is None:
                return
            raise ValueError(f"No lock held by {holder} for transaction with key {key}")
        _remove_if_unchanged(path, content)

    def is_locked(self, key: str) -> bool:
        return self.current_lock(key) is not None

    def is_lock_holder(self, key: str, holder: str) -> bool:
        current = self.current_lock(key)
        return current is not None and current.holder == holder

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_locked(key):
            pause = _pause_before(deadline)
            if pause is None:
                return False
            time.sleep(pause)
        return True

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_locked(key):
            pause = _pause_before(deadline)
            if pause is None:
                return False
            await asyncio.sleep(pause)
        return True


def _parse_lock(content: bytes, modified: float, hold_seconds: float) -> LockRecord:
    """A lock file's record. Without a readable expiry it expires `hold_seconds` after it was written."""
    try:
        raw = json.loads(content)
    except ValueError:
        raw = None
    if not isinstance(raw, dict):
        raw = {}
    try:
        expiration = datetime.fromisoformat(raw["expiration"])
        if expiration.tzinfo is None:
            expiration = expiration.replace(tzinfo=UTC)
    except (KeyError, TypeError, ValueError):
        expiration = datetime.fromtimestamp(modified, UTC) + timedelta(seconds=hold_seconds)
    pid, started = raw.get("pid"), raw.get("started")
    return LockRecord(
        holder=str(raw.get("holder", "")),
        expiration=expiration,
        host=raw.get("host"),
        pid=pid if isinstance(pid, int) and pid > 0 else None,
        started=None if started is None else str(started),
    )


def _remove_if_unchanged(path: Path, content: bytes) -> None:
    """Delete the lock file if it still holds `content` (not a lock someone took since it was read)."""
    try:
        if path.read_bytes() == content:
            path.unlink()
    except FileNotFoundError:
        pass


def _pause_before(deadline: float | None) -> float | None:
    """Seconds to sleep before the next look at a lock; None once `deadline` (monotonic) has passed."""
    if deadline is None:
        return LOCK_POLL_SECONDS
    left = deadline - time.monotonic()
    return None if left <= 0 else min(LOCK_POLL_SECONDS, left)


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
