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

# CIFAR-10 recipe (issue 8): unpack ../shared/data/cifar10 to CIFAR_WORK, hold out configs/cifar10_val.txt,
# shard both parts (captions from the CIFAR templates), train, zero-shot the held-out split, render the report.
# `make cifar10-tiny` runs the same steps on 50 training images per class with the tiny twin config.
CIFAR_TAR ?= ../shared/data/cifar10/cifar10-train.tar.gz
CIFAR_WORK ?= /tmp/contrastive-cifar10
# Where the tar is unpacked (shared by cifar10 and cifar10-tiny).
CIFAR_UNPACK ?= /tmp/contrastive-cifar10
CIFAR_CONFIG ?= configs/cifar10.yaml
CIFAR_RUN ?= runs/cifar10
CIFAR_TRAIN_PER_CLASS ?= 0
CIFAR_OVERRIDES ?=

.PHONY: cifar10 cifar10-tiny openclip-venv

cifar10: venv
	$(BIN)/python -m data_prep.cifar10 split --tar $(CIFAR_TAR) --out $(CIFAR_WORK) --unpack-to $(CIFAR_UNPACK) \
	  --train-per-class $(CIFAR_TRAIN_PER_CLASS)
	for part in train val; do \
	  test $(CIFAR_WORK)/shards/$$part/sizes.json -nt $(CIFAR_WORK)/split/.split && continue; \
	  rm -rf $(CIFAR_WORK)/shards/$$part; \
	  $(BIN)/contrastive prep imagefolder $(CIFAR_WORK)/split/$$part $(CIFAR_WORK)/shards --split $$part \
	    --templates eval/templates/cifar.txt --image-size 32 --resize-mode no --samples-per-shard 1000 --no-dedup \
	    || exit 1; \
	done
	$(BIN)/contrastive train --config $(CIFAR_CONFIG) --out $(CIFAR_RUN) \
	  data.train=$$($(BIN)/python -m data_prep.cifar10 spec $(CIFAR_WORK)/shards/train) $(CIFAR_OVERRIDES)
	$(BIN)/contrastive zeroshot --model $(CIFAR_RUN) --templates cifar --output $(CIFAR_RUN)/zeroshot_cifar10_val.json \
	  --data $$($(BIN)/python -m data_prep.cifar10 spec $(CIFAR_WORK)/shards/val)
	$(BIN)/contrastive report $(CIFAR_RUN)

cifar10-tiny: CIFAR_CONFIG = configs/cifar10_tiny.yaml
cifar10-tiny: CIFAR_WORK = /tmp/contrastive-cifar10-tiny
cifar10-tiny: CIFAR_RUN = runs/cifar10_tiny
cifar10-tiny: CIFAR_TRAIN_PER_CLASS = 50
cifar10-tiny: cifar10

# The open_clip baseline's own environment (bench/quality_vs_open_clip.py creates it on first use too).
openclip-venv: venv
	$(BIN)/python bench/openclip_env.py
