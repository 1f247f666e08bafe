"""The pipeline against the plain notebook, side by side in one invocation (issue 9).

    make bench                                    # full study settings (about 10 minutes on 2 cores)
    .venv/bin/python benchmarks/run_bench.py --quick   # 5 epochs, 100k-point prediction: a fast check

Measures whole processes, each started fresh, one after the other:

1. the notebook baseline (`benchmarks/notebook_baseline.py`, a faithful script of the study notebook);
2. `sngp run --config conf/default.yaml` cold: fresh temporary working directory, fresh SNGP_CACHE_DIR,
   fresh PREFECT_HOME (Prefect local mode, its own temporary server), MLflow SQLite in the temp dir;
3. the same command again, warm (everything cached);
4. per method, a fresh process that loads the model trained by the cold run from its cache directory
   and times `predict_with_uncertainty` on 1,000,000 random points in the grid range, with the peak
   extra memory (peak RSS during the prediction minus RSS before it, polled every 2 ms).

The cold run's stages are read back from the Prefect database (task runs: start/end) and from MLflow
(the runs' timestamps and the `train_seconds` / `inference_seconds` metrics).
Writes `benchmarks/results/latest.json` and `benchmarks/results/<YYYY-MM-DD>.json`, prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("deterministic", "sngp", "mc_dropout", "deep_ensemble")
TARGETS = {
    "cold_over_baseline": 0.7,
    "warm_seconds": 12.0,
    "warm_over_cold": 0.05,
    "ensemble_over_baseline": 0.4,
    "sngp_peak_mb": 1024.0,
    "sngp_over_mc_dropout_1m": 1.0,
}

# Runs in a fresh interpreter: load one cached model, predict on N random grid-range points.
PREDICT_SCRIPT = textwrap.dedent(
    """
    import json, sys, threading, time
    import numpy as np, psutil
    import sngp_models

    model_dir, n = sys.argv[1], int(sys.argv[2])
    x_range, y_range = json.loads(sys.argv[3]), json.loads(sys.argv[4])
    model = sngp_models.load_model(model_dir)
    rng = np.random.default_rng(0)
    points = np.stack([rng.uniform(*x_range, n), rng.uniform(*y_range, n)], axis=1).astype(np.float32)
    model.predict_with_uncertainty(points[:1000])  # trace/compile outside the measurement
    proc = psutil.Process()
    before = proc.memory_info().rss
    peak, done = [before], threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    started = time.perf_counter()
    pred = model.predict_with_uncertainty(points)
    seconds = time.perf_counter() - started
    done.set()
    poller.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    print(json.dumps({
        "seconds": seconds,
        "peak_extra_mb": (peak[0] - before) / 2**20,
        "rss_before_mb": before / 2**20,
        "finite": bool(np.isfinite(pred.probs).all() and np.isfinite(pred.uncertainty).all()),
        "mean_uncertainty": float(pred.uncertainty.mean()),
    }))
    """
)


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without anything pointing at servers or caches, plus `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_", "MLFLOW_", "SNGP_")) and k not in ("TF_USE_LEGACY_KERAS",)
    }
    env.update(extra)
    return env


def timed(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> tuple[float, float]:
    """Run `cmd` to completion; returns (wall seconds, wall-clock start time). Fails loudly on error."""
    start_wall = time.time()
    started = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"run_bench: {' '.join(cmd[:3])} ... failed (exit {proc.returncode}):\n{tail}")
    return seconds, start_wall


def _ts(value) -> float:
    """Prefect's sqlite timestamps ('2026-11-25 07:00:00.123456+00:00' or naive UTC) -> epoch seconds."""
    t = dt.datetime.fromisoformat(str(value))
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.timestamp()


def prefect_stages(prefect_home: Path) -> dict:
    """Flow and task run start/end (epoch seconds) from the local Prefect server's database."""
    db = prefect_home / "prefect.db"
    out: dict = {"flow": None, "tasks": {}}
    if not db.exists():
        return out
    con = sqlite3.connect(db)
    try:
        rows = con.execute(
            "SELECT start_time, end_time FROM flow_run WHERE start_time IS NOT NULL ORDER BY start_time"
        ).fetchall()
        if rows:
            out["flow"] = (_ts(rows[0][0]), _ts(rows[0][1]))
        for name, start, end in con.execute(
            "SELECT name, start_time, end_time FROM task_run WHERE start_time IS NOT NULL"
        ):
            out["tasks"][name] = (_ts(start), _ts(end) if end else None)
    finally:
        con.close()
    return out


def mlflow_stages(tracking_uri: str) -> dict:
    """Per method: train_seconds, inference_seconds and the nested run's recording time; parent times."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in exp], order_by=["attributes.start_time ASC"])
    parent = next(r for r in runs if r.data.tags.get("mlflow.parentRunId") is None)
    out = {
        "parent": (parent.info.start_time / 1000, parent.info.end_time / 1000),
        "methods": {},
    }
    for r in runs:
        if r.data.tags.get("mlflow.parentRunId") != parent.info.run_id:
            continue
        out["methods"][r.info.run_name] = {
            "train_seconds": r.data.metrics.get("train_seconds"),
            "inference_seconds": r.data.metrics.get("inference_seconds"),
            "record_seconds": (r.info.end_time - r.info.start_time) / 1000,
        }
    return out


def cold_breakdown(start_wall: float, total: float, prefect: dict, mlf: dict, imports_seconds: float) -> dict:
    """Where the cold run's wall time goes (seconds; task durations overlap: they run concurrently)."""
    end_wall = start_wall + total
    parent_start, parent_end = mlf["parent"]
    stages: dict = {"process_total": total, "imports_only_process": imports_seconds}
    if prefect["flow"]:
        flow_start, flow_end = prefect["flow"]
        stages["startup_until_flow_start"] = flow_start - start_wall  # imports + Prefect server start
        stages["flow_run"] = flow_end - flow_start
        stages["after_flow_until_exit"] = end_wall - flow_end  # summary print, server shutdown
        stages["flow_start_until_mlflow_parent"] = parent_start - flow_start
    tasks = {}
    for name, (start, end) in sorted(prefect["tasks"].items(), key=lambda kv: kv[1][0]):
        tasks[name] = {
            "start_offset": start - start_wall,
            "seconds": (end - start) if end else None,
        }
    stages["tasks"] = tasks
    stages["mlflow_record_per_method"] = {m: v["record_seconds"] for m, v in mlf["methods"].items()}
    stages["train_seconds_metric"] = {m: v["train_seconds"] for m, v in mlf["methods"].items()}
    stages["inference_seconds_metric"] = {m: v["inference_seconds"] for m, v in mlf["methods"].items()}
    stages["mlflow_parent_run"] = parent_end - parent_start
    return stages


def snapshot_source(dest: Path) -> str:
    """Copy the project's packages and configs to `dest` (first on PYTHONPATH for every child process).

    The repository is edited concurrently; the cache keys hash the library and task code, so an edit
    between the cold and the warm run would make the "warm" run retrain. The snapshot freezes the code for
    the whole benchmark. Returns a short hash of the copied sources."""
    import hashlib

    digest = hashlib.sha256()
    for package in ("sngp_models", "tasks", "flows", "conf"):
        shutil.copytree(ROOT / package, dest / package, ignore=shutil.ignore_patterns("*.tmp*"))
        for path in sorted((dest / package).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(dest)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def log_marks(log: Path, start_wall: float) -> dict[str, float]:
    """Offsets (s from process start) of Prefect's local-server messages in a `sngp run` log."""
    marks: dict[str, float] = {}
    day = dt.datetime.fromtimestamp(start_wall).date()
    patterns = {
        "server_starting": "Starting temporary server",
        "flow_begins": "Beginning flow run",
        "flow_finished": "Finished in state",
        "server_stopping": "Stopping temporary server",
    }
    for line in log.read_text(errors="replace").splitlines():
        stamp = line[:12]
        for key, text in patterns.items():
            if text in line and line[2:3] == ":" and (key != "flow_finished" or "Flow run" in line):
                try:
                    t = dt.datetime.combine(day, dt.time.fromisoformat(stamp)).timestamp()
                except ValueError:
                    continue
                if t < start_wall - 1:  # the run crossed midnight
                    t += 86400
                marks[key] = t - start_wall
    return marks


def phases(marks: dict[str, float], total: float) -> dict[str, float]:
    """Whole-process phases from the log marks (seconds)."""
    out = {}
    if "server_starting" in marks:  # Prefect started its own temporary server (sngp run starts it itself)
        out["imports_until_server_start"] = marks["server_starting"]
        if "flow_begins" in marks:
            out["prefect_server_start"] = marks["flow_begins"] - marks["server_starting"]
    if "flow_begins" in marks:  # imports, the temporary server, opening the MLflow store (overlapped)
        out["before_flow"] = marks["flow_begins"]
    if "flow_begins" in marks and "flow_finished" in marks:
        out["flow"] = marks["flow_finished"] - marks["flow_begins"]
    if "flow_finished" in marks:
        out["after_flow_until_exit"] = total - marks["flow_finished"]
    return out


def warm_with_running_server(cmd: list[str], run_dir: Path, env: dict[str, str], tmp: Path) -> float | None:
    """The warm command once more, against an already running Prefect server (`prefect server start`,
    as `sngp serve` provides) instead of a temporary one per process: isolates the server's start-up."""
    import signal
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    prefect = str(Path(sys.executable).parent / "prefect")
    server_env = clean_env(PREFECT_HOME=str(tmp / "prefect-server"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    with open(tmp / "prefect-server.log", "w") as log:
        server = subprocess.Popen(
            [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=server_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        api = f"http://127.0.0.1:{port}/api"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{api}/health", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None:
                    return None
                time.sleep(0.5)
        else:
            return None
        seconds, _ = timed(cmd, cwd=run_dir, env={**env, "PREFECT_API_URL": api}, log=tmp / "warm-server.log")
        return seconds
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the group started above: prefect + its uvicorn child
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def find_models(cache_dir: Path) -> dict[str, Path]:
    out = {}
    for method in METHODS:
        found = sorted((cache_dir / "models").glob(f"{method}-*"), key=lambda p: p.stat().st_mtime)
        found = [p for p in found if (p / "model.json").exists()]
        if found:
            out[method] = found[-1]
    return out


def machine() -> dict:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        import psutil

        mem = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        "memory_gb": mem,
        "platform": platform.platform(),
        "loadavg_at_start": list(os.getloadavg()),
    }


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("tensorflow", "tf-keras", "tf-models-official", "prefect", "mlflow", "numpy"):
        try:
            out[pkg.replace("-", "_")] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg.replace("-", "_")] = None
    return out


def reported_flow_seconds(log: Path) -> float | None:
    """The flow run's duration `sngp run` prints ("(Prefect flow run 1.2 s)": Prefect's start to end)."""
    found = re.search(r"\(Prefect flow run ([0-9.]+) s\)", log.read_text(errors="replace"))
    return float(found.group(1)) if found else None


def ratio(a, b):
    return (a / b) if a is not None and b else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="5 epochs and 100k prediction points: a fast check")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default=str(ROOT / "conf" / "default.yaml"))
    ap.add_argument(
        "--predict-points", type=int, default=None, help="default 1,000,000 (100,000 with --quick)"
    )
    ap.add_argument("--out", default=str(RESULTS), help="results folder (latest.json + <date>.json)")
    ap.add_argument("--no-readme", action="store_true", help="do not rewrite the README's Performance table")
    ap.add_argument("--keep", action="store_true", help="keep the temporary run folder (its path is printed)")
    args = ap.parse_args(argv)

    epochs = 5 if args.quick else 100
    points = args.predict_points or (100_000 if args.quick else 1_000_000)
    python = sys.executable
    sngp = str(Path(python).parent / "sngp")
    tmp = Path(tempfile.mkdtemp(prefix="sngp-bench-"))
    print(f"run_bench: working in {tmp} ({'quick' if args.quick else 'full'}: {epochs} epochs)", flush=True)
    result: dict = {
        "date": dt.date.today().isoformat(),
        "quick": args.quick,
        "epochs": epochs,
        "predict_points": points,
        "machine": machine(),
        "versions": versions(),
    }

    # 1. the notebook, as a plain script
    print("run_bench: notebook baseline ...", flush=True)
    base_json = tmp / "baseline.json"
    baseline_seconds, _ = timed(
        [
            python,
            str(ROOT / "benchmarks" / "notebook_baseline.py"),
            "--seed",
            str(args.seed),
            "--epochs",
            str(epochs),
            "--json",
            str(base_json),
        ],
        cwd=tmp,
        env=clean_env(),
        log=tmp / "baseline.log",
    )
    baseline = json.loads(base_json.read_text())

    # 2. + 3. the pipeline, cold then warm, in the same fresh folders
    src = tmp / "src"
    result["code_snapshot"] = snapshot_source(src)
    config = Path(args.config).resolve()
    if config.is_relative_to(ROOT / "conf"):
        config = src / config.relative_to(ROOT)
    run_dir = tmp / "run"
    run_dir.mkdir()
    env = clean_env(
        PYTHONPATH=str(src),
        SNGP_CACHE_DIR=str(run_dir / ".sngp_cache"),
        PREFECT_HOME=str(run_dir / ".prefect"),
        MLFLOW_TRACKING_URI=f"sqlite:///{run_dir / 'mlflow.db'}",
    )
    cmd = [sngp, "run", "--config", str(config), "--set", f"seed={args.seed}"]
    if args.quick:
        cmd += ["--set", f"training.epochs={epochs}"]
    print("run_bench: pipeline cold ...", flush=True)
    cold_seconds, cold_start = timed(cmd, cwd=run_dir, env=env, log=tmp / "cold.log")
    prefect_cold = prefect_stages(run_dir / ".prefect")
    shutil.copy(run_dir / ".prefect" / "prefect.db", tmp / "prefect-cold.db")
    print("run_bench: pipeline warm ...", flush=True)
    warm_seconds, warm_start = timed(cmd, cwd=run_dir, env=env, log=tmp / "warm.log")
    warm_recomputed = [  # task runs that did not hit the cache on the warm run (should be none)
        line.split("Task run '")[1].split("'")[0]
        for line in (tmp / "warm.log").read_text(errors="replace").splitlines()
        if "Task run '" in line and "Finished in state Completed()" in line
    ]
    print("run_bench: pipeline warm, again ...", flush=True)
    warm_repeat_seconds, _ = timed(cmd, cwd=run_dir, env=env, log=tmp / "warm2.log")
    print("run_bench: pipeline warm, against a running Prefect server ...", flush=True)
    warm_server_seconds = warm_with_running_server(cmd, run_dir, env, tmp)

    # Cold-run stages: Prefect task runs + MLflow metrics/timestamps (first parent run = the cold one).
    print("run_bench: imports-only process ...", flush=True)
    imports_seconds, _ = timed(
        [python, "-c", "import flows.cli, flows.cli.run, flows.pipeline"],
        cwd=run_dir,
        env=env,
        log=tmp / "imports.log",
    )
    mlf = mlflow_stages(env["MLFLOW_TRACKING_URI"])
    stages = cold_breakdown(cold_start, cold_seconds, prefect_cold, mlf, imports_seconds)
    stages["phases"] = phases(log_marks(tmp / "cold.log", cold_start), cold_seconds)
    warm_stages = phases(log_marks(tmp / "warm.log", warm_start), warm_seconds)
    ensemble_seconds = mlf["methods"].get("deep_ensemble", {}).get("train_seconds")

    # 4. prediction on `points` random grid-range points, one fresh process per method
    import yaml

    data_cfg = (yaml.safe_load(Path(args.config).read_text()) or {}).get("data", {})
    x_range, y_range = data_cfg.get("x_range", [-3.5, 3.5]), data_cfg.get("y_range", [-2.5, 2.5])
    script = tmp / "predict.py"
    script.write_text(PREDICT_SCRIPT)
    predict_seconds, predict_peak, predict_detail = {}, {}, {}
    models = find_models(run_dir / ".sngp_cache")
    for method, model_dir in models.items():
        print(f"run_bench: {points:,}-point prediction, {method} ...", flush=True)
        proc = subprocess.run(
            [python, str(script), str(model_dir), str(points), json.dumps(x_range), json.dumps(y_range)],
            cwd=tmp,
            env=clean_env(PYTHONPATH=str(src)),
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise SystemExit(f"run_bench: prediction benchmark for {method} failed:\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        predict_seconds[method], predict_peak[method] = r["seconds"], r["peak_extra_mb"]
        predict_detail[method] = r

    # 5. could SNGP's variance drop directions with a provable 1e-4 error? (benchmarks/sngp_variance_rank.py)
    rank = None
    if "sngp" in models:
        print("run_bench: SNGP variance truncation analysis ...", flush=True)
        rank_json = tmp / "rank.json"
        timed(
            [
                python,
                str(ROOT / "benchmarks" / "sngp_variance_rank.py"),
                str(models["sngp"]),
                "--points",
                str(min(points, 100_000)),
                "--json",
                str(rank_json),
            ],
            cwd=tmp,
            env=clean_env(PYTHONPATH=str(src)),
            log=tmp / "rank.log",
        )
        rank = json.loads(rank_json.read_text())

    result.update(
        {
            "baseline_seconds": baseline_seconds,
            "cold_seconds": cold_seconds,
            "warm_seconds": warm_seconds,
            "cold_over_baseline": ratio(cold_seconds, baseline_seconds),
            "warm_over_cold": ratio(warm_seconds, cold_seconds),
            # The same two runs as Prefect records them (flow run start to end, no process start-up).
            "cold_flow_run_seconds": reported_flow_seconds(tmp / "cold.log"),
            "warm_flow_run_seconds": reported_flow_seconds(tmp / "warm.log"),
            "warm_over_cold_flow_run": ratio(
                reported_flow_seconds(tmp / "warm.log"), reported_flow_seconds(tmp / "cold.log")
            ),
            "baseline_ensemble_seconds": baseline["ensemble_fit_seconds"],
            "ensemble_seconds": ensemble_seconds,
            "ensemble_over_baseline": ratio(ensemble_seconds, baseline["ensemble_fit_seconds"]),
            "predict_1m_seconds": predict_seconds,
            "predict_1m_peak_mb": predict_peak,
            "sngp_over_deterministic_1m": ratio(
                predict_seconds.get("sngp"), predict_seconds.get("deterministic")
            ),
            "sngp_over_mc_dropout_1m": ratio(predict_seconds.get("sngp"), predict_seconds.get("mc_dropout")),
            "baseline_stages": {k: v for k, v in baseline.items() if k.endswith("_seconds")},
            "cold_stages": stages,
            "warm_stages": warm_stages,
            "warm_repeat_seconds": warm_repeat_seconds,
            "warm_with_running_server_seconds": warm_server_seconds,
            "warm_recomputed_tasks": warm_recomputed,
            "sngp_variance_truncation": rank,
            "predict_detail": predict_detail,
        }
    )
    result["machine"]["loadavg_at_end"] = list(os.getloadavg())
    result["targets"] = {
        "cold_over_baseline <= 0.7": _meets(result["cold_over_baseline"], TARGETS["cold_over_baseline"]),
        "warm_seconds <= 12": _meets(warm_seconds, TARGETS["warm_seconds"]),
        "warm_over_cold <= 0.05": _meets(result["warm_over_cold"], TARGETS["warm_over_cold"]),
        "ensemble_over_baseline <= 0.4": _meets(
            result["ensemble_over_baseline"], TARGETS["ensemble_over_baseline"]
        ),
        "sngp_peak_mb < 1024": _meets(predict_peak.get("sngp"), TARGETS["sngp_peak_mb"]),
        "sngp_over_mc_dropout_1m <= 1": _meets(
            result["sngp_over_mc_dropout_1m"], TARGETS["sngp_over_mc_dropout_1m"]
        ),
    }

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # A --quick check never replaces the full run's latest.json (the README's table comes from that one).
    suffix = "-quick" if args.quick else ""
    latest, dated = out / f"latest{suffix}.json", out / f"{result['date']}{suffix}.json"
    if latest.is_file():  # the other benchmarks' keys (table_bench, drift_bench) and targets are kept
        previous = json.loads(latest.read_text())
        result = {**{k: v for k, v in previous.items() if k not in result}, **result}
        result["targets"] = {**previous.get("targets", {}), **result["targets"]}
    text = json.dumps(result, indent=2) + "\n"
    for path in (latest, dated):
        tmp_path = path.with_name(path.name + ".tmp")
        tmp_path.write_text(text)
        os.replace(tmp_path, path)
    print_table(result)
    print(f"\nrun_bench: wrote {latest} and {dated}")
    if not args.quick and not args.no_readme and update_readme(result):
        print(f"run_bench: updated the Performance table in {README}")
    if args.keep:
        print(f"run_bench: kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


README = ROOT / "README.md"
README_BEGIN, README_END = "<!-- bench:begin (written by benchmarks/run_bench.py) -->", "<!-- bench:end -->"


def markdown_table(r: dict) -> str:
    """The README's Performance table, from one result JSON (tests/test_bench_json.py checks they agree)."""
    f = lambda v, spec=".1f": "-" if v is None else format(v, spec)  # noqa: E731
    st, ph = r["cold_stages"], r["cold_stages"].get("phases", {})
    tasks = st["tasks"]
    train = {
        m: tasks.get(f"train-{m}", {}).get("seconds") for m in ("deterministic", "sngp", "deep_ensemble")
    }
    pred, peak = r["predict_1m_seconds"], r["predict_1m_peak_mb"]
    rows = [
        f"Measured {r['date']} on {r['machine']['cores']} cores ({r['machine']['cpu_model']}), load average "
        f"{f(r['machine']['loadavg_at_start'][0])} at the start (a shared machine); "
        f"{r['epochs']} epochs, TensorFlow {r['versions']['tensorflow']}, "
        f"Prefect {r['versions']['prefect']}, MLflow {r['versions']['mlflow']}.",
        "",
        "| whole process | seconds | ratio |",
        "|---|---:|---:|",
        f"| notebook baseline (`benchmarks/notebook_baseline.py`) | {f(r['baseline_seconds'])} | 1 |",
        f"| `sngp run` cold (fresh caches, temporary Prefect server) | {f(r['cold_seconds'])} "
        f"| {f(r['cold_over_baseline'], '.2f')} of baseline |",
        f"| `sngp run` warm (every task cached) | {f(r['warm_seconds'])} "
        f"| {f(r['warm_over_cold'], '.2f')} of cold |",
        f"| `sngp run` warm, again | {f(r['warm_repeat_seconds'])} | |",
        "| Prefect flow run (start to end, as Prefect records it): cold "
        f"| {f(r.get('cold_flow_run_seconds'))} | |",
        f"| Prefect flow run: warm | {f(r.get('warm_flow_run_seconds'))} "
        f"| {f(r.get('warm_over_cold_flow_run'), '.2f')} of cold |",
        f"| `sngp run` warm, against a running Prefect server "
        f"| {f(r['warm_with_running_server_seconds'])} | |",
        f"| 10-member ensemble training: notebook (10 sequential fits) "
        f"| {f(r['baseline_ensemble_seconds'])} | 1 |",
        f"| 10-member ensemble training: pipeline (one batched graph) | {f(r['ensemble_seconds'])} "
        f"| {f(r['ensemble_over_baseline'], '.2f')} of notebook |",
        "",
        f"| {r['predict_points']:,}-point prediction (fresh process) | seconds | peak extra memory (MB) |",
        "|---|---:|---:|",
        *(f"| {m} | {f(pred[m], '.2f')} | {f(peak[m], '.0f')} |" for m in pred),
        "",
        f"SNGP / deterministic {f(r['sngp_over_deterministic_1m'], '.1f')}x, "
        f"SNGP / MC Dropout {f(r['sngp_over_mc_dropout_1m'], '.2f')}x.",
        "",
        "Where the cold run's time goes (seconds, from the Prefect task runs and the log; tasks overlap): "
        f"before the flow starts (imports, temporary Prefect server, MLflow store; overlapped) "
        f"{f(ph.get('before_flow'))}, "
        f"flow {f(ph.get('flow'))} (training deterministic {f(train['deterministic'])}, "
        f"SNGP {f(train['sngp'])}, ensemble {f(train['deep_ensemble'])}, concurrently), "
        f"after the flow until exit {f(ph.get('after_flow_until_exit'))}.",
    ]
    return "\n".join(rows)


def update_readme(r: dict) -> bool:
    """Rewrite the block between the bench markers in README.md (if present)."""
    text = README.read_text()
    if README_BEGIN not in text or README_END not in text:
        return False
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    new = f"{head}{README_BEGIN}\n{markdown_table(r)}\n{README_END}{tail}"
    tmp_path = README.with_name(README.name + ".bench.tmp")
    tmp_path.write_text(new)
    os.replace(tmp_path, README)
    return True


def _meets(value, limit) -> bool | None:
    return None if value is None else bool(value <= limit)


def print_table(r: dict) -> None:
    f = lambda v, spec=".1f": "-" if v is None else format(v, spec)  # noqa: E731
    print()
    print(f"{'whole process':<34}{'seconds':>10}")
    print(f"{'notebook baseline':<34}{f(r['baseline_seconds']):>10}")
    cold_ratio, warm_ratio = f(r["cold_over_baseline"], ".2f"), f(r["warm_over_cold"], ".3f")
    print(f"{'sngp run, cold':<34}{f(r['cold_seconds']):>10}   cold/baseline {cold_ratio}")
    print(f"{'sngp run, warm (all cached)':<34}{f(r['warm_seconds']):>10}   warm/cold {warm_ratio}")
    print(f"{'  again':<34}{f(r['warm_repeat_seconds']):>10}")
    print(f"{'  against a running Prefect server':<34}{f(r['warm_with_running_server_seconds']):>10}")
    print(
        f"{'ensemble training (10 members)':<34}{f(r['ensemble_seconds']):>10}   "
        f"baseline {f(r['baseline_ensemble_seconds'])} s, ratio {f(r['ensemble_over_baseline'], '.2f')}"
    )
    print()
    print(f"{r['predict_points']:,}-point prediction{'':<8}{'seconds':>10}{'peak extra MB':>16}")
    for m, s in r["predict_1m_seconds"].items():
        print(f"  {m:<32}{f(s, '.2f'):>10}{f(r['predict_1m_peak_mb'][m], '.0f'):>16}")
    print(
        f"  sngp/deterministic {f(r['sngp_over_deterministic_1m'], '.2f')}, "
        f"sngp/mc_dropout {f(r['sngp_over_mc_dropout_1m'], '.2f')}"
    )
    st = r["cold_stages"]
    print()
    print("cold run stages (seconds; tasks overlap)")
    for key in ("startup_until_flow_start", "imports_only_process", "flow_run", "after_flow_until_exit"):
        if key in st:
            print(f"  {key:<32}{f(st[key]):>10}")
    for key, v in st.get("phases", {}).items():
        print(f"  {key:<32}{f(v):>10}   (warm run: {f(r['warm_stages'].get(key))})")
    for name, t in st["tasks"].items():
        print(f"  task {name:<27}{f(t['seconds']):>10}   (starts at {f(t['start_offset'])} s)")
    if r.get("warm_recomputed_tasks"):
        print(f"  WARNING: the warm run recomputed {r['warm_recomputed_tasks']}")
    rank = r.get("sngp_variance_truncation")
    if rank:
        kept = rank["tolerances"]["0.0001"]["kept_directions"]
        print(
            f"\nSNGP variance: a provable 1e-4 truncation keeps {kept} of {rank['num_inducing']} directions"
        )
    print()
    print(
        "targets: "
        + ", ".join(f"{k}: {'met' if v else 'open' if v is False else '-'}" for k, v in r["targets"].items())
    )


if __name__ == "__main__":
    sys.exit(main())
