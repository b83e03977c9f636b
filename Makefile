# Two entry points matter: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= config.example.yaml
LISTEN ?= tcp:8080:interface=127.0.0.1
TRIAL_ARGS ?= tests

.PHONY: run test check lint typecheck trial e2e bench bench-real llama-server clean

# pip says only what went wrong: -qq drops its progress and warnings (errors still show).
PIP := $(BIN)/python -m pip -qq --disable-pip-version-check --no-input

$(BIN)/python:
	@echo "Creating $(VENV) and installing llamaswap into it (first run only)..."
	@$(PYTHON) -m venv $(VENV)
	@$(PIP) install --upgrade pip

# Re-install whenever the project metadata changes. An editable install: pyproject.toml's
# package-dir makes it a plain path entry, where twistd finds twisted/plugins.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	@$(PIP) install -e '.[test,dev]'
	@touch $@

# --pidfile=: no twistd.pid, which would refuse a second llamaswap started in this folder.
run: $(VENV)/.installed
	$(BIN)/twistd -n --pidfile= llamaswap --config $(CONFIG) --listen $(LISTEN)

trial: $(VENV)/.installed
	$(BIN)/python -m twisted.trial $(TRIAL_ARGS)

typecheck: $(VENV)/.installed
	$(BIN)/mypy

lint: $(VENV)/.installed
	$(BIN)/ruff check llamaswap tests twisted bench
	$(BIN)/ruff format --check llamaswap tests twisted bench

test: trial typecheck lint

clean:
	rm -rf $(VENV) _trial_temp* build dist *.egg-info

# Real llama.cpp server + tiny generated models for end-to-end tests (docs/llama-server.md).
# Both live in $LLAMASWAP_CACHE (default ~/.cache/llamaswap), outside the repo, and are reused.
.PHONY: models

llama-server:
	scripts/build_llama_server.sh

models: $(VENV)/.installed
	scripts/build_llama_server.sh --source-only >/dev/null
	$(BIN)/python -m tests.gguf_models

# Proxy vs direct benchmark (docs/performance.md); needs Debian's nginx and wrk. Not part of `make test`.
bench: $(VENV)/.installed
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# The proxy in front of the real llama-server: streams direct vs proxy at 1/8/32 clients, and
# swap bursts (docs/performance.md, "Real llama-server"); about 2 minutes. Not part of `make test`.
bench-real: $(VENV)/.installed llama-server models
	$(BIN)/python bench/real.py $(BENCH_ARGS)

# End-to-end tests against the real llama-server (tests/test_e2e_llama_server.py, about 15-30 s
# once built; docs/llama-server.md). `make test` runs them too, or skips them without the binary.
e2e: llama-server models
	$(BIN)/python -m twisted.trial tests.test_e2e_llama_server
