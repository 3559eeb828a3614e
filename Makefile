# The two commands: `make run` (the example study, end to end) and `make test` (the whole suite).
# Both create .venv on first use (standard venv + pip install -e '.[dev]') and reuse it while
# pyproject.toml is unchanged.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= config/example.yaml

export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: run test validate example-data clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/longitudinal run --config $(CONFIG)

validate: $(STAMP)
	$(BIN)/longitudinal validate --config $(CONFIG)

test: $(STAMP)
	$(BIN)/python -m pytest

# Regenerate the bundled example study (fixed seed: the file changes only if the simulator does).
example-data: $(STAMP)
	$(BIN)/longitudinal simulate --out config/example-data/trial.csv --subjects 300 --min-visits 4 \
		--max-visits 8 --seed 20240601 --bad-rows 8

clean:
	rm -rf $(VENV) reports/*/ .pytest_cache
