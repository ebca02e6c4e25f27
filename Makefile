# Quick start: `make demo` (set up, then run the demo) and `make test` (set up, then run the tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test setup clean

demo: setup
	$(BIN)/medpeft demo --out demo-runs

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) demo-runs
