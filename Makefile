# The two commands of the README's quick start: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint bench clean

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV)

setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m datainf demo --out demo-out

test: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_estimators.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache
