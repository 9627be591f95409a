# `make demo` and `make test` set everything up on a fresh machine: they create .venv,
# install the project into it (editable, with the dev extra), then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The torch build to install first; override for another CUDA/CPU build, e.g.
#   make demo TORCH_SPEC="torch torchvision --index-url https://download.pytorch.org/whl/cu124"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: demo test venv clean-demo

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: venv
	$(BIN)/python -m contrastive.demo --out $(DEMO_DIR)

test: venv
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean-demo:
	rm -rf $(DEMO_DIR)
