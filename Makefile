# Two commands, each self-bootstrapping on a fresh machine:
#   make run    the main job on the bundled MiniGPT example with the embedded defaults
#   make test   the test suite (GPU tests are skipped where no GPU is present)
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
MODEL ?= examples/minigpt.py

.PHONY: all setup run test test-gpu discover doctor clean

all: test

setup:
	@scripts/bootstrap

run: setup
	$(BIN)/fact-ray run $(MODEL)

discover: setup
	$(BIN)/fact-ray discover $(MODEL)

doctor: setup
	$(BIN)/fact-ray doctor

# Two pytest-xdist workers by default: a test that compiles (nvcc is one process) or waits on Ray keeps about one
# core busy, so on the 2-core CI machine one worker leaves the other core idle most of the time. --dist loadfile
# keeps each file on one worker, so a module's fixtures (a compiled library, a Ray cluster) are set up once;
# --no-loadscope-reorder deals the files in collection order, which tests/conftest.py makes slow files first
# (xdist's default order, most tests first, dealt the few-test files that compile sm90a kernels last).
# TEST_JOBS=0 runs in this one process. --durations lists where the time went.
TEST_JOBS ?= 2

test: setup
	$(BIN)/pytest -q -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder --durations=15 tests

test-gpu: setup
	$(BIN)/pytest -q -m gpu tests

clean:
	rm -rf .fact-ray build *.egg-info
