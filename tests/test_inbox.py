"""The monitor's inbox on disk (tasks.inbox): which files are batches, why a batch cannot be scored, where a
rejected one goes, the claims and the lock (fast, real files; tests/servers/test_monitor.py runs the
whole monitor)."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pandas as pd
import pytest

from tasks import inbox

FEATURES = ["x0", "x1"]


def test_check_inbox_names_what_is_wrong(tmp_path):
    assert inbox.check_inbox(tmp_path) == tmp_path.resolve()
    with pytest.raises(inbox.InboxError, match="does not exist; create it"):
        inbox.check_inbox(tmp_path / "missing")
    (tmp_path / "file").write_text("")
    with pytest.raises(inbox.InboxError, match="is not a folder"):
        inbox.check_inbox(tmp_path / "file")


def test_batch_files_are_csv_and_parquet_oldest_first(tmp_path):
    for i, name in enumerate(["b.csv", "a.parquet", "c.CSV", ".c.csv.tmp-1", ".hidden.csv", "notes.txt"]):
        (tmp_path / name).write_text("x")
        os.utime(tmp_path / name, (1e9 + 10 - i, 1e9 + 10 - i))
    (tmp_path / "folder.csv").mkdir()
    assert inbox.batch_files(tmp_path) == ["c.CSV", "a.parquet", "b.csv"]


@pytest.mark.parametrize(
    ("write", "reason"),
    [
        (lambda p: p.write_text('x0,x1\n1,2\n"open\n'), "unreadable csv file"),
        (lambda p: p.write_text(""), "unreadable csv file"),
        (lambda p: p.write_text("x0,x1\n"), "no rows"),
        (
            lambda p: pd.DataFrame({"x0": [1.0], "y": [2.0]}).to_csv(p, index=False),
            "missing feature column(s) ['x1']",
        ),
        (
            lambda p: pd.DataFrame({"x0": ["a"], "x1": [2.0]}).to_csv(p, index=False),
            "column(s) ['x0'] are not numeric",
        ),
        (
            lambda p: pd.DataFrame({"x0": [True], "x1": [2.0]}).to_csv(p, index=False),
            "column(s) ['x0'] are not numeric",
        ),
        (
            lambda p: pd.DataFrame({"x0": [1.0, np.inf], "x1": [2, 3]}).to_csv(p, index=False),
            "first at row 1",
        ),
        (lambda p: pd.DataFrame({"x0": [np.nan], "x1": [2.0]}).to_csv(p, index=False), "1 row(s) with NaN"),
    ],
    ids=["corrupt", "empty-file", "header-only", "missing-column", "string", "boolean", "inf", "nan"],
)
def test_read_batch_says_why_a_batch_cannot_be_scored(tmp_path, write, reason):
    path = tmp_path / "batch.csv"
    write(path)
    with pytest.raises(ValueError) as caught:
        inbox.read_batch(path, FEATURES)
    assert reason in str(caught.value) and "\n" not in str(caught.value)


def test_read_batch_reads_parquet_with_extra_columns(tmp_path):
    frame = pd.DataFrame({"id": ["a", "b"], "x1": [0.5, 0.6], "x0": [1, 2]})
    frame.to_parquet(tmp_path / "b.parquet")
    pd.testing.assert_frame_equal(inbox.read_batch(tmp_path / "b.parquet", FEATURES), frame)
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match="unreadable parquet file"):
        inbox.read_batch(tmp_path / "bad.parquet", FEATURES)


def test_reject_moves_the_file_beside_its_reason_and_never_overwrites(tmp_path):
    for round_ in range(2):
        (tmp_path / "bad.csv").write_text(f"round {round_}")
        target = inbox.reject(tmp_path, "bad.csv", f"reason {round_}")
        assert not (tmp_path / "bad.csv").exists()
        assert target.read_text() == f"round {round_}"
        assert target.with_name(target.name + ".reason.txt").read_text() == f"bad.csv: reason {round_}\n"
    rejected = sorted(p.name for p in (tmp_path / "rejected").iterdir())
    assert len(rejected) == 4 and "bad.csv" in rejected and "bad.csv.reason.txt" in rejected


def test_scored_keeps_every_input_column_and_the_format(tmp_path):
    frame = pd.DataFrame({"x0": [0.1], "x1": [0.2], "uncertainty": ["theirs"]})
    outputs = pd.DataFrame({"predicted": ["0"], "uncertainty": [0.1], "abstain": [False]})
    scored = inbox.scored_frame(frame, outputs)
    assert list(scored.columns) == ["x0", "x1", "input_uncertainty", "predicted", "uncertainty", "abstain"]
    path = inbox.write_scored(tmp_path, "b.parquet", scored)
    assert path == tmp_path / "scored" / "b.parquet"
    pd.testing.assert_frame_equal(pd.read_parquet(path), scored)
    assert [p.name for p in (tmp_path / "scored").iterdir()] == ["b.parquet"]  # no temporary file left


def test_claims_round_trip(tmp_path):
    assert inbox.read_claim(tmp_path, "b.csv") is None
    inbox.write_claim(tmp_path, {"file": "b.csv", "batch": 3, "state": "claimed"})
    inbox.write_claim(tmp_path, {"file": "c.csv", "batch": 4, "state": "done"})
    assert inbox.read_claim(tmp_path, "b.csv") == {"file": "b.csv", "batch": 3, "state": "claimed"}
    assert [c["batch"] for c in inbox.claims(tmp_path)] == [3, 4]
    (tmp_path / ".sngp-monitor" / "batches" / "b.csv.json").write_text("{broken")
    assert inbox.read_claim(tmp_path, "b.csv") is None


def test_one_monitor_at_a_time_per_inbox(tmp_path):
    events = []

    def second() -> None:
        with inbox.inbox_lock(tmp_path):
            events.append("second")

    with inbox.inbox_lock(tmp_path):
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(1.0)
        events.append("first done")
    thread.join(timeout=10)
    assert events == ["first done", "second"]
    with inbox.inbox_lock(tmp_path), pytest.raises(TimeoutError, match="another monitor run"):
        with inbox.inbox_lock(tmp_path, wait=0.2):
            pass
