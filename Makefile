# `make demo` and `make test` work on a fresh machine with Python 3.11+:
# they create .venv, install the package (editable) with the extras they
# need, and run. The install is skipped while pyproject.toml is unchanged.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test format compare bench-step clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed-%: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[$*]"
	touch $@

demo: $(VENV)/.installed-examples
	$(PY) examples/lstm_exploding.py

test: $(VENV)/.installed-dev,examples,dp
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest

# Bad-input cases side by side: optax's output and optaxclip's.
compare: $(VENV)/.installed-dev
	$(PY) scripts/compare_optax.py

# Each clip chained before adam, against adam alone, the floor, a hand-fused clip + adam, optax.
bench-step: $(VENV)/.installed-dev
	$(PY) benchmarks/update_step.py

format: $(VENV)/.installed-dev
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
