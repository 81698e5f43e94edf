# Two commands do all the set-up on a fresh Debian/Ubuntu machine:
#   make demo    the demo (starts memcached, a Django site, traffic, a fault)
#   make test    the whole test suite on Django 5.2, a subset on the other
#                Django x Python combinations (scripts/test-matrix)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PIP_FLAGS ?= -q --disable-pip-version-check
# gcc builds djmemcache._speedups (optional C; tests/test_speedups.py checks it is built)
SYSTEM_DEPS := memcached:memcached nutcracker:nutcracker gcc:gcc
ARGS ?=

.PHONY: test test-dj52 test-matrix lint demo bench bench-stampede system-deps clean

test: system-deps lint test-matrix

system-deps:
	@scripts/ensure-system-deps $(SYSTEM_DEPS)

$(VENV)/.installed: setup.py djmemcache/_speedups.c
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) "Django>=5.2,<6.0" -e ".[test]" ruff readme_renderer
	@touch $@

test-dj52: system-deps $(VENV)/.installed
	$(VENV)/bin/python -m pytest

# The whole suite in $(VENV), the compat subset on every other Django/Python
# combination in its own venv, each made once (.venv-djX.Y-pyA.B/.installed).
test-matrix: system-deps $(VENV)/.installed
	FULL_VENV=$(VENV) scripts/test-matrix

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check $(wildcard djmemcache tests benchmarks demo)
	$(VENV)/bin/python -W ignore -m readme_renderer README.rst -o /dev/null
	$(VENV)/bin/python -W ignore -m readme_renderer CHANGES.rst -o /dev/null

demo: system-deps $(VENV)/.installed
	$(VENV)/bin/python demo/run.py $(ARGS)

bench: $(VENV)/.installed
	@scripts/ensure-system-deps memcached:memcached -:libmemcached-dev
	$(VENV)/bin/pip install $(PIP_FLAGS) pylibmc
	$(VENV)/bin/python benchmarks/bench.py $(ARGS)

bench-stampede: $(VENV)/.installed
	@scripts/ensure-system-deps memcached:memcached -:libmemcached-dev
	$(VENV)/bin/pip install $(PIP_FLAGS) pylibmc
	$(VENV)/bin/python benchmarks/stampede.py $(ARGS)

clean:
	rm -rf $(VENV) .venv-dj* build dist *.egg-info .pytest_cache .ruff_cache .tox
	find . -name __pycache__ -type d -not -path "./.git/*" -prune -exec rm -rf {} +
