# Realtime Lab: every target creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8080

.DEFAULT_GOAL := help
.PHONY: help run h2 cluster test lint style bench e2e clean

help: ## list the targets
	@grep -E '^[a-z0-9]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-7s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP) ## serve the dashboard on http://127.0.0.1:8080
	$(BIN)/realtime-lab serve --host $(HOST) --port $(PORT)

h2: $(STAMP) ## the dashboard behind nginx: TLS + HTTP/2 on https://127.0.0.1:8443, HTTP/1.1 on :8444
	PORT=$(PORT) BIN=$(BIN) deploy/h2.sh

cluster: $(STAMP) ## Redis, two processes on :8081 and :8082, nginx in front of both on http://127.0.0.1:8080
	PORT=$(PORT) BIN=$(BIN) deploy/cluster.sh

test: $(STAMP) ## run the whole suite (browser and nginx tests skip with a reason when absent)
	$(BIN)/python -m pytest

e2e: $(STAMP) ## run only the browser tests (needs chromium)
	$(BIN)/python -m pytest -m e2e tests/e2e

lint: $(STAMP) ## ruff check, ruff format --check, mypy --strict, import-linter layer contracts
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

style: $(STAMP) ## apply ruff format and safe fixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP) ## run the benchmark (quick sweep); results in bench-results/
	$(BIN)/realtime-lab bench --quick --out bench-results

clean: ## remove the venv, caches and results
	rm -rf $(VENV) .h2 .pytest_cache .mypy_cache .ruff_cache bench-results test-artifacts build dist *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
