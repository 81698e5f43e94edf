# Two commands do all the set-up on a fresh Debian/Ubuntu machine:
#   make demo    the demo (starts memcached, a Django site, traffic, a fault)
#   make test    the whole test suite, on Django 5.2 and 4.2
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
VENV42 ?= .venv-dj42
PIP_FLAGS ?= -q --disable-pip-version-check
SYSTEM_DEPS := memcached:memcached nutcracker:nutcracker
ARGS ?=

.PHONY: test test-dj52 test-dj42 lint demo bench bench-stampede system-deps clean

test: system-deps lint test-dj52 test-dj42

system-deps:
	@scripts/ensure-system-deps $(SYSTEM_DEPS)

$(VENV)/.installed: setup.py
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) "Django>=5.2,<6.0" -e ".[test]" ruff readme_renderer
	@touch $@

$(VENV42)/.installed: setup.py
	@test -x $(VENV42)/bin/python || $(PYTHON) -m venv $(VENV42)
	$(VENV42)/bin/pip install $(PIP_FLAGS) "Django>=4.2,<5.0" -e ".[test]"
	@touch $@

test-dj52: system-deps $(VENV)/.installed
	$(VENV)/bin/python -m pytest

test-dj42: system-deps $(VENV42)/.installed
	$(VENV42)/bin/python -m pytest

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
	rm -rf $(VENV) $(VENV42) build dist *.egg-info .pytest_cache .ruff_cache .tox
	find . -name __pycache__ -type d -not -path "./.git/*" -prune -exec rm -rf {} +
