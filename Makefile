# The two commands: `make demo` (the main job) and `make test` (the whole suite).
# Both install what is missing first (Debian packages, the venv, prepared models).

VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast lint bench clean install

setup:
	@scripts/setup.sh

demo: setup
	$(PY) -m edgectl.demo

test: setup lint
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check edge edgectl keys workers
	$(VENV)/bin/mypy

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/pip install -q -c requirements/constraints.txt -e ".[prepare,test,bench]"
	@# optimum-intel and open-clip pull a torchvision that cannot load beside the CPU torch
	@# (transformers' AutoImageProcessor, and so diffusers, then fail): nothing here needs it
	-@$(VENV)/bin/pip uninstall -q -y torchvision 2>/dev/null
	@for b in bench/[a-z]*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf var .pytest_cache

distclean: clean
	rm -rf $(VENV)
