"""The monitor's inbox on disk: batch files, their claims, scored/ and rejected/ (no Prefect, no MLflow, so
`sngp monitor` checks an inbox before anything heavy loads).

    DIR/<batch>.csv | .parquet           new batches (hidden files, e.g. .name.tmp being copied in, wait)
    DIR/scored/<batch>                   its columns + the model's outputs
    DIR/rejected/<batch>                 a batch that cannot be scored, beside <batch>.reason.txt
    DIR/.sngp-monitor/lock               held by the one monitor run working on the inbox
    DIR/.sngp-monitor/batches/<batch>.json   the batch's claim: number, content hash, model, state

tasks/monitor.py says how these make each batch count exactly once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from .redaction import redact

SCORED, REJECTED = "scored", "rejected"
STATE_DIR = ".sngp-monitor"
FORMATS = {".csv": "csv", ".parquet": "parquet"}
LOCK_WAIT_SECONDS = 600


class InboxError(ValueError):
    """The inbox cannot be used (missing, not a folder, not writable)."""


def check_inbox(inbox: str | os.PathLike) -> Path:
    """The inbox as an absolute path; InboxError (one line) if it is not a writable folder."""
    path = Path(inbox).expanduser().resolve()
    if not path.exists():
        raise InboxError(f"inbox {path} does not exist; create it (mkdir -p) or fix --inbox")
    if not path.is_dir():
        raise InboxError(f"inbox {path} is not a folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise InboxError(f"inbox {path} is not writable (batch files are moved out of it)")
    return path


@contextlib.contextmanager
def inbox_lock(inbox: Path, wait: float = LOCK_WAIT_SECONDS) -> Iterator[None]:
    """Hold DIR/.sngp-monitor/lock: one monitor run at a time works on an inbox (another waits up to
    `wait` s, then TimeoutError). The kernel releases it when the holder dies."""
    state = Path(inbox) / STATE_DIR
    state.mkdir(exist_ok=True)
    with open(state / "lock", "a") as handle:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"another monitor run held {state / 'lock'} for {wait:.0f} s"
                    ) from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def batch_files(inbox: Path) -> list[str]:
    """The batch files in the inbox, oldest first (modification time, then name): files ending in .csv
    or .parquet; hidden files and folders are left alone."""
    files = [
        path for path in Path(inbox).iterdir()
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in FORMATS
    ]  # fmt: skip
    files.sort(key=lambda path: (path.stat().st_mtime_ns, path.name))
    return [path.name for path in files]


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` a hidden temporary file beside `path`, flush it to disk, rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# --------------------------------------------------------------------------------------------------
# Claims


def _claim_path(inbox: Path, name: str) -> Path:
    return inbox / STATE_DIR / "batches" / f"{name}.json"


def read_claim(inbox: Path, name: str) -> dict | None:
    """The claim of batch file `name`, or None (none yet; a hand-edited, unreadable one counts as none)."""
    try:
        return json.loads(_claim_path(inbox, name).read_text())
    except (FileNotFoundError, ValueError):
        return None


def write_claim(inbox: Path, claim: dict) -> None:
    path = _claim_path(inbox, claim["file"])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(claim, indent=1)))


def claims(inbox: Path) -> list[dict]:
    folder = inbox / STATE_DIR / "batches"
    found = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        with contextlib.suppress(OSError, ValueError):
            found.append(json.loads(path.read_text()))
    return found


# --------------------------------------------------------------------------------------------------
# Reading, rejecting, writing


def one_line(text: object, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return redact(line if len(line) <= limit else line[: limit - 3] + "...")


def read_batch(path: Path, features: list[str]) -> pd.DataFrame:
    """The batch's rows; ValueError with a one-line reason if they cannot be scored: unreadable, no rows,
    a feature column missing, not numeric or not finite."""
    kind = FORMATS[path.suffix.lower()]
    try:
        frame = pd.read_parquet(path) if kind == "parquet" else pd.read_csv(path)
    except Exception as exc:  # noqa: BLE001 - whatever the reader says, the file is unreadable
        raise ValueError(f"unreadable {kind} file: {one_line(exc)}") from None
    if frame.empty:
        raise ValueError("no rows")
    missing = [name for name in features if name not in frame.columns]
    if missing:
        raise ValueError(f"missing feature column(s) {missing}; the model needs {', '.join(features)}")
    not_numeric = [
        name for name in features
        if pd.api.types.is_bool_dtype(frame[name]) or not pd.api.types.is_numeric_dtype(frame[name])
    ]  # fmt: skip
    if not_numeric:
        raise ValueError(f"column(s) {not_numeric} are not numeric")
    values = frame[features].to_numpy(dtype=np.float64)
    bad_rows = np.flatnonzero(~np.isfinite(values).all(axis=1))
    if bad_rows.size:
        raise ValueError(f"{bad_rows.size} row(s) with NaN or infinite features, first at row {bad_rows[0]}")
    return frame


def reject(inbox: Path, name: str, reason: str) -> Path:
    """Move batch file `name` to DIR/rejected/ (a name already there gets a time stamp) with its reason
    beside it (<name>.reason.txt) -> where it went. The move is the commit point."""
    folder = inbox / REJECTED
    folder.mkdir(exist_ok=True)
    target = folder / name
    if target.exists():
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        target = folder / f"{Path(name).stem}.{stamp}{Path(name).suffix}"
    target.with_name(target.name + ".reason.txt").write_text(f"{name}: {reason}\n")
    os.replace(inbox / name, target)
    return target


def scored_frame(frame: pd.DataFrame, outputs: pd.DataFrame) -> pd.DataFrame:
    """The batch's columns and the model's outputs side by side (an input column named like an output
    keeps its values as input_<name>)."""
    clashes = {name: f"input_{name}" for name in outputs.columns if name in frame.columns}
    inputs = frame.rename(columns=clashes).reset_index(drop=True)
    return pd.concat([inputs, outputs.reset_index(drop=True)], axis=1)


def write_scored(inbox: Path, name: str, scored: pd.DataFrame) -> Path:
    """DIR/scored/<name>, in the batch's own format, written atomically (a rerun rewrites it whole)."""
    folder = inbox / SCORED
    folder.mkdir(exist_ok=True)
    if FORMATS[Path(name).suffix.lower()] == "parquet":
        return write_atomic(folder / name, lambda tmp: scored.to_parquet(tmp, index=False))
    return write_atomic(folder / name, lambda tmp: scored.to_csv(tmp, index=False))
