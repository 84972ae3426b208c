# The two commands of the README: `make quickstart` and `make test`.
# The virtual environment is reused only while pyproject.toml is unchanged (hash stamp).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
DEPS_HASH := $(shell sha256sum pyproject.toml | cut -c1-16)
STAMP := $(VENV)/.deps-$(DEPS_HASH)

.PHONY: setup fashion-mnist quickstart lint test test-fast

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[dev]"
	@rm -f $(VENV)/.deps-* && touch $@

fashion-mnist:
	@bash .ci/ensure-fashion-mnist

# ARGS: dotted overrides, e.g. make quickstart ARGS="tracking.mlflow.enabled=true"
quickstart: setup fashion-mnist
	env -u PREFECT_API_URL PREFECT_HOME=$(CURDIR)/runs/.prefect $(VENV)/bin/dml pipeline run --config configs/quickstart.yaml $(ARGS)

# Lint and format check (ruff) and type check (mypy) the library, the flows, the tests and the benchmarks;
# settings in pyproject.toml. `make test` runs it first.
LINT_PATHS := dml pipeline tests benchmarks
lint: setup
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy $(LINT_PATHS)

# Prefect gets a throwaway home and no API URL, so tests never touch a real server.
test: setup lint
	env -u PREFECT_API_URL PREFECT_HOME=$$(mktemp -d) $(VENV)/bin/pytest -q

test-fast: setup
	env -u PREFECT_API_URL PREFECT_HOME=$$(mktemp -d) $(VENV)/bin/pytest -q -m "not dist and not slow"
