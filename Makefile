# make repro : create .venv if missing, install, run `dvc repro` on params.yaml
# make analysis : the optional local-parallelism analyses (analysis/dvc.yaml)
# make curves : accuracy vs sparsity of dpf, gmp, rigl, oneshot+retrain (curves/dvc.yaml)
# make test  : same set-up, then the test suite
# Offline machines: SPARSEFLOW_DATA_MIRROR points at a folder of original dataset archives;
# it defaults to ../shared/data when that folder exists.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

ifeq ($(origin SPARSEFLOW_DATA_MIRROR), undefined)
  ifneq ($(wildcard ../shared/data),)
    export SPARSEFLOW_DATA_MIRROR := $(abspath ../shared/data)
  endif
endif
export PATH := $(abspath $(BIN)):$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DVC_NO_ANALYTICS ?= 1

.PHONY: install repro analysis curves test metrics bench clean-runs push pull queue

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# One Prefect server for all stages (a temporary one unless PREFECT_API_URL is set) and a fork
# server whose children run the stages with their imports done, and DVC reusing the dvc.lock it
# wrote (flows/dvc_main.py; README, "Orchestration"): a bare `dvc repro` works too, but each of
# its stages then starts a temporary server of its own.
repro: $(STAMP)
	$(BIN)/sparseflow validate > /dev/null
	$(BIN)/sparseflow with-server -- $(BIN)/dvc repro
	$(BIN)/dvc metrics show

analysis: $(STAMP)
	$(BIN)/sparseflow validate > /dev/null
	$(BIN)/sparseflow with-server -- $(BIN)/dvc repro analysis/dvc.yaml
	$(BIN)/dvc metrics show analysis/dvc.yaml

curves: $(STAMP)
	$(BIN)/sparseflow validate > /dev/null
	$(BIN)/sparseflow with-server -- $(BIN)/dvc repro curves/dvc.yaml

# The outputs of every stage (prepared data, evaluation sets, runs with weights, masks and
# checkpoints, ensembles caches) to / from the default DVC remote (.dvc/config).
push: $(STAMP)
	$(BIN)/dvc push

pull: $(STAMP)
	$(BIN)/dvc pull

# DVC's experiment queue: `dvc exp run --queue -S key=value` several times, then `make queue
# JOBS=2`. The queue's background workers inherit this PATH (with .venv/bin), so the stage
# commands find `sparseflow`; each experiment runs in a temporary copy of the last commit.
JOBS ?= 2
queue:
	$(BIN)/sparseflow validate > /dev/null
	$(BIN)/dvc queue start -j $(JOBS)

test: $(STAMP)
	$(BIN)/python -m pytest -n auto --maxprocesses=4 --dist load --maxschedchunk 1 -m 'not serial'
	$(BIN)/python -m pytest -m serial

metrics: $(STAMP)
	$(BIN)/dvc metrics show

bench: $(STAMP)
	$(BIN)/python benchmarks/step_time.py --precisions
