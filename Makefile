# `make test` sets up a fresh machine (virtualenv, package, test extras), lints, and runs the
# fast tier; `make test-all` runs every test, the slow end-to-end tier too (what CI runs).
# `make digits` sets up the same environment and runs the default job on the embedded data.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= workdir/digits

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

.PHONY: install test test-all lint digits
install: $(BIN)/.installed

test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 --dist loadfile -m "not slow" tests

test-all: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 --dist loadfile tests

lint: $(BIN)/.installed
	$(BIN)/ruff check .

digits: $(BIN)/.installed
	$(BIN)/python -m experiments.main --config=configs/digits.py --workdir=$(WORKDIR) --mode=train
	$(BIN)/python -m experiments.main --config=configs/digits.py --workdir=$(WORKDIR) --mode=eval
	$(BIN)/python -m experiments.main --config=configs/digits.py --workdir=$(WORKDIR) --mode=sample
