# Every target bootstraps .venv itself, so a fresh clone needs only Python 3.11 and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= conf/default.yaml

.PHONY: run test test-fast lint format bench serve serve-model deploy sweep clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Reinstall only when the dependency list changes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/sngp run --config $(CONFIG)

# The tests that mostly wait (marker `waiting`, tests/conftest.py) run in a second pytest beside the
# others, on the same 2 cores; their report follows, and either one failing fails `make test`.
test: $(STAMP)
	@$(BIN)/python -m pytest -q -p no:cacheprovider -m waiting > $(VENV)/waiting-tests.log 2>&1 & waiting=$$!; \
	$(BIN)/python -m pytest -q --durations=15 -m "not waiting"; main=$$?; \
	wait $$waiting; waited=$$?; \
	echo "--- the waiting tests (pytest -m waiting, run alongside) ---"; cat $(VENV)/waiting-tests.log; \
	exit $$(( main != 0 ? main : waited ))

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not e2e"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) mlflow.db mlartifacts results .sngp_cache

# Register the deployments of prefect.yaml against the server in PREFECT_API_URL (the pipeline's, the
# nightly retrain and sweep-point/pool, which `sngp sweep --runner workpool` dispatches its points to).
# RETRAIN_CONFIG=conf/table_example.yaml: the nightly retrain runs on that config (e.g. your own table;
# its absolute path becomes the deployment's `config_path` parameter); empty: the study's settings.
# monitor/every-15-minutes watches MONITOR_INBOX (created if missing) with MONITOR_MODEL; the automation
# 'sngp: retrain on drift' runs retrain/nightly on its drift events, at most once per
# DRIFT_COOLDOWN_MINUTES; 'sngp: retry a crashed nightly retrain' runs a crashed retrain/nightly run once
# more as retrain/nightly-retry (both created or updated by `sngp deploy-automations`, never duplicated).
SNGP_WORK_POOL ?= sngp-pool
SNGP_RETRAIN_CRON ?= 0 2 * * *
RETRAIN_CONFIG ?=
MONITOR_MODEL ?= models:/sngp-uncertainty-sngp@champion
MONITOR_INBOX ?= inbox
DRIFT_COOLDOWN_MINUTES ?= 360
DEPLOY_ENV = SNGP_PROJECT_DIR="$(CURDIR)" SNGP_RETRAIN_CRON="$(SNGP_RETRAIN_CRON)" PREFECT_CLI_PROMPT=false \
	SNGP_MONITOR_MODEL="$(MONITOR_MODEL)" SNGP_MONITOR_INBOX="$(abspath $(MONITOR_INBOX))"
deploy: $(STAMP)
	@test -n "$$PREFECT_API_URL" || { echo "make deploy: set PREFECT_API_URL (sngp serve prints it)"; exit 2; }
	@test -z "$(RETRAIN_CONFIG)" || test -f "$(RETRAIN_CONFIG)" || \
		{ echo "make deploy: RETRAIN_CONFIG=$(RETRAIN_CONFIG) is not a file"; exit 2; }
	mkdir -p "$(abspath $(MONITOR_INBOX))"
	$(BIN)/prefect work-pool create $(SNGP_WORK_POOL) --type process --overwrite >/dev/null
	$(DEPLOY_ENV) $(BIN)/prefect --no-prompt deploy --all
	@test -z "$(RETRAIN_CONFIG)" || for name in nightly nightly-retry; do $(DEPLOY_ENV) $(BIN)/prefect \
		--no-prompt deploy --name $$name --param config_path="$(abspath $(RETRAIN_CONFIG))" || exit 1; done
	$(BIN)/sngp deploy-automations --cooldown-minutes $(DRIFT_COOLDOWN_MINUTES)

# Prefect server + MLflow server + $(WORKERS) process worker(s) on $(DATA_DIR); Ctrl-C stops them, data is kept.
DATA_DIR ?= .sngp_server
WORKERS ?= 1
serve: $(STAMP)
	$(BIN)/sngp serve --data-dir $(DATA_DIR) --workers $(WORKERS)

# One model behind MLflow's scoring server (POST http://127.0.0.1:$(MODEL_PORT)/invocations) until Ctrl-C;
# models:/ and runs:/ URIs are looked up in $$MLFLOW_TRACKING_URI (else ./mlflow.db).
MODEL ?= models:/sngp-uncertainty-sngp@champion
MODEL_PORT ?= 5001
serve-model: $(STAMP)
	$(BIN)/sngp serve-model --model "$(MODEL)" --port $(MODEL_PORT)

# Notebook baseline vs. `sngp run` cold and warm, 1M-point predictions -> benchmarks/results/latest.json.
bench: $(STAMP)
	$(BIN)/python benchmarks/run_bench.py

# The small sweep (conf/sweep_smoke.yaml: 8 points, seconds each) on embedded defaults (Prefect local
# mode, ./mlflow.db). SWEEP_ARGS="--runner dask --dask-workers 2" runs it on a local Dask cluster,
# SWEEP_ARGS="--runner workpool" on the work pool of `sngp serve --workers 2` (after `make deploy`).
SWEEP_CONFIG ?= conf/sweep_smoke.yaml
SWEEP_ARGS ?=
sweep: $(STAMP)
	$(BIN)/sngp sweep --config $(SWEEP_CONFIG) $(SWEEP_ARGS)
