# musegen: `make demo` runs the whole DAG on the embedded corpus; `make test` runs the tests.
# GPU users: install the torch build for your CUDA first (e.g. `.venv/bin/pip install torch
# --index-url https://download.pytorch.org/whl/cu128`); setup keeps any torch already importable.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
STAMP := $(VENV)/.installed

.PHONY: setup apt demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	@$(BIN)/pip install -q -e ".[dev,audio]"
	@$(BIN)/pip install -q --no-deps basic-pitch==0.4.0  # see the audio extra in pyproject.toml
	@$(MAKE) --no-print-directory apt
	@touch $(STAMP)
	@echo "setup: $(VENV) ready ($$($(BIN)/python -c 'import torch; print("torch", torch.__version__)'))"

# FluidSynth + a General MIDI soundfont for real audio (render.py falls back to a numpy
# synthesiser without them) and Chromium for the sweep report's browser test (skipped
# without it), sox for bench/transcribe.py's reverb (skipped without it). Installed where
# apt is usable (root); skipped with a note elsewhere.
apt:
	@missing=""; command -v fluidsynth >/dev/null || missing="fluidsynth"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v sox >/dev/null || missing="$$missing sox"; \
	[ -z "$$missing" ] && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "setup: apt-get install$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null \
	    || echo "setup: warning: apt-get install$$missing failed (numpy audio fallback; browser test skipped)"; \
	else echo "setup: $$missing absent and apt unusable: numpy audio fallback, browser test skipped"; fi

demo: setup
	dvc repro
	@echo
	@echo "done. Results:"
	@echo "  corpus / manifest   data/raw/m21-keyboard/, data/prepared/manifest.csv"
	@echo "  tokens              data/tokens/{cp,remi}/"
	@echo "  checkpoints         models/cp/checkpoints/step_<STEP>.pt, best.pt"
	@echo "  sweep report        reports/sweep/index.html   (open in a browser)"
	@echo "  tuned sampling      reports/tune/best_sampling.yaml"
	@echo "  champion            models:/musegen@champion   (reports/register/champion.json)"
	@echo "  curves              dvc plots show  -> dvc_plots/index.html"
	@echo "  metrics             dvc metrics show   (or: dvc metrics diff after dvc exp run -S ...)"
	@echo "  UIs                 make ui  (MLflow, Prefect, optuna-dashboard)"

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

.PHONY: ui prefect

# MLflow UI (:5000), Prefect server (:4200) and optuna-dashboard (:8080) on this repo's stores,
# bound to 127.0.0.1 (ports: params.yaml serve:); Ctrl-C stops all three.
ui: setup
	musegen ui

# A Prefect server on 127.0.0.1:4200 (PREFECT_HOME=.prefect) plus the scheduled deployments
# (nightly pipeline, hourly tune) served against it; Ctrl-C stops both.
prefect: setup
	PREFECT_HOME=$(CURDIR)/.prefect $(BIN)/python -m flows.serve --start-server
