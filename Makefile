# `make test` sets up a fresh machine (virtualenv, package, test extras), lints, and runs the
# fast tier; `make test-all` runs every test, the slow end-to-end tier too (what CI runs).
# `make digits` sets up the same environment and runs the default job on the embedded data.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= workdir/digits
# Extras of setup.cfg installed on top of `test`: `make install EXTRAS=cuda12` (NVIDIA GPU),
# `EXTRAS=tpu`, `EXTRAS=data` (TensorFlow, to run experiments.prepare_data), or several:
# `EXTRAS=cuda12,data`. Each set of extras has its own stamp, so asking for new ones installs
# them into the existing virtualenv.
EXTRAS ?=
comma := ,
space := $(subst ,, )
EXTRA_LIST := $(subst $(space),$(comma),$(strip test $(subst $(comma),$(space),$(EXTRAS))))
INSTALLED := $(BIN)/.installed-$(subst $(comma),-,$(EXTRA_LIST))
# `make digits` runs on two simulated CPU devices: the default's two networks
# (model.ensemble_size=2) then train one per device, on two cores at once; one network's
# batch steps in halves there (1.34x the steps/s of one device using both cores, measured at
# batches of 32). Only the host (CPU) platform reads the flag; on a GPU or TPU host the run
# uses the accelerator.
# `make digits DIGITS_XLA_FLAGS=` runs on one device.
DIGITS_XLA_FLAGS ?= --xla_force_host_platform_device_count=2
# `make digits DIGITS_CONFIG=configs/digits.py:v4 WORKDIR=workdir/digits_v4` trains one
# network instead of two (a workdir keeps the config that wrote it).
DIGITS_CONFIG ?= configs/digits.py
DIGITS := XLA_FLAGS="$(XLA_FLAGS) $(DIGITS_XLA_FLAGS)" $(BIN)/python -m experiments.main \
	--config=$(DIGITS_CONFIG) --workdir=$(WORKDIR)

$(INSTALLED): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[$(EXTRA_LIST)]'
	touch $@

.PHONY: install test test-all lint digits
install: $(INSTALLED)

test: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 --dist loadfile -m "not slow" tests

test-all: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 --dist loadfile tests

lint: $(INSTALLED)
	$(BIN)/ruff check .

digits: $(INSTALLED)
	$(DIGITS) --mode=train
	$(DIGITS) --mode=eval
	$(DIGITS) --mode=sample
	$(BIN)/python -m experiments.results --workdir=$(WORKDIR)
