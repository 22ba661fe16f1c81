# Two commands for a newcomer: `make demo` (set up + run the main job) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test bench clean

$(BIN)/edgecloud: pyproject.toml setup.py $(wildcard edgecloud/cim/csrc/*)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(BIN)/edgecloud

setup: $(BIN)/edgecloud

demo: setup
	$(BIN)/edgecloud demo

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/serving.py
	$(BIN)/python benchmarks/cim.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache edgecloud/cim/_kernel_*.so
