"""Training-loop variants, side by side in one process (issue 9, part b).

    .venv/bin/python benchmarks/train_variants.py                 # study settings, 3 repeats
    .venv/bin/python benchmarks/train_variants.py --epochs 20 --repeats 2 --json out.json

Every variant trains the same network (same seed, same mini-batch orders, same dropout seeds) and is
checked against the reference loop for identical results up to float tolerance:

* ``reference``  -- the straightforward loop: one tf.function call per mini-batch, and
  ``float(batch_loss)`` after each step (a host sync per step);
* ``no_sync``    -- the same, but per-epoch loss / correct counts are accumulated on the device and read
  once per epoch;
* ``jit``        -- ``reference`` with ``jit_compile=True`` on the train step (XLA);
* ``jit_no_sync``-- both;
* ``epoch_graph``-- the whole epoch inside one tf.function (AutoGraph ``tf.while_loop`` over precomputed
  batch indices), one host sync per epoch;
* ``library``    -- whatever ``sngp_models.training.fit_network`` does now.

Timings are wall seconds of ``fit`` (tracing included, as a user pays it) with min/median over repeats;
variants run interleaved so the machine's background load hits them alike.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import numpy as np

from sngp_models.config import ModelConfig
from sngp_models.data import make_two_moons
from sngp_models.networks import SHUFFLE_STREAM, ResNetMembers, SNGPResNet, member_seed
from sngp_models.tf_setup import tf, tf_keras
from sngp_models.training import fit_network, make_train_step

VARIANTS = ("reference", "no_sync", "jit", "jit_no_sync", "epoch_graph", "library")
NETS = ("deterministic", "sngp", "deep_ensemble")


def build(kind: str, input_dim: int, config: ModelConfig):
    if kind == "sngp":
        return SNGPResNet(input_dim, config)
    return ResNetMembers(
        input_dim, config, num_members=config.ensemble_size if kind == "deep_ensemble" else 1
    )


def _step_fn(net, x_all, y_all, optimizer, variables, jit: bool):
    train_step = make_train_step(net, x_all, y_all, optimizer, variables)
    return train_step, tf.function(train_step, reduce_retracing=True, jit_compile=jit or None)


def fit_variant(net, x, y, config: ModelConfig, variant: str) -> list[float]:
    """Train `net` in place with one loop variant; returns the per-epoch mean loss."""
    if variant == "library":
        return fit_network(net, x, y, config)["loss"]
    x_all = tf.constant(x, dtype=tf.float32)
    y_all = tf.constant(y, dtype=tf.int64)
    n, members, bs = int(x.shape[0]), net.num_members, config.batch_size
    optimizer = tf_keras.optimizers.legacy.Adam(learning_rate=config.learning_rate)
    shufflers = [np.random.default_rng(member_seed(config.seed, m, SHUFFLE_STREAM)) for m in range(members)]
    variables = net.trainable_weights
    raw_step, train_step = _step_fn(net, x_all, y_all, optimizer, variables, jit=variant.startswith("jit"))
    steps = math.ceil(n / bs)
    losses = []

    if variant == "epoch_graph":
        optimizer._create_all_weights(variables)  # no variable creation inside the while_loop

        @tf.function
        def train_epoch(order, first_step):
            loss_sum, correct_sum = tf.constant(0.0), tf.constant(0.0)
            for s in tf.range(steps):
                index = order[:, s * bs : (s + 1) * bs]
                seed = tf.stack([tf.constant(config.seed, tf.int64), first_step + tf.cast(s, tf.int64)])
                batch_loss, correct = raw_step(index, seed)
                loss_sum += batch_loss * tf.cast(tf.shape(index)[1], tf.float32)
                correct_sum += correct
            return loss_sum, correct_sum

        for epoch in range(config.epochs):
            net.on_epoch_begin(epoch)
            order = np.stack([rng.permutation(n) for rng in shufflers])
            loss_sum, _ = train_epoch(tf.constant(order), tf.constant(epoch * steps, tf.int64))
            losses.append(float(loss_sum) / n)
        net.finalize()
        return losses

    sync = variant in ("reference", "jit")
    step = 0
    for epoch in range(config.epochs):
        net.on_epoch_begin(epoch)
        order = np.stack([rng.permutation(n) for rng in shufflers])
        loss_sum, device_sum = 0.0, []
        for s in range(steps):
            index = order[:, s * bs : (s + 1) * bs]
            seed = tf.constant([config.seed, step], dtype=tf.int64)
            batch_loss, _ = train_step(tf.constant(index), seed)
            if sync:
                loss_sum += float(batch_loss) * index.shape[1]
            else:
                device_sum.append(batch_loss * index.shape[1])
            step += 1
        if not sync:
            loss_sum = float(tf.add_n(device_sum))
        losses.append(loss_sum / n)
    net.finalize()
    return losses


def final_weights(net) -> list[np.ndarray]:
    return [w.numpy() for w in net.all_weights]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--nets", default=",".join(NETS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    x, y = make_two_moons(n_per_class=500, seed=0)
    variants = args.variants.split(",")
    results: dict = {"epochs": args.epochs, "repeats": args.repeats, "nets": {}}
    for kind in args.nets.split(","):
        config = ModelConfig(epochs=args.epochs, seed=0)
        times: dict[str, list[float]] = {v: [] for v in variants}
        reference = None
        diffs: dict[str, dict] = {}
        for _ in range(args.repeats):
            for variant in variants:
                net = build(kind, x.shape[1], config)
                started = time.perf_counter()
                try:
                    losses = fit_variant(net, x, y, config, variant)
                except Exception as exc:  # noqa: BLE001 - a variant that cannot run is reported, not fatal
                    diffs[variant] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                    times[variant].append(float("nan"))
                    continue
                times[variant].append(time.perf_counter() - started)
                weights = final_weights(net)
                if reference is None:
                    reference = (losses, weights)
                diffs[variant] = {
                    "max_abs_weight_diff": max(
                        float(np.abs(a - b).max()) for a, b in zip(weights, reference[1])
                    ),
                    "max_abs_loss_diff": float(np.abs(np.subtract(losses, reference[0])).max()),
                }
        summary = {}
        ref_min = min(times[variants[0]])
        for v in variants:
            ok = [t for t in times[v] if math.isfinite(t)]
            summary[v] = {
                "seconds": times[v],
                "min": min(ok) if ok else None,
                "median": statistics.median(ok) if ok else None,
                "min_over_reference": (min(ok) / ref_min) if ok else None,
                **diffs.get(v, {}),
            }
        results["nets"][kind] = summary
        print(f"\n{kind} ({args.epochs} epochs, {args.repeats} repeats)")
        print(f"{'variant':<13}{'min s':>8}{'median s':>10}{'vs ref':>8}{'max |dw|':>11}{'max |dloss|':>13}")
        for v, r in summary.items():
            if r["min"] is None:
                print(f"{v:<13} failed: {r.get('error')}")
                continue
            print(
                f"{v:<13}{r['min']:>8.2f}{r['median']:>10.2f}{r['min_over_reference']:>8.2f}"
                f"{r['max_abs_weight_diff']:>11.2e}{r['max_abs_loss_diff']:>13.2e}"
            )
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
