# The whole gate is `make check`: lint, types, tests. Run it inside the project's venv.
PYTHON ?= python

.PHONY: check lint typecheck test

check: lint typecheck test

lint:
	$(PYTHON) -m ruff check dispatcher tests benchmarks
	$(PYTHON) -m ruff format --check dispatcher tests benchmarks

typecheck:
	$(PYTHON) -m mypy

test:
	$(PYTHON) -m pytest
