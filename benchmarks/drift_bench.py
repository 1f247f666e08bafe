"""Which method should watch production traffic: drift detection by abstain counts, per method, on two moons
and digits; and the REST latency of `sngp serve-model`.

    .venv/bin/python benchmarks/drift_bench.py                  # everything, merged into results/latest.json
    .venv/bin/python benchmarks/drift_bench.py --trials 20 --no-serve --no-write   # a quick look

Drift detection (key `drift_detection`): each method is trained once with the study's settings
(conf/default.yaml; digits: conf/digits.yaml). Each trial then does what production does: calibrate the
abstention threshold on an in-distribution calibration split (sngp_models.abstention.calibrate at 95 %
coverage), take a batch of 200 rows of which a fraction 0 / 0.05 / 0.1 / 0.3 are OOD, count the rows
the model abstains on and run the monitor's test (sngp_models.drift.abstain_drift, alpha 0.01).

- two moons: every trial draws a fresh calibration split (500 rows, as the pipeline's test split) and a
  fresh batch from the generator; OOD rows from the cluster around (2.5, -1.75).
- digits: trained on 40 % of digits 0-4; the other 60 % (540 rows) are reshuffled every trial into a
  340-row calibration split and the batch's in-distribution rows; OOD rows drawn from digits 5-9.

Per method: `detection_rate` by OOD fraction, `false_alarm_rate` (fraction 0; target <= alpha + 0.01),
the same for the plain binomial test against 1 - target coverage (`binomial_*`: what the monitor does
not use, and why), and the mean abstain rate of in-distribution and of OOD rows.

Serving (top-level keys `serve_p50_ms_1row`, `serve_p95_ms_1row`, `serve_ms_1000rows`, by method, and
details under drift_detection.serving): the study's sngp and deterministic models, logged by
`sngp run` into a temporary store, each behind a real `sngp serve-model`; a client on one keep-alive
HTTP connection POSTs JSON `dataframe_split` bodies: 300 one-row requests (after 20 warm-up ones) and
30 of 1000 rows, timed from send to the parsed answer.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("deterministic", "sngp", "mc_dropout", "deep_ensemble")
FRACTIONS = (0.05, 0.1, 0.3)
TARGET_COVERAGE = 0.95
SERVED = ("sngp", "deterministic")


# --------------------------------------------------------------------------------------------------
# Models


def train(config, method: str, x, y, trained: dict):
    """`method` fitted with the config's settings (MC Dropout wraps the trained deterministic net)."""
    import sngp_models
    from sngp_models.models import MCDropoutModel

    settings = config.model_settings(method, config.num_classes)
    if method == "mc_dropout":
        base = trained.get("deterministic") or train(config, "deterministic", x, y, trained)
        return MCDropoutModel.from_deterministic(base, sngp_models.ModelConfig(**settings))
    model = sngp_models.make_model(method, **settings)
    model.fit(x, y)
    trained[method] = model
    return model


def uncertainty(model, x) -> np.ndarray:
    return np.asarray(model.predict_with_uncertainty(np.asarray(x, np.float32)).uncertainty, np.float64)


# --------------------------------------------------------------------------------------------------
# Trials


def run_trials(draw, trials: int, rows: int, alpha: float, seed: int) -> dict:
    """`draw(rng, n_ood)` -> (calibration uncertainties, batch uncertainties: rows - n_ood in-distribution
    then n_ood OOD). Rates over `trials` trials per OOD fraction (0 = false alarms)."""
    from sngp_models.abstention import calibrate
    from sngp_models.drift import abstain_drift, critical_count

    rng = np.random.default_rng(seed)
    fractions = (0.0, *FRACTIONS)
    alarms = {f: 0 for f in fractions}
    binomial_alarms = {f: 0 for f in fractions}
    in_rates, ood_rates, critical = [], [], []
    for _ in range(trials):
        calibration, batches = draw(rng, {f: int(round(f * rows)) for f in fractions})
        rule = calibrate(calibration, TARGET_COVERAGE)
        for f, batch in batches.items():
            n_ood = int(round(f * rows))
            abstained = rule.abstain(batch)
            k = int(abstained.sum())
            settings = dict(threshold=rule.threshold, target_coverage=TARGET_COVERAGE, alpha=alpha)
            alarms[f] += abstain_drift(k, rows, reference_uncertainty=calibration, **settings).drift
            binomial_alarms[f] += abstain_drift(k, rows, **settings).drift
            if f == 0.0:
                in_rates.append(abstained.mean())
            else:
                ood_rates.append(abstained[rows - n_ood :].mean())
        critical.append(critical_count(rows, reference_uncertainty=calibration, **settings))
    false_alarm = alarms[0.0] / trials
    return {
        "false_alarm_rate": false_alarm,
        "detection_rate": {str(f): alarms[f] / trials for f in FRACTIONS},
        "false_alarm_ok": false_alarm <= alpha + 0.01,
        "binomial_false_alarm_rate": binomial_alarms[0.0] / trials,
        "binomial_detection_rate": {str(f): binomial_alarms[f] / trials for f in FRACTIONS},
        "in_distribution_abstain_rate": float(np.mean(in_rates)),
        "ood_abstain_rate": float(np.mean(ood_rates)),
        "median_critical_count": float(np.median(critical)),
    }


def two_moons(methods, trials: int, rows: int, alpha: float) -> dict:
    from flows.config import read_config
    from sngp_models.data import make_dataset, make_ood, make_two_moons

    config = read_config(ROOT / "conf" / "default.yaml")
    data = make_dataset(seed=0, n_per_class=config.data.n_train_per_class, n_ood=10)
    n_cal = 2 * config.data.n_test_per_class  # the pipeline calibrates on its test split: 500 rows
    per_trial_in = n_cal + rows
    x_in, _ = make_two_moons(trials * per_trial_in // 2 + 1, config.data.noise, seed=101)
    x_in = x_in[np.random.default_rng(7).permutation(len(x_in))]
    per_trial_ood = int(round(max(FRACTIONS) * rows))
    x_ood = make_ood(trials * per_trial_ood, seed=202)
    results, trained = {}, {}
    for method in methods:
        started = time.perf_counter()
        model = train(config, method, data.x_train, data.y_train, trained)
        u_in, u_ood = uncertainty(model, x_in), uncertainty(model, x_ood)
        counter = iter(range(trials))

        def draw(rng, n_oods, u_in=u_in, u_ood=u_ood, counter=counter):
            t = next(counter)
            block = u_in[t * per_trial_in : (t + 1) * per_trial_in]
            calibration, fresh = block[:n_cal], block[n_cal:]
            ood = u_ood[t * per_trial_ood : (t + 1) * per_trial_ood]
            return calibration, {f: np.r_[fresh[: rows - n], ood[:n]] for f, n in n_oods.items()}

        results[method] = run_trials(draw, trials, rows, alpha, seed=1)
        results[method]["seconds"] = round(time.perf_counter() - started, 1)
        print(f"drift_bench: two_moons {method}: {summary_line(results[method])}", flush=True)
    return {"calibration_rows": n_cal, "methods": results}


def digits(methods, trials: int, rows: int, alpha: float) -> dict:
    from flows.config import read_config
    from sngp_models.digits import make_digits_dataset

    config = read_config(ROOT / "conf" / "digits.yaml")
    data = make_digits_dataset(seed=0, known_classes=config.digits.known_classes, test_fraction=0.6)
    n_pool = len(data.x_test)
    n_cal = n_pool - rows
    results, trained = {}, {}
    for method in methods:
        started = time.perf_counter()
        model = train(config, method, data.x_train, data.y_train, trained)
        u_pool, u_ood = uncertainty(model, data.x_test), uncertainty(model, data.x_ood)

        def draw(rng, n_oods, u_pool=u_pool, u_ood=u_ood):
            order = rng.permutation(n_pool)
            calibration, fresh = u_pool[order[:n_cal]], u_pool[order[n_cal:]]
            ood = u_ood[rng.choice(len(u_ood), int(round(max(FRACTIONS) * rows)), replace=False)]
            return calibration, {f: np.r_[fresh[: rows - n], ood[:n]] for f, n in n_oods.items()}

        results[method] = run_trials(draw, trials, rows, alpha, seed=2)
        results[method]["seconds"] = round(time.perf_counter() - started, 1)
        print(f"drift_bench: digits {method}: {summary_line(results[method])}", flush=True)
    return {
        "train_rows": len(data.x_train),
        "calibration_rows": n_cal,
        "in_distribution_pool_rows": n_pool,
        "ood_rows": len(data.x_ood),
        "methods": results,
    }


def summary_line(r: dict) -> str:
    detection = ", ".join(f"{f}: {rate:.2f}" for f, rate in r["detection_rate"].items())
    return (
        f"false alarms {r['false_alarm_rate']:.3f} (binomial test {r['binomial_false_alarm_rate']:.3f}), "
        f"detection {detection}; abstains on {r['ood_abstain_rate']:.0%} of OOD rows"
    )


# --------------------------------------------------------------------------------------------------
# Serving


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serving(tmp: Path) -> dict:
    """The study's sngp and deterministic models logged by `sngp run`, each behind `sngp serve-model`."""
    sngp = Path(sys.executable).parent / "sngp"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "SNGP_"))} | {
        "PREFECT_HOME": str(tmp / "prefect"),
        "SNGP_CACHE_DIR": str(tmp / "cache"),
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    started = time.perf_counter()
    proc = subprocess.run(
        [sngp, "run", "--set", f"methods=[{','.join(SERVED)}]"],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"sngp run failed:\n{proc.stderr[-3000:]}")
    print(
        f"drift_bench: trained the study's {' and '.join(SERVED)} models "
        f"in {time.perf_counter() - started:.0f} s"
    )
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sngp-uncertainty")
    runs = {
        r.info.run_name: r
        for r in client.search_runs([experiment.experiment_id])
        if r.info.run_name in SERVED
    }
    results = {}
    for method in SERVED:
        uri = f"runs:/{runs[method].info.run_id}/model"
        port = free_port()
        server = subprocess.Popen(
            [sngp, "serve-model", "--model", uri, "--port", str(port)],
            cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        try:
            for line in server.stdout:
                if "Ctrl-C" in line:
                    break
            else:
                raise RuntimeError(f"sngp serve-model {uri} exited with {server.wait()}")
            results[method] = {"model": f"{method} (study settings, {uri})", **latency(port)}
        finally:
            server.terminate()
            server.wait(timeout=60)
        r = results[method]
        print(
            f"drift_bench: serve-model {method}: 1 row p50 {r['serve_p50_ms_1row']:.1f} ms, "
            f"p95 {r['serve_p95_ms_1row']:.1f} ms; 1000 rows {r['serve_ms_1000rows']:.1f} ms",
            flush=True,
        )
    return results


def measure_serving() -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="drift-bench-"))
    try:
        load_before = os.getloadavg()
        serve = serving(tmp)
        for result in serve.values():
            result["loadavg_before"] = load_before
            result["loadavg_after"] = os.getloadavg()
        return serve
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def latency(port: int, one_row: int = 300, warmup: int = 20, thousand: int = 30) -> dict:
    from sngp_models.data import make_two_moons

    x, _ = make_two_moons(600, 0.1, seed=5)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def post(rows: np.ndarray) -> float:
        body = json.dumps({"dataframe_split": {"columns": ["x0", "x1"], "data": rows.tolist()}})
        started = time.perf_counter()
        connection.request("POST", "/invocations", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        answer = json.loads(response.read())
        seconds = time.perf_counter() - started
        if response.status != 200 or len(answer["predictions"]) != len(rows):
            raise RuntimeError(f"HTTP {response.status}: {str(answer)[:300]}")
        return seconds * 1000

    for i in range(warmup):
        post(x[i : i + 1].astype(np.float64))
    single = [post(x[i % len(x) : i % len(x) + 1].astype(np.float64)) for i in range(one_row)]
    batch = [post(x[:1000].astype(np.float64)) for _ in range(thousand)]
    connection.close()
    return {
        "serve_p50_ms_1row": float(np.percentile(single, 50)),
        "serve_p95_ms_1row": float(np.percentile(single, 95)),
        "serve_ms_1000rows": float(np.median(batch)),
        "requests_1row": one_row,
        "requests_1000rows": thousand,
    }


# --------------------------------------------------------------------------------------------------


def merge_into(latest: Path, drift: dict, serve: dict | None) -> None:
    """drift_detection (and the serve_* keys) into latest.json, every other key kept; written atomically."""
    current = json.loads(latest.read_text()) if latest.is_file() else {}
    current["drift_detection"] = drift
    if serve:
        for key in ("serve_p50_ms_1row", "serve_p95_ms_1row", "serve_ms_1000rows"):
            current[key] = {method: round(result[key], 2) for method, result in serve.items()}
    targets = current.setdefault("targets", {})
    alpha = drift["alpha"]
    for name in ("two_moons", "digits"):
        for method, result in drift.get(name, {}).get("methods", {}).items():
            targets[f"drift false_alarm_rate {name} {method} <= {alpha + 0.01:g}"] = result["false_alarm_ok"]
    tmp = latest.with_name(latest.name + ".tmp")
    tmp.write_text(json.dumps(current, indent=2) + "\n")
    os.replace(tmp, latest)


def table(drift: dict) -> str:
    """The README's table (Markdown)."""
    head = (
        "| data | method | false alarms | "
        + " | ".join(f"detected, {f:.0%} OOD" for f in FRACTIONS)
        + " | OOD rows abstained |"
    )
    lines = [head, "|" + "---|" * (4 + len(FRACTIONS))]
    for name in ("two_moons", "digits"):
        for method, r in drift[name]["methods"].items():
            cells = " | ".join(f"{r['detection_rate'][str(f)]:.2f}" for f in FRACTIONS)
            lines.append(
                f"| {name.replace('_', ' ')} | {method} | {r['false_alarm_rate']:.3f} | {cells} "
                f"| {r['ood_abstain_rate']:.0%} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--rows", type=int, default=200, help="batch size (default: %(default)s)")
    ap.add_argument("--alpha", type=float, default=0.01)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--no-serve", action="store_true", help="skip the REST latency")
    ap.add_argument(
        "--serve-only",
        action="store_true",
        help="only the REST latency (the drift results in --out are kept)",
    )
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--out", default=str(RESULTS / "latest.json"))
    args = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    started = time.perf_counter()
    if args.serve_only:
        drift = json.loads(Path(args.out).read_text())["drift_detection"]
        serve = measure_serving()
        drift["serving"] = serve
        merge_into(Path(args.out), drift, serve)
        print(f"drift_bench: serving figures merged into {args.out}")
        return 0
    drift = {
        "alpha": args.alpha,
        "batch_rows": args.rows,
        "trials": args.trials,
        "target_coverage": TARGET_COVERAGE,
        "ood_fractions": list(FRACTIONS),
        "test": "one-sided beta-binomial test of the batch's abstain count against the calibration split "
        "(sngp_models.drift); binomial_*: a plain binomial test against 1 - target_coverage, for comparison",
        "two_moons": two_moons(args.methods, args.trials, args.rows, args.alpha),
        "digits": digits(args.methods, args.trials, args.rows, args.alpha),
    }
    serve = None
    if not args.no_serve:
        serve = measure_serving()
        drift["serving"] = serve
    drift["seconds"] = round(time.perf_counter() - started, 1)
    drift["machine"] = {"cores": os.cpu_count(), "platform": platform.platform(), "loadavg": os.getloadavg()}
    print(table(drift))
    if not args.no_write:
        merge_into(Path(args.out), drift, serve)
        print(f"drift_bench: merged into {args.out}")
    bad = [
        f"{name} {m}"
        for name in ("two_moons", "digits")
        for m, r in drift[name]["methods"].items()
        if not r["false_alarm_ok"]
    ]
    if bad:
        print(f"drift_bench: false-alarm rate above alpha + 0.01 for {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
