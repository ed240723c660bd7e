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

# FluidSynth + a General MIDI soundfont for real audio (render.py falls back to a numpy
# synthesiser without them). Installed where apt is usable (root); skipped elsewhere.
apt:
	@command -v fluidsynth >/dev/null && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "setup: apt-get install fluidsynth (soundfont TimGM6mb)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends fluidsynth >/dev/null \
	    || echo "setup: warning: apt-get failed; audio uses the numpy fallback synthesiser"; \
	else echo "setup: fluidsynth absent and apt unusable; audio uses the numpy fallback (install fluidsynth for real piano sound)"; fi

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	@$(BIN)/pip install -q -e ".[dev]"
	@$(MAKE) --no-print-directory apt
	@touch $(STAMP)
	@echo "setup: $(VENV) ready ($$($(BIN)/python -c 'import torch; print("torch", torch.__version__)'))"

demo: setup
	dvc repro
	@echo
	@echo "done. Results:"
	@echo "  corpus      data/raw/m21-keyboard/ (manifest.json)"
	@echo "  manifest    data/prepared/manifest.csv  (summary: data/prepared/summary.json)"
	@echo "  tokens      data/tokens/{cp,remi}/      (stats: dvc metrics show)"
	@dvc metrics show || true

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
