# fedxray: two commands for a fresh clone.
#   make demo   the main job: a simulated federation on data the project makes itself
#   make test   the test suite (FEDXRAY_DATA=../shared/data enables the real-data tests)
# Each creates .venv and installs fedxray into it on first use (pip: torch comes from local disk).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export OMP_WAIT_POLICY := PASSIVE

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	@echo "fedxray: creating $(VENV) and installing fedxray with its dependencies (first time: about 3 minutes; torch comes from local disk)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	@echo "fedxray: installed. The commands are in $(BIN)/ (fl-sim, fl-client, fl-server, fl-predict): run them as $(BIN)/fl-sim, or 'source $(BIN)/activate' first"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fl-sim

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache
