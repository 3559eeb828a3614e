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

.PHONY: run test typecheck validate server bench example-data clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --upgrade pip
	$(BIN)/python -m pip install -qq -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/longitudinal run --config $(CONFIG)

validate: $(STAMP)
	$(BIN)/longitudinal validate --config $(CONFIG)

test: $(STAMP) typecheck
	$(BIN)/python -m pytest

# The library's type hints, checked (configuration in pyproject.toml).
typecheck: $(STAMP)
	$(BIN)/mypy

# A local Prefect server and UI (SQLite under $$PREFECT_HOME, ~/.prefect by default; analytics off) for `longitudinal serve`:
# open http://127.0.0.1:4200 and, in another shell, export PREFECT_API_URL=http://127.0.0.1:4200/api
server: $(STAMP)
	PREFECT_SERVER_UI_API_URL=http://127.0.0.1:4200/api \
		$(BIN)/prefect server start --host 127.0.0.1 --port 4200 --ui --analytics-off

# Speed and memory at 2,000 to 2,000,000 rows against lme4 (see benchmarks/README.md); not a test.
# Issue 17's goals side by side with lme4 (both designs, the example, serve), then 200k against a running server.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.pipeline
	$(BIN)/python -m benchmarks.pipeline --server --sizes 200k --no-example --no-serve --out benchmarks/results/server
	$(BIN)/python benchmarks/bench_covariance.py --case all
	$(BIN)/python benchmarks/bench_glmm.py --case all
	$(BIN)/python benchmarks/bench_report.py

# Regenerate the bundled example study (fixed seed: the file changes only if the simulator does).
example-data: $(STAMP)
	$(BIN)/longitudinal simulate --out config/example-data/trial.csv --subjects 300 --min-visits 4 \
		--max-visits 8 --seed 20240601 --bad-rows 8
	$(BIN)/longitudinal simulate --design mmrm --out config/example-data/mmrm-trial.csv --subjects 240 \
		--seed 20261130
	$(BIN)/longitudinal simulate --design binary --out config/example-data/binary-trial.csv --subjects 300 \
		--seed 20261214 --bad-rows 2

clean:
	rm -rf $(VENV) reports/*/ .pytest_cache
