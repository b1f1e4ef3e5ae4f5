# Two commands on a fresh clone: `make demo` (the main job on the embedded SQLite
# default) and `make test`. Both create .venv and install what they need first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: install demo check test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/sessionforge demo

check: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

test: $(STAMP)
	$(BIN)/python -m pytest

# `make bench`: the suite on a temporary SQLite file, then on PostgreSQL and on MariaDB
# when reachable ($SESSIONFORGE_BENCH_URL / $SESSIONFORGE_BENCH_MARIADB_URL, defaults
# below; MariaDB runs the scenarios written for it, so far `factory`). Each run also
# measures the deterministic counts (calls and thread hops per operation), the memory
# per open session and the scaling grid (1-200 tasks x pools 5/20); the PostgreSQL run
# adds the replicas scenario on a primary and two replicas it builds. Each writes
# docs/benchmarks/suite-*.png, scaling.png and results.md (the targets, met or not).
# About 9 minutes on 2 cores. BENCH_ARGS=--quick for a smoke run (about a minute).
BENCH_STAMP := $(VENV)/.installed-bench
BENCH_URL ?= $(or $(SESSIONFORGE_BENCH_URL),postgresql+asyncpg://postgres@127.0.0.1:5432/test)
BENCH_MARIADB_URL ?= $(or $(SESSIONFORGE_BENCH_MARIADB_URL),mysql+aiomysql://root@127.0.0.1:3306/test)
BENCH_ARGS ?=

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.suite --url sqlite $(BENCH_ARGS)
	$(BIN)/python -m benchmarks.suite --url '$(BENCH_URL)' --skip-unreachable $(BENCH_ARGS)
	$(BIN)/python -m benchmarks.suite --url '$(BENCH_MARIADB_URL)' --skip-unreachable $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache sessionforge-demo.db*
