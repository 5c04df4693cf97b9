# fastfold-plugin: set up, run the demo, test, benchmark, lint. README.md and docs/install.md
# describe what gets installed.
#
#   make demo        create or reuse .venv, install everything, run `fastfold-plugin predict`
#   make test        the same install, then the CPU test suite (pytest -m "not gpu")
#   make test-gpu    the GPU tests (pytest -m gpu), on a machine with a CUDA GPU
#   make bench       benchmarks/run_all.py
#   make lint        ruff
#   make install     only the install
#
# Offline GPU machine (torch and triton in the system Python, no network, a wheelhouse made by
# `make wheelhouse` on a machine with network):  make install OFFLINE_WHEELHOUSE=.whl
# .venv remembers the wheelhouse, so later `make test-gpu` etc. stay offline.
#
# Each install step leaves a stamp file in .venv and reruns only when its inputs change, so a
# second run starts in seconds.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OFFLINE_WHEELHOUSE ?= $(shell cat $(VENV)/.offline-wheelhouse 2>/dev/null)
WHEELHOUSE_DIR ?= .whl
PYTEST_ARGS ?=
DEMO_ARGS ?=
BENCH_ARGS ?=

PIP_FLAGS := --disable-pip-version-check --retries 10 --timeout 60
ifneq ($(strip $(OFFLINE_WHEELHOUSE)),)
  MODE := offline:$(abspath $(OFFLINE_WHEELHOUSE))
  INDEX_FLAGS := --no-index --find-links $(abspath $(OFFLINE_WHEELHOUSE))
  VENV_FLAGS := --system-site-packages
  REQUIREMENTS := requirements/offline-gpu.txt
else
  MODE := online
  INDEX_FLAGS :=
  VENV_FLAGS :=
  REQUIREMENTS := requirements/cpu.txt requirements/dev.txt
endif
OPENFOLD_INSTALLER := $(wildcard patches/openfold_install/*.py patches/openfold_install/*.cpp)

# $(call retry,COMMAND): up to 3 tries, for steps that download.
retry = for i in 1 2 3; do $(1) && break; if [ $$i = 3 ]; then exit 1; fi; \
        echo "make: retrying in 15 s ($$i/3)"; sleep 15; done

.PHONY: help install demo test test-gpu bench lint wheelhouse clean check-mode

help:
	@sed -n '4,14p' Makefile | sed 's/^# \{0,1\}//'

install: $(VENV)/.stamp-plugin

demo: install
	$(VENV)/bin/fastfold-plugin predict $(DEMO_ARGS)

test: install
	$(PY) -m pytest -m "not gpu" $(PYTEST_ARGS) tests

# One tile configuration per kernel instead of autotuning (see kernels/_triton_utils.autotune):
# FASTFOLD_PLUGIN_AUTOTUNE=1 make test-gpu tunes as a user's run does.
test-gpu: install
	FASTFOLD_PLUGIN_AUTOTUNE=$${FASTFOLD_PLUGIN_AUTOTUNE:-0} $(PY) -m pytest -m gpu $(PYTEST_ARGS) tests

bench: install
	@if [ ! -f benchmarks/run_all.py ]; then \
	  echo "make bench: benchmarks/run_all.py does not exist yet" >&2; exit 1; fi
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

lint: install
	@if [ ! -x $(VENV)/bin/ruff ]; then \
	  echo "make lint: ruff is not installed in $(VENV) (an online 'make install' installs it)" >&2; exit 1; fi
	$(VENV)/bin/ruff check .

# Python 3.12 wheels (and OpenFold's sdist) for the offline GPU machine; see docs/install.md.
wheelhouse: install
	bash tools/prepare_wheelhouse.sh $(WHEELHOUSE_DIR)

clean:
	rm -rf $(VENV) build fastfold_plugin.egg-info fastfold_plugin/*.egg-info

# A .venv made online must not be reused offline, nor the reverse.
check-mode:
	@if [ -f $(VENV)/.mode ] && [ "$$(cat $(VENV)/.mode)" != "$(MODE)" ]; then \
	  echo "make: $(VENV) was set up for '$$(cat $(VENV)/.mode)', this run is '$(MODE)'." \
	       "Remove it (make clean) or pass the same OFFLINE_WHEELHOUSE." >&2; exit 1; fi

$(VENV)/.stamp-venv: | check-mode
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "fastfold-plugin needs Python >= 3.10"'
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV) || { rm -rf $(VENV); \
	  echo "make: venv without pip (no ensurepip here); using the system pip"; \
	  $(PYTHON) -m venv --without-pip $(VENV_FLAGS) $(VENV); }
	echo "$(MODE)" > $(VENV)/.mode
	# offline: also see the site-packages of $(PYTHON) itself (it may be a venv holding torch)
	if [ "$(MODE)" != online ]; then $(PYTHON) -c 'import site; print("\n".join(site.getsitepackages()))' \
	  > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_base_site.pth"; fi
	$(if $(filter offline:%,$(MODE)),echo "$(abspath $(OFFLINE_WHEELHOUSE))" > $(VENV)/.offline-wheelhouse)
	touch $@

$(VENV)/.stamp-deps: $(VENV)/.stamp-venv $(REQUIREMENTS) requirements/nodeps.txt | check-mode
	$(call retry,$(PY) -m pip install $(PIP_FLAGS) $(INDEX_FLAGS) $(addprefix -r ,$(REQUIREMENTS)))
	$(call retry,$(PY) -m pip install $(PIP_FLAGS) $(INDEX_FLAGS) --no-deps -r requirements/nodeps.txt)
	touch $@

$(VENV)/.stamp-openfold: $(VENV)/.stamp-deps $(OPENFOLD_INSTALLER) | check-mode
	$(PY) patches/openfold_install/install.py --python $(PY) --workdir $(VENV)/build/openfold $(INDEX_FLAGS)
	touch $@

$(VENV)/.stamp-plugin: $(VENV)/.stamp-openfold setup.py pyproject.toml | check-mode
	$(PY) -m pip install $(PIP_FLAGS) $(INDEX_FLAGS) --no-deps --no-build-isolation -e .
	touch $@
