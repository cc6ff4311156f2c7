# Two entry points (README): `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_WORKERS ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: demo test setup clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# Install the CPU torch pin first when no torch is present: a loose range would pull
	# several GB of CUDA wheels.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	-$(PY) -m pip install -q --no-deps "torchao" 2>/dev/null
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/moeprec demo

# pytest exits 5 when it collects no test; treat only that as success-with-nothing-to-do.
test: $(STAMP)
	$(PY) -m pytest -q -ra -n $(TEST_WORKERS) tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

clean:
	rm -rf $(VENV) build *.egg-info
