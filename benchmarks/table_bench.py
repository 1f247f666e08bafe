"""Your own data at scale: a 1,000,000-row x 32-feature Parquet table through the pipeline's data step
and one SNGP training epoch, wall time and peak RSS.

    .venv/bin/python benchmarks/table_bench.py            # writes table_1m_* into results/latest.json
    .venv/bin/python benchmarks/table_bench.py --rows 100000 --no-write   # a quick look

The table (32 float64 feature columns + an integer label with 4 classes; written once, not timed) is
measured in a fresh process doing exactly what `sngp run` does with `dataset: table` after its config
check: the data step (tasks.data: the files' digest for the cache key, load_table, the .npz the other
tasks read) and the train step (the .npz read back, SNGP with the study's settings and
`gp_kernel_scale: auto`, standardised inside the model, `epochs: 1`). Peak RSS is that process's
(ru_maxrss). Keys merged into benchmarks/results/latest.json (every other key kept):
`table_1m_seconds` (data step + epoch), `table_1m_peak_mb`, and the details under `table_1m`.
Target: peak < 2048 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PEAK_TARGET_MB = 2048
CLASSES = 4


def write_table(path: Path, rows: int, features: int, seed: int = 0) -> None:
    """`rows` x `features` float64 columns f0.. and a label from a noisy linear rule (learnable)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, features))
    score = x[:, :8] @ rng.normal(size=8) + 0.5 * rng.normal(size=rows)
    label = np.digitize(score, np.quantile(score, [0.25, 0.5, 0.75]))
    columns = {f"f{i}": x[:, i] for i in range(features)}
    pq.write_table(pa.table({**columns, "label": label.astype(np.int64)}), path, row_group_size=100_000)


def measure(path: str, epochs: int) -> dict:
    """In this (fresh) process: the data step, then the train step of one SNGP; timings and peak RSS."""
    from flows.config import read_config
    from tasks.data import data_facts, data_file_arguments, generate_data, load_data

    config = read_config(
        None,
        ["dataset=table", f"table.path={path}", "table.label=label", f"training.epochs={epochs}"],
    )
    started = time.perf_counter()
    data_path = generate_data.fn(**data_file_arguments(**config.data_settings(), seed=config.seed))
    data_seconds = time.perf_counter() - started
    data_peak = peak_mb()

    import sngp_models  # TensorFlow, as the train task imports it

    imported = time.perf_counter()
    facts = data_facts(data_path)
    data = load_data(data_path)
    model = sngp_models.make_model("sngp", **config.model_settings("sngp", facts["num_classes"]))
    model.fit(
        data.x_train,
        data.y_train,
        feature_names=facts["feature_names"],
        class_names=facts["class_names"],
    )
    train_seconds = time.perf_counter() - imported
    return {
        "data_seconds": round(data_seconds, 2),
        "train_seconds": round(train_seconds, 2),
        "seconds": round(data_seconds + train_seconds, 2),
        "data_peak_mb": round(data_peak, 1),
        "peak_mb": round(peak_mb(), 1),
        "rows": facts["rows"],
        "features": len(facts["feature_names"]),
        "classes": facts["class_names"],
        "epochs": epochs,
        "batch_size": model.config.batch_size,
        "gp_kernel_scale_chosen": model.gp_kernel_scale_,
        "train_accuracy_last_epoch": model.history_["accuracy"][-1],
    }


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def merge_into(latest: Path, result: dict) -> None:
    """Add the table_1m keys to latest.json, keeping every other key; written atomically."""
    current = json.loads(latest.read_text()) if latest.is_file() else {}
    current.update(
        {
            "table_1m_seconds": result["seconds"],
            "table_1m_peak_mb": result["peak_mb"],
            "table_1m": result,
        }
    )
    current.setdefault("targets", {})[f"table_1m_peak_mb < {PEAK_TARGET_MB}"] = (
        result["peak_mb"] < PEAK_TARGET_MB
    )
    tmp = latest.with_name(latest.name + ".tmp")
    tmp.write_text(json.dumps(current, indent=2) + "\n")
    os.replace(tmp, latest)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--features", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "latest.json"), help="JSON file to merge the keys into")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--measure", metavar="PARQUET", help=argparse.SUPPRESS)  # the fresh process
    args = ap.parse_args(argv)
    if args.measure:
        print("RESULT " + json.dumps(measure(args.measure, args.epochs)), flush=True)
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="table-bench-"))
    try:
        table = tmp / "table.parquet"
        started = time.perf_counter()
        write_table(table, args.rows, args.features)
        print(
            f"table_bench: wrote {args.rows:,} x {args.features} + label "
            f"({table.stat().st_size / 1e6:.0f} MB Parquet) in {time.perf_counter() - started:.1f} s"
        )
        env = {**os.environ, "SNGP_CACHE_DIR": str(tmp / "cache"), "TF_CPP_MIN_LOG_LEVEL": "3"}
        proc = subprocess.run(
            [sys.executable, __file__, "--measure", str(table), "--epochs", str(args.epochs)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            print(proc.stderr[-5000:], file=sys.stderr)
            return proc.returncode
        result = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["table_shape"] = f"{args.rows} rows x {args.features} float64 features + label (Parquet)"
    result["machine"] = {"cores": os.cpu_count(), "platform": platform.platform(), "loadavg": os.getloadavg()}
    print(json.dumps(result, indent=2))
    print(
        f"table_bench: data step {result['data_seconds']} s + {args.epochs} SNGP epoch(s) "
        f"{result['train_seconds']} s = {result['seconds']} s; peak RSS {result['peak_mb']:.0f} MB "
        f"(target < {PEAK_TARGET_MB} MB: {'met' if result['peak_mb'] < PEAK_TARGET_MB else 'MISSED'})"
    )
    if not args.no_write and args.rows == 1_000_000 and args.features == 32:
        merge_into(Path(args.out), result)
        print(f"table_bench: merged table_1m_seconds and table_1m_peak_mb into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
