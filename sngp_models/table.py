"""Your own data: a labelled CSV or Parquet table (a file or a glob of files) as train, test and OOD sets.

    data = load_table("data/labelled/*.parquet", label="outcome", ood_classes=["rare"])
    data.x_train, data.y_train, data.x_test, data.y_test, data.x_ood   # RAW float32 features, int labels
    data.class_names, data.feature_names, data.keys_train, data.digest

- All files a glob matches are concatenated in name order; they must share their columns.
- Labels may be integers or strings; the class names are kept as strings (`class_names[i]` is label i),
  sorted (numerically for numeric labels, else as text).
- `features`: default every numeric column except the label and `id_column`.
- Stable split: each row has a key, `str(id value)` with `id_column`, else a hash of its feature values
  (their float64 bytes). A row is on the test side iff `int(sha256(key)[:16], 16) / 2**64 < test_fraction`
  (`test_side`), so it never changes side when files are added or reordered.
- OOD: the rows of `ood_path` (same feature columns; a label column there is ignored) and the rows whose
  label is in `ood_classes` (held out of training).
- Features are NOT scaled here: the model's `standardize` fits the scaling on the train split and saves it.
- `table_digest(path, ood_path)` hashes the matched files' names and bytes without parsing them, so a
  caller can put it into a cache key before loading; `TableData.digest` is the same value.

Every bad input raises `TableError` (a ValueError) with one line naming the file/column/value and what is
allowed. Only numpy and pandas (+ pyarrow for Parquet) are needed.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .data import make_grid

CSV_SUFFIXES = (".csv",)
PARQUET_SUFFIXES = (".parquet", ".pq")
MISSING_POLICIES = ("error", "drop")
GRID_MARGIN = 0.1  # the 2-D grid extends this fraction of the data's span beyond it on every side
_GLOB_CHARS = frozenset("*?[")


class TableError(ValueError):
    """Bad table input: one line naming the file/column/value and what is allowed."""


@dataclass(frozen=True)
class TableData:
    """A table's train/test split and OOD set; the first ten fields mirror `data.TwoMoonsData` /
    `digits.DigitsData` (the grid fields are set only for 2-feature tables)."""

    x_train: np.ndarray  # (N_train, D) float32, raw feature values
    y_train: np.ndarray  # (N_train,) int64 in [0, num_classes): index into class_names
    x_test: np.ndarray
    y_test: np.ndarray
    x_grid: np.ndarray | None  # (grid_size**2, 2) over the train data's range (+ margin), 2 features only
    x_ood: np.ndarray  # (N_ood, D) float32; (0, D) without an OOD source
    grid_shape: tuple[int, int] | None
    x_range: tuple[float, float] | None
    y_range: tuple[float, float] | None
    num_classes: int
    class_names: tuple[str, ...]
    feature_names: tuple[str, ...]
    keys_train: np.ndarray  # (N_train,) str: each row's stable key (see test_side)
    keys_test: np.ndarray
    digest: str  # table_digest(path, ood_path)


# --- public helpers ------------------------------------------------------------------------------------


def test_side(keys: np.ndarray, test_fraction: float) -> np.ndarray:
    """Boolean mask: True where `int(sha256(key)[:16], 16) / 2**64 < test_fraction` (the stable split)."""
    test_fraction = check_test_fraction(test_fraction)
    keys = np.asarray(keys)
    top = np.fromiter(
        (int.from_bytes(hashlib.sha256(str(k).encode("utf-8")).digest()[:8], "big") for k in keys.ravel()),
        dtype=np.uint64,
        count=keys.size,
    )
    # uint64 -> float64 rounds like Python's int / 2**64 (the division by a power of two is exact).
    return (top.astype(np.float64) / 2.0**64 < test_fraction).reshape(keys.shape)


test_side.__test__ = False  # a library function, not a pytest test, when a test module imports it


def check_test_fraction(test_fraction: float) -> float:
    ok = isinstance(test_fraction, (int, float, np.integer, np.floating)) and not isinstance(
        test_fraction, (bool, np.bool_)
    )
    if not ok or not math.isfinite(float(test_fraction)) or not 0.0 < float(test_fraction) < 1.0:
        raise TableError(f"test_fraction: must be a number in (0, 1), got {test_fraction!r}")
    return float(test_fraction)


def table_digest(path: str, ood_path: str | None = None) -> str:
    """sha256 over the matched files' names and bytes, in name order (training files, then OOD files)."""
    digest = hashlib.sha256()
    sources = [("path", path)] + ([("ood_path", ood_path)] if ood_path is not None else [])
    for section, pattern in sources:
        digest.update(f"[{section}]\n".encode())
        for file in match_files(pattern, section):
            name = file.name.encode("utf-8")
            digest.update(len(name).to_bytes(8, "big") + name)
            digest.update(file.stat().st_size.to_bytes(8, "big"))
            with open(file, "rb") as fh:
                for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def match_files(pattern: str, what: str = "path") -> list[Path]:
    """The CSV/Parquet files `pattern` names (a file or a glob), sorted by name; TableError otherwise."""
    if not isinstance(pattern, (str, os.PathLike)) or not str(pattern):
        raise TableError(f"{what}: must be a CSV or Parquet file path or a glob, got {pattern!r}")
    pattern = os.path.expanduser(str(pattern))
    if _GLOB_CHARS & set(pattern):
        files = sorted((Path(p) for p in glob.glob(pattern)), key=lambda p: (p.name, str(p)))
        if not files:
            raise TableError(
                f"{what}: the glob {pattern!r} matches no file{_relative(pattern)}; "
                "give an existing CSV/Parquet file"
            )
    else:
        files = [Path(pattern)]
    for file in files:
        if file.is_dir():
            raise TableError(
                f"{what}: {file} is a directory; give a CSV or Parquet file or a glob such as {file}/*.csv"
            )
        if not file.exists():
            raise TableError(
                f"{what}: {file} does not exist{_relative(file)}; "
                "give an existing CSV or Parquet file or a glob"
            )
        if file.suffix.lower() not in CSV_SUFFIXES + PARQUET_SUFFIXES:
            raise TableError(
                f"{what}: {file} has suffix {file.suffix!r}; allowed: "
                f"{', '.join(CSV_SUFFIXES + PARQUET_SUFFIXES)}"
            )
    return files


def _relative(path: str | Path) -> str:
    """For a message about a relative path: where it was looked for (the working directory)."""
    return "" if os.path.isabs(path) else f" (relative to the working directory {os.getcwd()})"


# --- loading -------------------------------------------------------------------------------------------


def load_table(
    path: str,
    label: str,
    features: Sequence[str] | None = None,
    id_column: str | None = None,
    test_fraction: float = 0.2,
    ood_path: str | None = None,
    ood_classes: Sequence = (),
    missing: str = "error",
    grid_size: int = 100,
) -> TableData:
    """Read, check and split a labelled table (see the module docstring); TableError on bad input."""
    test_fraction = check_test_fraction(test_fraction)
    if missing not in MISSING_POLICIES:
        raise TableError(f"missing: must be one of {', '.join(MISSING_POLICIES)}, got {missing!r}")
    if isinstance(grid_size, bool) or not isinstance(grid_size, (int, np.integer)) or grid_size < 2:
        raise TableError(f"grid_size: must be an integer >= 2, got {grid_size!r}")
    if not isinstance(label, str) or not label:
        raise TableError(f"label: must be a column name, got {label!r}")
    if id_column is not None and (not isinstance(id_column, str) or id_column == label):
        raise TableError(
            f"id_column: must be a column name other than the label {label!r}, got {id_column!r}"
        )
    if isinstance(ood_classes, (str, bytes)) or not isinstance(ood_classes, (Sequence, np.ndarray)):
        raise TableError(f"ood_classes: must be a list of label values, got {ood_classes!r}")

    frame, origin = _read_all(path, "path")
    columns = list(frame.columns)
    where = f"path {path!r}"
    if label not in columns:
        raise TableError(f"label: column {label!r} not in {where}; columns: {_names(columns)}")
    if id_column is not None and id_column not in columns:
        raise TableError(f"id_column: column {id_column!r} not in {where}; columns: {_names(columns)}")
    feature_names = _feature_names(frame, features, label, id_column, where)

    x = _numeric(frame, feature_names, origin)
    x += 0.0  # -0.0 -> 0.0: equal values get equal bytes, hence equal row keys
    y_raw = frame[label]
    ids = frame[id_column] if id_column is not None else None
    bad = ~np.isfinite(x).all(axis=1) | y_raw.isna().to_numpy()
    if ids is not None:
        bad |= ids.isna().to_numpy()
    if bad.any():
        if missing == "error":
            first = int(np.flatnonzero(bad)[0])
            raise TableError(
                f"{where}: {int(bad.sum())} row(s) have NaN, inf or an empty value in the label, id or "
                f"features; first: {_row(origin, first)} "
                f"({_bad_cell(frame, x, feature_names, label, id_column, first)}); "
                "allowed: finite values, or missing: drop"
            )
        keep = ~bad
        x, y_raw, origin = x[keep], y_raw[keep], origin[keep]
        ids = ids[keep] if ids is not None else None
        if x.shape[0] == 0:
            raise TableError(
                f"{where}: no row is left after dropping rows with missing values (missing: drop)"
            )

    del frame  # the feature columns now live in x; the label (and id) columns stay referenced
    # One code per distinct label (pandas' hash table, no Python string per row), one name per code.
    codes, uniques = pd.factorize(y_raw.to_numpy())
    code_names = _as_strings(pd.Series(uniques))
    held_out = _held_out(code_names, ood_classes, label, where)
    is_ood = np.isin(code_names, list(held_out))[codes]
    known = np.unique(code_names[~np.isin(code_names, list(held_out))])
    if known.size < 2:
        reason = "all classes are held out by ood_classes" if known.size == 0 else f"only {known.tolist()}"
        raise TableError(
            f"label: column {label!r} in {where} needs at least 2 classes for training, {reason}; "
            "allowed: 2 or more distinct labels outside ood_classes"
        )
    class_names = _sorted_classes(y_raw.dtype, known)
    index = {name: i for i, name in enumerate(class_names)}
    y = np.array([index.get(name, -1) for name in code_names], dtype=np.int64)[codes]

    keys = _as_strings(ids) if ids is not None else _row_keys(x)
    with np.errstate(over="ignore"):  # a value beyond float32's range: reported below, not warned about
        x32 = x.astype(np.float32)
    del x
    if not np.isfinite(x32).all():
        first = int(np.flatnonzero(~np.isfinite(x32).all(axis=1))[0])
        raise TableError(
            f"{where}: {_row(origin, first)} has a value beyond float32's range (|x| > 3.4e38); "
            "allowed: finite float32 values"
        )
    on_test = test_side(keys, test_fraction)
    train, test = ~is_ood & ~on_test, ~is_ood & on_test
    counts = np.bincount(y[train], minlength=len(class_names))
    if counts.min() < 2:
        worst = class_names[int(np.argmin(counts))]
        raise TableError(
            f"label: class {worst!r} of column {label!r} in {where} has {int(counts.min())} training row(s) "
            f"(test_fraction={test_fraction}); allowed: at least 2 per class"
        )
    if not test.any():
        raise TableError(
            f"{where}: no row falls on the test side with test_fraction={test_fraction} "
            f"({int(train.sum())} training rows); allowed: more rows or a larger test_fraction"
        )

    x_ood = [x32[is_ood]]
    if ood_path is not None:
        x_ood.append(_read_ood(ood_path, feature_names, missing))
    x_train = x32[train]
    grid = _grid(x_train, grid_size) if len(feature_names) == 2 else (None, None, None, None)
    return TableData(
        x_train=x_train,
        y_train=y[train],
        x_test=x32[test],
        y_test=y[test],
        x_grid=grid[0],
        x_ood=np.concatenate(x_ood).astype(np.float32, copy=False),
        grid_shape=grid[1],
        x_range=grid[2],
        y_range=grid[3],
        num_classes=len(class_names),
        class_names=class_names,
        feature_names=tuple(feature_names),
        keys_train=keys[train],
        keys_test=keys[test],
        digest=table_digest(path, ood_path),
    )


# --- internals ---------------------------------------------------------------------------------------


def _names(columns: Sequence) -> str:
    shown = ", ".join(repr(str(c)) for c in list(columns)[:20])
    return shown + (f", ... ({len(columns)} in all)" if len(columns) > 20 else "")


def _read_all(pattern: str, what: str) -> tuple[pd.DataFrame, _Origin]:
    """All matched files concatenated; `origin` (N, 2): (file index, 0-based data row) of each row."""
    files = match_files(pattern, what)
    frames, origins = [], []
    for i, file in enumerate(files):
        frame = _read_file(file, what)
        if frames and list(frame.columns) != list(frames[0].columns):
            if set(frame.columns) != set(frames[0].columns):
                missing = sorted(set(frames[0].columns) - set(frame.columns), key=str)
                extra = sorted(set(frame.columns) - set(frames[0].columns), key=str)
                differences = "; ".join(
                    f"{kind}: {_names(names)}"
                    for kind, names in (("missing", missing), ("extra", extra))
                    if names
                )
                raise TableError(
                    f"{what}: {file} has other columns than {files[0].name} ({differences}); "
                    "allowed: every matched file with the same columns"
                )
            frame = frame[list(frames[0].columns)]
        frames.append(frame)
        origins.append(np.stack([np.full(len(frame), i), np.arange(len(frame))], axis=1))
    frame = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    if len(frame) == 0:
        raise TableError(
            f"{what}: {pattern!r} holds no data rows (header only); allowed: a table with at least one row"
        )
    origin = np.concatenate(origins)
    return frame.reset_index(drop=True), _Origin(files, origin)


class _Origin:
    """Where each row came from (file, data row), for messages; indexable like an array of rows."""

    def __init__(self, files: list[Path], rows: np.ndarray) -> None:
        self.files, self.rows = files, rows

    def __getitem__(self, mask) -> _Origin:
        return _Origin(self.files, self.rows[mask])

    def describe(self, i: int) -> str:
        file, row = self.rows[i]
        return f"data row {int(row) + 1} of {self.files[int(file)]}"


def _row(origin: _Origin, i: int) -> str:
    return origin.describe(i)


def _read_file(file: Path, what: str) -> pd.DataFrame:
    if file.suffix.lower() in CSV_SUFFIXES:
        header = _csv_header(file, what)
        _check_duplicates(header, file, what)
        try:
            frame = pd.read_csv(file)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
            raise TableError(
                f"{what}: {file} is not a readable CSV file ({_first_line(exc)}); "
                "allowed: a CSV with a header row"
            ) from None
    else:
        frame = _read_parquet(file, what)
        _check_duplicates(list(frame.columns), file, what)
    return frame


def _csv_header(file: Path, what: str) -> list[str]:
    try:
        with open(file, newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh), None)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise TableError(
            f"{what}: {file} is not a readable CSV file ({_first_line(exc)}); "
            "allowed: a UTF-8 CSV with a header row"
        ) from None
    if not header or all(not h.strip() for h in header):
        raise TableError(
            f"{what}: {file} is empty (no header row); allowed: a CSV with a header and data rows"
        )
    return header


def _read_parquet(file: Path, what: str) -> pd.DataFrame:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        # The schema first: read_table fails on duplicate names with a message that does not say so.
        _check_duplicates(pq.read_schema(file).names, file, what)
        table = pq.read_table(file, memory_map=True)
    except (OSError, pyarrow.ArrowException, ValueError) as exc:
        if isinstance(exc, TableError):
            raise
        raise TableError(
            f"{what}: {file} is not a readable Parquet file ({_first_line(exc)}); "
            "allowed: a valid Parquet file"
        ) from None
    if table.num_columns == 0:
        raise TableError(f"{what}: {file} has no columns; allowed: a table with a label and feature columns")
    # self_destruct frees each Arrow column once converted: the peak is ~one copy of the table, not two.
    return table.to_pandas(self_destruct=True, split_blocks=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _check_duplicates(columns: Sequence, file: Path, what: str) -> None:
    seen, dupes = set(), []
    for c in columns:
        if c in seen and c not in dupes:
            dupes.append(c)
        seen.add(c)
    if dupes:
        raise TableError(
            f"{what}: {file} has duplicate column name(s) {_names(dupes)}; allowed: unique names"
        )


def _feature_names(
    frame: pd.DataFrame, features: Sequence[str] | None, label: str, id_column: str | None, where: str
) -> list[str]:
    columns = list(frame.columns)
    if features is None:
        names = []
        for c in columns:
            if c in (label, id_column):
                continue
            if pd.api.types.is_numeric_dtype(frame[c].dtype):
                names.append(c)
            else:
                _reject_mostly_numeric(frame[c], where)
        if not names:
            raise TableError(
                f"features: {where} has no numeric column besides the label {label!r}"
                + (f" and id {id_column!r}" if id_column else "")
                + f"; columns: {_names(columns)}"
            )
        return [str(c) for c in names]
    if isinstance(features, (str, bytes)) or not isinstance(features, (Sequence, np.ndarray)):
        raise TableError(f"features: must be a list of column names or null, got {features!r}")
    names = list(features)
    if not names:
        raise TableError("features: must name at least one column, or be null for every numeric column")
    for name in names:
        if name not in columns:
            raise TableError(f"features: column {name!r} not in {where}; columns: {_names(columns)}")
        if name in (label, id_column):
            raise TableError(f"features: column {name!r} is the label or id column; allowed: other columns")
    if len(set(names)) != len(names):
        raise TableError(f"features: lists a column twice in {names!r}; allowed: distinct names")
    return [str(n) for n in names]


def _reject_mostly_numeric(column: pd.Series, where: str) -> None:
    """A text column whose values are mostly numbers is a numeric column with a typo ('n/a', '1,5'):
    leaving it out of the default features silently would hide the typo, so name it."""
    values = column.dropna()
    if values.empty:
        return
    parsed = pd.to_numeric(values, errors="coerce")
    ok = parsed.notna().to_numpy()
    if ok.mean() >= 0.5 and not ok.all():
        bad = values[~ok]
        raise TableError(
            f"features: column {column.name!r} in {where} is not numeric: {int(ok.mean() * 100)}% of its "
            f"values are numbers, but {len(bad)} are not (first: {bad.iloc[0]!r}); allowed: numbers only, "
            "or list the features to use without it"
        )


def _numeric(frame: pd.DataFrame, names: list[str], origin: _Origin, what: str = "features") -> np.ndarray:
    """The feature columns as float64 (N, D); TableError naming a non-numeric column and a bad value
    (`what`: the key the message starts with, `features` or `ood_path`)."""
    for name in names:
        column = frame[name]
        if pd.api.types.is_numeric_dtype(column.dtype):
            continue
        converted = pd.to_numeric(column, errors="coerce")
        bad = converted.isna().to_numpy() & column.notna().to_numpy()
        first = int(np.flatnonzero(bad)[0]) if bad.any() else 0
        allowed = "numbers only, or leave it out of features" if what == "features" else "numbers only"
        raise TableError(
            f"{what}: column {name!r} is not numeric (dtype {column.dtype}; {_row(origin, first)} has "
            f"{column.iloc[first]!r}); allowed: {allowed}"
        )
    x = np.empty((len(frame), len(names)), dtype=np.float64)
    for j, name in enumerate(names):  # column by column: no temporary copy of the whole selection
        x[:, j] = frame[name].to_numpy(dtype=np.float64, na_value=np.nan)
    return x


def _bad_cell(
    frame: pd.DataFrame, x: np.ndarray, names: list[str], label: str, id_column: str | None, i: int
) -> str:
    if pd.isna(frame[label].iloc[i]):
        return f"label {label!r} is empty"
    if id_column is not None and pd.isna(frame[id_column].iloc[i]):
        return f"id {id_column!r} is empty"
    j = int(np.flatnonzero(~np.isfinite(x[i]))[0])
    return f"column {names[j]!r} = {x[i, j]}"


def _as_strings(y: pd.Series) -> np.ndarray:
    """Labels or ids as strings; integral floats (ints read as float next to a gap) lose their '.0'."""
    values = y.to_numpy()
    if values.dtype.kind == "f" and np.all(values == np.round(values)):
        values = values.astype(np.int64)
    elif values.dtype.kind == "b":
        values = values.astype(np.int64)
    return np.array([str(v) for v in values], dtype=str)


def _sorted_classes(dtype, known: np.ndarray) -> tuple[str, ...]:
    """The training classes' names: numeric labels in numeric order, others in text order."""
    if pd.api.types.is_numeric_dtype(dtype):
        return tuple(sorted(known.tolist(), key=float))
    return tuple(sorted(known.tolist()))


def _held_out(names: np.ndarray, ood_classes: Sequence, label: str, where: str) -> set[str]:
    present = set(names.tolist())
    held = set()
    for value in ood_classes:
        name = str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
        if name not in present:
            raise TableError(
                f"ood_classes: {value!r} is not a value of column {label!r} in {where}; "
                f"allowed: {_names(sorted(present))}"
            )
        held.add(name)
    return held


_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def _row_keys(x: np.ndarray) -> np.ndarray:
    """Each row's key without an id column: the first 32 hex digits of sha256(float64 bytes of the row).

    Built without a Python string per row (a million rows: 128 MB of keys, not several times that)."""
    rows = np.ascontiguousarray(x, dtype=np.float64)
    raw = rows.view(np.uint8).reshape(rows.shape[0], rows.shape[1] * 8)
    digests = np.frombuffer(b"".join(hashlib.sha256(r).digest()[:16] for r in raw), dtype=np.uint8)
    digests = digests.reshape(rows.shape[0], 16)
    hex_digits = np.empty((rows.shape[0], 32), dtype=np.uint8)
    hex_digits[:, 0::2] = _HEX[digests >> 4]
    hex_digits[:, 1::2] = _HEX[digests & 0x0F]
    return hex_digits.view("S32").ravel().astype("<U32")


def _read_ood(ood_path: str, feature_names: list[str], missing: str) -> np.ndarray:
    frame, origin = _read_all(ood_path, "ood_path")
    absent = [n for n in feature_names if n not in frame.columns]
    if absent:
        raise TableError(
            f"ood_path: {ood_path!r} lacks the training feature column(s) {_names(absent)}; "
            f"allowed: a table with the columns {_names(feature_names)} (others are ignored)"
        )
    x = _numeric(frame, feature_names, origin, "ood_path")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        if missing == "error":
            first = int(np.flatnonzero(bad)[0])
            j = int(np.flatnonzero(~np.isfinite(x[first]))[0])
            raise TableError(
                f"ood_path {ood_path!r}: {int(bad.sum())} row(s) have NaN or inf; first: "
                f"{_row(origin, first)} (column {feature_names[j]!r} = {x[first, j]}); "
                "allowed: finite values, or missing: drop"
            )
        x = x[~bad]
    with np.errstate(over="ignore"):  # reported below, not warned about
        x32 = x.astype(np.float32)
    if not np.isfinite(x32).all():
        raise TableError(f"ood_path {ood_path!r}: a value is beyond float32's range; allowed: |x| < 3.4e38")
    return x32


def _grid(x: np.ndarray, grid_size: int):
    ranges = []
    for j in range(2):
        low, high = float(x[:, j].min()), float(x[:, j].max())
        margin = GRID_MARGIN * (high - low) if high > low else 1.0
        ranges.append((low - margin, high + margin))
    return (
        make_grid(ranges[0], ranges[1], int(grid_size)),
        (int(grid_size), int(grid_size)),
        ranges[0],
        ranges[1],
    )
