"""The TensorFlow-free part of the model interface, shared by every method.

`Prediction`, the uncertainty score, what every model carries besides its weights (the input scaling
`Standardizer`, feature and class names; `Classifier`), and the on-disk format `load_model` reads: a
directory that appears atomically at its final path, holding `model.json` (method, config, metadata), the
method's payload files and, written last, `manifest.json` with the SHA-256 of every other file. Kept apart
from models.py so that methods without TensorFlow (exact_gp) can use it without importing TensorFlow.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .validation import NotFittedError, check_features, check_labels

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Prediction:
    probs: np.ndarray  # (N, C), rows sum to 1
    uncertainty: np.ndarray  # (N,), (1 - sum_c p_c^2) / 2


@dataclass(frozen=True)
class Standardizer:
    """Per-feature (x - mean) / std with the train x's statistics (float64); a constant feature has
    std 1, so it is only centred. Applied in float64, returned as float32."""

    mean: np.ndarray  # (D,) float64
    std: np.ndarray  # (D,) float64, > 0

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardizer:
        x = np.asarray(x, dtype=np.float64)
        std = x.std(axis=0)
        std[std == 0] = 1.0
        return cls(mean=x.mean(axis=0), std=std)

    def transform(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, dtype=np.float64) - self.mean) / self.std).astype(np.float32)

    def to_dict(self) -> dict[str, list[float]]:
        # JSON writes a float64 as the shortest string that reads back as the same float: exact round trip.
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, list[float]]) -> Standardizer:
        return cls(mean=np.asarray(d["mean"], dtype=np.float64), std=np.asarray(d["std"], dtype=np.float64))


def check_names(names: Sequence | None, count: int, name: str, default_prefix: str) -> tuple[str, ...]:
    """`count` distinct strings (default: f"{default_prefix}{i}"); ValueError naming `name` otherwise."""
    if names is None:
        return tuple(f"{default_prefix}{i}" for i in range(count))
    if isinstance(names, (str, bytes)):
        raise ValueError(f"{name}: must be a list of {count} distinct strings, got the string {names!r}")
    try:
        values = tuple(names)
    except TypeError:
        raise ValueError(f"{name}: must be a list of {count} distinct strings, got {names!r}") from None
    if len(values) != count:
        raise ValueError(f"{name}: must have {count} entries (one per {name[:-6]}), got {len(values)}")
    if not all(isinstance(v, (str, np.str_)) and v for v in values):
        raise ValueError(f"{name}: must hold non-empty strings, got {list(values)!r}")
    if len(set(values)) != count:
        raise ValueError(f"{name}: must be distinct, got {list(values)!r}")
    return tuple(str(v) for v in values)


class Classifier:
    """What every method shares on top of its own `predict_with_uncertainty(x) -> Prediction`: the
    scikit-learn style `predict_proba` and `predict`, and what travels with the weights:

    - `feature_names` ("x0".."x{D-1}" unless fit was given them) and `class_names` ("0".."C-1" unless
      given): the names of the input columns and of the classes (label i is `class_names[i]`);
    - `standardizer`: with `config.standardize`, the input scaling fitted on the train x (else None).
    """

    method: str = ""
    input_dim: int | None = None
    feature_names: tuple[str, ...] | None = None
    class_names: tuple[str, ...] | None = None
    standardizer: Standardizer | None = None
    # SNGP's random-feature kernel scale in use (models.SNGPModel); None for the methods without one.
    gp_kernel_scale_: float | None = None

    def predict_with_uncertainty(self, x) -> Prediction:
        raise NotImplementedError

    def is_fitted(self) -> bool:
        raise NotImplementedError

    def prepare_fit(
        self, x, y, feature_names: Sequence[str] | None = None, class_names: Sequence[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Check x and y, set input_dim, the names and the scaling; return (scaled x float32, y int64)."""
        x = check_features(x, "x")
        y = check_labels(y, x.shape[0], self.config.num_classes)
        features = check_names(feature_names, int(x.shape[1]), "feature_names", "x")
        classes = check_names(class_names, self.config.num_classes, "class_names", "")
        self.input_dim, self.feature_names, self.class_names = int(x.shape[1]), features, classes
        self.standardizer = Standardizer.fit(x) if self.config.standardize else None
        return self.scale(x), y

    def check_fitted(self) -> None:
        """NotFittedError unless the model was fitted or loaded."""
        if not self.is_fitted():
            raise NotFittedError(
                f"{self.method} model is not fitted yet: call fit(x, y) or load_model(path) first"
            )

    def prepare_predict(self, x) -> np.ndarray:
        """Check that the model is fitted and x fits it; x as float32 (not yet scaled: see `scale`)."""
        self.check_fitted()
        return check_features(x, "x", self.input_dim)

    def scale(self, x: np.ndarray) -> np.ndarray:
        """x as the network sees it: standardised with the train statistics if `config.standardize`."""
        return x if self.standardizer is None else self.standardizer.transform(x)

    def interface_meta(self) -> dict[str, Any]:
        """What `save` writes besides the method's payload (restored by `restore_interface`)."""
        return {
            "input_dim": self.input_dim,
            "feature_names": list(self.feature_names),
            "class_names": list(self.class_names),
            "standardizer": None if self.standardizer is None else self.standardizer.to_dict(),
        }

    def restore_interface(self, meta: dict[str, Any]) -> None:
        """Inverse of `interface_meta` (models saved before names and scaling existed get the defaults)."""
        self.input_dim = int(meta["input_dim"])
        self.feature_names = check_names(meta.get("feature_names"), self.input_dim, "feature_names", "x")
        self.class_names = check_names(meta.get("class_names"), self.config.num_classes, "class_names", "")
        scaling = meta.get("standardizer")
        self.standardizer = None if scaling is None else Standardizer.from_dict(scaling)

    def copy_interface(self, other: Classifier) -> None:
        """Take input_dim, names and scaling from a fitted `other` (e.g. MC Dropout from deterministic)."""
        self.input_dim, self.feature_names = other.input_dim, other.feature_names
        self.class_names, self.standardizer = other.class_names, other.standardizer

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

    The directory appears at `path` only once complete; an existing model there is replaced. On any
    error the partial directory goes; a full disk is an OSError(ENOSPC) naming `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write_payload(tmp)
        (tmp / "model.json").write_text(json.dumps({"format_version": FORMAT_VERSION, **meta}, indent=2))
        manifest = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        # Written last: a directory without a valid manifest is never loaded as a model.
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        _move_into_place(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC and not exc.filename:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from exc  # name the model
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
            if file_sha256(path / name) != digest:
                raise ValueError(f"{path / name}: checksum mismatch; the saved model is corrupt")
        meta = json.loads((path / "model.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable saved model: {exc}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    return meta


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MB blocks (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
