# `make test` sets up a fresh machine (virtualenv, package, test extras) and runs the suite.
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

.PHONY: install test lint digits
install: $(BIN)/.installed

test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 --dist loadfile tests

lint: $(BIN)/.installed
	$(BIN)/ruff check .

digits: $(BIN)/.installed
	$(BIN)/python -m experiments.main --config=configs/digits.py --workdir=$(WORKDIR) --mode=train
	$(BIN)/python -m experiments.main --config=configs/digits.py --workdir=$(WORKDIR) --mode=eval
	$(BIN)/python -m experiments.main --config=configs/digits.py --workdir=$(WORKDIR) --mode=sample
