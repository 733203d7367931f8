# The README's two commands: `make bench` (the main job) and `make test` (the whole suite).
VENV ?= .venv
PY := $(VENV)/bin/python
JOBS ?= 2
# pytest-xdist where installed (the CPU setup installs it; a GPU machine's preinstalled Python may lack it).
XDIST = $(shell $(PY) -c "import xdist" 2>/dev/null && echo "-n $(JOBS)")

.PHONY: setup test bench info

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV)

# CPU tests through Triton's interpreter; on a CUDA machine also the GPU tests, in a run of their own.
test: setup
	$(PY) -m pytest $(XDIST) -q tests
	@if $(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
		$(PY) -m pytest -q -m gpu tests; fi

bench: setup
	$(PY) -m dlkernels bench

info: setup
	$(PY) -m dlkernels info
