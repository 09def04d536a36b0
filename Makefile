# `make demo` and `make test` work on a fresh machine with Python 3.11+:
# they create .venv, install the package (editable) with the extras they
# need, and run. The install is skipped while pyproject.toml is unchanged.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-distributed docs format compare bench bench-quick clean

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
	$(PY) -m pytest -n auto -m "not distributed"

# The multi-device tests (8 forced host CPU devices, each in a subprocess: shard_map, FSDP
# sharding) and DP-SGD across 2 processes x 4 CPU devices (jax.distributed, gloo): a few minutes.
test-distributed: $(VENV)/.installed-dev,examples,dp
	$(PY) -m pytest -n auto -m distributed

# The documentation site (Sphinx + MyST, docs/): warnings are errors. Open docs/_build/html/index.html.
docs: $(VENV)/.installed-docs,dp
	rm -rf docs/_build
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html
	@echo "docs: docs/_build/html/index.html"

# Bad-input cases side by side: optax's output and optaxclip's.
compare: $(VENV)/.installed-dev
	$(PY) scripts/compare_optax.py

# Every transform chained before adam against its read floor and optax's (one state and vmapped
# over 4), and the DP step against jax_privacy; prints each target PASS/MISS and writes
# benchmarks/results/bench{,-quick}.{json,md} and a scaling plot (see benchmarks/README.md).
bench: $(VENV)/.installed-dev,examples,dp
	$(PY) benchmarks/run.py

bench-quick: $(VENV)/.installed-dev,examples,dp
	$(PY) benchmarks/run.py --quick

format: $(VENV)/.installed-dev
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis docs/_build
