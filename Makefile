# Two commands take a fresh machine (Python 3.11 and make) to a running server or a green suite:
#   make serve   - creates .venv, installs comfyq, starts it against ComfyUI at 127.0.0.1:8188
#   make test    - creates .venv, installs comfyq with its test tools, runs the whole suite
#   make lint    - ruff (lint, format) and mypy --strict, as CI runs them before the tests
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: serve simulate test test-all bench lint sysdeps clean

$(BIN)/.installed: setup.cfg pyproject.toml
	@$(MAKE) --no-print-directory sysdeps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@# bench too: mypy checks bench/, and the v2 tests run the official comfy-api-proxy beside comfyq
	$(BIN)/pip install -q -e '.[test,bench]'
	@touch $@

# python-magic needs the libmagic shared library; install it when it is missing and we may.
sysdeps:
	@$(PYTHON) -c "import ctypes.util,sys; sys.exit(0 if ctypes.util.find_library('magic') else 1)" 2>/dev/null || \
	  { echo "libmagic missing: installing libmagic1"; \
	    if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq libmagic1; \
	    else sudo apt-get update -qq && sudo apt-get install -y -qq libmagic1; fi; }
	@# The Postgres store's tests start a throwaway cluster when no server answers: its binaries.
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  { echo "PostgreSQL server binaries missing: installing postgresql"; \
	    if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq postgresql; \
	    else sudo apt-get update -qq && sudo apt-get install -y -qq postgresql; fi; }
	@# The dashboard's browser tests drive Debian's Chromium (Playwright's downloads are not used);
	@# installed when missing and we are root (otherwise those tests skip, or fail under
	@# COMFYQ_REQUIRE_BROWSER=1).
	@command -v chromium >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || \
	  { echo "chromium missing: installing it for the dashboard tests"; \
	    apt-get update -qq && apt-get install -y -qq chromium; }

serve: $(BIN)/.installed
	$(BIN)/comfyq serve

simulate: $(BIN)/.installed
	$(BIN)/comfyq serve --simulate

# Two workers (TEST_WORKERS=0 runs it in one process): much of the suite waits on subprocesses,
# sleeps and sockets, so two run in about the time of one on two cores. --dist loadfile keeps each
# file on one worker, in order: module fixtures (a served comfyq, the browser) start once, and a
# module's closing tests (test_hostile's "the end") still run after the rest of it.
# --no-loadscope-reorder hands out files in name order instead of most-tests-first, which would
# leave the two-test, five-minute fuzz file (test_api_fuzz.py) to the end of the run.
TEST_WORKERS ?= 2
test: $(BIN)/.installed
	$(BIN)/pytest -q -m "not real_comfyui" -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-all: $(BIN)/.installed
	$(BIN)/pytest -q

# ruff (lint + format) and mypy --strict; the files mypy checks are listed in pyproject.toml.
lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(BIN)/.installed
	$(BIN)/pip install -q -e '.[test,bench]'
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
