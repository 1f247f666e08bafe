"""The TensorFlow-free part of the model interface, shared by every method.

`Prediction`, the uncertainty score, and the on-disk format `load_model` reads: a directory that appears
atomically at its final path, holding `model.json` (method, config, metadata), the method's payload
files and, written last, `manifest.json` with the SHA-256 of every other file. Kept apart from models.py
so that methods without TensorFlow (exact_gp) can use it without importing TensorFlow.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Prediction:
    probs: np.ndarray  # (N, C), rows sum to 1
    uncertainty: np.ndarray  # (N,), (1 - sum_c p_c^2) / 2


class Classifier:
    """What every method shares on top of its own `predict_with_uncertainty(x) -> Prediction`: the
    scikit-learn style `predict_proba` and `predict`."""

    def predict_with_uncertainty(self, x) -> Prediction:
        raise NotImplementedError

    def predict_proba(self, x) -> np.ndarray:
        return self.predict_with_uncertainty(x).probs

    def predict(self, x) -> np.ndarray:
        return np.argmax(self.predict_proba(x), axis=1)


def uncertainty_from_probs(probs: np.ndarray) -> np.ndarray:
    """(1 - sum_c p_c^2) / 2 per row: the study's p(1-p) generalised to C classes."""
    probs = np.asarray(probs)
    return 0.5 * (1.0 - np.sum(np.square(probs), axis=-1))


def write_model_dir(
    path: str | os.PathLike, meta: dict[str, Any], write_payload: Callable[[Path], None]
) -> Path:
    """Write `write_payload(dir)`'s files + model.json (`meta` with format_version) + manifest atomically.

    The directory appears at `path` only once complete; an existing model there is replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write_payload(tmp)
        (tmp / "model.json").write_text(json.dumps({"format_version": FORMAT_VERSION, **meta}, indent=2))
        manifest = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        # Written last: a directory without a valid manifest is never loaded as a model.
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        _move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _move_into_place(tmp: Path, path: Path) -> None:
    """Rename the finished `tmp` to `path`, replacing a model there. Several processes may save to the
    same path at once (runs sharing a cache): whoever renames last wins, nobody fails."""
    for _attempt in range(100):
        trash = None
        if path.exists():
            trash = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            try:
                path.rename(trash)
            except FileNotFoundError:  # another writer moved it away first
                trash = None
        try:
            tmp.rename(path)
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            # another writer put its complete model there in between: replace that one
        finally:
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
    raise OSError(errno.EBUSY, f"could not move the saved model into place at {path}")


def read_model_dir(path: str | os.PathLike) -> dict[str, Any]:
    """Check the manifest's checksums and the format version; return model.json's contents."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise ValueError(f"{path}: not a complete saved model (no manifest.json); it may be half-written")
    try:
        manifest = json.loads(manifest_path.read_text())
        for name, digest in manifest.items():
            if _sha256(path / name) != digest:
                raise ValueError(f"{path / name}: checksum mismatch; the saved model is corrupt")
        meta = json.loads((path / "model.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable saved model: {exc}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    return meta


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
