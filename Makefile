# Two entry points: `make demo` and `make test` (`make test-fast`: its unit tier alone). Both set everything up first and are
# idempotent: the venv is rebuilt only when the pins change; models are fetched once.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mta-installed
DEMO := runs/demo

.PHONY: setup models demo test test-fast lint clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

models: setup
	$(BIN)/mta models fetch smollm2-135m minilm-l6

demo: models
	$(BIN)/mta demo --out $(DEMO)

test: models
	bash scripts/run-tests.sh

# the unit tier alone (no real weights needed); `make test` runs it first, then the rest
test-fast: setup
	bash scripts/run-tests.sh unit

lint: setup
	$(BIN)/ruff check src tests benchmarks scripts

clean:
	rm -rf $(VENV) runs
