# The two set-up commands of the README. Each creates .venv if missing and
# installs exq-fast with what it needs (the embedded Redis included).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: demo test lint typecheck pytest bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,embedded,web]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m exq_fast demo

test: $(STAMP) lint typecheck pytest

lint: $(STAMP)
	$(PY) -m ruff check exq_fast tests benchmarks

typecheck: $(STAMP)
	$(PY) -m mypy

# pytest exits 5 when it collected no test: that is a broken suite, not a pass.
pytest: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose"; fi; \
	exit $$rc

bench: $(STAMP)
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/enqueue.py
	$(PY) benchmarks/throughput.py

clean:
	rm -rf $(VENV) build dist *.egg-info
