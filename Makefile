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
# synthesiser without them), Chromium for the sweep report's browser test, sox for
# bench/transcribe.py's reverb. Installed where apt is usable (root), each tool on its own so
# one failing package does not take the others down. With CI set, FluidSynth or Chromium still
# missing fails setup (and their tests fail instead of skipping, tests/conftest.py `needs`):
# CI must not go green without them. Elsewhere a missing tool is a warning.
APT_fluidsynth := fluidsynth timgm6mb-soundfont
APT_chromium := chromium
APT_sox := sox
CI_TOOLS := fluidsynth chromium
apt:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  updated=""; \
	  for tool in fluidsynth chromium sox; do \
	    command -v $$tool >/dev/null && continue; \
	    case $$tool in fluidsynth) pkgs="$(APT_fluidsynth)";; chromium) pkgs="$(APT_chromium)";; *) pkgs="$(APT_sox)";; esac; \
	    [ -n "$$updated" ] || { apt-get update -qq; updated=1; }; \
	    echo "setup: apt-get install $$pkgs"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$pkgs >/dev/null \
	      || echo "setup: warning: apt-get install $$pkgs failed"; \
	  done; \
	fi; \
	missing=""; for tool in fluidsynth chromium sox; do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	[ -z "$$missing" ] && exit 0; \
	hint="apt-get install $(APT_fluidsynth) $(APT_chromium) $(APT_sox)"; \
	for tool in $(CI_TOOLS); do \
	  case " $$missing " in *" $$tool "*) [ -n "$$CI" ] && { echo "setup: ERROR: $$tool missing in CI (CI is set); install: $$hint" >&2; exit 1; };; esac; \
	done; \
	echo "setup: warning:$$missing absent: numpy audio fallback, browser test and reverb bench skipped (install: $$hint)"

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
