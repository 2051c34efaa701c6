# Two commands on a fresh machine: `make demo` and `make test`. Both set everything up via `make install`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install demo test lint docs clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first: torch==2.13.0 is a local CPU build here; anything else pulls GBs of CUDA wheels.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -e ".[test]"
	touch $@

demo: install
	$(VENV)/bin/schce demo --out demo_output

test: install
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks
	$(PY) -m pytest -q

$(VENV)/.docs-installed: pyproject.toml $(VENV)/.installed
	$(PIP) install -e ".[doc]"
	# The tutorials name the kernel "python3": register this venv's Python under that name (inside the venv only).
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3"
	touch $@

# Builds offline (no intersphinx) with warnings as errors and runs every tutorial (docs/conf.py).
docs: $(VENV)/.docs-installed
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf demo_output docs/_build docs/generated docs/notebooks
