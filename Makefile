# The README's two commands: `make bench` (the main job) and `make test` (the whole suite).
VENV ?= .venv
PY := $(VENV)/bin/python
JOBS ?= 2

.PHONY: setup test bench info

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV)

test: setup
	$(PY) -m pytest -n $(JOBS) -q tests

bench: setup
	$(PY) -m dlkernels bench

info: setup
	$(PY) -m dlkernels info
