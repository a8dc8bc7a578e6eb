# native4k: `make demo` and `make test` work on a fresh machine (Python 3.11).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp

.PHONY: setup demo train-demo test lint bench clean

setup: $(STAMP)

# Re-runs only when pyproject.toml changes: a second `make setup` does nothing.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (Python 3.11)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: setup
	$(PY) -m pipelines.demo

# After `make demo`: a tiny random DiT trains 8 CPU steps on demo_out/curated, printing the loss.
train-demo: setup
	$(PY) -m pipelines.train_demo

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) -m bench.curation_throughput

clean:
	rm -rf demo_out .pytest_cache
