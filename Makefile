# Two entry points set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Test workers: most end-to-end tests wait on servers and agents in other processes, so a
# few more workers than cores keep both cores of the reference machine busy.
TEST_WORKERS ?= 3

.PHONY: demo test test-fast bench lint clean venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m strata.demo

test: lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope

# The unit tier: no servers, agents, CLIs or databases (under a minute).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not e2e"

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info
