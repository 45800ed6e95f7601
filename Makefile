# Two entry points for a fresh machine: `make demo` and `make test`. Each builds .venv when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV := $(BIN)/uv
export AWS_EC2_METADATA_DISABLED := true

.PHONY: demo up test lint format lock clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet uv==0.13.8

# Pinned install: requirements.lock is compiled from pyproject.toml (see `make lock`).
$(VENV)/.installed: $(BIN)/python requirements.lock pyproject.toml worker/pyproject.toml localcloud/pyproject.toml
	VIRTUAL_ENV=$(VENV) $(UV) pip install --quiet -r requirements.lock -e ./worker -e ./localcloud -e .
	touch $@

# The example DAG in a real Airflow deployment on the local cloud, triggered as from the UI; exits with its result.
demo: $(VENV)/.installed
	$(BIN)/python -m ec2cluster_localcloud.demo run

# The local cloud and Airflow, kept running until Ctrl-C: trigger ec2_cluster_example from the UI.
up: $(VENV)/.installed
	$(BIN)/python -m ec2cluster_localcloud.demo up

test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist loadgroup $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(VENV)/.installed
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

lock: $(BIN)/python
	$(UV) pip compile pyproject.toml --extra dev --no-emit-package ec2cluster-worker \
		--python-version 3.11 -o requirements.lock --quiet

clean:
	rm -rf $(VENV)
