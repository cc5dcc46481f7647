# The two set-up commands of the README, and the benchmarks. Each target creates .venv and
# installs the project into it the first time (again whenever pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
# The PyTorch build this project is tested with; override on machines that need another,
# e.g. make run TORCH="torch torchvision"
TORCH ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.exitflow-installed

.PHONY: run test bench install clean

run: $(STAMP)
	$(BIN)/exitflow run examples/digits.yaml

test: $(STAMP)
	$(BIN)/pytest -q -n 2 --dist loadgroup --durations=15 $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/curve_speed.py
	$(BIN)/python bench/tune_asha.py
	$(BIN)/python bench/dynamic_inference.py
	$(BIN)/python bench/study_memory.py
	$(BIN)/python bench/phase_overhead.py
	$(BIN)/python bench/data_loading.py
	$(BIN)/python bench/fit_processes.py
	$(BIN)/python bench/store_writers.py

install: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) mlflow.db mlartifacts .exitflow .pytest_cache .hypothesis
