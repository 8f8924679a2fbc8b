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

test: setup
	$(BIN)/pytest -q tests

test-gpu: setup
	$(BIN)/pytest -q -m gpu tests

clean:
	rm -rf .fact-ray build *.egg-info
