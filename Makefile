# Quick start: `make demo` (set up, then run the demo) and `make test` (set up, then run the tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast setup clean

demo: setup
	$(BIN)/medpeft demo --out demo-runs

# pytest-xdist workers (tests/conftest.py shares the cores out between them); a module's tests stay on one
# worker, so that its fixtures are built once.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadscope

test: setup
	$(PYTEST) $(PYTEST_ARGS)

# The edit loop: every test but those marked slow (10 s or more each).
test-fast: setup
	$(PYTEST) -m "not slow" $(PYTEST_ARGS)

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@echo "Setting up $(VENV): medpeft with torch (the CUDA build; it runs on the CPU too), timm, peft, the"
	@echo "catalogue models' libraries, ONNX, Ray and the test tools: about 6.5 GB, a few minutes."
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) demo-runs
