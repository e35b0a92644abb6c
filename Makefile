# Two entry points set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Test workers: most end-to-end tests wait on servers, agents and throttled links in other
# processes, so more than twice as many workers as cores keep both cores of the
# reference machine busy (3 workers: 387 s, 4: 351 s, 5: 332-339 s here).
TEST_WORKERS ?= 5

# The mount extra (pyfuse3) builds against libfuse3: taken when its headers are there
# (.ci/run installs them), left out with a note otherwise, so the rest still installs.
MOUNT_EXTRA := $(shell pkg-config --exists fuse3 2>/dev/null && echo ,mount || \
	echo "note: libfuse3-dev not found, mounts left out (apt-get install fuse3 libfuse3-dev pkg-config)" >&2)

.PHONY: demo test test-suite test-fast bench lint clean venv

# Python may cache compiled bytecode here even where the environment says not to: without
# the cache every test worker and every fresh `strata` process compiles the sources again
# (pytest's assertion rewriting of the tests alone: 5 s per worker).
unexport PYTHONDONTWRITEBYTECODE

# uv installs the dependencies (pinned in pyproject.toml) instead of pip: pip spends 20 s
# of CPU weighing every release of every dependency against the platform's tags, uv 2 s.
# The venv is made without pip (installing pip into it took 5 s) and uv is put in by the
# pip of the Python that made it, or, where that one has none, by a pip put in the venv.
# uv is asked for what its cache holds first: pyfuse3 has no wheel, and on a machine that
# built it once uv would otherwise fetch its source again and rebuild it (29 s).
# Modules are compiled ahead on every core, not at first import: the test workers would
# each compile the same modules at once. Not the packages no command or test imports
# (pip, setuptools, mypy's sources beside its compiled modules, moto's other AWS
# services, pygments' lexers, the libraries' own tests, SQLAlchemy's other databases,
# playwright's asyncio API): 58% of the files. The rest take 12 s of CPU (7 s on two cores).
NOT_IMPORTED := /site-packages/(pip|setuptools|pkg_resources|_distutils_hack|mypy|mypyc|markdown_it|pycparser|py_partiql_parser)/|/site-packages/moto/(?!(core|moto_api|moto_server|s3|s3bucket_path|utilities|iam|sts|cloudwatch|events)/)[^/]+/|/site-packages/pygments/lexers/|/site-packages/[^/]+/(_?tests?|testing)/|/site-packages/sqlalchemy/dialects/(mssql|mysql|oracle)/|/site-packages/playwright/async_api/
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv --without-pip $(VENV)
	test -x $(BIN)/uv || $(PY) -m pip -q --python $(BIN)/python install uv==0.13.9 || \
		{ $(BIN)/python -m ensurepip -q && $(BIN)/python -m pip install -q uv==0.13.9; }
	$(BIN)/uv pip install -q --python $(BIN)/python --offline -e '.[dev$(MOUNT_EXTRA)]' \
		2>/dev/null || $(BIN)/uv pip install -q --python $(BIN)/python -e '.[dev$(MOUNT_EXTRA)]'
	$(BIN)/python -m compileall -q -j 0 -x '$(NOT_IMPORTED)' $(VENV)/lib src > /dev/null
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m strata.demo

# Lint and tests side by side: mypy's 15 s of CPU fit in the time the tests wait on their
# servers and links. Either failing fails `make test`.
test: $(STAMP)
	@$(MAKE) --no-print-directory -j2 lint test-suite

# The whole suite without the lint, its temporary files on a tmpfs (tests/scratch.sh).
# The test modules' bytecode is written first, beside mypy (tests/rewrite_ahead.py: pytest
# rewrites a test module's asserts as it imports it, and every worker imports them all:
# 20 s of CPU when they all do it at once). Its failures are the suite's to report.
test-suite: $(STAMP)
	-@$(BIN)/python tests/rewrite_ahead.py
	tests/scratch.sh $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope \
		--no-loadscope-reorder

# The unit tier: no servers, agents, CLIs, databases or killed processes, no fuzzing; the
# property tests try a quarter of their examples (tests/tier.py).
test-fast: $(STAMP)
	STRATA_FAST_TIER=1 tests/scratch.sh $(BIN)/python -m pytest -q -n 2 --dist load \
		-m "not e2e and not slow"

# mypy keeps its cache beside uv's, outside the checkout: a fresh clone on a machine that
# ran the checks before re-checks only what changed (0.8 s instead of 20-32 CPU s beside
# the tests). mypy checks each cached module against its source's size and hash.
MYPY_CACHE ?= $(if $(XDG_CACHE_HOME),$(XDG_CACHE_HOME),$(if $(HOME),$(HOME)/.cache,.cache))/strata/mypy

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy --cache-dir "$(MYPY_CACHE)"

bench: $(STAMP)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info
