# Each target creates .venv on first use, so a fresh machine needs only python3, pip and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint load bench bench-mixed bench-memory bench-all fuzz clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,load]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/forkserver

test: $(STAMP)
	scripts/system-deps
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check forkserver tests load

# The locust smoke run (every scenario, no failed request; the gate fails a slow run), then the
# locust scenarios against a real server (LOAD_ARGS="-t 60s -u 50 --max-p95-ms 200").
load: $(STAMP)
	$(BIN)/python -m pytest -q load/test_locust_smoke.py
	$(BIN)/python load/run.py $(LOAD_ARGS)

# forkserver vs the ceiling loop, granian, bjoern, meinheld and gunicorn (sync, gthread) under wrk,
# keep-alive, close, browser-like, TLS and Flask at c=50, median of 3, with CPU per request (about
# 8 minutes on 2 cores); writes load/results/bench.md and .png (BENCH_ARGS=--full adds 1, 10 and
# 200 connections, about 17 minutes; BENCH_ARGS=--quick is a 2-minute smoke run).
bench: $(STAMP)
	$(BIN)/python load/bench.py $(BENCH_ARGS)

# Head-of-line: 40 fast keep-alive clients beside 2 slow (50 ms) ones, threads and handoff rows
# against gunicorn gthread and sync; writes load/results/bench-mixed.md (BENCH_ARGS=--quick).
bench-mixed: $(STAMP)
	$(BIN)/python load/bench_mixed.py $(BENCH_ARGS)

# Total PSS of a generated stock Django site, 8 workers after a warm-up: forkserver (preload,
# freeze, refork) beside gunicorn; writes load/results/bench-memory.md and .png (BENCH_ARGS=--quick).
bench-memory: $(STAMP)
	$(BIN)/python load/bench_memory.py $(BENCH_ARGS)

# All three benchmarks in a row (about 18 minutes on 2 cores), then their tables and pictures
# copied to docs/benchmark/ (BENCH_ARGS=--quick: smoke runs, nothing copied).
bench-all: $(STAMP)
	$(BIN)/python load/bench_all.py $(BENCH_ARGS)

# Mutated and random requests thrown at a live server for a bounded time.
fuzz: $(STAMP)
	$(BIN)/python tests/fuzz_live.py --seconds 120

clean:
	rm -rf $(VENV) build *.egg-info
