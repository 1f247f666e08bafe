"""sngp_models.table: CSV/Parquet files or globs -> train/test/OOD, stable split, digest, bad input."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sklearn.datasets

from sngp_models import table
from sngp_models.table import TableData, TableError, load_table, table_digest

FORMATS = ("csv", "parquet")


def write(frame: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)
    return path


def small_frame(n: int = 60, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "rid": np.arange(n),
            "a": rng.normal(size=n),
            "b": rng.normal(size=n),
            "colour": rng.choice(["red", "green"], size=n),  # text: not a default feature
            "y": np.array(["cat", "dog", "eel"])[np.arange(n) % 3],
        }
    )


@pytest.fixture(scope="module")
def wine() -> pd.DataFrame:
    return sklearn.datasets.load_wine(as_frame=True).frame


# --- reading and splitting -----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_wine_three_classes_thirteen_features(tmp_path: Path, wine: pd.DataFrame, fmt: str) -> None:
    path = write(wine, tmp_path / f"wine.{fmt}")
    data = load_table(str(path), label="target")
    assert isinstance(data, TableData)
    assert data.num_classes == 3 and data.class_names == ("0", "1", "2")
    assert data.feature_names == tuple(c for c in wine.columns if c != "target")
    assert data.x_train.shape[1] == data.x_test.shape[1] == data.x_ood.shape[1] == 13
    assert data.x_train.shape[0] + data.x_test.shape[0] == len(wine)
    assert data.x_ood.shape == (0, 13)
    for x in (data.x_train, data.x_test, data.x_ood):
        assert x.dtype == np.float32
    assert data.y_train.dtype == data.y_test.dtype == np.int64
    assert set(np.unique(data.y_train)) == {0, 1, 2}
    # Raw features (no scaling here): every training row is a row of the file.
    rows = {tuple(r) for r in wine.drop(columns="target").to_numpy(np.float32)}
    assert all(tuple(r) in rows for r in data.x_train)
    assert data.x_grid is None and data.grid_shape is None and data.x_range is None and data.y_range is None
    assert data.keys_train.shape == (data.x_train.shape[0],) and data.keys_train.dtype.kind == "U"
    assert data.digest == table_digest(str(path))
    with pytest.raises(dataclasses.FrozenInstanceError):
        data.num_classes = 2  # type: ignore[misc]


def test_csv_and_parquet_give_the_same_split(tmp_path: Path, wine: pd.DataFrame) -> None:
    a = load_table(str(write(wine, tmp_path / "w.csv")), label="target")
    b = load_table(str(write(wine, tmp_path / "w.parquet")), label="target")
    np.testing.assert_array_equal(a.keys_test, b.keys_test)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)


def test_string_labels_sorted_and_kept(tmp_path: Path) -> None:
    cancer = sklearn.datasets.load_breast_cancer(as_frame=True)
    frame = cancer.frame.copy()
    frame["target"] = np.asarray(cancer.target_names)[cancer.target]
    data = load_table(str(write(frame, tmp_path / "bc.parquet")), label="target")
    assert data.class_names == ("benign", "malignant") and data.num_classes == 2
    assert len(data.feature_names) == 30
    labels = np.concatenate([data.y_train, data.y_test])
    assert np.bincount(labels).tolist() == [
        int((frame["target"] == "benign").sum()),
        int((frame["target"] == "malignant").sum()),
    ]


def test_numeric_labels_sort_numerically(tmp_path: Path) -> None:
    frame = pd.DataFrame({"x": np.arange(60.0), "y": np.array([2, 10, 1])[np.arange(60) % 3]})
    data = load_table(str(write(frame, tmp_path / "t.csv")), label="y")
    assert data.class_names == ("1", "2", "10")


def test_default_features_skip_text_label_and_id(tmp_path: Path) -> None:
    data = load_table(str(write(small_frame(), tmp_path / "t.csv")), label="y", id_column="rid")
    assert data.feature_names == ("a", "b")
    assert data.class_names == ("cat", "dog", "eel")
    chosen = load_table(str(tmp_path / "t.csv"), label="y", features=["b"], id_column="rid")
    assert chosen.feature_names == ("b",) and chosen.x_train.shape[1] == 1


def test_stable_split_rule(tmp_path: Path) -> None:
    frame = small_frame(200)
    data = load_table(str(write(frame, tmp_path / "t.csv")), label="y", id_column="rid", test_fraction=0.3)
    # The rule, written out: sha256 of the key, its first 16 hex digits as a fraction of 2**64.
    for key in data.keys_test:
        assert int(hashlib.sha256(key.encode()).hexdigest()[:16], 16) / 2**64 < 0.3
    for key in data.keys_train:
        assert int(hashlib.sha256(key.encode()).hexdigest()[:16], 16) / 2**64 >= 0.3
    assert sorted(np.concatenate([data.keys_train, data.keys_test]).tolist()) == sorted(
        str(i) for i in range(200)
    )
    mask = table.test_side(np.array(["0", "1", "2"]), 0.3)
    assert mask.dtype == bool and mask.shape == (3,)
    # Without an id, the key hashes the row's feature values (float64 bytes).
    no_id = load_table(str(tmp_path / "t.csv"), label="y", features=["a", "b"], test_fraction=0.3)
    row = frame[["a", "b"]].to_numpy(np.float64)
    keys = {hashlib.sha256(r.tobytes()).hexdigest()[:32] for r in row}
    assert set(no_id.keys_train) | set(no_id.keys_test) == keys


@pytest.mark.parametrize("fmt", FORMATS)
def test_glob_concatenates_in_name_order_and_rows_keep_their_side(tmp_path: Path, fmt: str) -> None:
    frame = small_frame(240)
    write(frame.iloc[:120], tmp_path / f"part-b.{fmt}")
    write(frame.iloc[120:], tmp_path / f"part-a.{fmt}")
    pattern = str(tmp_path / f"part-*.{fmt}")
    both = load_table(pattern, label="y")
    # Name order: part-a (rows 120..) first, then part-b.
    expected = pd.concat([frame.iloc[120:], frame.iloc[:120]])
    assert both.x_train.shape[0] + both.x_test.shape[0] == 240
    train_rows = expected[["rid", "a", "b"]].to_numpy(np.float32)
    side = table.test_side(both.keys_train, 0.2)
    assert not side.any()
    assert all(tuple(r) in {tuple(t) for t in train_rows} for r in both.x_train)
    # Adding a file never moves a row to the other side.
    write(small_frame(90, seed=7).assign(rid=lambda f: f.rid + 1000), tmp_path / f"part-c.{fmt}")
    more = load_table(pattern, label="y")
    assert more.x_train.shape[0] + more.x_test.shape[0] == 330
    assert set(both.keys_train) <= set(more.keys_train)
    assert set(both.keys_test) <= set(more.keys_test)
    assert more.digest != both.digest


def test_digest_is_the_files_not_the_path(tmp_path: Path) -> None:
    frame = small_frame()
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    write(frame, one / "t.csv"), write(frame, two / "t.csv")
    assert table_digest(str(one / "t.csv")) == table_digest(str(two / "t.csv"))
    assert table_digest(str(one / "t.csv")) != table_digest(str(one / "t.csv"), str(two / "t.csv"))
    write(frame.iloc[:-1], two / "t.csv")
    assert table_digest(str(one / "t.csv")) != table_digest(str(two / "t.csv"))
    os.rename(two / "t.csv", two / "u.csv")
    write(frame, two / "u.csv")
    assert table_digest(str(one / "t.csv")) != table_digest(str(two / "u.csv"))  # names count


def test_ood_classes_and_ood_file(tmp_path: Path, wine: pd.DataFrame) -> None:
    path = write(wine, tmp_path / "wine.csv")
    held = load_table(str(path), label="target", ood_classes=[2])
    assert held.class_names == ("0", "1") and held.num_classes == 2
    assert held.x_ood.shape == (int((wine.target == 2).sum()), 13)
    assert held.x_train.shape[0] + held.x_test.shape[0] == int((wine.target != 2).sum())
    # An OOD file: the same feature columns in any order, extra columns (a label) ignored.
    ood = wine.iloc[:10, ::-1].assign(extra="z")
    ood_path = write(ood, tmp_path / "ood.parquet")
    both = load_table(str(path), label="target", ood_classes=["2"], ood_path=str(ood_path))
    assert both.x_ood.shape == (held.x_ood.shape[0] + 10, 13)
    np.testing.assert_array_equal(
        both.x_ood[-10:], wine.iloc[:10].drop(columns="target").to_numpy(np.float32)
    )
    assert both.digest == table_digest(str(path), str(ood_path))


def test_two_feature_table_gets_a_grid(tmp_path: Path) -> None:
    frame = small_frame()
    data = load_table(str(write(frame, tmp_path / "t.csv")), label="y", features=["a", "b"], grid_size=20)
    assert data.x_grid.shape == (400, 2) and data.grid_shape == (20, 20)
    for j, (low, high) in enumerate((data.x_range, data.y_range)):
        assert low < data.x_train[:, j].min() and high > data.x_train[:, j].max()
    assert data.x_grid[:, 0].min() == pytest.approx(data.x_range[0])


def test_missing_drop(tmp_path: Path) -> None:
    frame = small_frame().astype({"a": float})
    frame.loc[[3, 8], "a"] = np.nan
    frame.loc[5, "b"] = np.inf
    path = write(frame, tmp_path / "t.parquet")
    data = load_table(str(path), label="y", missing="drop", id_column="rid")
    assert data.x_train.shape[0] + data.x_test.shape[0] == len(frame) - 3
    assert not {"3", "5", "8"} & (set(data.keys_train) | set(data.keys_test))


# --- bad input: one TableError each, naming the file/column/value ----------------------------------------


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and isinstance(exc.value, ValueError)
    return message


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_file_and_empty_glob(tmp_path: Path, fmt: str) -> None:
    with pytest.raises(TableError, match=r"path: .*nope\.\w+ does not exist") as exc:
        load_table(str(tmp_path / f"nope.{fmt}"), label="y")
    _one_line(exc)
    with pytest.raises(TableError, match="matches no file"):
        load_table(str(tmp_path / f"*.{fmt}"), label="y")
    with pytest.raises(TableError, match="ood_path: .*does not exist"):
        load_table(
            str(write(small_frame(), tmp_path / f"t.{fmt}")), label="y", ood_path=str(tmp_path / "x.csv")
        )


def test_directory_and_wrong_suffix(tmp_path: Path) -> None:
    with pytest.raises(TableError, match="is a directory") as exc:
        load_table(str(tmp_path), label="y")
    _one_line(exc)
    (tmp_path / "t.txt").write_text("a,y\n1,2\n")
    with pytest.raises(TableError, match=r"suffix '\.txt'; allowed: \.csv"):
        load_table(str(tmp_path / "t.txt"), label="y")


def test_corrupt_files(tmp_path: Path) -> None:
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("a,b,y\n1,2,0\n3,4,1,9,9\n")
    with pytest.raises(TableError, match="ragged.csv is not a readable CSV") as exc:
        load_table(str(ragged), label="y")
    _one_line(exc)
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 50)
    with pytest.raises(TableError, match="binary.csv is not a readable CSV"):
        load_table(str(binary), label="y")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(TableError, match="broken.parquet is not a readable Parquet file") as exc:
        load_table(str(broken), label="y")
    _one_line(exc)
    truncated = tmp_path / "truncated.parquet"
    write(small_frame(), tmp_path / "whole.parquet")
    truncated.write_bytes((tmp_path / "whole.parquet").read_bytes()[:-40])
    with pytest.raises(TableError, match="truncated.parquet is not a readable Parquet file"):
        load_table(str(truncated), label="y")


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_and_header_only(tmp_path: Path, fmt: str) -> None:
    header_only = write(small_frame().iloc[:0], tmp_path / f"h.{fmt}")
    with pytest.raises(TableError, match=r"no data rows \(header only\)") as exc:
        load_table(str(header_only), label="y")
    _one_line(exc)
    if fmt == "csv":
        (tmp_path / "empty.csv").write_text("")
        with pytest.raises(TableError, match="empty.csv is empty"):
            load_table(str(tmp_path / "empty.csv"), label="y")


@pytest.mark.parametrize("fmt", FORMATS)
def test_label_missing(tmp_path: Path, fmt: str) -> None:
    path = write(small_frame(), tmp_path / f"t.{fmt}")
    with pytest.raises(TableError, match=r"label: column 'outcome' not in .*columns: 'rid', 'a'") as exc:
        load_table(str(path), label="outcome")
    _one_line(exc)


@pytest.mark.parametrize("fmt", FORMATS)
def test_feature_not_numeric(tmp_path: Path, fmt: str) -> None:
    path = write(small_frame(), tmp_path / f"t.{fmt}")
    with pytest.raises(TableError, match=r"features: column 'colour' is not numeric .*'(red|green)'") as exc:
        load_table(str(path), label="y", features=["a", "colour"])
    _one_line(exc)
    # A numeric column with a typo is not silently left out of the default features.
    frame = small_frame().astype({"a": str})
    frame.loc[7, "a"] = "1,5"  # (pandas reads "n/a", "NA", "" as missing values: see the NaN test)
    typo = write(frame, tmp_path / f"typo.{fmt}")
    with pytest.raises(TableError, match=r"features: column 'a' .* is not numeric.*first: '1,5'"):
        load_table(str(typo), label="y")


@pytest.mark.parametrize("fmt", FORMATS)
def test_nan_and_inf_with_missing_error(tmp_path: Path, fmt: str) -> None:
    frame = small_frame()
    frame.loc[[4, 9], "b"] = np.nan
    frame.loc[6, "a"] = np.inf
    path = write(frame, tmp_path / f"t.{fmt}")
    with pytest.raises(
        TableError, match=r"3 row\(s\) have NaN.*first: data row 5 of .*t\.\w+ \(column 'b' = nan\)"
    ) as exc:
        load_table(str(path), label="y")
    _one_line(exc)
    label_gap = small_frame()
    label_gap.loc[2, "y"] = None
    with pytest.raises(TableError, match=r"1 row\(s\).*data row 3 .*label 'y' is empty"):
        load_table(str(write(label_gap, tmp_path / f"l.{fmt}")), label="y")
    with pytest.raises(TableError, match="missing: must be one of error, drop"):
        load_table(str(path), label="y", missing="ignore")


def test_single_class_and_too_few_training_rows(tmp_path: Path) -> None:
    single = small_frame().assign(y="cat")
    with pytest.raises(
        TableError, match=r"label: column 'y' .*needs at least 2 classes.*only \['cat'\]"
    ) as exc:
        load_table(str(write(single, tmp_path / "single.csv")), label="y")
    _one_line(exc)
    rare = small_frame()
    rare.loc[0, "y"] = "fox"  # one row: fewer than 2 training rows whichever side it is on
    with pytest.raises(
        TableError, match=r"label: class 'fox' .* has [01] training row\(s\).*at least 2"
    ) as exc:
        load_table(str(write(rare, tmp_path / "rare.parquet")), label="y", id_column="rid")
    _one_line(exc)


def test_bad_ood_classes(tmp_path: Path) -> None:
    path = str(write(small_frame(), tmp_path / "t.csv"))
    with pytest.raises(
        TableError, match=r"ood_classes: 'fox' is not a value of column 'y'.*'cat', 'dog'"
    ) as exc:
        load_table(path, label="y", ood_classes=["fox"])
    _one_line(exc)
    with pytest.raises(TableError, match="all classes are held out"):
        load_table(path, label="y", ood_classes=["cat", "dog", "eel"])
    with pytest.raises(TableError, match=r"only \['eel'\]"):
        load_table(path, label="y", ood_classes=["cat", "dog"])
    with pytest.raises(TableError, match="ood_classes: must be a list"):
        load_table(path, label="y", ood_classes="cat")


@pytest.mark.parametrize("fmt", FORMATS)
def test_ood_file_columns_differ(tmp_path: Path, fmt: str) -> None:
    path = str(write(small_frame(), tmp_path / f"t.{fmt}"))
    ood = write(small_frame().rename(columns={"b": "B"}), tmp_path / f"ood.{fmt}")
    with pytest.raises(TableError, match=r"ood_path: .* lacks the training feature column\(s\) 'b'") as exc:
        load_table(path, label="y", ood_path=str(ood))
    _one_line(exc)


def test_files_of_a_glob_with_other_columns(tmp_path: Path) -> None:
    write(small_frame(), tmp_path / "p1.csv")
    write(small_frame().drop(columns="b"), tmp_path / "p2.csv")
    with pytest.raises(TableError, match=r"p2.csv has other columns than p1.csv \(missing: 'b'"):
        load_table(str(tmp_path / "p*.csv"), label="y")


def test_duplicate_column_names(tmp_path: Path) -> None:
    path = tmp_path / "dup.csv"
    path.write_text("a,b,a,y\n1,2,3,0\n4,5,6,1\n")
    with pytest.raises(TableError, match=r"dup.csv has duplicate column name\(s\) 'a'") as exc:
        load_table(str(path), label="y")
    _one_line(exc)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table([pa.array([1.0, 2.0]), pa.array([3.0, 4.0]), pa.array([0, 1])], names=["a", "a", "y"]),
        tmp_path / "dup.parquet",
    )
    with pytest.raises(TableError, match=r"dup.parquet has duplicate column name\(s\) 'a'"):
        load_table(str(tmp_path / "dup.parquet"), label="y")


def test_features_naming_absent_column(tmp_path: Path) -> None:
    path = str(write(small_frame(), tmp_path / "t.parquet"))
    with pytest.raises(TableError, match=r"features: column 'c' not in .*columns: 'rid', 'a', 'b'") as exc:
        load_table(path, label="y", features=["a", "c"])
    _one_line(exc)
    with pytest.raises(TableError, match="features: column 'y' is the label"):
        load_table(path, label="y", features=["a", "y"])
    with pytest.raises(TableError, match="id_column: column 'key' not in"):
        load_table(path, label="y", id_column="key")


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.1, float("nan"), "0.2", True, None])
def test_test_fraction_outside_open_unit_interval(tmp_path: Path, fraction) -> None:
    path = str(write(small_frame(), tmp_path / "t.csv"))
    with pytest.raises(TableError, match=r"test_fraction: must be a number in \(0, 1\)") as exc:
        load_table(path, label="y", test_fraction=fraction)
    _one_line(exc)
    with pytest.raises(TableError, match="test_fraction"):
        table.test_side(np.array(["a"]), fraction)


def test_no_row_on_the_test_side(tmp_path: Path) -> None:
    frame = small_frame(6)
    with pytest.raises(TableError, match="no row falls on the test side|training row"):
        load_table(str(write(frame, tmp_path / "t.csv")), label="y", test_fraction=0.01)


def test_a_relative_path_is_looked_for_in_the_working_directory(tmp_path: Path, monkeypatch) -> None:
    """The message says where a relative path was looked for (`sngp run` started in another folder than
    the config's data)."""
    monkeypatch.chdir(tmp_path)
    where = re.escape(f"(relative to the working directory {tmp_path})")
    with pytest.raises(TableError, match=rf"data/t\.csv does not exist {where}"):
        load_table("data/t.csv", "y")
    with pytest.raises(TableError, match=rf"matches no file {where}"):
        load_table("data/*.csv", "y")
    with pytest.raises(TableError) as exc:
        load_table(str(tmp_path / "t.csv"), "y")
    assert "relative to" not in str(exc.value)
