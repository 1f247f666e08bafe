"""Faithful, plain-script replica of the study notebook (seed/sngp_tutorial.ipynb): the yardstick for
performance comparisons (issue 9).

It runs exactly the notebook's code paths, in the notebook's order, with no caching, no orchestration and
default TensorFlow settings:

* data: make_moons(2*500, noise=0.1) + class shifts, 100x100 grid, 500 OOD points;
* DeepResNet (Keras subclass, input Dense(128, trainable=False), 6 residual Dense+Dropout(0.1) blocks,
  Dense(2) output) trained with SparseCategoricalCrossentropy(from_logits=True),
  SparseCategoricalAccuracy, tf.keras.optimizers.legacy.Adam(1e-4), batch 128, 100 epochs;
* DeepResNetSNGP (SpectralNormalization(norm_multiplier=0.9) hidden layers,
  RandomFeatureGaussianProcess(num_classes, gp_cov_momentum=-1) output) with the ResetCovarianceCallback,
  grid inference through the full N x N covmat (`model(x, return_covmat=True)` + `mean_field_logits`);
* MC Dropout: 10 calls of the deterministic net with training=True, mean of the softmax;
* Deep Ensemble: 10 sequential fits of fresh DeepResNets, mean of the softmax.

Deliberate differences from the notebook, none of which changes the measured code paths:
* seeds are set from --seed (the notebook sets none; the benchmark needs repeatability);
* fits run with verbose=0 and model.summary()/plt.show() are dropped (stdout carries only the JSON);
* the notebook trains the SNGP model twice (cell 81, then again inside `train_and_test_sngp`, whose result
  is the one it plots); this script fits it once, like the final `train_and_test_sngp`;
* the notebook's illustrative cells (a lone SpectralNormalization Dense, a GP layer on random embeddings,
  an unused built SNGP model) are skipped;
* plots are optional (--plots DIR, matplotlib Agg), off by default and never timed;
* the OOD predictions behind the sanity figures are extra (the notebook only plots OOD points); they run
  outside the timed stages.

Prints ONE JSON object on stdout with the per-stage timings and sanity figures.
"""

import time  # first statement after the docstring: total_seconds is measured from here

_T0 = time.perf_counter()

import argparse
import json
import os
import sys

os.environ["TF_USE_LEGACY_KERAS"] = "1"  # must precede any tensorflow import (official.nlp needs Keras 2)

DEFAULT_X_RANGE = (-3.5, 3.5)
DEFAULT_Y_RANGE = (-2.5, 2.5)
DEFAULT_N_GRID = 100
METHODS = ("deterministic", "sngp", "mc_dropout", "ensemble")


def _define(tf, nlp_layers, np, sklearn_datasets):
    """The notebook's functions and classes, verbatim apart from formatting (they need tf in scope)."""

    def make_training_data(sample_size=500):
        """Create two moon training dataset."""
        train_examples, train_labels = sklearn_datasets.make_moons(n_samples=2 * sample_size, noise=0.1)

        # Adjust data position slightly.
        train_examples[train_labels == 0] += [-0.1, 0.2]
        train_examples[train_labels == 1] += [0.1, -0.2]

        return train_examples, train_labels

    def make_testing_data(x_range=DEFAULT_X_RANGE, y_range=DEFAULT_Y_RANGE, n_grid=DEFAULT_N_GRID):
        """Create a mesh grid in 2D space."""
        x = np.linspace(x_range[0], x_range[1], n_grid)
        y = np.linspace(y_range[0], y_range[1], n_grid)
        xv, yv = np.meshgrid(x, y)
        return np.stack([xv.flatten(), yv.flatten()], axis=-1)

    def make_ood_data(sample_size=500, means=(2.5, -1.75), vars=(0.01, 0.01)):
        return np.random.multivariate_normal(means, cov=np.diag(vars), size=sample_size)

    class DeepResNet(tf.keras.Model):
        """Defines a multi-layer residual network."""

        def __init__(self, num_classes, num_layers=3, num_hidden=128, dropout_rate=0.1, **classifier_kwargs):
            super().__init__()
            # Defines class meta data.
            self.num_hidden = num_hidden
            self.num_layers = num_layers
            self.dropout_rate = dropout_rate
            self.classifier_kwargs = classifier_kwargs

            # Defines the hidden layers.
            self.input_layer = tf.keras.layers.Dense(self.num_hidden, trainable=False)
            self.dense_layers = [self.make_dense_layer() for _ in range(num_layers)]

            # Defines the output layer.
            self.classifier = self.make_output_layer(num_classes)

        def call(self, inputs):
            # Projects the 2d input data to high dimension.
            hidden = self.input_layer(inputs)

            # Computes the ResNet hidden representations.
            for i in range(self.num_layers):
                resid = self.dense_layers[i](hidden)
                # As in the notebook: a fresh Dropout layer per call; it picks up `training` from the
                # Keras call context (fit -> True, model(x, training=True) -> True, model(x) -> False).
                resid = tf.keras.layers.Dropout(self.dropout_rate)(resid)
                hidden += resid

            return self.classifier(hidden)

        def make_dense_layer(self):
            """Uses the Dense layer as the hidden layer."""
            return tf.keras.layers.Dense(self.num_hidden, activation="relu")

        def make_output_layer(self, num_classes):
            """Uses the Dense layer as the output layer."""
            return tf.keras.layers.Dense(num_classes, **self.classifier_kwargs)

    class DeepResNetSNGP(DeepResNet):
        def __init__(self, spec_norm_bound=0.9, **kwargs):
            self.spec_norm_bound = spec_norm_bound
            super().__init__(**kwargs)

        def make_dense_layer(self):
            """Applies spectral normalization to the hidden layer."""
            dense_layer = super().make_dense_layer()
            return nlp_layers.SpectralNormalization(dense_layer, norm_multiplier=self.spec_norm_bound)

        def make_output_layer(self, num_classes):
            """Uses Gaussian process as the output layer."""
            return nlp_layers.RandomFeatureGaussianProcess(
                num_classes, gp_cov_momentum=-1, **self.classifier_kwargs
            )

        def call(self, inputs, training=False, return_covmat=False):
            # Gets logits and a covariance matrix from the GP layer.
            logits, covmat = super().call(inputs)

            # Returns only logits during training.
            if not training and return_covmat:
                return logits, covmat

            return logits

    class ResetCovarianceCallback(tf.keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            """Resets covariance matrix at the beginning of the epoch."""
            if epoch > 0:
                self.model.classifier.reset_covariance_matrix()

    class DeepResNetSNGPWithCovReset(DeepResNetSNGP):
        def fit(self, *args, **kwargs):
            """Adds ResetCovarianceCallback to model callbacks."""
            kwargs["callbacks"] = list(kwargs.get("callbacks", []))
            kwargs["callbacks"].append(ResetCovarianceCallback())

            return super().fit(*args, **kwargs)

    def compute_posterior_mean_probability(logits, covmat, lambda_param=np.pi / 8.0):
        # Computes uncertainty-adjusted logits using the built-in method.
        logits_adjusted = nlp_layers.gaussian_process.mean_field_logits(
            logits, covmat, mean_field_factor=lambda_param
        )
        return tf.nn.softmax(logits_adjusted, axis=-1)[:, 0]

    return {
        "make_training_data": make_training_data,
        "make_testing_data": make_testing_data,
        "make_ood_data": make_ood_data,
        "DeepResNet": DeepResNet,
        "DeepResNetSNGPWithCovReset": DeepResNetSNGPWithCovReset,
        "compute_posterior_mean_probability": compute_posterior_mean_probability,
    }


def _save_plots(plots_dir, results, train_examples, train_labels, ood_examples, np):
    """The notebook's plot_predictions figures (14x5, two panels), saved instead of shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import colors

    cmap_train = colors.ListedColormap(["#377eb8", "#ff7f00"])
    os.makedirs(plots_dir, exist_ok=True)

    def plot_uncertainty_surface(test_uncertainty, ax, cmap=None):
        test_uncertainty = test_uncertainty / np.max(test_uncertainty)
        ax.set_ylim(DEFAULT_Y_RANGE)
        ax.set_xlim(DEFAULT_X_RANGE)
        pcm = ax.imshow(
            np.reshape(test_uncertainty, [DEFAULT_N_GRID, DEFAULT_N_GRID]),
            cmap=cmap,
            origin="lower",
            extent=DEFAULT_X_RANGE + DEFAULT_Y_RANGE,
            vmin=0,
            vmax=1,
            interpolation="bicubic",
            aspect="auto",
        )
        ax.scatter(train_examples[:, 0], train_examples[:, 1], c=train_labels, cmap=cmap_train, alpha=0.5)
        ax.scatter(ood_examples[:, 0], ood_examples[:, 1], c="red", alpha=0.1)
        return pcm

    names = {
        "sngp": "SNGP",
        "deterministic": "Deterministic",
        "mc_dropout": "MC Dropout",
        "ensemble": "Deep ensemble",
    }
    for key, model_name in names.items():
        pred_probs = results[key]
        uncertainty = pred_probs * (1.0 - pred_probs)
        fig, axs = plt.subplots(1, 2, figsize=(14, 5))
        pcm_0 = plot_uncertainty_surface(pred_probs, ax=axs[0])
        pcm_1 = plot_uncertainty_surface(uncertainty, ax=axs[1])
        fig.colorbar(pcm_0, ax=axs[0])
        fig.colorbar(pcm_1, ax=axs[1])
        axs[0].set_title(f"Class Probability, {model_name}")
        axs[1].set_title(f"(Normalized) Predictive Uncertainty, {model_name}")
        fig.savefig(os.path.join(plots_dir, f"{key}.png"), dpi=140)
        plt.close(fig)


def run_baseline(seed: int = 0, epochs: int = 100, ensemble_size: int = 10, plots_dir=None, t0=None) -> dict:
    """Run the notebook end to end; return timings (seconds) and sanity figures.

    `t0` is the perf_counter origin of `total_seconds`; by default the first line of this module, so a
    driver should import this module and call run_baseline in a fresh subprocess.
    """
    t_start = _T0 if t0 is None else t0
    out: dict = {"seed": seed, "epochs": epochs, "ensemble_size": ensemble_size}

    # --- imports (TensorFlow + tf-models, plus the notebook's numpy/sklearn) -----------------------------
    t = time.perf_counter()
    import numpy as np
    import official.nlp.modeling.layers as nlp_layers
    import sklearn.datasets as sklearn_datasets
    import tensorflow as tf

    out["import_seconds"] = time.perf_counter() - t

    nb = _define(tf, nlp_layers, np, sklearn_datasets)
    np.random.seed(seed)
    tf.keras.utils.set_random_seed(seed)

    # --- data ---------------------------------------------------------------------------------------------
    t = time.perf_counter()
    train_examples, train_labels = nb["make_training_data"](sample_size=500)
    test_examples = nb["make_testing_data"]()
    ood_examples = nb["make_ood_data"](sample_size=500)
    out["data_seconds"] = time.perf_counter() - t

    resnet_config = {"num_classes": 2, "num_layers": 6, "num_hidden": 128}

    # One loss / metrics tuple / optimizer object shared by every model, exactly as in the notebook
    # (`train_config` for the deterministic and SNGP models; the ensemble loop passes the same objects).
    # The legacy Adam keeps per-variable slots, so sharing works, but its iteration counter (and hence
    # the bias correction) carries over from model to model -- a notebook quirk kept on purpose.
    loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    metrics = (tf.keras.metrics.SparseCategoricalAccuracy(),)
    optimizer = tf.keras.optimizers.legacy.Adam(learning_rate=1e-4)
    train_config = {"loss": loss, "metrics": metrics, "optimizer": optimizer}
    fit_config = {"batch_size": 128, "epochs": epochs}

    def timed_fit(model_class: str, method: str):
        """The notebook's build, compile and fit of one model, timed as `<method>_fit_seconds`."""
        t = time.perf_counter()
        model = nb[model_class](**resnet_config)
        model.compile(**train_config)
        model.fit(train_examples, train_labels, verbose=0, **fit_config)
        out[f"{method}_fit_seconds"] = time.perf_counter() - t
        return model

    # --- deterministic ResNet -----------------------------------------------------------------------------
    resnet_model = timed_fit("DeepResNet", "deterministic")

    t = time.perf_counter()
    resnet_logits = resnet_model(test_examples)
    resnet_probs = tf.nn.softmax(resnet_logits, axis=-1)[:, 0]  # Take the probability for class 0.
    resnet_probs = np.asarray(resnet_probs)
    out["deterministic_predict_seconds"] = time.perf_counter() - t

    # --- SNGP ---------------------------------------------------------------------------------------------
    sngp_model = timed_fit("DeepResNetSNGPWithCovReset", "sngp")

    t = time.perf_counter()
    sngp_logits, sngp_covmat = sngp_model(test_examples, return_covmat=True)  # full 10k x 10k covmat
    sngp_probs = nb["compute_posterior_mean_probability"](sngp_logits, sngp_covmat)
    sngp_probs = np.asarray(sngp_probs)
    out["sngp_predict_seconds"] = time.perf_counter() - t
    del sngp_covmat

    # --- MC Dropout (the deterministic net, dropout on at inference) ------------------------------------
    num_ensemble = ensemble_size

    def mc_dropout_sampling(examples):
        # Enable dropout during inference.
        return resnet_model(examples, training=True)

    t = time.perf_counter()
    dropout_logit_samples = [mc_dropout_sampling(test_examples) for _ in range(num_ensemble)]
    dropout_prob_samples = [tf.nn.softmax(lg, axis=-1)[:, 0] for lg in dropout_logit_samples]
    dropout_probs = np.asarray(tf.reduce_mean(dropout_prob_samples, axis=0))
    out["mc_dropout_predict_seconds"] = time.perf_counter() - t

    # --- Deep ensemble (sequential fits of fresh nets) --------------------------------------------------
    t = time.perf_counter()
    resnet_ensemble = []
    for _ in range(num_ensemble):
        member = nb["DeepResNet"](**resnet_config)
        # Notebook quirk: every member is compiled with the SAME optimizer (and metric) object.
        member.compile(optimizer=optimizer, loss=loss, metrics=metrics)
        member.fit(train_examples, train_labels, verbose=0, **fit_config)
        resnet_ensemble.append(member)
    out["ensemble_fit_seconds"] = time.perf_counter() - t

    t = time.perf_counter()
    ensemble_logit_samples = [model(test_examples) for model in resnet_ensemble]
    ensemble_prob_samples = [tf.nn.softmax(lg, axis=-1)[:, 0] for lg in ensemble_logit_samples]
    ensemble_probs = np.asarray(tf.reduce_mean(ensemble_prob_samples, axis=0))
    out["ensemble_predict_seconds"] = time.perf_counter() - t

    # --- sanity figures (untimed; OOD inference is not in the notebook) ---------------------------------
    ood_p0 = {
        "deterministic": np.asarray(tf.nn.softmax(resnet_model(ood_examples), axis=-1)[:, 0]),
        "sngp": np.asarray(
            nb["compute_posterior_mean_probability"](*sngp_model(ood_examples, return_covmat=True))
        ),
        "mc_dropout": np.mean(
            [tf.nn.softmax(mc_dropout_sampling(ood_examples), axis=-1)[:, 0] for _ in range(num_ensemble)],
            axis=0,
        ),
        "ensemble": np.mean([tf.nn.softmax(m(ood_examples), axis=-1)[:, 0] for m in resnet_ensemble], axis=0),
    }
    grid_p0 = {
        "deterministic": resnet_probs,
        "sngp": sngp_probs,
        "mc_dropout": dropout_probs,
        "ensemble": ensemble_probs,
    }
    for m in METHODS:
        p = grid_p0[m].astype(np.float64)
        q = np.asarray(ood_p0[m], dtype=np.float64)
        out[f"{m}_grid_mean_uncertainty"] = float(np.mean(p * (1.0 - p)))  # mean p(1-p) over the grid
        out[f"{m}_ood_mean_max_prob"] = float(np.mean(np.maximum(q, 1.0 - q)))  # binary: max(p, 1-p)

    if plots_dir:
        _save_plots(plots_dir, grid_p0, train_examples, train_labels, ood_examples, np)

    out["total_seconds"] = time.perf_counter() - t_start
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--ensemble-size", type=int, default=10)
    ap.add_argument("--json", metavar="PATH", help="also write the JSON object to PATH")
    ap.add_argument("--plots", metavar="DIR", help="save the 4 notebook figures (PNG) to DIR")
    args = ap.parse_args(argv)

    result = run_baseline(args.seed, args.epochs, args.ensemble_size, plots_dir=args.plots)
    text = json.dumps(result, indent=2)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            fh.write(text + "\n")
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
