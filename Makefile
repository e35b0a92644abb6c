# Two entry points set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Test workers: most end-to-end tests wait on servers and agents in other processes, so a
# few more workers than cores keep both cores of the reference machine busy.
TEST_WORKERS ?= 3

# The mount extra (pyfuse3) builds against libfuse3: taken when its headers are there
# (.ci/run installs them), left out with a note otherwise, so the rest still installs.
MOUNT_EXTRA := $(shell pkg-config --exists fuse3 2>/dev/null && echo ,mount || \
	echo "note: libfuse3-dev not found, mounts left out (apt-get install fuse3 libfuse3-dev pkg-config)" >&2)

.PHONY: demo test test-fast bench lint clean venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev$(MOUNT_EXTRA)]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m strata.demo

test: lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder

# The unit tier: no servers, agents, CLIs or databases (664 tests, 88 s on 2 workers here).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist load -m "not e2e"

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info
