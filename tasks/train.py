"""Train one method (cached across flow runs); the trained model persists as a directory."""

from __future__ import annotations

import threading
import time
from typing import Any

from prefect import get_run_logger, task

from sngp_models.interface import read_model_dir

from .cache import CACHE_POLICY, CODE_VERSION, artifact_path, configured, stable_key
from .data import data_facts, load_data

# Set when the flow is interrupted (SIGINT/SIGTERM): training in worker threads stops at the next epoch
# instead of running to the end while the process waits for its thread pool.
STOP_TRAINING = threading.Event()


class TrainingInterrupted(RuntimeError):
    """Training stopped early because the flow run was interrupted."""


def _progress(method: str, epochs: int):
    logger = get_run_logger()
    every = max(1, epochs // 10)  # ~10 lines per method, first and last epoch always shown

    def on_epoch_end(epoch: int, logs: dict[str, float]) -> None:
        if STOP_TRAINING.is_set():
            raise TrainingInterrupted(f"{method}: interrupted at epoch {epoch + 1}/{epochs}")
        if epoch == 0 or (epoch + 1) % every == 0 or epoch + 1 == epochs:
            logger.info(
                "%s epoch %d/%d  loss %.4f  accuracy %.4f",
                method,
                epoch + 1,
                epochs,
                logs["loss"],
                logs["accuracy"],
            )

    return on_epoch_end


@task(name="train", task_run_name="train-{method}", cache_policy=CACHE_POLICY, persist_result=True)
def train_model(method: str, model_config: dict, data_path: str, code_version: str = CODE_VERSION) -> dict:
    """Fit `method` on the run's training set and save it. `model_config`: the method's relevant fields."""
    import sngp_models  # TensorFlow is imported here, only when something must be trained

    data = load_data(data_path)
    facts = data_facts(data_path)
    model = sngp_models.make_model(method, **model_config)
    started = time.perf_counter()
    model.fit(
        data.x_train,
        data.y_train,
        on_epoch_end=_progress(method, model.config.epochs),
        feature_names=facts["feature_names"],
        class_names=facts["class_names"],
    )
    seconds = time.perf_counter() - started
    path = artifact_path("models", f"{method}-{stable_key(method, model_config, data_path, code_version)}")
    model.save(path)
    logger = get_run_logger()
    logger.info("%s trained in %.1f s -> %s", method, seconds, path)
    result = {"method": method, "model_dir": str(path), "train_seconds": seconds, "history": model.history_}
    chosen = getattr(model, "gp_kernel_scale_", None)
    if chosen is not None:  # SNGP: the kernel scale in use (chosen from the data with "auto")
        result["gp_kernel_scale_chosen"] = float(chosen)
        logger.info("%s: gp_kernel_scale %s -> %.6g", method, model_config.get("gp_kernel_scale"), chosen)
    return result


@task(name="mc-dropout-from-deterministic", cache_policy=CACHE_POLICY, persist_result=True)
def mc_dropout_from_deterministic(
    deterministic: dict, model_config: dict, code_version: str = CODE_VERSION
) -> dict:
    """MC Dropout is the trained deterministic net called with dropout on (as in the study): no retraining."""
    import sngp_models
    from sngp_models.models import MCDropoutModel

    base = sngp_models.load_model(deterministic["model_dir"])
    model = MCDropoutModel.from_deterministic(base, sngp_models.ModelConfig(**model_config))
    path = artifact_path(
        "models", f"mc_dropout-{stable_key(deterministic['model_dir'], model_config, code_version)}"
    )
    model.save(path)
    return {**deterministic, "method": "mc_dropout", "model_dir": str(path)}


def submit_training(methods: list[str], settings: dict[str, dict], data_path: str) -> dict[str, Any]:
    """Submit one training per method (they run concurrently) -> futures by method. `settings`: each
    method's library settings (its cache key), with `deterministic` whenever `mc_dropout` is trained:
    MC Dropout wraps the deterministic net, as in the study.

    A result whose model directory is missing or incomplete (a cache entry outliving its files, a
    process killed while saving) is not trusted: that training reruns instead of failing later."""
    train = configured(train_model)
    trained = {}
    if "mc_dropout" in methods and "deterministic" not in methods:
        trained["deterministic"] = train.submit("deterministic", settings["deterministic"], data_path)
    for method in methods:
        if method != "mc_dropout":
            trained[method] = train.submit(method, settings[method], data_path)
    retrain = train.with_options(refresh_cache=True)
    for method, future in trained.items():
        args = (method, settings[method], data_path)
        trained[method] = usable_model(future, lambda a=args: retrain.submit(*a))
    if "mc_dropout" in methods:
        mc_dropout = configured(mc_dropout_from_deterministic)
        args = (trained["deterministic"], settings["mc_dropout"])
        trained["mc_dropout"] = usable_model(
            mc_dropout.submit(*args), lambda: mc_dropout.with_options(refresh_cache=True).submit(*args)
        )
    return trained


def usable_model(future, rerun):
    """`future` once finished, or `rerun()` (the same task, cache refreshed) if the model directory its
    result names does not load (no manifest, checksum mismatch, missing)."""
    future.wait()
    if not future.state.is_completed():
        return future  # a real failure: recorded by record_method
    model_dir = future.result()["model_dir"]
    try:
        read_model_dir(model_dir)
    except (ValueError, OSError) as exc:
        get_run_logger().warning("%s; training again", exc)
        return rerun()
    return future
