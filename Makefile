# The two commands of the README: `make demo` and `make test`. Everything they need is set up here.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --disable-pip-version-check -q
# A bare torch range pulls a multi-GB CUDA build; this CPU build lies on the project's machines.
TORCH  ?= torch==2.13.0

.PHONY: demo test lint install install-test bench clean

$(VENV)/.base: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) "$(TORCH)"
	$(PIP) -e ".[mpi]"
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PIP) -e ".[test,bench]"
	touch $@

install: $(VENV)/.base
install-test: $(VENV)/.test

demo: install
	$(VENV)/bin/ckptguard demo --store ./ckpts
	$(PY) examples/distributed_demo.py --store ./ckpts-sharded

lint: install-test
	$(VENV)/bin/ruff check ckptguard tests benchmarks examples
	$(VENV)/bin/ruff format --check ckptguard tests benchmarks examples
	cd $(CURDIR) && $(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest -q

bench: install-test
	$(VENV)/bin/ckptguard bench --size 1GiB --out benchmarks/results

clean:
	rm -rf $(VENV) build *.egg-info ckpts ckpts-sharded .pytest_cache
