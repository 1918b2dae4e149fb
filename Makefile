# The two commands a newcomer types: `make demo` and `make test`.
# Both install what is missing (scripts/deps.sh), build, and fetch the
# default model themselves.

SHELL := /bin/bash
.DEFAULT_GOAL := help

# Build outside the clone so CI and fresh clones rebuild incrementally
# (a cold llama.cpp build takes ~10 minutes on 2 cores).
TESSERA_CACHE ?= $(HOME)/.cache/tessera
export CARGO_TARGET_DIR ?= $(TESSERA_CACHE)/target
# The model store the tests read (the demo uses ~/.tessera, like a user).
TEST_HOME := $(TESSERA_CACHE)/home
VENV := $(TESSERA_CACHE)/venv
BIN := $(CARGO_TARGET_DIR)/release/tessera
MODEL := smollm2-135m-instruct

.PHONY: help deps build model venv demo test lint bench

help:
	@echo "make demo   run a local Tessera network (1 gateway, 3 providers) on the default model"
	@echo "make test   run the whole test suite"
	@echo "make bench  run the engine benchmark against llama.cpp (figures in BENCHMARKS.md)"

deps:
	@scripts/deps.sh

build: deps
	cargo build --release --locked

model: build
	TESSERA_HOME=$(TEST_HOME) $(BIN) models pull $(MODEL)

venv: deps
	@test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	@$(VENV)/bin/python -m pip install -q --disable-pip-version-check -r crates/tessera/tests/clients/requirements.txt

# A gateway and three providers as separate processes on loopback.
demo: build
	$(BIN) devnet --providers 3

# Test-only parts: cheating providers (`adversary`), the synthetic engine
# and the throwaway PostgreSQL server (`testing`). `make build` has neither.
TEST_FEATURES := tessera/adversary,tessera/testing

lint: build
	cargo fmt --all --check
	cargo clippy --release --locked --workspace --all-targets --features $(TEST_FEATURES) -- -D warnings

# End-to-end tests start real servers that each use every core, so test
# binaries run one test at a time.
# The set-up is checked first: every system package deps.sh lists must be
# installed (by package name, not by looking for files).
test: model venv lint
	scripts/deps.sh --check
	TESSERA_TEST_HOME=$(TEST_HOME) \
	TESSERA_TEST_MODEL="$$(TESSERA_HOME=$(TEST_HOME) $(BIN) models path $(MODEL))" \
	TESSERA_TEST_PYTHON=$(VENV)/bin/python \
	RUST_TEST_THREADS=1 \
	cargo test --release --locked --workspace --features $(TEST_FEATURES)

# llama.cpp's own server and tools, built natively outside the clone, are
# the reference (scripts/llama-ref.sh; never part of `make test`).
bench: model
	cargo build --release --locked --features tessera/testing
	TESSERA_HOME=$(TEST_HOME) $(BIN) bench engine --llama-bin "$$(scripts/llama-ref.sh)"
